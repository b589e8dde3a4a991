"""The pod's volumes for a cell that cannot see the node's disk (an EC2 cell).

The kubelet gives every container host paths on the node: configmaps, secrets, projected
service-account tokens and downward API files (each an AtomicWriter directory: the files
in `..<timestamp>`, `..data` a symlink to it, visible names linked through `..data`),
emptyDirs, `etc-hosts`, the termination-log file. Before a container is made, this ships
each of them to the cell over the agent channel (cells/API.md, volumes), and the container
mounts the cell's copy. Every AtomicWriter volume is then watched (inotify, and a check
every `volumes.sync_interval` behind it): a new version is read whole from its own
directory and replayed in the cell as the same atomic swap, so a reader there never sees a
mix. A container's termination message is read back into the kubelet's file on the node
before the node reports the container exited, as the kubelet reads it from there.

Only the kubelet's directory of the pod itself is shipped; any other host path is refused
unless `volumes.allowed_host_paths` holds it (then shipped once, as it is at create), and
never a socket or a device. Everything but the termination-log file goes on memory in
the cell: a secret, a token or a configmap never reaches the cell's disk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import structlog
from asyncinotify import Inotify, Mask, Watch

from kiyot_py.agent_client import AgentClient, AgentError
from kiyot_py.config import VolumeSettings
from kiyot_py.errors import InvalidArgument
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import Container, Sandbox

log = structlog.get_logger("kiyot.pods.volumes")

# What one volume may carry over the agent channel: the agent takes bodies of 4 MiB, and
# base64 makes 4 of every 3 bytes (the kubelet's own limit is 1 MiB per configmap or secret).
MAX_SHIPPED_BYTES = 3 * 1024 * 1024
MAX_ENTRIES = 4096
TERMINATION_MESSAGE_PATH = "io.kubernetes.container.terminationMessagePath"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
READ_ATTEMPTS = 5  # a version removed while we read it: read the new one
READ_BACK_TIMEOUT = 3.0


class VolumeError(InvalidArgument):
    """A mount the node cannot give a cell that does not see its disk."""


@dataclass(frozen=True)
class Shipped:
    """One of a container's host paths, as the cell gets it."""

    host_path: str  # as the kubelet gave it
    real_path: str  # what it resolves to on the node
    kind: str  # atomic | tree | file | empty (cells/API.md)
    medium: str  # memory | disk
    size_limit: int = 0
    termination_log: bool = False

    @property
    def name(self) -> str:
        return hashlib.sha256(self.real_path.encode()).hexdigest()[:32]


@dataclass
class Version:
    version: str
    files: list[dict[str, Any]]


# -- what a container's mounts become --------------------------------------------------------

def pod_directory(settings: VolumeSettings, pod_uid: str) -> str:
    return os.path.join(os.path.realpath(settings.kubelet_root), "pods", pod_uid)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _tmpfs_size(path: str) -> int | None:
    """The size of a tmpfs mounted exactly at `path` (an emptyDir of medium Memory), or None."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == path and fields[sep + 1] == "tmpfs":
                    for option in fields[sep + 3].split(","):
                        if option.startswith("size="):
                            return _bytes(option[5:])
                    return 0
    except (OSError, ValueError):
        return None
    return None


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if text and text[-1].lower() in units:
        return int(text[:-1]) * units[text[-1].lower()]
    return int(text)


def plan(config: api_pb2.ContainerConfig, pod_uid: str, settings: VolumeSettings) -> list[Shipped]:
    """What each of the container's host paths is for the cell; refuses what cannot go."""
    pod_dir = pod_directory(settings, pod_uid)
    allowed = [os.path.realpath(p.strip()) for p in settings.allowed_host_paths.split(",") if p.strip()]
    termination_path = config.annotations.get(TERMINATION_MESSAGE_PATH) or DEFAULT_TERMINATION_PATH
    out: list[Shipped] = []
    for m in config.mounts:
        what = f"mount {m.container_path!r} (host path {m.host_path!r})"
        if m.propagation not in (api_pb2.PROPAGATION_PRIVATE,):
            raise VolumeError(f"{what}: mount propagation cannot cross to a cell that is a VM of its own; "
                              "only private mounts are supported there")
        real = os.path.realpath(m.host_path)
        in_pod = _under(real, pod_dir)
        if not in_pod and not any(_under(real, a) for a in allowed):
            raise VolumeError(
                f"{what}: a cell that is a VM of its own cannot see the node's disk; only the kubelet's "
                f"directory of this pod ({pod_dir}) is shipped to it. Allow other paths with "
                "volumes.allowed_host_paths")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise VolumeError(f"{what}: {real} does not exist on the node") from None
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode) \
                or stat.S_ISFIFO(st.st_mode):
            raise VolumeError(f"{what}: {real} is a socket, device or FIFO, which cannot be shipped to a cell")
        if stat.S_ISREG(st.st_mode):
            is_log = in_pod and m.container_path == termination_path
            out.append(Shipped(m.host_path, real, "file", "disk" if is_log else "memory", termination_log=is_log))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise VolumeError(f"{what}: {real} is neither a file nor a directory")
        rel = os.path.relpath(real, pod_dir).split(os.sep) if in_pod else []
        if len(rel) == 3 and rel[0] == "volumes" and rel[1] == "kubernetes.io~empty-dir":
            size = _tmpfs_size(real)
            out.append(Shipped(m.host_path, real, "empty", "disk" if size is None else "memory", size or 0))
        elif os.path.islink(os.path.join(real, "..data")):
            out.append(Shipped(m.host_path, real, "atomic", "memory"))
        else:
            out.append(Shipped(m.host_path, real, "tree", "memory"))
    return out


