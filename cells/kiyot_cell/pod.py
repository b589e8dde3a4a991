"""PUT /v1/pod: the pod this cell runs, its /etc files and its IPC namespace.

The files are rewritten *in place* (not tmp+rename): containers bind-mount them, and a
bind mount pins the inode, so a rename would leave running containers on the old file.
The pod's IPC namespace is kept by a bind mount of its nsfs file (as `ip netns` keeps a
network namespace), so it needs no process to hold it and outlives agent restarts;
containers whose IPC mode is POD join it. A PID namespace cannot outlive its first
process, so the pod's (made on first use, for shareProcessNamespace) is held by
catatonit in pause mode, an init that reaps orphans (podman's pod pause); it outlives
agent restarts too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ApiError, invalid
from .records import atomic_write_json

# sethostname(2) takes at most 64 bytes (HOST_NAME_MAX): refuse more here, with a clear
# message, rather than let runc fail every container of the pod.
HOSTNAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9\-.]{0,62}[a-zA-Z0-9])?$")


@dataclass
class PodSpec:
    sandbox_id: str
    hostname: str
    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> PodSpec:
        sid = body.get("sandbox_id")
        host = body.get("hostname")
        if not isinstance(sid, str) or not sid:
            raise invalid("'sandbox_id' is required")
        if not isinstance(host, str) or not HOSTNAME_RE.match(host):
            raise invalid("'hostname' is required and must be a valid host name of at most 64 bytes")
        dns = body.get("dns") or {}
        if not isinstance(dns, dict):
            raise invalid("'dns' must be an object")
        lists = {}
        for k in ("servers", "searches", "options"):
            v = dns.get(k) or []
            if not isinstance(v, list) or not all(
                isinstance(x, str) and x and "\n" not in x and " " not in x for x in v
            ):
                raise invalid(f"'dns.{k}' must be a list of words")
            lists[k] = v
        labels = body.get("labels") or {}
        if not isinstance(labels, dict):
            raise invalid("'labels' must be an object")
        return cls(sandbox_id=sid, hostname=host, labels={str(k): str(v) for k, v in labels.items()}, **lists)


class Pod:
    def __init__(self, pod_dir: Path, catatonit: str = "catatonit") -> None:
        self.dir = pod_dir
        self._catatonit = catatonit
        self.etc = pod_dir / "etc"
        self.ipc_ns = pod_dir / "ns" / "ipc"
        self._pid_init_file = pod_dir / "ns" / "pid-init"
        self._pid_holder: subprocess.Popen[bytes] | None = None
        self.spec: PodSpec | None = None

    def load(self) -> None:
        p = self.dir / "pod.json"
        if p.exists():
            self.spec = PodSpec(**json.loads(p.read_text()))

    def put(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = PodSpec.parse(body)
        if spec != self.spec or not (self.etc / "resolv.conf").exists():
            self.etc.mkdir(parents=True, exist_ok=True)
            _write_in_place(self.etc / "hostname", f"{spec.hostname}\n")
            _write_in_place(self.etc / "hosts",
                            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                            f"127.0.0.1\t{spec.hostname}\n")
            _write_in_place(self.etc / "resolv.conf", _resolv(spec))
            atomic_write_json(self.dir / "pod.json", asdict(spec))
            self.spec = spec
        if not is_mount_point(self.ipc_ns):
            self.ipc_ns.parent.mkdir(parents=True, exist_ok=True)
            self.ipc_ns.touch()
            out = subprocess.run(
                ["unshare", f"--ipc={self.ipc_ns}", "true"], check=False, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise ApiError("internal", f"making the pod's IPC namespace: {out.stderr.strip()}")
        return {"etc_dir": str(self.etc)}

    def namespace(self, kind: str) -> Path | None:
        """The pod's own namespace of `kind` ("ipc" or "pid"), once PUT /v1/pod was done."""
        if self.spec is None:
            return None
        if kind == "ipc":
            return self.ipc_ns if is_mount_point(self.ipc_ns) else None
        if kind == "pid":
            return Path(f"/proc/{self._pid_init()}/ns/pid")
        return None

    def _pid_init(self) -> int:
        """The host pid of the pod's PID-namespace init, started if none lives."""
        try:
            pid = int(self._pid_init_file.read_text())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and _is_our_init(pid, self.dir):
            return pid
        if self._pid_holder is not None:
            self._pid_holder.poll()  # reap the `unshare` of an init that died
        # Same process group as the agent and no parent-death signal: it survives an agent
        # restart, and a local cell's teardown (a kill of the whole group) takes it down.
        self._pid_holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--", self._catatonit, "-P"],
            env={_INIT_MARK: str(self.dir)},  # how a restarted agent knows its pod's init
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children = Path(f"/proc/{self._pid_holder.pid}/task/{self._pid_holder.pid}/children")
        deadline = time.monotonic() + 5
        while not (kids := children.read_text().split() if children.exists() else []):
            if time.monotonic() > deadline or self._pid_holder.poll() is not None:
                raise ApiError("internal", "the pod's PID namespace did not start")
            time.sleep(0.002)
        self._pid_init_file.parent.mkdir(parents=True, exist_ok=True)
        self._pid_init_file.write_text(kids[0])
        return int(kids[0])


_INIT_MARK = "KIYOT_POD_DIR"


def _is_our_init(pid: int, pod_dir: Path) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    mark = f"{_INIT_MARK}={pod_dir}".encode()
    return comm == b"catatonit" and state != b"Z" and mark in environ


def is_mount_point(path: Path) -> bool:
    """True once something is mounted on `path` (a namespace's nsfs, a tmpfs): another
    device than its directory's."""
    try:
        return path.stat().st_dev != path.parent.stat().st_dev
    except FileNotFoundError:
        return False


def _resolv(spec: PodSpec) -> str:
    if not spec.servers:
        try:
            return Path("/etc/resolv.conf").read_text()  # the cell's own
        except OSError:
            return ""
    lines = [f"nameserver {s}" for s in spec.servers]
    if spec.searches:
        lines.append("search " + " ".join(spec.searches))
    if spec.options:
        lines.append("options " + " ".join(spec.options))
    return "\n".join(lines) + "\n"


def _write_in_place(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
