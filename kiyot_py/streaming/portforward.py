"""Port-forward sessions: SPDY `portforward.k8s.io` (a data and an error stream per
forwarded connection, paired by request id), the same SPDY carried in WebSocket messages
(`SPDY/3.1+portforward.k8s.io`, as crictl's WebSocket transport asks), and the WebSocket
channel layout (`v4.channel.k8s.io`: port i on channels 2i and 2i+1). Each forwarded
connection is one agent stream to the port inside the pod's network.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from kiyot_py.errors import KiyotError
from kiyot_py.streaming import spdy
from kiyot_py.streaming.http import HttpConnection, RequestHead
from kiyot_py.streaming.relay import CLIENT_GONE, AgentStream, Outcome, relay_port
from kiyot_py.streaming.remotecommand import negotiate_spdy, with_room, writer_of
from kiyot_py.streaming.websocket import WebSocket

SPDY_PROTOCOL = "portforward.k8s.io"
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
WEBSOCKET_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io", ""]
PAIR_WAIT = 30.0  # seconds between a connection's first stream and its second

OpenPort = Callable[[int], AbstractAsyncContextManager[AgentStream]]


def parse_port(text: str | None) -> int | None:
    try:
        port = int(text or "")
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


async def forward(open_port: OpenPort, port: int, client: spdy.Stream, errors: spdy.Stream,
                  gone: asyncio.Event) -> None:
    """One forwarded connection: its bytes both ways, and any failure on its error stream."""
    try:
        async with open_port(port) as agent:
            outcome = await relay_port(SpdyByteClient(client), agent, gone)
    except KiyotError as exc:
        outcome = Outcome(error=str(exc))
    try:
        if outcome.error and outcome is not CLIENT_GONE:
            await errors.write(f"error forwarding port {port}: {outcome.error}".encode())
            await client.reset()
        else:
            await client.close_write()
        await errors.close_write()
    except (ConnectionError, spdy.SpdyError):
        pass


class SpdyByteClient:
    def __init__(self, stream: spdy.Stream) -> None:
        self._stream = stream

    async def read(self) -> bytes:
        return await self._stream.read()

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close_write(self) -> None:
        await self._stream.close_write()


def request_id(stream: spdy.Stream, kind: str) -> str:
    """The client's request id; clients before it existed paired a data stream with the
    error stream opened just before it (stream ids rise by 2)."""
    given = stream.headers.get("requestid")
    if given:
        return given
    return str(stream.id if kind == "error" else stream.id - 2)


async def serve_port_session(session: spdy.Session, open_port: OpenPort) -> None:
    """Pair the client's streams into forwarded connections until the session ends."""
    running = asyncio.create_task(session.run())
    gone = asyncio.Event()
    running.add_done_callback(lambda _: gone.set())
    pending: dict[str, dict[str, spdy.Stream]] = {}
    work: set[asyncio.Task[None]] = set()

    async def expire(rid: str) -> None:
        await asyncio.sleep(PAIR_WAIT)
        for stream in pending.pop(rid, {}).values():
            await stream.reset()

    try:
        while (stream := await session.accept()) is not None:
            kind = stream.headers.get("streamtype", "")
            port = parse_port(stream.headers.get("port"))
            if kind not in ("error", "data") or port is None:
                await stream.reset(spdy.RST_REFUSED_STREAM)
                continue
            rid = request_id(stream, kind)
            pair = pending.setdefault(rid, {})
            if kind in pair:
                await stream.reset(spdy.RST_REFUSED_STREAM)
                continue
            pair[kind] = stream
            if len(pair) == 1:
                timer = asyncio.create_task(expire(rid))
                work.add(timer)
                timer.add_done_callback(work.discard)
                continue
            del pending[rid]
            task = asyncio.create_task(forward(open_port, port, pair["data"], pair["error"], gone))
            work.add(task)
            task.add_done_callback(work.discard)
    finally:
        for task in list(work):
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        await session.close()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def serve_spdy(conn: HttpConnection, head: RequestHead, open_port: OpenPort) -> None:
    if await negotiate_spdy(conn, head, [SPDY_PROTOCOL]) is None:
        return
    await serve_port_session(spdy.Session(conn.reader, writer_of(conn), server=True), open_port)


class MessageReader:
    """SPDY bytes out of WebSocket messages, read only as the session asks for them."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._buffer = bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            message = await self._ws.receive()
            if message is None:
                partial, self._buffer = bytes(self._buffer), bytearray()
                raise asyncio.IncompleteReadError(partial, n)
            if isinstance(message, bytes):
                self._buffer += message
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


async def serve_websocket(conn: HttpConnection, head: RequestHead, open_port: OpenPort,
                          ports: tuple[int, ...]) -> None:
    ws = WebSocket(conn)
    protocol = await ws.handshake(head, [TUNNEL_PROTOCOL, *WEBSOCKET_PROTOCOLS])
    if protocol is None:
        return
    if protocol == TUNNEL_PROTOCOL:
        async def write(data: bytes) -> None:
            await ws.send(data)
        session = spdy.Session(MessageReader(ws), write, server=True)
        await serve_port_session(session, open_port)
        await ws.close()
        return
    if not ports:
        await ws.close(1008, "no ports: name them in the PortForward request or as ?port=")
        return
    await serve_websocket_channels(ws, protocol, open_port, ports)


async def serve_websocket_channels(ws: WebSocket, protocol: str, open_port: OpenPort,
                                   ports: tuple[int, ...]) -> None:
    """Port i's bytes on channel 2i, its errors on 2i+1; each channel first carries its
    port (u16, little-endian). One connection per port, for the WebSocket's life."""
    send = ws.send_channel
    clients = [ChannelByteClient(send, 2 * i) for i in range(len(ports))]
    for i, port in enumerate(ports):
        await send(2 * i, struct.pack("<H", port))
        await send(2 * i + 1, struct.pack("<H", port))
    gone = asyncio.Event()

    async def read_client() -> None:
        try:
            while (message := await ws.receive_channel()) is not None:
                channel, payload = message
                if channel % 2 == 0 and channel // 2 < len(clients) and payload:
                    await clients[channel // 2].incoming.put(payload)
        finally:
            gone.set()
            for client in clients:
                client.end()

    async def one(i: int, port: int) -> None:
        try:
            async with open_port(port) as agent:
                outcome = await relay_port(clients[i], agent, gone)
        except KiyotError as exc:
            outcome = Outcome(error=str(exc))
        if outcome.error and outcome is not CLIENT_GONE:
            await send(2 * i + 1, f"error forwarding port {port}: {outcome.error}".encode())

    reader = asyncio.create_task(read_client())
    try:
        await asyncio.gather(*(one(i, port) for i, port in enumerate(ports)), return_exceptions=True)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await ws.close()


class ChannelByteClient:
    def __init__(self, send: Callable[[int, bytes], Awaitable[None]], channel: int) -> None:
        self._send = send
        self._channel = channel
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)

    def end(self) -> None:
        with_room(self.incoming, b"")

    async def read(self) -> bytes:
        return await self.incoming.get()

    async def write(self, data: bytes) -> None:
        await self._send(self._channel, data)

    async def close_write(self) -> None:
        """The channel layout has no half-close: the target's end shows when the session ends."""

