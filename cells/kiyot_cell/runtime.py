"""conmon and the OCI runtime (runc) as the agent drives them.

Facts from DESIGN.md that this module honours: conmon needs `--api-version 1` and a
pipe's write end in `_OCI_SYNCPIPE` (its JSON lines are the only place errors appear:
conmon's stdio goes to /dev/null); the `--persist-dir` and `--socket-dir-path` must exist
first or it fails silently; conmon runs `runc create`, the agent then runs `runc start`.
conmon daemonizes, so it (and the container) outlive the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import re
import signal as _signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AgentConfig
from .errors import ApiError


@dataclass(frozen=True)
class ContainerPaths:
    """Every file of one container, under <state>/containers/<id>/."""

    dir: Path

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def upper(self) -> Path:
        """The overlay's writable layer: everything the container changes in its rootfs."""
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def log(self) -> Path:
        return self.dir / "ctr.log"

    @property
    def log_prev(self) -> Path:
        return self.dir / "ctr.log.1"

    @property
    def ctl(self) -> Path:
        """conmon's control fifo: `2 0 0` makes it reopen the log file, `1 H W` resizes
        the console of a container with a TTY."""
        return self.bundle / "ctl"

    @property
    def attach(self) -> Path:
        """conmon's attach socket (SOCK_SEQPACKET). conmon binds it in the bundle, reached
        through the `<sock_dir>/<id>` symlink it makes; under a state dir both paths may
        be past the 108 bytes a socket address holds, so it is bound and reached by a
        directory's descriptor (`/proc/self/fd/N/attach`)."""
        return self.bundle / "attach"

    @property
    def exit_dir(self) -> Path:
        return self.dir / "exit"

    @property
    def persist_dir(self) -> Path:
        return self.dir / "persist"

    @property
    def conmon_pidfile(self) -> Path:
        return self.dir / "conmon.pid"

    @property
    def pidfile(self) -> Path:
        return self.dir / "container.pid"

    @property
    def sock_dir(self) -> Path:
        return self.dir / "s"


# Real-time signals as Linux/glibc number them (moby's and containerd's table):
# SIGRTMIN is 34 (glibc keeps 32 and 33), SIGRTMAX 64, whatever libc the agent runs on.
SIGRTMIN, SIGRTMAX = 34, 64
_RT_RE = re.compile(r"^SIGRTM(IN|AX)(?:([+-])(\d{1,2}))?$")


def parse_signal(sig: str | int | None, default: str = "SIGTERM") -> int:
    """The number of a signal given by name ("SIGTERM", "TERM", "SIGRTMIN+3", "SIGRTMAX-1")
    or number ("15"). The one place the agent turns signal names into numbers."""
    if sig is None or sig == "":
        sig = default
    if isinstance(sig, bool):
        raise ApiError("invalid", f"bad signal {sig!r}")
    if isinstance(sig, int) or (isinstance(sig, str) and sig.strip().isdigit()):
        n = int(sig)
        if 0 < n <= SIGRTMAX:
            return n
        raise ApiError("invalid", f"bad signal {sig!r}")
    if not isinstance(sig, str):
        raise ApiError("invalid", f"bad signal {sig!r}")
    name = sig.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    rt = _RT_RE.match(name)
    if rt:
        base = SIGRTMIN if rt.group(1) == "IN" else SIGRTMAX
        off = int(rt.group(3) or 0)
        n = base + off if rt.group(2) == "+" else base - off
        if rt.group(2) and ((rt.group(1) == "IN") != (rt.group(2) == "+")):
            n = -1  # SIGRTMIN-n and SIGRTMAX+n name no real-time signal
        if SIGRTMIN <= n <= SIGRTMAX:
            return n
        raise ApiError("invalid", f"unknown signal {sig!r}")
    member = getattr(_signal.Signals, name, None)
    if not isinstance(member, _signal.Signals) or name.startswith("SIGRT"):
        raise ApiError("invalid", f"unknown signal {sig!r}")
    return int(member)


