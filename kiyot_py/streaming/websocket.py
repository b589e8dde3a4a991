"""A server-side WebSocket over one asyncio connection (wsproto does the protocol).

Messages, not frames: fragments are put together, pings answered, and a close answered
before `receive` reports the end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from kiyot_py.streaming.http import HttpConnection, RequestHead

MAX_MESSAGE = 4 * 1024 * 1024


class WebSocketError(Exception):
    pass


class WebSocket:
    def __init__(self, conn: HttpConnection) -> None:
        self._conn = conn
        self._ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = asyncio.Lock()
        self._parts: list[bytes | str] = []
        self._size = 0
        self.closed = False
        self._base64 = False  # the channel protocol's base64 variant: text messages

    async def handshake(self, head: RequestHead, choose: list[str]) -> str | None:
        """Accept the client's upgrade with the first of its offered subprotocols that is
        in `choose` ("" when it offered none and "" is in `choose`). None, after a 403
        that names the supported ones, when nothing matches."""
        offered = head.values("sec-websocket-protocol") or [""]
        chosen = next((p for p in offered if p in choose), None)
        if chosen is None:
            await self._conn.answer(403, f"none of the subprotocols {offered} is supported here; "
                                         f"supported: {', '.join(p for p in choose if p)}")
            return None
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers]
        target = head.path + ("?" + head.query if head.query else "")
        try:
            self._ws.initiate_upgrade_connection(headers, target)
            if not any(isinstance(e, Request) for e in self._ws.events()):
                raise RemoteProtocolError("no upgrade request", event_hint=None)
        except RemoteProtocolError as exc:
            await self._conn.answer(400, f"bad WebSocket upgrade: {exc}")
            return None
        await self._write(self._ws.send(AcceptConnection(subprotocol=chosen or None)))
        self._base64 = "base64" in chosen
        return chosen

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            self._conn.writer.write(data)
            await self._conn.writer.drain()

    async def send(self, message: bytes | str) -> None:
        if self.closed:
            raise ConnectionError("the WebSocket is closed")
        try:
            event = BytesMessage(data=message) if isinstance(message, bytes) else TextMessage(data=message)
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            raise ConnectionError(str(exc)) from None
        await self._write(data)

    async def receive(self) -> bytes | str | None:
        """The next whole message; None once the connection is closed (either side)."""
        while True:
            for event in self._ws.events():
                if isinstance(event, (BytesMessage, TextMessage)):
                    self._size += len(event.data)
                    if self._size > MAX_MESSAGE:
                        await self.close(1009, "message too big")
                        return None
                    self._parts.append(bytes(event.data) if isinstance(event, BytesMessage) else event.data)
                    if event.message_finished:
                        parts, self._parts, self._size = self._parts, [], 0
                        if isinstance(event, BytesMessage):
                            return b"".join(p for p in parts if isinstance(p, bytes))
                        return "".join(p for p in parts if isinstance(p, str))
                elif isinstance(event, Ping):
                    await self._write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if not self.closed:
                        self.closed = True
                        with contextlib.suppress(LocalProtocolError, ConnectionError):
                            await self._write(self._ws.send(event.response()))
                    return None
            if self.closed:
                return None
            try:
                data = await self._conn.reader.read(64 * 1024)
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                return None
            try:
                self._ws.receive_data(data)
            except RemoteProtocolError:
                self.closed = True
                return None

    # The channel protocols (k8s.io's remotecommand and port-forward): each message is a
    # channel byte then the payload, or in the base64 variants, text: the channel as a
    # digit, then the payload in base64.

    async def send_channel(self, channel: int, payload: bytes) -> None:
        if self._base64:
            await self.send(chr(ord("0") + channel) + base64.b64encode(payload).decode())
        else:
            await self.send(bytes([channel]) + payload)

    async def receive_channel(self) -> tuple[int, bytes] | None:
        """The next (channel, payload); None once closed. Undecodable messages are skipped."""
        while (message := await self.receive()) is not None:
            if isinstance(message, bytes):
                if message:
                    return message[0], message[1:]
            elif self._base64 and message:
                try:
                    return ord(message[0]) - ord("0"), base64.b64decode(message[1:], validate=True)
                except (binascii.Error, ValueError):
                    continue
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(LocalProtocolError, ConnectionError):
            await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