# -- reading what the kubelet wrote -----------------------------------------------------------

def _file_entry(path: str, rel: str, st: os.stat_result, room: int) -> dict[str, Any]:
    """A regular file as an entry of a volume's body, if it fits in `room` bytes."""
    with open(path, "rb") as fh:
        data = fh.read(room + 1)
    if len(data) > room:
        raise VolumeError(f"{path}: its volume holds more than {MAX_SHIPPED_BYTES} bytes, more than a cell takes")
    return {"path": rel, "data": base64.b64encode(data).decode(), "mode": stat.S_IMODE(st.st_mode),
            "size": len(data)}


def _read_entries(root: str, skip_dots: bool) -> list[dict[str, Any]]:
    """Every file, directory and symlink under `root`, relative to it; no link is followed."""
    entries: list[dict[str, Any]] = []
    total = 0
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root)
            if skip_dots and top == root and name.startswith(".."):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                entries.append({"path": rel, "symlink": os.readlink(full)})
            elif stat.S_ISDIR(st.st_mode):
                entries.append({"path": rel, "dir": True, "mode": stat.S_IMODE(st.st_mode)})
            elif stat.S_ISREG(st.st_mode):
                entry = _file_entry(full, rel, st, MAX_SHIPPED_BYTES - total)
                total += entry.pop("size")
                entries.append(entry)
            else:
                raise VolumeError(f"{full} is a socket, device or FIFO, which cannot be shipped to a cell")
            if len(entries) > MAX_ENTRIES:
                raise VolumeError(f"{root} holds more than {MAX_ENTRIES} entries, more than a cell takes")
        if skip_dots and top == root:
            dirs[:] = [d for d in dirs if not d.startswith("..")]
    return entries


def read_version(path: str) -> Version:
    """The current version of an AtomicWriter directory, read from its own (immutable)
    version directory; one removed while we read it (the kubelet moved on) is read again."""
    for _ in range(READ_ATTEMPTS):
        version = os.readlink(os.path.join(path, "..data"))
        try:
            return Version(version, _read_entries(os.path.join(path, version), skip_dots=False))
        except FileNotFoundError:
            continue
    raise VolumeError(f"{path} changed {READ_ATTEMPTS} times while it was read")


def _body(v: Shipped) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": v.kind, "medium": v.medium, "size_limit": v.size_limit}
    if v.kind == "tree":
        body["files"] = _read_entries(v.real_path, skip_dots=False)
    elif v.kind == "file":
        entry = _file_entry(v.real_path, "file", os.stat(v.real_path), MAX_SHIPPED_BYTES)
        del entry["size"]
        body["files"] = [entry]
    return body


# -- shipping and keeping in sync ------------------------------------------------------------

