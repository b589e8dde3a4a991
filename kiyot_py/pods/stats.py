"""What each cell's pod and containers use, as their agents push it (cells/API.md, stats).

Every agent sends a `stats` event at each of its samples (about once a second) on the
event stream the node watches (`sync.py`); the latest of each sandbox is kept here, in
memory, and the CRI stats calls answer from it, never with a round trip to a cell. A
container's figures go with the container, a sandbox's with the sandbox or its cell. An
agent that sends none (an older one) leaves nothing here: the calls then give the
records' attributes and no figures, as containerd does for a container it has no metrics
for yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import structlog

from kiyot_py.errors import Unavailable
from kiyot_py.model import SANDBOX_READY, Container, Sandbox
from kiyot_py.pods.index import Index

log = structlog.get_logger("kiyot.pods.stats")


@dataclass(frozen=True)
class Cpu:
    usage_core_nano_seconds: int
    usage_nano_cores: int | None  # None: the cgroup's first sample, no rate yet


@dataclass(frozen=True)
class Memory:
    usage_bytes: int
    working_set_bytes: int
    rss_bytes: int
    page_faults: int
    major_page_faults: int
    available_bytes: int | None  # None: no limit


@dataclass(frozen=True)
class Layer:
    timestamp: int
    used_bytes: int
    inodes_used: int


@dataclass(frozen=True)
class Interface:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


@dataclass(frozen=True)
class Network:
    timestamp: int
    interfaces: tuple[Interface, ...]


@dataclass(frozen=True)
class ContainerUsage:
    timestamp: int
    cpu: Cpu | None
    memory: Memory | None
    process_count: int | None
    writable_layer: Layer | None


@dataclass(frozen=True)
class PodUsage:
    timestamp: int
    cpu: Cpu | None
    memory: Memory | None
    process_count: int | None
    network: Network | None


# --- the agent's JSON, checked ----------------------------------------------------------

T = TypeVar("T")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is {value!r}, not a count")
    return value


def _counts(cls: type, d: Any, nullable: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The count fields of dataclass `cls` from a JSON object; only `nullable` ones may be null."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} is {d!r}, not an object")
    return {f.name: None if f.name in nullable and d.get(f.name) is None
            else _count(d.get(f.name), f"{cls.__name__}.{f.name}")
            for f in fields(cls) if f.name not in skip}


def _maybe(d: Any, read: Callable[[Any], T]) -> T | None:
    return None if d is None else read(d)


def _cpu(d: Any) -> Cpu:
    return Cpu(**_counts(Cpu, d, nullable=("usage_nano_cores",)))


def _memory(d: Any) -> Memory:
    return Memory(**_counts(Memory, d, nullable=("available_bytes",)))


def _layer(d: Any) -> Layer:
    return Layer(**_counts(Layer, d))


def _interface(d: Any) -> Interface:
    counts = _counts(Interface, d, skip=("name",))
    if not isinstance(d.get("name"), str):
        raise ValueError(f"interface name is {d.get('name')!r}")
    return Interface(name=d["name"], **counts)


def _network(d: Any) -> Network:
    if not isinstance(d, dict) or not isinstance(d.get("interfaces"), list):
        raise ValueError(f"network is {d!r}")
    return Network(timestamp=_count(d.get("timestamp"), "network.timestamp"),
                   interfaces=tuple(_interface(i) for i in d["interfaces"]))


def container_usage(d: Any) -> ContainerUsage:
    if not isinstance(d, dict):
        raise ValueError(f"container stats are {d!r}")
    return ContainerUsage(timestamp=_count(d.get("timestamp"), "timestamp"), cpu=_maybe(d.get("cpu"), _cpu),
                          memory=_maybe(d.get("memory"), _memory),
                          process_count=_maybe(d.get("process_count"), lambda v: _count(v, "process_count")),
                          writable_layer=_maybe(d.get("writable_layer"), _layer))


def pod_usage(d: Any) -> PodUsage:
    if not isinstance(d, dict):
        raise ValueError(f"pod stats are {d!r}")
    return PodUsage(timestamp=_count(d.get("timestamp"), "timestamp"), cpu=_maybe(d.get("cpu"), _cpu),
                    memory=_maybe(d.get("memory"), _memory),
                    process_count=_maybe(d.get("process_count"), lambda v: _count(v, "process_count")),
                    network=_maybe(d.get("network"), _network))


# --- the cache --------------------------------------------------------------------------

class StatsCache:
    def __init__(self, index: Index, layer_filesystem: str) -> None:
        self._index = index
        # Where the writable layers are said to live, as ImageFsInfo names their filesystem.
        self.layer_filesystem = layer_filesystem
        self._pods: dict[str, PodUsage] = {}
        self._containers: dict[str, ContainerUsage] = {}

    def apply(self, sandbox_id: str, body: Any) -> None:
        """A `stats` event from a sandbox's cell: the latest of its pod and containers.

        Only containers the node records in that sandbox are taken: a cell speaks for its
        own containers, never another's. One it no longer reports has no figures."""
        try:
            if not isinstance(body, dict) or not isinstance(body.get("containers", []), list):
                raise ValueError(f"stats are {body!r:.200}")
            pod = _maybe(body.get("pod"), pod_usage)
            containers = {c.get("id"): container_usage(c) for c in body.get("containers", [])
                          if isinstance(c, dict)}
        except (ValueError, TypeError) as exc:
            log.debug("ignoring malformed stats from a cell", sandbox=sandbox_id, error=str(exc))
            return
        mine = {c.id for c in self._index.containers_of(sandbox_id)}
        for cid in mine:
            usage = containers.get(cid)
            if usage is None:
                self._containers.pop(cid, None)
            else:
                self._containers[cid] = usage
        if pod is None:
            self._pods.pop(sandbox_id, None)
        else:
            self._pods[sandbox_id] = pod

    def forget_container(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    def forget_sandbox(self, sandbox_id: str) -> None:
        """The sandbox's cell runs no more (stopped, lost): its figures, and its containers', go."""
        self._pods.pop(sandbox_id, None)
        for c in self._index.containers_of(sandbox_id):
            self._containers.pop(c.id, None)

    # -- what the CRI asks ---------------------------------------------------------------

    def container(self, container_id: str) -> tuple[Container, ContainerUsage | None]:
        c = self._index.container(container_id)
        return c, self._containers.get(c.id)

    def containers(self, id_prefix: str = "", sandbox_prefix: str = "",
                   labels: dict[str, str] | None = None) -> list[tuple[Container, ContainerUsage | None]]:
        """Every container the filter names, whatever its state (as ListContainers selects)."""
        return [(c, self._containers.get(c.id))
                for c in self._index.list_containers(id_prefix, sandbox_prefix, None, labels)]

    def sandbox(self, sandbox_id: str) -> tuple[Sandbox, PodUsage | None]:
        sb = self._index.sandbox(sandbox_id)
        if sb.state != SANDBOX_READY:
            raise Unavailable(f"pod sandbox {sb.id} is not ready: its cell runs no more")
        return sb, self._pods.get(sb.id)

    def sandboxes(self, id_prefix: str = "", labels: dict[str, str] | None = None
                  ) -> list[tuple[Sandbox, PodUsage | None, list[tuple[Container, ContainerUsage | None]]]]:
        """The ready sandboxes the filter names (one whose cell runs no more uses nothing),
        each with its containers: one pass over the containers, whatever the number of pods."""
        chosen = self._index.list_sandboxes(id_prefix, SANDBOX_READY, labels)
        by_sandbox: dict[str, list[tuple[Container, ContainerUsage | None]]] = {sb.id: [] for sb in chosen}
        for c in self._index.containers.values():
            if c.sandbox_id in by_sandbox:
                by_sandbox[c.sandbox_id].append((c, self._containers.get(c.id)))
        return [(sb, self._pods.get(sb.id), by_sandbox[sb.id]) for sb in chosen]
