"""Exec, attach and port-forward over a WebSocket (API.md "Streams"): the cell's end of the
node's streaming server.

The socket is upgraded first (auth has run, as on every route) and the request checked
after, so every outcome, a refusal too, comes back one way: binary messages whose first
byte is a channel, and one status on channel 3 before the agent closes. Back-pressure
holds end to end: the next chunk is read from a process, container or target only once the
last one was sent (a send drains), and the next message from the node only once the last
one was written and drained. However a session ends, nothing of it stays behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import WSMessage, WSMsgType, web

from . import execs, log
from .containers import ContainerManager
from .errors import ApiError, conflict, invalid
from .records import ContainerRecord
from .runtime import libc

_log = log.get("streams")
STDIN, STDOUT, STDERR, STATUS, RESIZE = 0, 1, 2, 3, 4
CHUNK = 32 * 1024  # the most payload in one message, either way
# A silent dead node is noticed by TCP keepalive (about 30 s), which the node's kernel
# answers whatever its reader does: WebSocket pings would wait behind the data a
# back-pressured reader has not taken yet, and fail a live session.
KEEPALIVE = {socket.TCP_KEEPIDLE: 15, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 3}
CHECK = 1.0  # how often a session looks whether its node is still there
CONNECT_TIMEOUT = 10.0
# A TTY exec waits this long for the node's first message, in case it is the terminal's
# size: the console then has it before the process starts (later, runc passes a resize on,
# but a process may have read its size first).
FIRST_RESIZE_WAIT = 0.25
# conmon reads each stdin packet from the attach socket into a buffer of 32 KiB less one.
ATTACH_PACKET = 8192
MESSAGE_MAX = 4096  # of an error status's text
PORT_RE = re.compile(r"^[0-9]{1,5}$")
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state: the node's FIN, a reset or a failed keepalive end it

Session = Callable[[web.Request, "Stream"], Awaitable[dict[str, Any] | None]]


class Stdio(NamedTuple):
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


class Stream:
    """One upgraded WebSocket, framed in channels."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self._request = request
        self._ws = ws
        self._sock = request.transport.get_extra_info("socket") if request.transport else None
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in KEEPALIVE.items():
                self._sock.setsockopt(socket.IPPROTO_TCP, option, value)
        self._sending = asyncio.Lock()  # one message at a time, whole
        self._held: WSMessage | None = None  # a first message read early, not a resize

    @property
    def gone(self) -> bool:
        """The node closed, or the connection is over. A reader paused by back-pressure
        sees neither: the kernel's state of the connection tells."""
        transport = self._request.transport
        if self._ws.closed or transport is None or transport.is_closing():
            return True
        state = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] if self._sock else TCP_ESTABLISHED
        return state != TCP_ESTABLISHED

    async def send(self, channel: int, data: bytes) -> None:
        """`data` on `channel`, in messages of at most CHUNK; returns once the socket took
        them. An empty `data` is a message of the channel byte alone."""
        async with self._sending:
            for at in range(0, max(len(data), 1), CHUNK):
                await self._ws.send_bytes(bytes([channel]) + data[at:at + CHUNK])

    async def initial_size(self) -> tuple[int, int] | None:
        """The size in a resize the node sends first, if it does soon."""
        try:
            msg = await self._ws.receive(FIRST_RESIZE_WAIT)
        except TimeoutError:
            return None
        if msg.type is WSMsgType.BINARY and msg.data[:1] == bytes([RESIZE]):
            return _size(msg.data[1:])
        self._held = msg
        return None

    async def messages(self) -> AsyncIterator[tuple[int, bytes]]:
        """(channel, payload) of each message from the node, until it closes."""
        while True:
            msg, self._held = self._held or await self._ws.receive(), None
            if msg.type is WSMsgType.BINARY and msg.data:
                yield msg.data[0], msg.data[1:]
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            else:
                raise invalid("every message is binary: a channel byte, then the payload")

    async def finish(self, status: dict[str, Any] | None) -> None:
        if status is not None and not self.gone:
            with contextlib.suppress(ConnectionError):
                await self.send(STATUS, json.dumps(status).encode())
        await self._ws.close()