@dataclass
class _Watched:
    sandbox_id: str
    volume: Shipped
    agent: AgentClient
    version: str = ""  # what the cell holds
    path_in_cell: str = ""
    handle: Watch | None = None  # the inotify watch
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PodVolumes:
    """Every shipped volume of the node's sandboxes, kept in step with the kubelet's."""

    def __init__(self, settings: VolumeSettings, ships: bool) -> None:
        self._settings = settings
        # False for cells that share the node's disk (local ones): they bind the kubelet's
        # paths themselves, and every method here does nothing.
        self.ships = ships
        self._watched: dict[str, _Watched] = {}  # by the node's real path
        self._inotify: Inotify | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def ship(self, sb: Sandbox, agent: AgentClient, config: api_pb2.ContainerConfig) -> dict[str, str]:
        """Ships the container's host paths to the cell: {host path: the cell's path}."""
        if not self.ships:
            return {}
        planned = plan(config, sb.uid, self._settings)
        cell_paths: dict[str, str] = {}
        for v in planned:
            if v.kind == "atomic":
                w = self._watched.get(v.real_path)
                if w is None or w.sandbox_id != sb.id:
                    w = self._watched[v.real_path] = _Watched(sb.id, v, agent)
                    self._watch(w)
                cell_paths[v.host_path] = await self._sync(w)
            else:
                answer = await agent.put_volume(v.name, _body(v))
                cell_paths[v.host_path] = answer["path"]
        return cell_paths

    def rewatch(self, sb: Sandbox, agent: AgentClient, configs: list[api_pb2.ContainerConfig]) -> None:
        """After a restart of the node: watch the sandbox's volumes again and bring the
        cell up to date with what changed meanwhile (in the background)."""
        if not self.ships:
            return
        self._tasks.append(asyncio.create_task(self._rewatch(sb, agent, configs), name=f"rewatch-{sb.id[:12]}"))

    async def _rewatch(self, sb: Sandbox, agent: AgentClient, configs: list[api_pb2.ContainerConfig]) -> None:
        for config in configs:
            try:
                for v in plan(config, sb.uid, self._settings):
                    if v.kind == "atomic" and v.real_path not in self._watched:
                        w = self._watched[v.real_path] = _Watched(sb.id, v, agent)
                        self._watch(w)
                        await self._sync(w)
            except (VolumeError, AgentError, OSError) as exc:
                log.warning("cannot watch a pod's volumes again", sandbox=sb.id, error=str(exc))

    def forget(self, sandbox_id: str) -> None:
        for path, w in list(self._watched.items()):
            if w.sandbox_id == sandbox_id:
                del self._watched[path]
                if self._inotify is not None and w.handle is not None:
                    with contextlib.suppress(OSError):  # the kubelet removed the directory already
                        self._inotify.rm_watch(w.handle)

    async def read_back_termination(self, c: Container, sb: Sandbox, agent: AgentClient) -> None:
        """The container's termination message, from the cell into the kubelet's file."""
        if not self.ships:
            return
        config = api_pb2.ContainerConfig.FromString(c.config)
        try:
            planned = plan(config, sb.uid, self._settings)
        except VolumeError:
            return
        for v in planned:
            if not v.termination_log:
                continue
            try:
                data = await agent.read_volume_file(v.name, timeout=READ_BACK_TIMEOUT)
            except AgentError as exc:
                log.warning("cannot read a termination message back", container=c.id, error=exc.message)
                return
            if data:
                # In place, as the container would have written it: the kubelet reads the file.
                with open(v.real_path, "r+b") as fh:  # noqa: ASYNC230 - at most 4 KiB
                    fh.write(data)
                    fh.truncate()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    # -- the watch --------------------------------------------------------------------------

    def _watch(self, w: _Watched) -> None:
        if self._inotify is None:
            self._inotify = Inotify()
            self._tasks.append(asyncio.create_task(self._events(), name="volume-events"))
            self._tasks.append(asyncio.create_task(self._periodic(), name="volume-check"))
        try:
            # The kubelet's swap is a rename of ..data_tmp onto ..data: a MOVED_TO here.
            w.handle = self._inotify.add_watch(w.volume.real_path, Mask.MOVED_TO | Mask.CREATE | Mask.ONLYDIR)
        except OSError as exc:  # out of watches: the periodic check still holds
            log.warning("cannot watch a volume; checked periodically only", path=w.volume.real_path, error=str(exc))

    async def _events(self) -> None:
        assert self._inotify is not None
        async for event in self._inotify:
            if event.name is not None and str(event.name) != "..data":
                continue
            w = self._watched.get(str(event.watch.path)) if event.watch is not None else None
            if w is not None:
                await self._sync_logged(w)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sync_interval)
            for w in list(self._watched.values()):
                await self._sync_logged(w)

    async def _sync_logged(self, w: _Watched) -> None:
        try:
            await self._sync(w)
        except (VolumeError, AgentError, OSError) as exc:
            log.warning("cannot bring a volume up to date in its cell", sandbox=w.sandbox_id,
                        path=w.volume.real_path, error=str(exc))

    async def _sync(self, w: _Watched) -> str:
        """Puts the node's current version into the cell unless it holds it; its path there."""
        async with w.lock:
            current = await asyncio.to_thread(read_version, w.volume.real_path)
            if current.version == w.version:
                return w.path_in_cell
            answer = await w.agent.put_volume(w.volume.name, {
                "kind": "atomic", "medium": w.volume.medium, "size_limit": w.volume.size_limit,
                "version": current.version, "files": current.files})
            w.version = current.version
            w.path_in_cell = answer["path"]
            log.info("volume version shipped", sandbox=w.sandbox_id, path=w.volume.real_path,
                     version=current.version)
            return w.path_in_cell
