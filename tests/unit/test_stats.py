"""Stats on the node: what fake agents push on their event streams reaches every CRI
stats call through the socket (the cache, its filters, what it forgets), and the
conversions to CRI messages and cAdvisor-style metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kiyot_py.cri import convert, metrics
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Sandbox
from kiyot_py.pods import stats
from tests.unit.test_verbs import Node, create, run_pod

SECOND = 1_000_000_000
MiB = 1 << 20
T0 = 1_764_000_000 * SECOND


def container_sample(cid: str, cpu_ns: int = 3 * SECOND, working_set: int = 40 * MiB, at: int = T0) -> dict:
    return {"id": cid, "timestamp": at,
            "cpu": {"usage_core_nano_seconds": cpu_ns, "usage_nano_cores": 500_000_000},
            "memory": {"usage_bytes": working_set + MiB, "working_set_bytes": working_set, "rss_bytes": working_set,
                       "page_faults": 100, "major_page_faults": 2, "available_bytes": None},
            "process_count": 2,
            "writable_layer": {"timestamp": at - 5 * SECOND, "used_bytes": 8192, "inodes_used": 3}}


def pod_sample(at: int = T0) -> dict:
    eth0 = {"name": "eth0", "rx_bytes": 1000, "rx_packets": 10, "rx_errors": 1, "rx_dropped": 0,
            "tx_bytes": 2000, "tx_packets": 20, "tx_errors": 0, "tx_dropped": 3}
    return {"timestamp": at, "cpu": {"usage_core_nano_seconds": 5 * SECOND, "usage_nano_cores": None},
            "memory": {"usage_bytes": 64 * MiB, "working_set_bytes": 60 * MiB, "rss_bytes": 50 * MiB,
                       "page_faults": 300, "major_page_faults": 4, "available_bytes": 4 * MiB},
            "process_count": 3,
            "network": {"timestamp": at, "interfaces": [{**eth0, "name": "tunl0"}, eth0]}}


@pytest.fixture
async def node(tmp_path):
    n = await Node(tmp_path).start()
    yield n
    await n.stop()


async def running_pod(node: Node) -> tuple[str, str]:
    sid = await run_pod(node)
    cid = await create(node, sid)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    return sid, cid


async def until(pred, what: str):
    for _ in range(500):  # bounded: 5 s
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def pushed(node: Node, sid: str, body: dict, cid: str) -> None:
    """Push a sample from the sandbox's cell and wait until the node holds it."""
    node.agent_of(sid).push_stats(body)
    await until(lambda: node.runtime.stats.container(cid)[1] is not None
                and node.runtime.stats.container(cid)[1].timestamp == body["containers"][0]["timestamp"],
                "the node to take the sample")


async def test_pushed_stats_answer_the_container_calls(node):
    sid, cid = await running_pod(node)
    await pushed(node, sid, {"pod": pod_sample(), "containers": [container_sample(cid)]}, cid)
    s = (await node.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid))).stats
    assert (s.attributes.id, s.attributes.metadata.name, dict(s.attributes.labels)) == (cid, "app", {"c": "app"})
    assert (s.cpu.timestamp, s.cpu.usage_core_nano_seconds.value, s.cpu.usage_nano_cores.value) == \
        (T0, 3 * SECOND, 500_000_000)
    assert (s.memory.timestamp, s.memory.working_set_bytes.value, s.memory.rss_bytes.value) == (T0, 40 * MiB, 40 * MiB)
    assert (s.memory.page_faults.value, s.memory.major_page_faults.value) == (100, 2)
    assert not s.memory.HasField("available_bytes")  # no limit: no figure, not 0
    assert s.writable_layer.used_bytes.value == 8192 and s.writable_layer.inodes_used.value == 3
    assert s.writable_layer.fs_id.mountpoint == str(node.settings.state_dir)  # as ImageFsInfo names it

    async def ids(**f) -> list[str]:
        resp = await node.rt.ListContainerStats(pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**f)))
        return [x.attributes.id for x in resp.stats]

    assert await ids() == [cid]
    assert await ids(id=cid[:12]) == [cid]  # a prefix, as ListContainers takes it
    assert await ids(pod_sandbox_id=sid) == [cid]
    assert await ids(pod_sandbox_id="0" * 64) == []
    assert await ids(label_selector={"c": "app"}) == [cid]
    assert await ids(label_selector={"c": "other"}) == []
    streamed = [x.attributes.id async for page in node.rt.StreamContainerStats(pb.StreamContainerStatsRequest())
                for x in page.container_stats]
    assert streamed == [cid]


