"""The interface every cell provider implements (local netns cells now, EC2 next).

Shaped for a VM far away that takes tens of seconds to boot: `launch` asks for a cell
and returns as soon as the provider has accepted it (the cell may still be `pending`);
`wait_running` waits until the provider says it runs and has an address; the agent
inside is then the pods room's business. A launch carries an idempotency token, so
that a kubelet's retry or a node restart mid-launch finds the same cell instead of
making a second one. Cells are described many at a time (one cloud call at recovery,
not one per sandbox) and found by tags alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kiyot_py import errors
from kiyot_py.model import Cell

# Tags every cell carries, so that the cloud alone can say who owns what.
TAG_NODE = "kiyot-node"
TAG_SANDBOX = "kiyot-sandbox"
TAG_POD = "kiyot-pod"
# What a cell is for: a pod's (ROLE_POD) or a standby cell waiting for one; the
# orphan collector only ever reaps pod cells.
TAG_ROLE = "kiyot-role"
TAG_POD_UID = "kiyot-pod-uid"
TAG_POD_ATTEMPT = "kiyot-pod-attempt"
# The warm pool a cell was launched for; it keeps the tag once a pod claimed it.
TAG_POOL = "kiyot-pool"
ROLE_POD = "pod"
ROLE_STANDBY = "standby"
POD_LABEL_TAG_PREFIX = "pod-label:"


class ProviderError(errors.KiyotError):
    """A provider failed; raised as one of the kinds below, with the provider's own message
    (and its own error code, where it has one: EC2's "InsufficientInstanceCapacity")."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class CapacityError(ProviderError, errors.ResourceExhausted):
    """No capacity for this shape now (a zone out of an instance type)."""


class QuotaError(ProviderError, errors.ResourceExhausted):
    """An account limit (vCPUs, instances) stops the launch."""


class ProviderPermissionDenied(ProviderError, errors.PermissionDenied):
    pass


class ProviderConfigError(ProviderError, errors.FailedPrecondition):
    """The provider's configuration is wrong: an unknown image, a bad subnet."""


class CellNotFound(ProviderError, errors.NotFound):
    pass


class ProviderUnavailable(ProviderError, errors.Unavailable):
    """Transient: throttled, a timeout, the API is down. A retry may succeed."""


@dataclass(frozen=True)
class CellShape:
    """What a pod asks of its cell: the provider picks the cheapest fit."""

    cpu_millis: int = 0  # 0: the provider's smallest
    memory_bytes: int = 0
    architecture: str = ""  # GOARCH; "": the provider's default
    runtime_handler: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    # The pod's annotations: a provider may read its own (an explicit instance type).
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CellFeatures:
    """What this provider's cells can do, as the Status RPC advertises it to the kubelet."""

    # `rro` mounts: the cell's OCI runtime knows the option and its kernel has mount_setattr.
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False
    # Whether a container may be privileged: inside a VM of its own, it is so in that VM
    # only; a local cell shares the node's kernel, so there only if the config says.
    privileged: bool = False
    # A local cell shares the node's disk: the kubelet's host paths are there already. A
    # VM's cell sees none of it, and the node ships the pod's volumes (pods/volumes.py).
    shares_node_disk: bool = False


@dataclass(frozen=True)
class Readiness:
    """Whether the provider can make cells now, as Status tells the kubelet: a condition is
    met when its reason is "" (the reasons are CamelCase words, the messages sentences)."""

    runtime_reason: str = ""
    runtime_message: str = ""
    network_reason: str = ""
    network_message: str = ""


@dataclass(frozen=True)
class PullEndpoint:
    """Where a provider's cells fetch images through the node (local cells only)."""

    host: str  # the address on the node the cells reach
    port: int


@dataclass(frozen=True)
class CellEvent:
    """What a provider's own event feed says of a cell (EC2: EventBridge through SQS)."""

    cell_id: str
    kind: str  # "spot-interruption" | "rebalance-recommendation" | "state"
    state: str = ""  # for "state": the provider's word (EC2: stopping, stopped, shutting-down, terminated, ...)
    action: str = ""  # for a spot interruption: terminate | stop | hibernate
    time: str = ""  # when the provider says it happens (or happened), ISO 8601
    source: str = ""  # where the node heard it: "sqs", ...


CellEvents = Callable[[CellEvent], None]


class Provider(Protocol):
    name: str

    async def start(self) -> None:
        """Prepare shared infrastructure (a bridge, a client) and revive cells' agents."""

    @property
    def features(self) -> CellFeatures:
        """What the cells can do (known once start() has run)."""

    @property
    def default_architecture(self) -> str:
        """GOARCH of a cell launched with no architecture asked for (what PullImage resolves)."""

    @property
    def pull_path(self) -> PullEndpoint | None:
        """The node endpoint the cells pull images through, or None: cells go to registries."""

    @property
    def reserved_ports(self) -> frozenset[int]:
        """Ports in a cell that a pod may not take (the agent's own)."""

    async def readiness(self) -> Readiness:
        """Whether cells can be made now (cheap: the kubelet asks every few seconds)."""

    async def launch(self, shape: CellShape, token: str) -> Cell:
        """Ask for a cell; returns once the provider has it (state pending or running).

        The same token always gives the same cell, also after a restart of the node."""

    def fits(self, cell: Cell, shape: CellShape) -> bool:
        """Whether a cell already running (a standby one) would do for a pod of this shape:
        what a launch for the shape might have chosen, or more."""

    async def retag(self, cell_id: str, tags: dict[str, str]) -> None:
        """Set these tags on the cell (others stay): a standby cell becomes a pod's.
        Idempotent; CellNotFound when the cell is gone."""

    async def wait_running(self, cell_id: str, timeout: float) -> Cell:
        """Wait until the cell runs and has its address; CellNotFound when it is gone."""

    async def identity_fingerprint(self, cell_id: str, timeout: float) -> str:
        """For cells that make their own key (`Cell.enrollment == "console"`): the key's
        fingerprint as the cell showed it on its console, read through the provider's API."""

    async def terminate(self, cell_id: str) -> None:
        """Release a cell and everything it holds. Unknown cells are already terminated."""

    async def describe(self, cell_ids: list[str]) -> dict[str, Cell]:
        """The cells as the provider sees them now; a cell that no longer exists is absent."""

    async def list_cells(self, tags: dict[str, str]) -> list[Cell]:
        """Every cell carrying all of these tags."""

    def interrupted(self, cell: Cell) -> None:
        """The cloud announced it takes this cell back (a spot interruption notice): a
        provider may keep new cells off the same capacity for a while."""

    def watch_events(self, sink: CellEvents) -> None:
        """Hand every event of the provider's own feed to `sink` from now on (a provider
        that has no feed never calls it)."""

    async def reset(self) -> int:
        """Terminate every cell of this provider here and undo start(); how many cells."""

    async def close(self) -> None:
        """Let go of clients; cells keep running."""
