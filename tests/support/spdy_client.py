"""A SPDY client made of the project's own SPDY module, as client-go drives a runtime's
streaming server: the upgrade request, then streams by type."""

from __future__ import annotations

import asyncio
import urllib.parse

from kiyot_py.streaming import spdy

WAIT = 10.0


class SpdyClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        self.session = spdy.Session(reader, write, server=False)
        self.running = asyncio.create_task(self.session.run())

    async def close(self) -> None:
        await self.session.close()
        self.running.cancel()
        await asyncio.gather(self.running, return_exceptions=True)
        self.writer.close()


async def upgrade(url: str, protocols: list[str]) -> tuple[int, dict[str, list[str]], SpdyClient | None]:
    """POST the SPDY upgrade as client-go does: the status, headers, and a client session."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: Upgrade",
             "Upgrade: SPDY/3.1", *[f"X-Stream-Protocol-Version: {p}" for p in protocols], "", ""]
    writer.write("\r\n".join(lines).encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).decode()
    status = int(head.split()[1])
    headers: dict[str, list[str]] = {}
    for line in head.split("\r\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    if status != 101:
        writer.close()
        return status, headers, None
    return status, headers, SpdyClient(reader, writer)


async def read_all(stream: spdy.Stream) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(stream.read(), WAIT):
        data += chunk
    return data