async def test_pushed_stats_answer_the_sandbox_calls(node):
    sid, cid = await running_pod(node)
    other, _ = await running_pod_named(node, "db", "uid-2")
    await pushed(node, sid, {"pod": pod_sample(), "containers": [container_sample(cid)]}, cid)
    s = (await node.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid))).stats
    assert (s.attributes.id, s.attributes.metadata.name, dict(s.attributes.labels)) == (sid, "web", {"app": "web"})
    linux = s.linux
    assert (linux.cpu.timestamp, linux.cpu.usage_core_nano_seconds.value) == (T0, 5 * SECOND)
    assert not linux.cpu.HasField("usage_nano_cores")  # the cell's first sample: no rate yet
    assert (linux.memory.working_set_bytes.value, linux.memory.available_bytes.value) == (60 * MiB, 4 * MiB)
    assert linux.process.process_count.value == 3
    assert [i.name for i in linux.network.interfaces] == ["tunl0", "eth0"]
    assert linux.network.default_interface.name == "eth0"
    assert (linux.network.default_interface.rx_bytes.value, linux.network.default_interface.tx_errors.value) == \
        (1000, 0)
    assert [c.attributes.id for c in linux.containers] == [cid]
    assert linux.containers[0].cpu.usage_core_nano_seconds.value == 3 * SECOND

    async def ids(**f) -> list[str]:
        resp = await node.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(filter=pb.PodSandboxStatsFilter(**f)))
        return sorted(x.attributes.id for x in resp.stats)

    assert await ids() == sorted([sid, other])
    assert await ids(id=sid[:10]) == [sid]
    assert await ids(label_selector={"app": "db"}) == [other]
    streamed = [x.attributes.id async for page in node.rt.StreamPodSandboxStats(pb.StreamPodSandboxStatsRequest())
                for x in page.pod_sandbox_stats]
    assert sorted(streamed) == sorted([sid, other])


async def running_pod_named(node: Node, name: str, uid: str) -> tuple[str, str]:
    sid = await run_pod(node, name=name, uid=uid)
    cid = await create(node, sid, name=f"{name}-app")
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    return sid, cid


async def test_without_a_sample_a_container_has_its_attributes_and_no_figures(node):
    # An agent that pushes no stats (an older one), or a container not sampled yet.
    sid, cid = await running_pod(node)
    s = (await node.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid))).stats
    assert s.attributes.id == cid and s.attributes.metadata.name == "app"
    assert s.cpu.timestamp > 0 and s.memory.timestamp > 0  # critest asks for both timestamps
    assert not s.cpu.HasField("usage_core_nano_seconds") and not s.memory.HasField("working_set_bytes")
    assert not s.HasField("writable_layer")
    pod = (await node.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid))).stats
    assert pod.linux.cpu.timestamp > 0 and not pod.linux.HasField("network")
    assert [c.attributes.id for c in pod.linux.containers] == [cid]


async def test_a_cell_speaks_only_for_its_own_containers_and_bad_stats_change_nothing(node):
    sid, cid = await running_pod(node)
    other_sid, other_cid = await running_pod_named(node, "db", "uid-2")
    await pushed(node, sid, {"pod": pod_sample(), "containers": [container_sample(cid)]}, cid)
    # The db pod's cell names the web pod's container: not taken.
    node.agent_of(other_sid).push_stats({"pod": pod_sample(), "containers": [
        container_sample(cid, cpu_ns=99 * SECOND, at=T0 + SECOND), container_sample(other_cid, at=T0 + SECOND)]})
    await until(lambda: node.runtime.stats.container(other_cid)[1] is not None, "the db pod's sample")
    assert node.runtime.stats.container(cid)[1].cpu.usage_core_nano_seconds == 3 * SECOND
    # Malformed: ignored whole (nothing of it taken), and the stream goes on.
    bad_cpu = {**container_sample(cid, at=T0 + 3 * SECOND), "cpu": {"usage_core_nano_seconds": "x"}}
    bad = [{"pod": {"timestamp": -1}, "containers": [container_sample(cid, at=T0 + 2 * SECOND)]},
           {"containers": [bad_cpu]}, {"containers": {}}, ["not", "an", "object"]]
    for body in bad:
        node.runtime.stats.apply(sid, body)
        assert node.runtime.stats.container(cid)[1].timestamp == T0
        assert node.runtime.stats.sandbox(sid)[1].timestamp == T0
    agent = node.agent_of(sid)
    for body in bad:
        agent.push_stats(body)
    later = container_sample(cid, cpu_ns=4 * SECOND, at=T0 + 4 * SECOND)
    await pushed(node, sid, {"pod": None, "containers": [later]}, cid)
    assert node.runtime.stats.container(cid)[1].cpu.usage_core_nano_seconds == 4 * SECOND
    assert node.runtime.stats.sandbox(sid)[1] is None  # that sample had no pod figures
    # A container the cell no longer reports has no figures any more.
    node.agent_of(sid).push_stats({"pod": pod_sample(T0 + 5 * SECOND), "containers": []})
    await until(lambda: node.runtime.stats.container(cid)[1] is None, "the container's figures to go")


