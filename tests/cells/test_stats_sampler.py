"""The agent's stats sampler over fake cgroup trees (v1 and v2) in a tmp dir: its
arithmetic (the CPU rate, the working set's floor), which file gives what, and what one
pass keeps and forgets. No root, no containers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from kiyot_cell import stats
from kiyot_cell.config import AgentConfig
from kiyot_cell.events import EventHub
from kiyot_cell.records import ContainerRecord

CID = "c" * 64
NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier
    lo:  900      9    0    0    0     0          0         0      900       9    0    0    0     0       0          0
  eth0: 1234     12    1    2    0     0          0         0     5678      34    3    4    0     0       0          0
"""
V1_STAT = ("cache 4096\nrss 1\ntotal_cache {cache}\ntotal_rss {rss}\ntotal_pgfault {faults}\n"
           "total_pgmajfault {major}\ntotal_inactive_file {inactive}\ntotal_active_file 0\n")
V2_STAT = "anon {rss}\nfile {cache}\ninactive_file {inactive}\npgfault {faults}\npgmajfault {major}\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, cgroup: str, *, cpu_ns: int, usage: int, inactive: int, limit: int = 9223372036854771712,
            rss: int = 0, faults: int = 0, major: int = 0, pids: int = 1) -> None:
    for controller in ("cpuacct", "memory", "pids"):
        write(root / controller / "tasks", "")
    d = cgroup.strip("/")
    write(root / "cpuacct" / d / "cpuacct.usage", f"{cpu_ns}\n")
    write(root / "memory" / d / "memory.usage_in_bytes", f"{usage}\n")
    write(root / "memory" / d / "memory.limit_in_bytes", f"{limit}\n")
    write(root / "memory" / d / "memory.stat",
          V1_STAT.format(cache=inactive, rss=rss, faults=faults, major=major, inactive=inactive))
    write(root / "pids" / d / "pids.current", f"{pids}\n")


def v2_tree(root: Path, cgroup: str, *, usage_usec: int, current: int, inactive: int, limit: str = "max",
            rss: int = 0, faults: int = 0, major: int = 0, pids: int = 1) -> None:
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    d = root / cgroup.strip("/")
    write(d / "cpu.stat", f"usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 2\n")
    write(d / "memory.current", f"{current}\n")
    write(d / "memory.max", f"{limit}\n")
    write(d / "memory.stat", V2_STAT.format(rss=rss, cache=inactive, inactive=inactive, faults=faults, major=major))
    write(d / "pids.current", f"{pids}\n")


def test_the_cpu_rate_is_the_difference_over_the_time_between():
    assert stats.nano_cores(None, 5_000, 10) is None  # a first sample has no rate
    assert stats.nano_cores((1_000_000_000, 0), 1_500_000_000, 1_000_000_000) == 500_000_000  # half a core
    assert stats.nano_cores((0, 0), 4_000_000_000, 2_000_000_000) == 2_000_000_000  # two cores
    assert stats.nano_cores((10, 100), 20, 100) is None  # no time passed
    assert stats.nano_cores((10**9, 0), 10, 10**9) is None  # the counter went back: a new cgroup


def test_the_working_set_never_goes_below_zero():
    assert stats.working_set(100 << 20, 30 << 20) == 70 << 20
    assert stats.working_set(100, 150) == 0  # read apart, the figures may cross


def test_v1_and_v2_are_told_apart_per_controller(tmp_path):
    hybrid = tmp_path / "hybrid"
    for controller in ("cpuacct", "memory"):  # no pids hierarchy: not a v2 one either
        write(hybrid / controller / "tasks", "")
    write(hybrid / "unified" / "cgroup.controllers", "")
    assert stats.hierarchies(hybrid) == {"cpu": stats.Hierarchy(hybrid / "cpuacct", 1),
                                         "memory": stats.Hierarchy(hybrid / "memory", 1)}
    unified = tmp_path / "unified"
    write(unified / "cgroup.controllers", "cpu memory pids\n")
    assert {h.version for h in stats.hierarchies(unified).values()} == {2}
    assert set(stats.hierarchies(unified)) == {"cpu", "memory", "pids"}


def test_v1_figures(tmp_path):
    v1_tree(tmp_path, "/cell/" + CID, cpu_ns=2_500_000_000, usage=80 << 20, inactive=10 << 20, limit=256 << 20,
            rss=60 << 20, faults=1234, major=5, pids=3)
    hs = stats.hierarchies(tmp_path)
    assert stats.cpu_usage_ns(hs["cpu"], "/cell/" + CID) == 2_500_000_000
    assert stats.memory_usage(hs["memory"], "/cell/" + CID) == stats.Memory(
        usage_bytes=80 << 20, working_set_bytes=70 << 20, rss_bytes=60 << 20, page_faults=1234,
        major_page_faults=5, available_bytes=(256 - 70) << 20)
    assert stats.process_count(hs, "/cell/" + CID) == 3


def test_v1_without_a_limit_has_no_available_bytes(tmp_path):
    v1_tree(tmp_path, "/cell/" + CID, cpu_ns=1, usage=8 << 20, inactive=1 << 20)  # the kernel's "unlimited"
    assert stats.memory_usage(stats.hierarchies(tmp_path)["memory"], "/cell/" + CID).available_bytes is None


