"""What the cell's containers and its pod use, sampled in the background (GET /v1/stats).

Every `stats_interval` seconds one pass reads a few small cgroup files per live container
and for the pod (the cell's cgroup parent, above every container's), and the pod's
network counters; it keeps the latest sample of each, whose CPU rate is taken against the
one before (as containerd's collector does), and publishes the pass as a `stats` event.
Writable layers may hold many files: they are walked in a thread, one after another, each
once every LAYER_EVERY intervals (a new container's at once), and each sample carries the
last walk's figure.

cgroup v1 and v2 are told apart per controller: a hybrid host has v1 hierarchies of their
own (cpuacct, memory, pids) beside an empty unified one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import log
from .config import AgentConfig
from .containers import ContainerManager
from .events import EventHub
from .images import disk_usage
from .records import LIVE_STATES, RUNNING, ContainerRecord

_log = log.get("stats")
CGROUP_ROOT = Path("/sys/fs/cgroup")
LAYER_EVERY = 10  # intervals between two walks of a writable layer
# A memory limit above this is no limit: the kernel rounds "unlimited" down to a page.
UNLIMITED = 1 << 62
POD = ""  # the pod's key among the CPU marks, beside the containers' ids


@dataclass(frozen=True)
class Cpu:
    usage_core_nano_seconds: int  # cumulative
    usage_nano_cores: int | None  # the rate since the sample before; None for the first


@dataclass(frozen=True)
class Memory:
    usage_bytes: int
    working_set_bytes: int  # usage less the inactive file cache, what the kubelet evicts on
    rss_bytes: int
    page_faults: int
    major_page_faults: int
    available_bytes: int | None  # limit less working set; None without a limit


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
    interfaces: list[Interface]


@dataclass(frozen=True)
class ContainerSample:
    id: str
    timestamp: int
    cpu: Cpu | None
    memory: Memory | None
    process_count: int | None
    writable_layer: Layer | None


@dataclass(frozen=True)
class PodSample:
    timestamp: int
    cpu: Cpu | None
    memory: Memory | None
    process_count: int | None
    network: Network | None


# --- reading one cgroup ------------------------------------------------------------------

@dataclass(frozen=True)
class Hierarchy:
    """Where one controller's files are: a v1 hierarchy of its own, or the unified (v2) one."""

    root: Path
    version: int

    def dir(self, cgroup: str) -> Path:
        return self.root / cgroup.strip("/")


