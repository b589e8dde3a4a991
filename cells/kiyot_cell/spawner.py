"""The spawner: local cells' agents forked from one interpreter that has done the imports.

Started by exec, a cell's agent spends about 0.4 s of CPU on its imports (aiohttp, ssl,
the server) before it answers, and holds them in memory of its own: that was most of a
local pod's start and of its memory. The spawner imports them once; each cell's pid 1
is a fork of it, sharing those pages with every other cell (copy-on-write; `gc.freeze`
keeps the collector from touching, hence copying, them).

It holds nothing of the node's: it is a fresh interpreter (no key, no token, no gRPC
thread), so a fork leaks nothing into a cell. It serves only the node, on its stdin (one
end of a socket pair, no path anyone else could connect to): a JSON line
`{"argv": [<kiyot_cell.cli supervise arguments>], "netns": <path>, "log": <path>}` per
request, the answer `{"pid": <the cell's pid 1, as the node sees it>}` or `{"error": <why>}`.

What a cell gets is what `nsenter --net=<netns> unshare --ipc --pid --mount-proc
--propagation slave` gave it: the pod's network namespace, and IPC, PID and mount
namespaces of its own, its own /proc; a session of its own, no child of the node. Its
command line reads as `python -m kiyot_cell.cli supervise ...`, by which the node finds
a cell's processes, forked or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from pathlib import Path

from . import log
from .runtime import die_with_parent, libc

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE, MS_SLAVE = 2, 4, 8, 0x4000, 1 << 18, 1 << 19
PR_SET_MM, PR_SET_MM_MAP = 35, 14
REQUEST_LIMIT = 64 * 1024  # a request is a command line: far smaller


class SpawnError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SpawnError(f"{what}: {os.strerror(err)}")


class _MmMap(ctypes.Structure):
    """struct prctl_mm_map (linux/prctl.h)."""
    _fields_ = [
        ("start_code", ctypes.c_uint64), ("end_code", ctypes.c_uint64), ("start_data", ctypes.c_uint64),
        ("end_data", ctypes.c_uint64), ("start_brk", ctypes.c_uint64), ("brk", ctypes.c_uint64),
        ("start_stack", ctypes.c_uint64), ("arg_start", ctypes.c_uint64), ("arg_end", ctypes.c_uint64),
        ("env_start", ctypes.c_uint64), ("env_end", ctypes.c_uint64),
        ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32),
    ]


def set_command_line(argv: list[str]) -> ctypes.Array:
    """Make /proc/self/cmdline read `argv` (NUL-separated, as exec would have left it).

    prctl(PR_SET_MM_MAP) points the kernel at a buffer of ours, every other field of the
    memory map as it is (from /proc/self/stat; the break from sbrk). It is how CRIU
    restores a process, and needs no capability. The buffer is returned: it must live
    as long as the process."""
    data = b"".join(a.encode() + b"\0" for a in argv)
    buffer = ctypes.create_string_buffer(data, len(data))
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()

    def stat(number: int) -> int:  # proc(5) numbers the fields from 1; the split starts at 3
        return int(fields[number - 3])

    c = libc()
    c.sbrk.restype = ctypes.c_void_p
    mm = _MmMap(start_code=stat(26), end_code=stat(27), start_data=stat(45), end_data=stat(46),
                start_brk=stat(47), brk=c.sbrk(0) or 0, start_stack=stat(28),
                arg_start=ctypes.addressof(buffer), arg_end=ctypes.addressof(buffer) + len(data),
                env_start=stat(50), env_end=stat(51), auxv=None, auxv_size=0, exe_fd=0xFFFFFFFF)
    _check(c.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0), "prctl(PR_SET_MM_MAP)")
    return buffer


def _enter_namespaces(netns: str) -> None:
    """In the forked child: the cell's network namespace, new IPC, PID (for its next
    child) and mount namespaces, mounts that stay in the cell (the node's still reach it)."""
    c = libc()
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(c.setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)
    _check(c.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
    _check(c.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")


def _become_cell_init(request: dict, keep: list) -> int:
    """In the cell's pid 1: its own /proc, a session, the agent's log, then supervise."""
    from . import cli

    c = libc()
    _check(c.mount(b"none", b"/proc", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /proc")
    _check(c.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount proc")
    os.setsid()
    keep.append(set_command_line([sys.executable, "-m", "kiyot_cell.cli", *request["argv"]]))
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, 1 << 16)  # the spawner's socket and connections are not the cell's
    gc.unfreeze()
    return cli.main(request["argv"])


def _spawn(conn: socket.socket, request: dict) -> None:
    """Fork the cell: a child enters its namespaces and forks its pid 1, sends that pid
    back and exits; the pid 1 is no child of the spawner (nor of the node)."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _enter_namespaces(request["netns"])
        init = os.fork()
        if init == 0:
            keep: list = []
            code = 1
            try:
                code = _become_cell_init(request, keep)
            except BaseException:
                log.get("spawner").exception("cell_init_failed")
            os._exit(code)
        conn.sendall(json.dumps({"pid": init}).encode() + b"\n")
        code = 0
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(e) or type(e).__name__}).encode() + b"\n")
    os._exit(code)


def _parse_request(line: bytes) -> dict:
    if len(line) > REQUEST_LIMIT:
        raise SpawnError("request too large")
    request = json.loads(line)
    if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
            and all(isinstance(a, str) for a in request["argv"]) and request["argv"][:1] == ["supervise"]
            and isinstance(request.get("netns"), str) and isinstance(request.get("log"), str)):
        raise SpawnError("a request is {argv: [supervise, ...], netns: path, log: path}")
    return request


def serve() -> int:
    """Serve the node on stdin, its end of a unix socket pair: one JSON line per request,
    one answer line each, in turn. Ends when the node closes its end, or dies."""
    die_with_parent()  # the node's child: it goes when the node does (its cells stay)
    try:
        conn = socket.socket(fileno=0)
    except OSError:
        sys.exit("kiyot-cell spawner: stdin must be a unix socket (the node starts the spawner)")
    from . import server  # noqa: F401  (the imports every cell shares)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    requests = conn.makefile("rb")
    gc.freeze()  # what is imported now stays shared with every cell
    conn.sendall(json.dumps({"ready": os.getpid()}).encode() + b"\n")
    while line := requests.readline(REQUEST_LIMIT + 1):
        try:
            request = _parse_request(line)
        except (SpawnError, ValueError) as e:
            conn.sendall(json.dumps({"error": f"bad request: {e}"}).encode() + b"\n")
            continue
        _spawn(conn, request)
    return 0
