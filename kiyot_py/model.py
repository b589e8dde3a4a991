"""The node's records of sandboxes, containers, images and cells.

Plain dataclasses, stored as JSON by `kiyot_py.store`. States use the CRI enum names
so that the CRI layer converts them one to one.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

SANDBOX_READY = "SANDBOX_READY"
SANDBOX_NOTREADY = "SANDBOX_NOTREADY"

CONTAINER_CREATED = "CONTAINER_CREATED"
CONTAINER_RUNNING = "CONTAINER_RUNNING"
CONTAINER_EXITED = "CONTAINER_EXITED"
CONTAINER_UNKNOWN = "CONTAINER_UNKNOWN"


def new_id() -> str:
    """A CRI id: 64 lowercase hex characters."""
    return secrets.token_hex(32)


def now_ns() -> int:
    return time.time_ns()


@dataclass
class CellFacts:
    """What a cell says about itself (GET /v1/facts): the node builds every spec and
    picks every image platform from these, never from its own machine."""

    os: str = "linux"
    architecture: str = "amd64"  # GOARCH: amd64, arm64, arm, ppc64le, s390x, 386, riscv64
    variant: str = ""  # GOARM-style variant: "v8" for arm64, "v7" for arm, "" otherwise
    kernel: str = ""  # uname -r of the cell
    # The capabilities a container in this cell can hold at most (CAP_* names).
    capabilities: list[str] = field(default_factory=list)
    cgroup_version: int = 1
    seccomp: bool = True  # the kernel filters syscalls
    # The cell's RuntimeDefault profile (containers-common/moby JSON), or None: the
    # node's built-in deny list is used.
    seccomp_profile: dict[str, Any] | None = field(default=None, repr=False)
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


@dataclass
class Cell:
    """A provider's view of one cell: where its agent is and how to talk to it."""

    id: str
    sandbox_id: str
    address: str  # the pod IP
    agent_url: str  # https://address:port
    # The one name the cell's agent certificate holds (pki.cell_server_name): the node
    # connects with it as the TLS server name, so it reaches this cell and no other.
    server_name: str = ""
    state: str = "running"  # pending | running | stopped | terminated
    tags: dict[str, str] = field(default_factory=dict)
    # Where the cell pulls images from: "host:port" of the node's pull path, or "" to
    # go to the registries directly (a cloud cell).
    pull_path: str = ""
    # The cell's own host name: a pod that names none (hostNetwork) gets it, as a pod on
    # a node gets the node's. At most 64 bytes, like every host name.
    hostname: str = ""
    # How the cell gets its TLS identity: "" (the provider gave it one, as local cells
    # get theirs on the node's disk) or "console" (it makes its own key and shows the
    # key's fingerprint on its console; the node enrolls it: kiyot_py/enrollment.py).
    enrollment: str = ""
    launched_at: int = 0  # ns since the epoch, as the provider says; 0: unknown (old enough)
    # What the provider chose for the cell (EC2: instance type, zone, hourly price).
    offering: dict[str, str] = field(default_factory=dict)
    # The provider's words for the state (EC2's StateReason: "Server.SpotInstanceTermination: ...").
    state_reason: str = ""
    # What the provider announced before taking the cell away (a spot interruption, a
    # rebalance recommendation), as the node first heard of it: kind, action, time, source.
    notices: list[dict[str, str]] = field(default_factory=list)
    # Learned from the agent once it answers; None until then.
    facts: CellFacts | None = None

    @property
    def gone(self) -> bool:
        """Whether the cell runs no more (terminated, or stopped: a stopped VM runs nothing)."""
        return self.state in ("terminated", "stopped")


@dataclass
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str = SANDBOX_NOTREADY
    created_at: int = field(default_factory=now_ns)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    runtime_handler: str = ""
    log_directory: str = ""
    config: bytes = field(default=b"", repr=False)  # the PodSandboxConfig as sent
    hostname: str = ""  # the pod's host name: the config's, else the cell's own
    # "creating" until the cell answered; such a sandbox is not listed yet.
    phase: str = "creating"
    cell: Cell | None = None
    # The idempotency token of its cell's launch (pods.cells.launch_token), kept so that
    # a restart mid-launch adopts the same cell.
    launch_token: str = ""
    # What the kubelet last said of the whole pod after a resize (UpdatePodSandboxResources):
    # {"resources": …, "overhead": …}, each converted as a container's limits (cpu, memory,
    # pids of an OCI linux.resources); recorded, never applied.
    pod_resources: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.name, self.namespace, self.uid, self.attempt)


@dataclass
class Container:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str  # what the kubelet asked for
    image_id: str  # sha256:… of the image config
    image_ref: str  # name@digest the cell pulled
    state: str = CONTAINER_CREATED
    created_at: int = field(default_factory=now_ns)
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    # The process's identity as the cell resolved it: uid, gid, every group (gid first).
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    # The limits in force in the cell, as its agent reports them (an OCI linux.resources'
    # cpu, memory, pids): ContainerStatus.resources, which the kubelet's resize reads.
    resources: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # absolute path on the node; "" = no log requested
    stop_signal: str = "SIGTERM"
    spec: dict[str, Any] = field(default_factory=dict, repr=False)
    config: bytes = field(default=b"", repr=False)  # the ContainerConfig as sent
    # Log shipping progress: bytes of the cell's log copied, and the node file's
    # (inode, size) right after that copy, so a restart resumes exactly.
    log_offset: int = 0
    log_inode: int = 0
    log_size: int = 0
    log_done: bool = False


@dataclass
class Credentials:
    """Registry credentials of one PullImage: used for that pull and never kept."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    server_address: str = ""  # the registry host they are for ("" means the image's own)


@dataclass(frozen=True)
class PlatformImage:
    """One platform's manifest of an image: what a cell of that platform pulls and runs."""

    platform_digest: str  # the image manifest's digest
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # its config blob


@dataclass
class Image:
    id: str  # sha256:… of the config blob (of the platform PullImage resolved for)
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)  # name@manifest-or-index digest
    size: int = 0
    platform_digest: str = ""  # digest of that platform's manifest
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    pinned: bool = False
    # Other platforms of the same index, resolved for the cells that run them, by
    # platform ("linux/arm64/v8").
    platforms: dict[str, PlatformImage] = field(default_factory=dict, repr=False)

    @property
    def user(self) -> str:
        return (self.config.get("config") or {}).get("User") or ""

    def platform_digests(self) -> list[str]:
        """Every platform manifest of this image the cells may hold, the default one first."""
        digests = [self.platform_digest] if self.platform_digest else []
        for p in self.platforms.values():
            if p.platform_digest not in digests:
                digests.append(p.platform_digest)
        return digests


T = TypeVar("T")


def to_json(obj: Any) -> Any:
    """Dataclass → JSON-able value (bytes become hex)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, bytes):
        return {"__hex__": obj.hex()}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def _from_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__hex__"}:
        return bytes.fromhex(value["__hex__"])
    return value


def from_json(cls: type[T], data: dict[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = _from_value(data[f.name])
        if f.name == "cell" and value is not None:
            value = from_json(Cell, value)
        elif f.name == "facts" and value is not None:
            value = from_json(CellFacts, value)
        elif f.name == "platforms":
            value = {k: from_json(PlatformImage, v) for k, v in value.items()}
        kwargs[f.name] = value
    return cls(**kwargs)