async def _session(request: web.Request, run: Session) -> web.WebSocketResponse:
    # aiohttp takes only messages shorter than max_msg_size: the channel byte and a CHUNK.
    ws = web.WebSocketResponse(max_msg_size=2 + CHUNK)
    await ws.prepare(request)
    stream = Stream(request, ws)
    status: dict[str, Any] | None
    try:
        status = await run(request, stream)
    except ApiError as e:
        _log.info("stream_refused", path=request.path, code=e.code, message=e.message)
        status = {"error": e.code, "message": e.message[:MESSAGE_MAX]}
    except Exception as e:
        _log.exception("stream_failed", path=request.path)
        status = {"error": "internal", "message": f"{type(e).__name__}: {e}"[:MESSAGE_MAX]}
    await stream.finish(status)
    return ws


async def _until(stream: Stream, inbound: asyncio.Task[None], goal: asyncio.Task[Any]) -> bool:
    """Wait for `goal`: True when it is done, False when the node goes first (its messages
    end, or the connection drops while `inbound` is stuck writing). Failures are raised."""
    while True:
        await asyncio.wait({inbound, goal}, timeout=CHECK, return_when=asyncio.FIRST_COMPLETED)
        if stream.gone:
            return False
        if goal.done():
            goal.result()
            return True
        if inbound.done():
            inbound.result()
            return False