async def test_figures_go_with_the_container_and_the_sandbox(node):
    sid, cid = await running_pod(node)
    await pushed(node, sid, {"pod": pod_sample(), "containers": [container_sample(cid)]}, cid)
    await node.rt.StopContainer(pb.StopContainerRequest(container_id=cid))
    await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert cid not in node.runtime.stats._containers
    assert node.runtime.stats.sandbox(sid)[1] is not None
    await node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # its cell runs no more (as containerd: unavailable)
        await node.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await node.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest())).stats == []
    assert sid not in node.runtime.stats._pods
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_metric_is_described_and_labelled_as_its_descriptor_says(node):
    sid, cid = await running_pod(node)
    await pushed(node, sid, {"pod": pod_sample(), "containers": [container_sample(cid)]}, cid)
    descriptors = {d.name: list(d.label_keys)
                   for d in (await node.rt.ListMetricDescriptors(pb.ListMetricDescriptorsRequest())).descriptors}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes", "container_memory_rss",
            "container_network_receive_bytes_total", "container_network_transmit_bytes_total"} <= descriptors.keys()
    (pod,) = (await node.rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest())).pod_metrics
    assert pod.pod_sandbox_id == sid
    every = [*pod.metrics, *(m for c in pod.container_metrics for m in c.metrics)]
    for m in every:
        assert m.name in descriptors, m.name
        assert len(m.label_values) == len(descriptors[m.name]), m.name
    by_name = {(m.name, tuple(m.label_values)): m for m in every}
    cpu = by_name["container_cpu_usage_seconds_total", ("web", "default", "app", cid, "registry.example/app:1")]
    assert (cpu.value.value, cpu.metric_type, cpu.timestamp) == (3, pb.COUNTER, T0)
    rx = by_name["container_network_receive_bytes_total", ("web", "default", "", sid, "", "eth0")]
    assert rx.value.value == 1000
    ws = by_name["container_memory_working_set_bytes", ("web", "default", "app", cid, "registry.example/app:1")]
    assert (ws.value.value, ws.metric_type) == (40 * MiB, pb.GAUGE)
    streamed = [p async for page in node.rt.StreamPodSandboxMetrics(pb.StreamPodSandboxMetricsRequest())
                for p in page.pod_sandbox_metrics]
    assert [p.pod_sandbox_id for p in streamed] == [sid]


def test_the_default_interface_is_eth0_else_the_first():
    def interface(name: str) -> stats.Interface:
        return stats.Interface(name, 1, 1, 0, 0, 2, 2, 0, 0)
    net = stats.Network(timestamp=T0, interfaces=(interface("veth1"), interface("eth0")))
    assert convert.network_usage(net).default_interface.name == "eth0"
    net = stats.Network(timestamp=T0, interfaces=(interface("veth1"), interface("veth2")))
    assert convert.network_usage(net).default_interface.name == "veth1"
    assert not convert.network_usage(stats.Network(timestamp=T0, interfaces=())).HasField("default_interface")


def test_a_pod_without_network_figures_has_only_its_containers_metrics():
    sb = Sandbox(id="s" * 64, name="web", namespace="default", uid="u", attempt=0)
    out = metrics.pod_sandbox_metrics(sb, None, [], "/var/lib/kiyot-py")
    assert (out.pod_sandbox_id, list(out.metrics), list(out.container_metrics)) == (sb.id, [], [])
