"""Container lifecycle: create (overlay rootfs + bundle + conmon), start, stop, delete, exec.

Every record change goes through `_set`, which persists it and publishes an event. A
watcher task per live container waits on a pidfd of its conmon (which writes the exit file
and then exits), so an exit is seen at once; it re-reads the exit file at least every
second in case a wake-up is missed. The exit code is conmon's, never invented; a dead
conmon without an exit file is `unknown` / MonitorLost. The per-container lock
serializes create/start/delete and the watcher's transition, so a container that exits
the instant it starts still ends as `exited`; stop never holds it while waiting (the
watcher must be able to record the exit).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal as _signal
import time
from pathlib import Path
from typing import Any

from . import execs, log, resources
from . import spec as specmod
from .config import AgentConfig
from .errors import conflict, invalid, not_found
from .events import EventHub
from .images import DIGEST_RE, ImageStore, disk_usage
from .pod import Pod
from .records import CREATED, EXITED, LIVE_STATES, RUNNING, UNKNOWN, ContainerRecord, RecordStore, now_ns
from .runtime import (
    ContainerPaths,
    Runtime,
    conmon_alive,
    mount_overlay,
    parse_signal,
    read_pidfile,
    unmount,
    wait_for_exit,
)

_log = log.get("containers")
ID_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,252}$")
POLL = 0.1
RECHECK = 1.0  # upper bound between looks at a live container's exit file
EXIT_WAIT_AFTER_KILL = 30.0  # bound on waiting for conmon's exit file after SIGKILL
CUT_ASIDE = "ctr.log.cut"  # a log segment being cut, until conmon has reopened ctr.log


def in_cgroup(pid: int, cgroup: str) -> bool:
    """Whether process `pid` lives in `cgroup` (or below it), in any hierarchy."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    prefix = cgroup.rstrip("/")
    return any((path := line.split(":", 2)[-1]) == prefix or path.startswith(prefix + "/") for line in lines)


def check_id(cid: str) -> str:
    if not ID_RE.match(cid):
        raise invalid(f"container id must be 64 lowercase hex characters, got {cid[:80]!r}")
    return cid


