"""Exec and attach sessions: the client's side over SPDY (`v4.channel.k8s.io` down to
`channel.k8s.io`) or WebSocket (`v5`, `v4`, their base64 variants, `channel.k8s.io`),
relayed to the cell's agent (relay.py). The wire facts: ../shared/reference/streaming.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from kiyot_py.errors import KiyotError
from kiyot_py.streaming import spdy
from kiyot_py.streaming.http import HttpConnection, RequestHead
from kiyot_py.streaming.relay import (
    RESIZE,
    STATUS,
    STDERR,
    STDIN,
    STDOUT,
    AgentStream,
    Outcome,
    relay_command,
)
from kiyot_py.streaming.websocket import WebSocket

SPDY_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
WEBSOCKET_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                       "base64.channel.k8s.io", "channel.k8s.io", ""]
STREAM_WAIT = 30.0  # seconds a client has to open every stream it asked for
CLOSE_GRACE = 5.0  # seconds a finished session waits for the client to hang up
MAX_RESIZE_LINE = 4096
CLOSE_CHANNEL = 255  # v5: a client message [255, channel] closes that channel

OpenAgent = Callable[[], AbstractAsyncContextManager[AgentStream]]


def parse_resize(line: bytes) -> tuple[int, int] | None:
    """(width, height) of one resize message, None for a malformed one or a 0 size."""
    try:
        size = json.loads(line)
        width, height = int(size["Width"]), int(size["Height"])
    except (ValueError, KeyError, TypeError):
        return None
    return (width, height) if width > 0 and height > 0 else None


async def run_session(client: SpdyCommandClient | WebSocketCommandClient, open_agent: OpenAgent,
                      *, stdin: bool, tty: bool) -> None:
    try:
        async with open_agent() as agent:
            outcome = await relay_command(client, agent, stdin=stdin, tty=tty)
    except KiyotError as exc:
        outcome = Outcome(error=str(exc))
    await client.finish(outcome)


# -- SPDY -----------------------------------------------------------------------------

class SpdyCommandClient:
    def __init__(self, session: spdy.Session, version: str, streams: dict[str, spdy.Stream]) -> None:
        self._session = session
        self._version = version
        self._streams = streams
        self._resize_buffer = b""
        self.gone = asyncio.Event()

    async def read_stdin(self) -> bytes:
        return await self._streams["stdin"].read()

    async def next_resize(self) -> tuple[int, int] | None:
        stream = self._streams.get("resize")
        if stream is None:
            return None
        while True:
            line, newline, rest = self._resize_buffer.partition(b"\n")
            if newline:
                self._resize_buffer = rest
                size = parse_resize(line)
                if size is not None:
                    return size
                continue
            if len(self._resize_buffer) > MAX_RESIZE_LINE:
                return None
            chunk = await stream.read()
            if not chunk:
                return parse_resize(self._resize_buffer) if self._resize_buffer else None
            self._resize_buffer += chunk

    async def write(self, channel: int, data: bytes) -> None:
        await self._streams["stdout" if channel == STDOUT else "stderr"].write(data)

    async def finish(self, outcome: Outcome) -> None:
        try:
            for name in ("stdout", "stderr"):
                if name in self._streams:
                    await self._streams[name].close_write()
            report = outcome.v4_status() if self._version == "v4.channel.k8s.io" else outcome.text()
            error = self._streams["error"]
            if report:
                await error.write(report)
            await error.close_write()
        except (ConnectionError, spdy.SpdyError):
            pass


def expected_streams(version: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> set[str]:
    wanted = {"error"}
    wanted |= {name for name, on in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)) if on}
    if tty and version in ("v3.channel.k8s.io", "v4.channel.k8s.io"):
        wanted.add("resize")
    return wanted


async def accept_streams(session: spdy.Session, wanted: set[str]) -> dict[str, spdy.Stream] | None:
    """The streams the client opens, by type; None when it does not open them all in time."""
    streams: dict[str, spdy.Stream] = {}
    try:
        async with asyncio.timeout(STREAM_WAIT):
            while not wanted <= streams.keys():
                stream = await session.accept()
                if stream is None:
                    return None
                kind = stream.headers.get("streamtype", "")
                if kind in wanted and kind not in streams:
                    streams[kind] = stream
                else:
                    await stream.reset(spdy.RST_REFUSED_STREAM)
    except TimeoutError:
        return None
    return streams


async def serve_spdy(conn: HttpConnection, head: RequestHead, open_agent: OpenAgent, *,
                     stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    version = await negotiate_spdy(conn, head, SPDY_PROTOCOLS)
    if version is None:
        return
    session = spdy.Session(conn.reader, writer_of(conn), server=True)
    running = asyncio.create_task(session.run())
    try:
        streams = await accept_streams(session, expected_streams(version, stdin=stdin, stdout=stdout,
                                                                 stderr=stderr, tty=tty))
        if streams is None:
            return
        client = SpdyCommandClient(session, version, streams)
        running.add_done_callback(lambda _: client.gone.set())
        await run_session(client, open_agent, stdin=stdin, tty=tty)
        # Every stream of ours is finished; the client hangs up once it has read them all
        # (a reset now could overtake what it has not read yet).
        await asyncio.wait({running}, timeout=CLOSE_GRACE)
    finally:
        await session.close()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def negotiate_spdy(conn: HttpConnection, head: RequestHead, supported: list[str]) -> str | None:
    """Answer the SPDY upgrade with the first of the client's protocols that is supported;
    None (after a 400 or 403) when there is none."""
    if not head.has_token("connection", "upgrade") or not head.has_token("upgrade", "spdy/3.1"):
        await conn.answer(400, "expected an upgrade to SPDY/3.1 or websocket")
        return None
    offered = head.values("x-stream-protocol-version")
    if not offered:
        await conn.answer(400, "X-Stream-Protocol-Version is required")
        return None
    chosen = next((p for p in offered if p in supported), None)
    if chosen is None:
        await conn.answer(403, f"none of the protocols {offered} is supported; supported: {', '.join(supported)}",
                          [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
        return None
    await conn.switch([("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", chosen)])
    return chosen


def writer_of(conn: HttpConnection) -> Callable[[bytes], Awaitable[None]]:
    async def write(data: bytes) -> None:
        conn.writer.write(data)
        await conn.writer.drain()
    return write


# -- WebSocket ------------------------------------------------------------------------

class WebSocketCommandClient:
    def __init__(self, ws: WebSocket, protocol: str) -> None:
        self._ws = ws
        self._v5 = protocol.startswith("v5.")
        self._status_json = protocol.startswith(("v4.", "v5."))
        # One message of stdin at a time: the client's socket is read no faster than the
        # cell takes its stdin.
        self._stdin: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._resizes: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=16)
        self._reader: asyncio.Task[None] | None = None
        self.gone = asyncio.Event()

    async def start(self, first_channel: int) -> None:
        await self._ws.send_channel(first_channel, b"")  # the client learns the session is up
        self._reader = asyncio.create_task(self._read_client())

    async def _read_client(self) -> None:
        stdin_open = True
        try:
            while (message := await self._ws.receive_channel()) is not None:
                channel, payload = message
                if channel == STDIN and stdin_open and payload:
                    await self._stdin.put(payload)
                elif channel == RESIZE:
                    size = parse_resize(payload)
                    if size is not None and not self._resizes.full():
                        self._resizes.put_nowait(size)
                elif self._v5 and channel == CLOSE_CHANNEL and payload[:1] == bytes([STDIN]) and stdin_open:
                    stdin_open = False
                    await self._stdin.put(b"")
        finally:
            self.gone.set()
            if stdin_open:
                with_room(self._stdin, b"")
            with_room(self._resizes, None)

    async def read_stdin(self) -> bytes:
        return await self._stdin.get()

    async def next_resize(self) -> tuple[int, int] | None:
        return await self._resizes.get()

    async def write(self, channel: int, data: bytes) -> None:
        await self._ws.send_channel(channel, data)

    async def finish(self, outcome: Outcome) -> None:
        report = outcome.v4_status() if self._status_json else outcome.text()
        try:
            if report:
                await self._ws.send_channel(STATUS, report)
        except ConnectionError:
            pass
        await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def with_room(queue: asyncio.Queue, item: object) -> None:
    """Put `item` (an end marker) even into a full queue: the oldest entry makes room."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


async def serve_websocket(conn: HttpConnection, head: RequestHead, open_agent: OpenAgent, *,
                          stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    ws = WebSocket(conn)
    protocol = await ws.handshake(head, WEBSOCKET_PROTOCOLS)
    if protocol is None:
        return
    client = WebSocketCommandClient(ws, protocol)
    await client.start(STDOUT if stdout else STDERR if stderr else STATUS)
    await run_session(client, open_agent, stdin=stdin, tty=tty)
