"""Exec in a running container: `runc exec` in the foreground, as CRI-O runs it.

The process is the bundle's own (env, user, capabilities, ...) with other args, in a spec
file of its own beside a pid file; both go when the exec ends, whatever ends it. A caller
that gives up has the process killed by its pid file (a SIGKILL is the one signal runc
cannot forward) and runc reaped, each wait bounded.

- exec-sync (`POST /v1/containers/{id}/exec`) keeps the output and answers once.
- a streaming exec (streams.py) gets pipes, or, with a TTY, a pty as runc's stdio.

In the foreground runc copies between its stdio and the process's own: pipes it makes
(and gives the process's user, who may reopen /dev/stdin) or, with a TTY, the console it
makes in the container, which gets each resize of our pty (runc leads the pty's session:
the SIGWINCH is its). So runc alone holds our ends: its exit is the end of the output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import termios
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from tty import setraw
from typing import Any

from . import log
from .errors import ApiError, conflict, invalid
from .records import RUNNING, ContainerRecord
from .runtime import ContainerPaths, Runtime, die_with_parent, read_pidfile

_log = log.get("execs")
# Exec-sync output kept per stream: both, with the reply's framing, fit the kubelet's
# 16 MiB gRPC message. The rest is read and dropped, so a chatty command neither blocks
# on a full pipe nor swells the agent.
EXEC_OUTPUT_MAX = 8 * 1024 * 1024 - 4096
KILL_WAIT = 10.0  # bound on runc's exit once its process was killed
READ_LIMIT = 32 * 1024  # a streaming exec's output buffered in the agent, per stream


@dataclass(frozen=True)
class ExecFiles:
    spec: Path
    pidfile: Path

    def argv(self, runtime: Runtime, cid: str) -> list[str]:
        return [runtime.cfg.runtime_path, *runtime.root_args(), "exec",
                "--process", str(self.spec), "--pid-file", str(self.pidfile), cid]


@contextlib.contextmanager
def exec_files(paths: ContainerPaths, cmd: list[str], *, terminal: bool,
               size: tuple[int, int] | None = None) -> Iterator[ExecFiles]:
    process = json.loads((paths.bundle / "config.json").read_text())["process"]
    process["args"] = cmd
    process["terminal"] = terminal
    process.pop("consoleSize", None)
    if terminal and size:  # runc sizes the console before the process starts
        process["consoleSize"] = {"width": size[0], "height": size[1]}
    if terminal and not any(e.startswith("TERM=") for e in process.get("env") or []):
        process["env"] = [*(process.get("env") or []), "TERM=xterm"]  # as containerd's exec with a TTY
    tag = uuid.uuid4().hex[:12]
    files = ExecFiles(paths.dir / f"exec-{tag}.json", paths.dir / f"exec-{tag}.pid")
    try:
        files.spec.write_text(json.dumps(process))
        yield files
    finally:
        for f in (files.spec, files.pidfile):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


async def kill(proc: asyncio.subprocess.Process, pidfile: Path, wait: float = KILL_WAIT) -> int:
    """SIGKILL the exec'd process and reap runc (killed too if it hangs on); the pid, 0 if
    runc ended before it wrote one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    pid = 0
    while proc.returncode is None and loop.time() < deadline:
        pid = read_pidfile(pidfile)
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        with contextlib.suppress(TimeoutError):  # runc writes the file once the process runs
            await asyncio.wait_for(proc.wait(), 0.02)
    try:
        await asyncio.wait_for(proc.wait(), max(deadline - loop.time(), 0.1))
    except TimeoutError:
        proc.kill()
        await proc.wait()
    return pid


# --- exec-sync ------------------------------------------------------------------------------

async def exec_sync(runtime: Runtime, paths: ContainerPaths, rec: ContainerRecord,
                    body: dict[str, Any]) -> dict[str, Any]:
    cmd = body.get("cmd")
    timeout = body.get("timeout", 0)
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise invalid("'cmd' must be a non-empty list of strings")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise invalid("'timeout' must be a number of seconds >= 0 (0 = none)")
    if rec.state != RUNNING:
        raise conflict(f"container {rec.id} is {rec.state}, not running")
    with exec_files(paths, cmd, terminal=False) as files:
        proc = await asyncio.create_subprocess_exec(
            *files.argv(runtime, rec.id), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
        assert proc.stdout is not None and proc.stderr is not None  # both are PIPEs
        try:
            out, err, _ = await asyncio.wait_for(asyncio.gather(
                _read_capped(proc.stdout), _read_capped(proc.stderr), proc.wait()), timeout or None)
        except TimeoutError:
            pid = await kill(proc, files.pidfile)
            _log.info("exec_timeout", id=rec.id, pid=pid)
            raise ApiError("timeout", f"exec did not finish within {timeout}s; process {pid} was killed") from None
    return {
        "exit_code": proc.returncode,
        "stdout": base64.b64encode(out).decode(),
        "stderr": base64.b64encode(err).decode(),
    }


async def _read_capped(stream: asyncio.StreamReader, limit: int = EXEC_OUTPUT_MAX) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept)


# --- streaming exec -------------------------------------------------------------------------