async def _end(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _stdio(query: Mapping[str, str]) -> Stdio:
    flags = []
    for name in Stdio._fields:
        value = query.get(name, "0")
        if value not in ("0", "1"):
            raise invalid(f"'{name}' must be 0 or 1, got {value[:20]!r}")
        flags.append(value == "1")
    stdio = Stdio(*flags)
    if stdio.tty and stdio.stderr:
        raise invalid("a TTY has no stderr of its own: 'tty' and 'stderr' exclude each other")
    if not (stdio.stdin or stdio.stdout or stdio.stderr):
        raise invalid("at least one of 'stdin', 'stdout' and 'stderr' is needed")
    return stdio


def _size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) of a resize message; None for a size with a 0 in it."""
    try:
        size = json.loads(payload)
        width, height = size["width"], size["height"]
    except (ValueError, TypeError, KeyError):
        raise invalid('a resize is {"width": W, "height": H}') from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535 for v in (width, height)):
        raise invalid("a resize's width and height are integers from 0 to 65535")
    return (width, height) if width and height else None


async def _copy_out(reader: asyncio.StreamReader, stream: Stream, channel: int | None) -> None:
    """A process's output to the node; `channel` None reads and drops it (so the process
    never blocks on output nobody asked for)."""
    with contextlib.suppress(ConnectionError):  # the node has gone: the session sees it
        while data := await reader.read(CHUNK):
            if channel is not None:
                await stream.send(channel, data)


class Streams:
    """The three routes' handlers, over the cell's containers."""

    def __init__(self, mgr: ContainerManager) -> None:
        self.mgr = mgr

    async def exec(self, request: web.Request) -> web.WebSocketResponse:
        return await _session(request, self._exec)

    async def attach(self, request: web.Request) -> web.WebSocketResponse:
        return await _session(request, self._attach)

    async def portforward(self, request: web.Request) -> web.WebSocketResponse:
        netns = self.mgr.cfg.netns

        async def forward(request: web.Request, stream: Stream) -> dict[str, Any] | None:
            return await _portforward(request, stream, netns)
        return await _session(request, forward)

    # --- exec -------------------------------------------------------------------------------

    async def _exec(self, request: web.Request, stream: Stream) -> dict[str, Any] | None:
        cmd = request.query.getall("cmd", [])
        stdio = _stdio(request.query)
        if not cmd:
            raise invalid("'cmd' is required, once per argument")
        rec = self.mgr.running(request.match_info["id"])
        size = await stream.initial_size() if stdio.tty else None
        async with execs.stream_exec(self.mgr.runtime, self.mgr.paths(rec.id), rec.id, cmd, size=size,
                                     **stdio._asdict()) as ex:
            wanted = {"stdout": STDOUT if stdio.stdout else None, "stderr": STDERR}
            outs = [asyncio.create_task(_copy_out(r, stream, wanted[name])) for name, r in ex.outputs.items()]
            inbound = asyncio.create_task(_exec_input(stream, ex))
            done = asyncio.create_task(_exited(ex.proc, outs))
            try:
                if not await _until(stream, inbound, done):
                    return None
            finally:
                await _end(inbound, done, *outs)
            rc = done.result()
            _log.info("exec_stream", id=rec.id, exit_code=rc, tty=stdio.tty)
            return {"exit_code": rc if rc >= 0 else 128 - rc}  # runc itself killed by a signal

    # --- attach -----------------------------------------------------------------------------

    async def _attach(self, request: web.Request, stream: Stream) -> dict[str, Any] | None:
        stdio = _stdio(request.query)
        rec = self.mgr.running(request.match_info["id"])
        if stdio.stdin and not rec.stdin:
            raise invalid(f"container {rec.id} was created without stdin: nothing to attach it to")
        paths = self.mgr.paths(rec.id)
        with await _connect_seqpacket(paths.attach) as sock:
            # conmon's packets start with 2 (stdout) or 3 (stderr).
            wanted = {2: STDOUT if stdio.stdout else None, 3: STDERR if stdio.stderr else None}
            outbound = asyncio.create_task(_attach_output(sock, stream, wanted))
            inbound = asyncio.create_task(_attach_input(sock, stream, rec, paths.ctl, stdin=stdio.stdin))
            try:
                # Detaching (the node goes) leaves the container running.
                return {} if await _until(stream, inbound, outbound) else None
            finally:
                await _end(inbound, outbound)


async def _exec_input(stream: Stream, ex: execs.StreamExec) -> None:
    async for channel, payload in stream.messages():
        if channel == STDIN and payload:
            await ex.write(payload)
        elif channel == STDIN:
            ex.close_stdin()
        elif channel == RESIZE and (size := _size(payload)):
            ex.resize(*size)


async def _exited(proc: asyncio.subprocess.Process, outs: list[asyncio.Task[None]]) -> int:
    """runc's exit code, once all the output is sent (runc alone held it: it ends with runc)."""
    rc = await proc.wait()
    await asyncio.gather(*outs)
    return rc


async def _connect_seqpacket(path: Path) -> socket.socket:
    """conmon's attach socket, by a descriptor of its directory: its path is longer than
    a socket address holds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{dfd}/{path.name}"),
                                   CONNECT_TIMEOUT)
        finally:
            os.close(dfd)
    except (OSError, TimeoutError) as e:
        sock.close()
        raise conflict(f"the container's monitor takes no attach: {e}") from None
    return sock


async def _attach_output(sock: socket.socket, stream: Stream, wanted: dict[int, int | None]) -> None:
    """Until conmon closes the socket (the container has exited)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError):  # the node has gone (the session sees it), or conmon has
        while packet := await loop.sock_recv(sock, CHUNK):
            channel = wanted.get(packet[0])
            if channel is not None:
                await stream.send(channel, packet[1:])


async def _attach_input(sock: socket.socket, stream: Stream, rec: ContainerRecord, ctl: Path, *,
                        stdin: bool) -> None:
    loop = asyncio.get_running_loop()
    async for channel, payload in stream.messages():
        if channel == STDIN and stdin:
            try:
                for at in range(0, len(payload), ATTACH_PACKET):
                    await loop.sock_sendall(sock, payload[at:at + ATTACH_PACKET])
                if not payload:
                    sock.shutdown(socket.SHUT_WR)  # conmon closes the container's stdin, unless left open
                    stdin = False
            except OSError:  # conmon is done with this attach: the container is exiting
                stdin = False
        elif channel == RESIZE and rec.tty and (size := _size(payload)):
            _resize_console(ctl, *size)