def test_v2_figures(tmp_path):
    v2_tree(tmp_path, "/cell/" + CID, usage_usec=1_500_000, current=50 << 20, inactive=20 << 20, rss=25 << 20,
            faults=77, major=1, pids=4)
    hs = stats.hierarchies(tmp_path)
    assert stats.cpu_usage_ns(hs["cpu"], "/cell/" + CID) == 1_500_000_000  # usage_usec x 1000
    memory = stats.memory_usage(hs["memory"], "/cell/" + CID)
    assert memory == stats.Memory(usage_bytes=50 << 20, working_set_bytes=30 << 20, rss_bytes=25 << 20,
                                  page_faults=77, major_page_faults=1, available_bytes=None)
    write(tmp_path / "cell" / CID / "memory.max", f"{64 << 20}\n")
    assert stats.memory_usage(hs["memory"], "/cell/" + CID).available_bytes == 34 << 20
    assert stats.process_count(hs, "/cell/" + CID) == 4


def test_processes_without_a_pids_controller_are_counted_from_cgroup_procs(tmp_path):
    v1_tree(tmp_path, "/cell", cpu_ns=1, usage=1, inactive=0)
    write(tmp_path / "memory" / "cell" / "cgroup.procs", "")
    write(tmp_path / "memory" / "cell" / "a" / "cgroup.procs", "10\n11\n")
    write(tmp_path / "memory" / "cell" / "b" / "cgroup.procs", "12\n")
    hs = {k: v for k, v in stats.hierarchies(tmp_path).items() if k != "pids"}
    assert stats.process_count(hs, "/cell") == 3


def test_net_dev_leaves_loopback_out():
    assert stats.net_dev(NET_DEV) == [stats.Interface(
        name="eth0", rx_bytes=1234, rx_packets=12, rx_errors=1, rx_dropped=2,
        tx_bytes=5678, tx_packets=34, tx_errors=3, tx_dropped=4)]


class FakeManager:
    """What the sampler reads of the container manager: records, cgroup paths, layer dirs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.records: dict[str, ContainerRecord] = {}
        self.store = SimpleNamespace(all=lambda: list(self.records.values()))

    def cgroup_path(self, cid: str) -> str:
        return f"/cell/{cid}"

    def paths(self, cid: str) -> SimpleNamespace:
        return SimpleNamespace(upper=self.tmp / "upper" / cid)


def sampler(tmp_path: Path) -> tuple[stats.StatsSampler, FakeManager, EventHub]:
    """A sampler of the cgroup tree under tmp/cg (made first), with tmp/proc as its /proc."""
    cfg = AgentConfig(host="127.0.0.1", port=1, tls_dir=tmp_path, state_dir=tmp_path, cgroup_parent="cell")
    proc = tmp_path / "proc"
    write(proc / "net" / "dev", NET_DEV)
    mgr = FakeManager(tmp_path)
    hub = EventHub()
    return stats.StatsSampler(cfg, mgr, hub, cgroups=stats.hierarchies(tmp_path / "cg"), proc=proc), mgr, hub


def test_a_pass_samples_live_containers_and_the_pod_and_forgets_the_rest(tmp_path):
    cg = tmp_path / "cg"
    v1_tree(cg, "/cell", cpu_ns=3_000_000_000, usage=90 << 20, inactive=0, pids=5)
    v1_tree(cg, f"/cell/{CID}", cpu_ns=1_000_000_000, usage=40 << 20, inactive=4 << 20, pids=2)
    s, mgr, _ = sampler(tmp_path)
    mgr.records[CID] = ContainerRecord(id=CID, name="c", image_digest="sha256:x", state="running", pid=1)
    exited = "e" * 64
    mgr.records[exited] = ContainerRecord(id=exited, name="e", image_digest="sha256:x", state="exited")
    not_yet = "d" * 64  # live, but no cgroup (yet): left out, not zeroed
    mgr.records[not_yet] = ContainerRecord(id=not_yet, name="d", image_digest="sha256:x", state="created")

    s.sample()
    first = s.containers[CID]
    assert set(s.containers) == {CID}
    assert first.cpu == stats.Cpu(usage_core_nano_seconds=1_000_000_000, usage_nano_cores=None)
    assert first.memory is not None and first.memory.working_set_bytes == 36 << 20
    assert first.process_count == 2 and first.writable_layer is None
    assert s.pod is not None and s.pod.process_count == 5
    assert s.pod.network is not None and [i.name for i in s.pod.network.interfaces] == ["eth0"]

    write(cg / "cpuacct" / "cell" / CID / "cpuacct.usage", "1500000000\n")
    s.sample()
    second = s.containers[CID]
    assert second.timestamp >= first.timestamp
    assert second.cpu is not None and second.cpu.usage_core_nano_seconds == 1_500_000_000
    assert second.cpu.usage_nano_cores is not None and second.cpu.usage_nano_cores > 0
    assert s.pod.cpu is not None and s.pod.cpu.usage_nano_cores == 0  # the pod's counter stood still

    del mgr.records[CID]  # deleted: gone from the next pass, and so is its CPU mark
    s.sample()
    assert s.containers == {} and CID not in s._marks
    view = s.view()
    assert view["containers"] == [] and view["pod"]["memory"]["working_set_bytes"] == 90 << 20


async def test_each_pass_is_published_to_those_who_asked(tmp_path):
    v1_tree(tmp_path / "cg", "/cell", cpu_ns=1, usage=1, inactive=0)
    s, _, hub = sampler(tmp_path)
    asked, plain = hub.subscribe(stats=True), hub.subscribe()
    s.start()
    try:
        event = await asyncio.wait_for(asked.queue.get(), 10)
    finally:
        await s.close()
    assert event["type"] == "stats" and event["stats"]["containers"] == []
    assert event["stats"]["pod"]["cpu"]["usage_core_nano_seconds"] == 1
    assert plain.queue.empty()  # a stream that did not ask for stats gets none