def hierarchies(root: Path = CGROUP_ROOT) -> dict[str, Hierarchy]:
    """The hierarchy of each controller the sampler reads (cpu, memory, pids)."""
    found = {}
    for controller, v1_name in (("cpu", "cpuacct"), ("memory", "memory"), ("pids", "pids")):
        if (root / v1_name / "tasks").exists():  # only v1 cgroups have `tasks`
            found[controller] = Hierarchy(root / v1_name, 1)
        elif (root / "cgroup.controllers").exists():
            found[controller] = Hierarchy(root, 2)
    return found


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _read_keyed(path: Path) -> dict[str, int]:
    """A `key value` file (memory.stat, cpu.stat)."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def working_set(usage: int, inactive_file: int) -> int:
    """Usage less the inactive file cache, never below 0 (the figures are read apart)."""
    return max(usage - inactive_file, 0)


def nano_cores(before: tuple[int, int] | None, usage_ns: int, at_ns: int) -> int | None:
    """The CPU rate in nano-cores from (usage, time) before to now; None without a sample
    before, when no time passed, or when the counter went back (a new cgroup, same name)."""
    if before is None:
        return None
    used, elapsed = usage_ns - before[0], at_ns - before[1]
    if elapsed <= 0 or used < 0:
        return None
    return used * 1_000_000_000 // elapsed


def cpu_usage_ns(h: Hierarchy, cgroup: str) -> int:
    d = h.dir(cgroup)
    if h.version == 1:
        return _read_int(d / "cpuacct.usage")
    return _read_keyed(d / "cpu.stat")["usage_usec"] * 1000


def memory_usage(h: Hierarchy, cgroup: str) -> Memory:
    d = h.dir(cgroup)
    stat = _read_keyed(d / "memory.stat")
    if h.version == 1:
        usage = _read_int(d / "memory.usage_in_bytes")
        limit: int | None = _read_int(d / "memory.limit_in_bytes")
        inactive, rss = stat["total_inactive_file"], stat["total_rss"]
        faults, major = stat["total_pgfault"], stat["total_pgmajfault"]
    else:
        usage = _read_int(d / "memory.current")
        raw = (d / "memory.max").read_text().strip()
        limit = None if raw == "max" else int(raw)
        inactive, rss = stat["inactive_file"], stat["anon"]  # anon, as cAdvisor takes RSS on v2
        faults, major = stat["pgfault"], stat["pgmajfault"]
    ws = working_set(usage, inactive)
    available = max(limit - ws, 0) if limit is not None and limit <= UNLIMITED else None
    return Memory(usage_bytes=usage, working_set_bytes=ws, rss_bytes=rss, page_faults=faults,
                  major_page_faults=major, available_bytes=available)


def process_count(hs: dict[str, Hierarchy], cgroup: str) -> int:
    """pids.current (tasks of the cgroup and below); without a pids controller, the
    processes in the cgroup and below, from cgroup.procs."""
    if "pids" in hs:
        return _read_int(hs["pids"].dir(cgroup) / "pids.current")
    h = hs.get("memory") or hs["cpu"]
    count = 0
    for top, _, _ in os.walk(h.dir(cgroup)):
        with contextlib.suppress(FileNotFoundError):
            count += len((Path(top) / "cgroup.procs").read_text().split())
    return count


def net_dev(text: str) -> list[Interface]:
    """The interfaces of a /proc/net/dev, loopback left out."""
    out = []
    for line in text.splitlines()[2:]:  # two header lines
        name, _, counters = line.partition(":")
        fields = [int(x) for x in counters.split()]
        if name.strip() == "lo" or len(fields) < 12:
            continue
        out.append(Interface(name=name.strip(), rx_bytes=fields[0], rx_packets=fields[1], rx_errors=fields[2],
                             rx_dropped=fields[3], tx_bytes=fields[8], tx_packets=fields[9], tx_errors=fields[10],
                             tx_dropped=fields[11]))
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- the sampler -------------------------------------------------------------------------

class StatsSampler:
    def __init__(self, cfg: AgentConfig, mgr: ContainerManager, hub: EventHub,
                 cgroups: dict[str, Hierarchy] | None = None, proc: Path = Path("/proc")) -> None:
        self._cfg = cfg
        self._mgr = mgr
        self._hub = hub
        self._cgroups = hierarchies() if cgroups is None else cgroups
        self._proc = proc
        self._pod_cgroup = "/" + cfg.cgroup_parent.strip("/")
        self.pod: PodSample | None = None
        self.containers: dict[str, ContainerSample] = {}
        # (cumulative CPU ns, monotonic ns) of each cgroup's last sample: the rate's base.
        self._marks: dict[str, tuple[int, int]] = {}
        self._layers: dict[str, Layer] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._sample_loop(), name="stats"),
                       asyncio.create_task(self._layer_loop(), name="stats-layers")]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def view(self) -> dict[str, Any]:
        """GET /v1/stats, and the body of every `stats` event."""
        return {"pod": None if self.pod is None else dataclasses.asdict(self.pod),
                "containers": [dataclasses.asdict(s) for s in self.containers.values()]}

    def _live(self) -> Iterator[ContainerRecord]:
        return (r for r in self._mgr.store.all() if r.state in LIVE_STATES)

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.sample()
                self._hub.publish({"type": "stats", "stats": self.view()})
            except Exception:  # one bad pass must not end sampling
                _log.exception("stats_failed")
            await asyncio.sleep(self._cfg.stats_interval)

    def sample(self) -> None:
        """One pass over the pod and its live containers; the deleted and the ended are forgotten."""
        samples = {}
        for rec in self._live():
            at = time.time_ns()
            cpu, memory, processes = self._cgroup(rec.id, self._mgr.cgroup_path(rec.id))
            if cpu is None and memory is None and processes is None:
                continue  # no cgroup (yet, or any more)
            samples[rec.id] = ContainerSample(id=rec.id, timestamp=at, cpu=cpu, memory=memory,
                                              process_count=processes, writable_layer=self._layers.get(rec.id))
        self.containers = samples
        at = time.time_ns()
        cpu, memory, processes = self._cgroup(POD, self._pod_cgroup)
        self.pod = PodSample(timestamp=at, cpu=cpu, memory=memory, process_count=processes,
                             network=self._network())
        for key in self._marks.keys() - samples.keys() - {POD}:
            del self._marks[key]

    def _cgroup(self, key: str, cgroup: str) -> tuple[Cpu | None, Memory | None, int | None]:
        """What one cgroup uses; None for each controller it cannot be read from."""
        cpu = memory = processes = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            if "cpu" in self._cgroups:
                usage, at = cpu_usage_ns(self._cgroups["cpu"], cgroup), time.monotonic_ns()
                cpu = Cpu(usage, nano_cores(self._marks.get(key), usage, at))
                self._marks[key] = (usage, at)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if "memory" in self._cgroups:
                memory = memory_usage(self._cgroups["memory"], cgroup)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if self._cgroups:
                processes = process_count(self._cgroups, cgroup)
        return cpu, memory, processes

    def _network(self) -> Network | None:
        """The pod network's counters: the agent's own network's, or (when the pod has a
        network apart from the agent's, as on EC2) those a container's process sees."""
        at = time.time_ns()
        netns = self._cfg.netns
        source = None
        if netns is None or _same_file(netns, str(self._proc / "self/ns/net")):
            source = self._proc / "net/dev"
        else:
            for rec in self._live():
                if rec.state == RUNNING and _same_file(str(self._proc / f"{rec.pid}/ns/net"), netns):
                    source = self._proc / f"{rec.pid}/net/dev"
                    break
        if source is None:
            return None
        try:
            return Network(timestamp=at, interfaces=net_dev(source.read_text()))
        except (OSError, ValueError):
            return None

    async def _layer_loop(self) -> None:
        """Every layer once every LAYER_EVERY intervals; a new container's at the next one."""
        for turn in itertools.count():
            try:
                for rec in [r for r in self._live() if turn % LAYER_EVERY == 0 or r.id not in self._layers]:
                    usage = await asyncio.to_thread(disk_usage, self._mgr.paths(rec.id).upper)
                    self._layers[rec.id] = Layer(time.time_ns(), usage["bytes"], usage["inodes"])
                for cid in self._layers.keys() - {r.id for r in self._live()}:
                    del self._layers[cid]
            except Exception:
                _log.exception("layer_walk_failed")
            await asyncio.sleep(self._cfg.stats_interval)
