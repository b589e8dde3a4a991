"""Stats through the CRI socket, as the kubelet asks for them: a container that spins and
holds 64 MiB in its cell shows rising CPU and its working set, the cell's cgroup agrees,
and the metrics the kubelet turns into /metrics/cadvisor are all described."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import run, wait_for, wait_state

SECOND = 1_000_000_000
MiB = 1 << 20
# Holds 64 MiB (a shell variable: anonymous memory) and spins one core.
BUSY = "x=$(busybox yes | busybox head -c 67108864); while :; do :; done"


@pytest.fixture
def pulled(img, test_images):
    ref = test_images["busybox"].ref
    return img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref))).image_ref


def cell_working_set(cell_id: str, container_id: str) -> int:
    """The container's working set as its cell's cgroup gives it (cgroup v1 here)."""
    cg = Path("/sys/fs/cgroup/memory/kiyot") / cell_id / container_id
    stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    return max(int((cg / "memory.usage_in_bytes").read_text()) - int(stat["total_inactive_file"]), 0)


def test_a_busy_container_shows_rising_cpu_and_its_working_set(cri, pod, pulled, test_images):
    sandbox_id, _ = pod
    cid = run(cri, pod, "busy", test_images["busybox"].ref, ["sh", "-c", BUSY])
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING

    def stats() -> pb.ContainerStats:
        return cri.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats

    def filled():  # sampled twice (a rate), with the 64 MiB in and its writable layer walked
        s = stats()
        return s if (s.cpu.HasField("usage_nano_cores") and s.memory.working_set_bytes.value >= 60 * MiB
                     and s.HasField("writable_layer")) else None

    first = wait_for(filled)
    assert first, stats()
    later = wait_for(lambda: (s := stats()).cpu.timestamp >= first.cpu.timestamp + SECOND and s)
    burnt = later.cpu.usage_core_nano_seconds.value - first.cpu.usage_core_nano_seconds.value
    elapsed = later.cpu.timestamp - first.cpu.timestamp
    print(f"CPU {burnt / SECOND:.2f} s over {elapsed / SECOND:.2f} s; "
          f"{later.cpu.usage_nano_cores.value / SECOND:.2f} cores")
    assert burnt > 0 and later.cpu.usage_nano_cores.value > 0
    assert later.attributes.metadata.name == "busy" and later.attributes.labels["container"] == "busy"

    info = json.loads(cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                      verbose=True)).info["info"])
    own = cell_working_set(info["cell"]["id"], cid)
    ws = stats().memory.working_set_bytes.value
    print(f"working set {ws / MiB:.1f} MiB, the cell's cgroup {own / MiB:.1f} MiB")
    assert abs(ws - own) <= 0.1 * own

    listed = cri.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id=sandbox_id))).stats
    assert [s.attributes.id for s in listed] == [cid]
    assert listed[0].cpu.usage_core_nano_seconds.value >= later.cpu.usage_core_nano_seconds.value
    assert listed[0].writable_layer.fs_id.mountpoint  # the node's filesystem ImageFsInfo names

    (pod_stats,) = cri.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
        filter=pb.PodSandboxStatsFilter(id=sandbox_id))).stats
    linux = pod_stats.linux
    assert pod_stats.attributes.id == sandbox_id
    assert linux.cpu.usage_core_nano_seconds.value >= later.cpu.usage_core_nano_seconds.value
    assert linux.memory.working_set_bytes.value >= 60 * MiB
    assert linux.process.process_count.value >= 1
    assert linux.network.default_interface.name and linux.network.default_interface.rx_bytes.value > 0
    assert [c.attributes.id for c in linux.containers] == [cid]

    described = {d.name: len(d.label_keys)
                 for d in cri.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    (pod_metrics,) = [p for p in cri.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
                      if p.pod_sandbox_id == sandbox_id]
    every = [*pod_metrics.metrics, *(m for c in pod_metrics.container_metrics for m in c.metrics)]
    assert {m.name for m in every} <= described.keys()
    assert all(len(m.label_values) == described[m.name] for m in every)
    names = {m.name for m in every}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
            "container_network_receive_bytes_total"} <= names