class ContainerManager:
    def __init__(self, cfg: AgentConfig, images: ImageStore, pod: Pod, events: EventHub) -> None:
        self.cfg = cfg
        self.images = images
        self.pod = pod
        self.events = events
        self.runtime = Runtime(cfg)
        self.store = RecordStore(cfg.containers_dir)
        self._locks: dict[str, asyncio.Lock] = {}
        self._log_locks: dict[str, asyncio.Lock] = {}  # a log's segments move only under it
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Condition()

    # --- helpers --------------------------------------------------------------------------

    def paths(self, cid: str) -> ContainerPaths:
        return ContainerPaths(self.cfg.containers_dir / cid)

    def _lock(self, cid: str) -> asyncio.Lock:
        return self._locks.setdefault(cid, asyncio.Lock())

    def view(self, rec: ContainerRecord) -> dict[str, Any]:
        out = rec.public()
        try:  # fresh, without an event per line
            out["log_size"] = rec.log_base + self.paths(rec.id).log.stat().st_size
        except FileNotFoundError:
            out["log_size"] = rec.log_base
        return out

    def get(self, cid: str) -> ContainerRecord:
        rec = self.store.get(check_id(cid))
        if rec is None:
            raise not_found(f"no container {cid}")
        return rec

    def list(self) -> list[dict[str, Any]]:
        return [self.view(r) for r in self.store.all()]

    async def _set(self, rec: ContainerRecord, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(rec, k, v)
        await asyncio.to_thread(self.store.save, rec)
        self.events.publish({"type": "container", "container": self.view(rec)})
        async with self._changed:
            self._changed.notify_all()
        _log.info("container", id=rec.id, name=rec.name, state=rec.state, exit_code=rec.exit_code, reason=rec.reason)

    async def wait_changed(self, timeout: float) -> None:
        """Until some container's record changes, or `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _wait_not_live(self, cid: str, timeout: float) -> bool:
        def done() -> bool:
            r = self.store.get(cid)
            return r is None or r.state not in LIVE_STATES
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(done), timeout)
            return True
        except TimeoutError:
            return done()

    async def _remove_files(self, paths: ContainerPaths) -> None:
        # The overlay first: removing through it would only whiteout the image's files.
        unmount(paths.rootfs)
        await asyncio.to_thread(shutil.rmtree, paths.dir, True)

    # --- recovery -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Reload records; re-attach watchers (the conmons lived on); clear cut-short creates."""
        recs, orphans = await asyncio.to_thread(self.store.load)
        for d in orphans:
            _log.warning("removing_orphan", dir=str(d))
            await self.runtime.delete(d.name)
            await self._remove_files(ContainerPaths(d))
        for rec in recs:
            await self._finish_log_cut(rec)
            if rec.state in LIVE_STATES:
                self._watch(rec)
        _log.info("recovered", containers=len(recs), live=sum(r.state in LIVE_STATES for r in recs))

    async def close(self) -> None:
        for t in self._watchers.values():
            t.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)

    # --- exit watching --------------------------------------------------------------------

    def _watch(self, rec: ContainerRecord) -> None:
        t = self._watchers.get(rec.id)
        if t is None or t.done():
            self._watchers[rec.id] = asyncio.create_task(self._watcher(rec.id), name=f"watch-{rec.id[:12]}")

    def _read_exit(self, cid: str) -> tuple[int, int] | None:
        """(exit code, finished_at ns) from conmon's exit file, if it is complete."""
        p = self.paths(cid)
        for f in (p.exit_dir / cid, p.persist_dir / "exit"):
            try:
                text = f.read_text().strip()
                st = f.stat()
            except FileNotFoundError:
                continue
            if text.lstrip("-").isdigit():
                return int(text), st.st_mtime_ns
        return None

    async def _watcher(self, cid: str) -> None:
        try:
            while True:
                rec = self.store.get(cid)
                if rec is None or rec.state not in LIVE_STATES:
                    return
                ex = self._read_exit(cid)
                pid = rec.conmon_pid or read_pidfile(self.paths(cid).conmon_pidfile)
                if ex is None and not conmon_alive(pid, cid):
                    await asyncio.sleep(POLL)  # conmon writes the file just before it exits
                    ex = self._read_exit(cid)
                    if ex is None:
                        async with self._lock(cid):
                            rec = self.store.get(cid)
                            if rec is not None and rec.state in LIVE_STATES:
                                await self._set(rec, state=UNKNOWN, reason="MonitorLost",
                                                message="the container's monitor (conmon) died without "
                                                        "writing an exit code; its state is unknown")
                        return
                if ex is not None:
                    code, finished = ex
                    oom = (self.paths(cid).persist_dir / "oom").exists()
                    reason = "Completed" if code == 0 else ("OOMKilled" if code == 137 and oom else "Error")
                    async with self._lock(cid):
                        rec = self.store.get(cid)
                        if rec is not None and rec.state in LIVE_STATES:
                            await self._set(rec, state=EXITED, exit_code=code, reason=reason,
                                            finished_at=max(finished, rec.started_at))
                    return
                await self._rotate_log_if_big(cid)
                await wait_for_exit(pid, RECHECK)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("watcher_failed", id=cid)

    # --- create / start -------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> tuple[ContainerRecord, bool]:
        cid = body.get("id")
        name = body.get("name")
        digest = body.get("image_digest")
        spec = body.get("spec")
        user = body.get("user")
        groups_policy = body.get("groups_policy") or "Merge"
        stop_signal = body.get("stop_signal") or "SIGTERM"  # the node's; never the image's
        pod_namespaces = body.get("pod_namespaces") or []
        pid_target = body.get("pid_target")
        if not isinstance(cid, str):
            raise invalid("'id' is required")
        check_id(cid)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise invalid("'name' is required (letters, digits, '_', '.', '-')")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise invalid("'image_digest' must be sha256:<64 hex>")
        if not isinstance(spec, dict):
            raise invalid("'spec' (an OCI runtime spec object) is required")
        specmod.check_process(spec.get("process") or {})
        if user is not None and (not isinstance(user, str) or not user):
            raise invalid("'user' must be a non-empty string")
        if groups_policy not in specmod.GROUPS_POLICIES:
            raise invalid(f"'groups_policy' must be one of {list(specmod.GROUPS_POLICIES)}")
        if not isinstance(stop_signal, str):
            raise invalid("'stop_signal' must be a string")
        parse_signal(stop_signal)
        if not isinstance(pod_namespaces, list) or not all(k in ("ipc", "pid") for k in pod_namespaces):
            raise invalid("'pod_namespaces' must be a list drawn from [\"ipc\", \"pid\"]")
        if pid_target is not None and "pid" in pod_namespaces:
            raise invalid("'pid_target' and a pod PID namespace exclude each other")
        if pid_target is not None and not isinstance(pid_target, str):
            raise invalid("'pid_target' must be a container id")
        stdio = {k: body.get(k, False) for k in ("stdin", "stdin_once", "tty")}
        if not all(isinstance(v, bool) for v in stdio.values()):
            raise invalid("'stdin', 'stdin_once' and 'tty' must be booleans")
        req_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

        async with self._lock(cid):
            existing = self.store.get(cid)
            if existing is not None:
                if existing.request_hash == req_hash:
                    return existing, False
                raise conflict(f"container {cid} exists with a different body")
            if not self.images.has(digest):
                raise conflict(f"image {digest} has not been pulled in this cell")
            # After the repeat check: a repeated create answers even if its target has gone.
            shared = self._shared_namespaces(pod_namespaces, pid_target)
            devices = specmod.resolve_devices(body.get("devices"))  # the cell's nodes, not the node's
            paths = self.paths(cid)
            if paths.dir.exists():
                await self._remove_files(paths)
            paths.dir.mkdir(parents=True)
            t0 = asyncio.get_running_loop().time()
            try:
                image = await self.images.unpacked(digest)
                for d in (paths.rootfs, paths.upper, paths.work):
                    d.mkdir(parents=True)
                # nosuid where it changes nothing a container may do: with no_new_privs set,
                # set-id bits give nothing anyway.
                no_new_privs = bool((spec.get("process") or {}).get("noNewPrivileges"))
                mount_overlay(image / "rootfs", paths.upper, paths.work, paths.rootfs, nosuid=no_new_privs)
                cfg_path = paths.bundle / "config.json"
                image_cfg = json.loads((image / "config.json").read_text())
                ctx = specmod.CellContext(
                    rootfs=paths.rootfs,
                    netns=self.cfg.netns,
                    cgroups_path=self.cgroup_path(cid),
                    pod_etc=self.pod.etc if self.pod.spec is not None else None,
                    pod_hostname=self.pod.spec.hostname if self.pod.spec else None,
                    pod_namespaces={kind: str(path) for kind, path in shared.items()},
                )
                # Off the event loop: it reads the image's /etc/passwd and /etc/group.
                config = await asyncio.to_thread(specmod.build, image_cfg, spec, ctx, user, groups_policy, devices,
                                                 terminal=stdio["tty"])
                cfg_path.write_text(json.dumps(config, indent=1))
                pid, conmon_pid = await self.runtime.launch(cid, name, paths, **stdio)
            except BaseException:
                await self.runtime.delete(cid)
                await self._remove_files(paths)
                raise
            rec = ContainerRecord(id=cid, name=name, image_digest=digest, state=CREATED, pid=pid,
                                  created_at=now_ns(), request_hash=req_hash, stop_signal=stop_signal,
                                  conmon_pid=conmon_pid, user=specmod.process_identity(config),
                                  resources=resources.of_config(config), **stdio)
            await self._set(rec)
            self._watch(rec)
            _log.info("created", id=cid, seconds=round(asyncio.get_running_loop().time() - t0, 3))
            return rec, True

    # `builtins.list`: in this class body `list` is the method above.
    def _shared_namespaces(self, pod_namespaces: builtins.list[str], pid_target: str | None) -> dict[str, Path]:
        """Paths of the namespaces a new container joins: the pod's, or its PID target's."""
        found = {kind: self.pod.namespace(kind) for kind in pod_namespaces}
        shared = {kind: path for kind, path in found.items() if path is not None}
        if len(shared) != len(found):
            raise conflict("the pod's namespaces do not exist yet: PUT /v1/pod first")
        if pid_target is not None:
            target = self.get(pid_target)
            if target.state != RUNNING:
                raise conflict(f"'pid_target' {pid_target} is {target.state}, not running")
            # The recorded pid may have been recycled: join its namespace only while it is
            # still a process of the target's own cgroup.
            if not in_cgroup(target.pid, self.cgroup_path(pid_target)):
                raise conflict(f"'pid_target' {pid_target}: its process {target.pid} is gone")
            shared["pid"] = Path(f"/proc/{target.pid}/ns/pid")
        return shared

    def cgroup_path(self, cid: str) -> str:
        return f"/{self.cfg.cgroup_parent.strip('/')}/{cid}"

    async def start(self, cid: str) -> ContainerRecord:
        rec = self.get(cid)
        async with self._lock(cid):
            rec = self.get(cid)
            if rec.state == RUNNING:
                return rec
            if rec.state != CREATED:
                raise conflict(f"container {cid} is {rec.state}, not created")
            started = now_ns()  # before `runc start`: a quick exit must not finish before it started
            await self.runtime.start(cid)
            await self._set(rec, state=RUNNING, started_at=started)
            return rec

    async def update_resources(self, cid: str, body: dict[str, Any]) -> ContainerRecord:
        """Apply new limits to a created or running container's cgroup and record them."""
        self.get(cid)
        change = resources.check(body)
        async with self._lock(cid):  # not while it starts, exits or goes
            rec = self.get(cid)
            if rec.state not in LIVE_STATES:
                raise conflict(f"container {cid} is {rec.state}: only a created or running one can be updated")
            t0 = asyncio.get_running_loop().time()
            await self.runtime.update(cid, self.paths(cid), change)
            await self._set(rec, resources=resources.merge(rec.resources, change))
            _log.info("resources_updated", id=cid, resources=change,
                      seconds=round(asyncio.get_running_loop().time() - t0, 3))
            return rec

    # --- stop / delete --------------------------------------------------------------------

    async def stop(self, cid: str, body: dict[str, Any]) -> ContainerRecord:
        rec = self.get(cid)
        timeout = body.get("timeout", 10)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
            raise invalid("'timeout' must be a number of seconds >= 0")
        sig = parse_signal(body.get("signal"), rec.stop_signal)
        if rec.state == UNKNOWN:
            # Its monitor is gone: kill what may still run, but no exit code can be known.
            await self.runtime.kill(cid, int(_signal.SIGKILL))
            return rec
        if rec.state not in LIVE_STATES:
            return rec
        if sig != _signal.SIGKILL and timeout > 0:
            await self.runtime.kill(cid, sig)
            if await self._wait_not_live(cid, float(timeout)):
                return self.get(cid)
        _log.info("stop_sigkill", id=cid)
        await self.runtime.kill(cid, int(_signal.SIGKILL))
        await self._wait_not_live(cid, EXIT_WAIT_AFTER_KILL)
        return self.get(cid)

    async def delete(self, cid: str) -> None:
        check_id(cid)
        async with self._lock(cid):
            rec = self.store.get(cid)
            paths = self.paths(cid)
            if rec is None and not paths.dir.exists():
                return
            if rec is not None and rec.state in LIVE_STATES:
                await self.runtime.kill(cid, int(_signal.SIGKILL))
        # outside the lock: the watcher records the exit (bounded wait)
        if rec is not None and rec.state in LIVE_STATES:
            await self._wait_not_live(cid, 10.0)
        async with self._lock(cid):
            await self.runtime.delete(cid)
            t = self._watchers.pop(cid, None)
            if t is not None:
                t.cancel()
            # The record goes first: a crash mid-rmtree leaves an orphan dir, cleared at start.
            with contextlib.suppress(FileNotFoundError):
                self.store.path(cid).unlink()
            await self._remove_files(paths)
            if self.store.get(cid) is not None:
                self.store.forget(cid)
                self.events.publish({"type": "removed", "id": cid})
        self._locks.pop(cid, None)
        _log.info("deleted", id=cid)

    # --- exec (execs.py runs it; a streaming exec is streams.py's) ---------------------------

    async def exec(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        return await execs.exec_sync(self.runtime, self.paths(cid), self.get(cid), body)

    def running(self, cid: str) -> ContainerRecord:
        rec = self.get(cid)
        if rec.state != RUNNING:
            raise conflict(f"container {cid} is {rec.state}, not running")
        return rec

    # --- logs -----------------------------------------------------------------------------
    #
    # conmon writes the CRI-format log to ctr.log. Offsets the node sees are logical (bytes
    # since the container began), so they stay valid when the file is cut: past
    # log_max_size, ctr.log becomes ctr.log.1 (the older one goes) and conmon reopens a new
    # ctr.log. conmon writes whole lines, so segments start on line boundaries.

    async def read_log(self, cid: str, offset: int) -> tuple[int, bytes]:
        """(where the bytes start, bytes) from logical `offset` on; the start is later than
        `offset` only when those bytes were rotated away."""
        async with self._log_locks.setdefault(cid, asyncio.Lock()):
            rec = self.store.get(cid)
            if rec is None:  # deleted meanwhile: the log has ended
                return offset, b""
            paths = self.paths(cid)
            has_prev = rec.log_base > 0 and paths.log_prev.exists()
            first = rec.log_prev_base if has_prev else rec.log_base
            offset = max(offset, first)
            if offset >= rec.log_base:
                if _size(paths.log) <= offset - rec.log_base:
                    return offset, b""  # nothing new: a follower's every look, without a thread
                return offset, await asyncio.to_thread(_read_at, paths.log, offset - rec.log_base)
            return offset, await asyncio.to_thread(_read_at, paths.log_prev, offset - rec.log_prev_base)

    async def _rotate_log_if_big(self, cid: str) -> None:
        async with self._log_locks.setdefault(cid, asyncio.Lock()):
            rec = self.store.get(cid)
            paths = self.paths(cid)
            try:
                size = paths.log.stat().st_size
            except FileNotFoundError:
                return
            if rec is None or size <= self.cfg.log_max_size:
                return
            pid = rec.conmon_pid or read_pidfile(paths.conmon_pidfile)
            if not await asyncio.to_thread(_cut_log, paths, pid, cid):
                _log.info("log_cut_skipped", id=cid, reason="conmon exited first")
                return
            await self._finish_log_cut(rec)
            _log.info("log_rotated", id=cid, log_base=rec.log_base)

    async def _finish_log_cut(self, rec: ContainerRecord) -> None:
        """Settle a cut: done if conmon has reopened the log (ctr.log is back), undone if
        not. At start, this also settles a cut the previous agent died in the middle of."""
        paths = self.paths(rec.id)
        aside = paths.dir / CUT_ASIDE
        if not aside.exists():
            return
        if not paths.log.exists():
            os.replace(aside, paths.log)
            return
        os.replace(aside, paths.log_prev)
        rec.log_prev_base = rec.log_base
        rec.log_base += paths.log_prev.stat().st_size
        await asyncio.to_thread(self.store.save, rec)

    def uses_image(self, digest: str) -> bool:
        return any(r.image_digest == digest for r in self.store.all())

    def usage(self) -> dict[str, int]:
        """Bytes and inodes of the containers' writable layers (their overlays' upper dirs)."""
        total = {"bytes": 0, "inodes": 0}
        for rec in self.store.all():
            part = disk_usage(self.paths(rec.id).upper)
            total = {k: total[k] + part[k] for k in total}
        return total

    def log_size(self, cid: str) -> int:
        return self.view(self.get(cid))["log_size"]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_at(path: Path, pos: int, limit: int = 256 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def _cut_log(paths: ContainerPaths, conmon_pid: int, cid: str, wait: float = 30.0) -> bool:
    """Start a new log segment: move ctr.log aside and have conmon reopen it (`2 0 0` on
    its ctl fifo). False, with nothing changed, when conmon is gone (or stuck) before it
    reopened: it is exiting, and the log stays whole."""
    if not conmon_alive(conmon_pid, cid):
        return False
    aside = paths.dir / CUT_ASIDE
    os.replace(paths.log, aside)  # conmon writes on into it until it reopens
    try:
        fd = os.open(paths.ctl, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"2 0 0\n")
        finally:
            os.close(fd)
    except OSError:  # no fifo, or nobody reading it
        os.replace(aside, paths.log)
        return False
    deadline = time.monotonic() + wait
    while not paths.log.exists():
        if not conmon_alive(conmon_pid, cid) or time.monotonic() > deadline:
            os.replace(aside, paths.log)
            return False
        time.sleep(0.002)
    return True  # the caller makes the aside segment ctr.log.1