class Runtime:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    def _base(self) -> list[str]:
        return [self.cfg.runtime_path, *self.root_args()]

    def root_args(self) -> list[str]:
        return ["--root", str(self.cfg.runtime_root)] if self.cfg.runtime_root else []

    async def run(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *self._base(), *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"{self.cfg.runtime} {args[0]} timed out"
        return proc.returncode or 0, out.decode(errors="replace").strip()

    async def start(self, cid: str) -> None:
        rc, out = await self.run("start", cid)
        if rc != 0:
            raise ApiError("internal", f"{self.cfg.runtime} start: {out}")

    async def kill(self, cid: str, sig: int) -> tuple[int, str]:
        return await self.run("kill", cid, str(sig))

    async def update(self, cid: str, paths: ContainerPaths, resources: dict[str, Any]) -> None:
        """Change a created or running container's cgroup limits (`runc update --resources`,
        an OCI LinuxResources; what it leaves out stays as it is)."""
        file = paths.dir / "resources.json"
        file.write_text(json.dumps(resources))
        try:
            rc, out = await self.run("update", "--resources", str(file), cid, timeout=30.0)
        finally:
            file.unlink(missing_ok=True)
        if rc == 0:
            return
        # It may have ended a moment ago, before conmon's exit file says so: that is the
        # container's state, not a failure of the update.
        if await self.status(cid) not in ("created", "running"):
            raise ApiError("conflict", f"container {cid} has ended: nothing to update")
        raise ApiError("internal", f"{self.cfg.runtime} update: {out}")

    async def status(self, cid: str) -> str:
        """What the runtime says of a container: created, running, stopped, …; "" if it cannot say."""
        rc, out = await self.run("state", cid)
        try:
            return str(json.loads(out).get("status", "")) if rc == 0 else ""
        except ValueError:
            return ""

    async def delete(self, cid: str) -> tuple[int, str]:
        return await self.run("delete", "--force", cid)

    async def launch(self, cid: str, name: str, paths: ContainerPaths, *, stdin: bool = False,
                     stdin_once: bool = False, tty: bool = False) -> tuple[int, int]:
        """Start conmon (which runs `runc create`); return (container pid, conmon pid).

        `stdin`, `stdin_once` and `tty` are the CRI config's: conmon holds the container's
        stdin (`-i`) for attach, closes it when an attach ends unless told to leave it open,
        and makes the console itself (`-t`; the spec's process.terminal is then true)."""
        for d in (paths.exit_dir, paths.persist_dir, paths.sock_dir):
            d.mkdir(parents=True, exist_ok=True)
        stdio = [*(["--stdin"] if stdin else []), *(["--leave-stdin-open"] if stdin and not stdin_once else []),
                 *(["--terminal"] if tty else [])]
        argv = [
            self.cfg.conmon_path, "--api-version", "1",
            "-c", cid, "-u", cid, "-n", name,
            "-r", self.cfg.runtime_path, *[f"--runtime-arg={a}" for a in self.root_args()],
            "-b", str(paths.bundle), "-p", str(paths.pidfile), "-P", str(paths.conmon_pidfile),
            "-l", f"k8s-file:{paths.log}",
            "--exit-dir", str(paths.exit_dir), "--persist-dir", str(paths.persist_dir),
            "--socket-dir-path", str(paths.sock_dir), *stdio,
            "--log-level", "error",
        ]
        rfd, wfd = os.pipe()
        try:
            env = dict(os.environ, _OCI_SYNCPIPE=str(wfd))
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, pass_fds=(wfd,), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True, cwd=paths.bundle)  # conmon drops files (`oom`) in its cwd
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        os.close(wfd)  # only conmon holds the write end now: EOF means it is done with it
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_sync, rfd), 60.0)
        except TimeoutError:
            line = ""
        finally:
            os.close(rfd)
        await proc.wait()  # the parent conmon exits once the daemon is set up
        try:
            msg = json.loads(line) if line else {}
        except ValueError:
            msg = {"message": line}
        pid = int(msg.get("data", msg.get("pid", -1)) or -1)
        if pid <= 0:
            raise ApiError("internal", f"container create failed: {msg.get('message') or 'conmon gave no pid'}")
        conmon_pid = read_pidfile(paths.conmon_pidfile)
        return pid, conmon_pid


def _read_sync(fd: int) -> str:
    """The first JSON line conmon writes on the sync pipe ("" on EOF without one)."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def die_with_parent() -> None:
    """preexec_fn: a helper (skopeo, umoci, runc exec) dies with the agent (PR_SET_PDEATHSIG),
    so a restarted agent never races a previous one's half-done pull. Not for conmon."""
    with contextlib.suppress(OSError, AttributeError):
        libc().prctl(1, int(_signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def read_pidfile(p: Path) -> int:
    try:
        return int(p.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def conmon_alive(pid: int, cid: str) -> bool:
    """True if `pid` is still the conmon of this container (guards against pid reuse)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except (FileNotFoundError, IndexError):
        return False
    return bool(cmd) and cmd[0].endswith(b"conmon") and cid.encode() in cmd


async def wait_for_exit(pid: int, timeout: float) -> None:
    """Return when process `pid` exits (a pidfd becomes readable) or after `timeout` s.

    Works for processes that are not our children (conmon daemonizes). The caller checks
    what it waits for afterwards: a timeout and a recycled pid are both just a re-check.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already, or no pidfds here: a short sleep keeps callers from spinning
        await asyncio.sleep(min(timeout, 0.1))
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


MS_NOSUID, MS_NODEV = 2, 4


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path, *, nosuid: bool) -> None:
    """Mount `lower` (read-only) under `upper` on `target`: a container's rootfs in ~1 ms.

    Always nodev: a device node in the image or the writable layer opens nothing (the
    container's /dev is runc's own tmpfs). nosuid when the caller says: set-id files
    must keep working for a container that may escalate (Kubernetes'
    allowPrivilegeEscalation, true by default; critest checks it)."""
    for p in (lower, upper, work, target):
        if "," in str(p) or ":" in str(p):  # the option string's separators
            raise ApiError("internal", f"path {p} cannot be an overlay layer")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    flags = MS_NODEV | (MS_NOSUID if nosuid else 0)
    if libc().mount(b"overlay", str(target).encode(), b"overlay", flags, opts) != 0:
        err = ctypes.get_errno()
        raise ApiError("internal", f"mounting the container's rootfs (overlay on {lower}): {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Detach whatever is mounted on `target`; nothing mounted there is fine."""
    libc().umount2(str(target).encode(), 2)  # MNT_DETACH; EINVAL/ENOENT: not mounted
