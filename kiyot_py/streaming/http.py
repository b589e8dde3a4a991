"""One client connection's HTTP/1.1 request head (h11), the plain answers, and the 101.

The streaming server reads one request per connection: after a `101 Switching Protocols`
the raw connection belongs to SPDY or WebSocket, which aiohttp's server cannot hand over.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import h11

HEAD_TIMEOUT = 10.0  # seconds a client has to send its request head
MAX_HEAD = 64 * 1024


@dataclass
class RequestHead:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # names lowercase, in the client's order

    def values(self, name: str) -> list[str]:
        """Every value of header `name`, repeated headers and comma-separated lists alike."""
        found = []
        for key, value in self.headers:
            if key == name:
                found += [v.strip() for v in value.split(",") if v.strip()]
        return found

    def has_token(self, name: str, token: str) -> bool:
        return token.lower() in (v.lower() for v in self.values(name))


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def read_head(self) -> RequestHead | None:
        """The request head, or None when the client sent none (or garbage: answered 400).

        Only the head is read from the connection: what follows it (a new protocol's first
        frames) stays in the reader for that protocol."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                data = await self.reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
        except asyncio.LimitOverrunError:
            await self.answer(431, f"the request head is over {MAX_HEAD} bytes")
            return None
        try:
            self._h11.receive_data(data)
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            await self.answer(exc.error_status_hint, f"bad request: {exc}")
            return None
        if not isinstance(event, h11.Request):
            await self.answer(400, "bad request")
            return None
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        return RequestHead(event.method.decode("latin-1"), path, query, headers)

    async def answer(self, status: int, text: str, headers: list[tuple[str, str]] | None = None) -> None:
        """A plain-text answer, after which the connection closes."""
        body = (text + "\n").encode()
        try:
            self.writer.write(self._h11.send(h11.Response(status_code=status, headers=[
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                ("Connection", "close"), *(headers or [])])) or b"")
            self.writer.write(self._h11.send(h11.Data(data=body)) or b"")
            self.writer.write(self._h11.send(h11.EndOfMessage()) or b"")
            await self.writer.drain()
        except (h11.LocalProtocolError, ConnectionError):
            pass

    async def switch(self, headers: list[tuple[str, str]]) -> None:
        """Answer 101 Switching Protocols; from here on the connection is the new protocol's."""
        self.writer.write(self._h11.send(h11.InformationalResponse(status_code=101, headers=headers)) or b"")
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
