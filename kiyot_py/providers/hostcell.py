"""A cell on this host, as local cells and the EC2 simulator's machines are made of it:
the commands that build and end one, its process groups, its cgroups, its mounts."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import threading
from pathlib import Path

from kiyot_py.providers.base import ProviderUnavailable

CLONE_NEWNET = 0x40000000


async def run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise ProviderUnavailable(f"{' '.join(argv)}: {err.decode().strip() or proc.returncode}")
    return out.decode()


def write_netns_sysctls(netns: Path, values: dict[str, str]) -> None:
    """Write sysctls (paths under /proc/sys) of the network namespace `netns`, without a
    process: /proc/sys/net shows the namespace of the thread that opens it, so a thread of
    its own enters the namespace, writes and ends (no thread of ours stays in a cell's)."""
    failure: list[OSError] = []

    def write() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            for key, value in values.items():
                Path("/proc/sys", key).write_text(value)
        except OSError as e:
            failure.append(e)

    thread = threading.Thread(target=write, name="netns-sysctl")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def process_group(pid: int) -> int:
    """The process group of `pid`, or 0 when it is gone already."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return 0


def cgroup_busy(relative: str) -> bool:
    """Whether any process is left in the cgroup `relative` (or below), in any hierarchy."""
    for hierarchy in Path("/sys/fs/cgroup").glob("*"):
        path = hierarchy / relative
        if path.is_dir():
            for procs in path.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    if procs.read_text().strip():
                        return True
    return False


def remove_cgroups(relative: str) -> None:
    root = Path("/sys/fs/cgroup")
    for hierarchy in root.iterdir() if root.exists() else []:
        path = hierarchy / relative
        if path.is_dir():
            # Children first; a cgroup directory is removed with rmdir, never rm -r.
            for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                path.rmdir()


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # Field 5 is the mount point; space, tab, newline and backslash come octal-escaped.
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4]).decode()
            if (point + "/").startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def cell_agent_processes() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every cell agent process on this host (`kiyot_cell.cli` in its command
    line): one pass over /proc. Callers pick theirs by an argument of the command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kiyot_cell.cli" in args:
            found.append((int(entry.name), args))
    return found