@dataclass
class StreamExec:
    """A running `runc exec` whose stdio the caller relays."""

    proc: asyncio.subprocess.Process
    # "stdout" and "stderr" as asked for; with a TTY, "stdout" is the pty (both, and the
    # process's echo): it is always there, to be read even when nobody wants it.
    outputs: dict[str, asyncio.StreamReader]
    stdin: asyncio.StreamWriter | None
    master: int | None = None  # the pty's, with a TTY

    async def write(self, data: bytes) -> None:
        """Into the process's stdin, once it has room (dropped once its stdin is gone)."""
        if self.stdin is None:
            return
        try:
            self.stdin.write(data)
            await self.stdin.drain()
        except OSError:  # the process closed its stdin, or ended: its pipe is closed already
            self.stdin = None

    def close_stdin(self) -> None:
        # A terminal has no end of input: with a TTY the process ends on what it reads.
        if self.stdin is not None and self.master is None:
            self.stdin.close()
            self.stdin = None

    def resize(self, width: int, height: int) -> None:
        if self.master is not None:
            _set_size(self.master, width, height)


@contextlib.asynccontextmanager
async def stream_exec(runtime: Runtime, paths: ContainerPaths, cid: str, cmd: list[str], *,
                      tty: bool, stdin: bool, stdout: bool, stderr: bool,
                      size: tuple[int, int] | None = None) -> AsyncIterator[StreamExec]:
    """Run `cmd` in container `cid` with its stdio ours (a terminal of `size`, width and
    height, if known); when the block ends the process is killed if it still runs, and
    every descriptor and file is gone."""
    with exec_files(paths, cmd, terminal=tty, size=size) as files:
        async with contextlib.AsyncExitStack() as stack:
            if tty:
                ex = await _spawn_on_pty(runtime, files, cid, stack, stdin=stdin, size=size)
            else:
                ex = await _spawn_on_pipes(runtime, files, cid, stack, stdin=stdin, stdout=stdout, stderr=stderr)
            try:
                yield ex
            finally:
                if ex.proc.returncode is None:
                    # Our ends of its stdio go first: runc, still copying output into a pipe
                    # nobody reads any more, would never exit.
                    await stack.aclose()
                    pid = await kill(ex.proc, files.pidfile)
                    _log.info("exec_killed", id=cid, pid=pid)


async def _spawn_on_pipes(runtime: Runtime, files: ExecFiles, cid: str, stack: contextlib.AsyncExitStack, *,
                          stdin: bool, stdout: bool, stderr: bool) -> StreamExec:
    fds: dict[str, int] = {}  # the child's ends
    try:
        outputs: dict[str, asyncio.StreamReader] = {}
        for name, wanted in (("stdout", stdout), ("stderr", stderr)):
            if wanted:
                r, fds[name] = os.pipe()
                outputs[name] = await _reader(r, stack)
        writer = None
        if stdin:
            fds["stdin"], w = os.pipe()
            writer = await _writer(w, stack)
        devnull = asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *files.argv(runtime, cid), stdin=fds.get("stdin", devnull), stdout=fds.get("stdout", devnull),
            stderr=fds.get("stderr", devnull), preexec_fn=die_with_parent)
    finally:
        for fd in fds.values():
            os.close(fd)
    return StreamExec(proc, outputs, writer)


async def _spawn_on_pty(runtime: Runtime, files: ExecFiles, cid: str, stack: contextlib.AsyncExitStack, *,
                        stdin: bool, size: tuple[int, int] | None) -> StreamExec:
    master, slave = os.openpty()
    stack.callback(os.close, master)
    try:
        # Raw from the start: the container's console is the terminal (runc makes ours raw
        # too, but only once it runs, and what came before would have its newlines doubled).
        setraw(slave)
        if size:  # what runc copies to the container's console once it has it
            _set_size(master, *size)
        reader = await _reader(os.dup(master), stack, protocol=_PtyProtocol)
        writer = await _writer(os.dup(master), stack) if stdin else None
        proc = await asyncio.create_subprocess_exec(
            *files.argv(runtime, cid), stdin=slave, stdout=slave, stderr=slave, preexec_fn=_on_tty)
    finally:
        os.close(slave)  # runc holds it now: its exit ends the pty's output
    return StreamExec(proc, {"stdout": reader}, writer, master)


def _set_size(master: int, width: int, height: int) -> None:
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _on_tty() -> None:
    """preexec_fn: runc leads a session with the pty as its controlling terminal, so that a
    resize of the pty signals it."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    die_with_parent()


class _PtyProtocol(asyncio.StreamReaderProtocol):
    def connection_lost(self, exc: Exception | None) -> None:
        # Reading a pty whose other side has closed fails with EIO: that is its end of file,
        # and what was read before it must still be readable.
        super().connection_lost(None if isinstance(exc, OSError) and exc.errno == errno.EIO else exc)


async def _reader(fd: int, stack: contextlib.AsyncExitStack,
                  protocol: type[asyncio.StreamReaderProtocol] = asyncio.StreamReaderProtocol) -> asyncio.StreamReader:
    """A reader of `fd` that stops reading while READ_LIMIT bytes wait to be taken."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    transport, _ = await loop.connect_read_pipe(lambda: protocol(reader), os.fdopen(fd, "rb", buffering=0))
    stack.callback(transport.close)
    return reader


async def _writer(fd: int, stack: contextlib.AsyncExitStack) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", buffering=0))

    def abort() -> None:  # the exec is over: nothing left is worth writing
        if not transport.is_closing():
            transport.abort()
    stack.callback(abort)
    return asyncio.StreamWriter(transport, proto, None, loop)