def _resize_console(ctl: Path, width: int, height: int) -> None:
    """conmon resizes a container's console on `1 HEIGHT WIDTH` in its ctl fifo (a line
    under PIPE_BUF: written whole, even beside a log cut's `2 0 0`)."""
    try:
        fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no conmon reading it: the container is gone
        return
    try:
        os.write(fd, f"1 {height} {width}\n".encode())
    except BlockingIOError:
        pass  # conmon is behind: a later resize will do
    finally:
        os.close(fd)


# --- port-forward ---------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000  # os.setns and os.CLONE_NEWNET come with Python 3.12


def _socket_in(netns: str) -> socket.socket:
    """A TCP socket of the network namespace at `netns`. A socket stays in the namespace it
    was made in, so a thread of its own enters it, makes the socket and ends: no thread of
    the agent ever moves."""
    made: list[socket.socket | OSError] = []

    def make() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc().setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except OSError as e:
            made.append(e)

    thread = threading.Thread(target=make, name="netns-socket")
    thread.start()
    thread.join()
    if isinstance(made[0], OSError):
        raise made[0]
    return made[0]


async def _connect(port: int, netns: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if netns is None:
        return await asyncio.open_connection("127.0.0.1", port, limit=CHUNK)
    sock = await asyncio.to_thread(_socket_in, netns)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=CHUNK)


async def _portforward(request: web.Request, stream: Stream, netns: str | None) -> dict[str, Any] | None:
    port = request.query.get("port", "")
    if not PORT_RE.match(port) or not 1 <= int(port) <= 65535:
        raise invalid(f"'port' must be a number from 1 to 65535, got {port[:20]!r}")
    # The pod's own loopback, as a kubelet's port-forward reaches the pod's localhost: in
    # the pod's network namespace when it is not the agent's (EC2 cells keep the agent
    # apart from the pod).
    target = f"127.0.0.1:{port}"
    try:
        reader, writer = await asyncio.wait_for(_connect(int(port), netns), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise ApiError("unreachable", f"{target} in the pod: {e or 'no answer'}") from None
    eof = asyncio.Event()  # the node's half-close, passed on
    outbound = asyncio.create_task(_target_output(reader, stream, target))
    inbound = asyncio.create_task(_target_input(writer, stream, eof, target))
    both = asyncio.create_task(_both(outbound, eof, writer, target))
    try:
        return {} if await _until(stream, inbound, both) else None
    finally:
        await _end(inbound, outbound, both)
        writer.transport.abort()  # closed already, unless the session was cut short


async def _both(outbound: asyncio.Task[None], eof: asyncio.Event, writer: asyncio.StreamWriter, target: str) -> None:
    """Until both halves are closed: all the target said was sent, and all the node said
    was written to the target."""
    await outbound
    await eof.wait()
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise ApiError("unreachable", f"{target} took not all the node sent: {e or 'it stopped reading'}") from None


async def _target_output(reader: asyncio.StreamReader, stream: Stream, target: str) -> None:
    while True:
        try:
            data = await reader.read(CHUNK)
        except OSError as e:
            raise ApiError("unreachable", f"{target}: {e}") from None
        await stream.send(STDOUT, data)  # empty: the target's half-close
        if not data:
            return


async def _target_input(writer: asyncio.StreamWriter, stream: Stream, eof: asyncio.Event, target: str) -> None:
    async for channel, payload in stream.messages():
        if channel != STDIN or eof.is_set():
            continue
        try:
            if payload:
                writer.write(payload)
                await writer.drain()
            else:
                writer.write_eof()
                eof.set()
        except OSError as e:
            raise ApiError("unreachable", f"{target}: {e}") from None
