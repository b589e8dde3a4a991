"""UpdateContainerResources, UpdatePodSandboxResources and CheckpointContainer through the
socket, over fake agents: what the cell is asked to apply (converted as at create), what
ContainerStatus reports back, and the answers for containers that run no more."""

from __future__ import annotations

import json

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Container
from tests.unit.test_verbs import IMAGE, Node, pod_config, run_pod

MiB = 1 << 20


@pytest.fixture
async def node(tmp_path):
    n = await Node(tmp_path).start()
    yield n
    await n.stop()


async def limited_container(node: Node, sid: str, **resources) -> str:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app"), image=pb.ImageSpec(image=IMAGE),
                                linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(**resources)))
    return (await node.rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=config, sandbox_config=pod_config()))).container_id


async def update(node: Node, cid: str, **linux) -> None:
    await node.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(**linux)))


async def status_resources(node: Node, cid: str) -> pb.LinuxContainerResources:
    status = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
    assert status.HasField("resources")
    return status.resources.linux


async def test_new_limits_go_to_the_cell_as_at_create_and_the_status_reports_them(node):
    sid = await run_pod(node)
    cid = await limited_container(node, sid, cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                                  memory_limit_in_bytes=128 * MiB)
    agent = node.agent_of(sid)
    # The create spec's limits and the update's come from one conversion.
    assert agent.containers[cid].body["spec"]["linux"]["resources"]["memory"] == {"limit": 128 * MiB}
    before = await status_resources(node, cid)
    assert (before.cpu_shares, before.cpu_quota, before.cpu_period, before.memory_limit_in_bytes) == (
        512, 50000, 100000, 128 * MiB)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))

    await update(node, cid, memory_limit_in_bytes=64 * MiB)  # as `crictl update --memory`
    assert agent.resource_updates == [(cid, {"memory": {"limit": 64 * MiB}})]  # a zero keeps its value
    now = await status_resources(node, cid)
    assert (now.cpu_shares, now.cpu_quota, now.memory_limit_in_bytes) == (512, 50000, 64 * MiB)

    # What the kubelet's resize sends: every figure, and pids.max as at create.
    await update(node, cid, cpu_shares=1024, cpu_quota=200000, cpu_period=100000,
                 memory_limit_in_bytes=256 * MiB, oom_score_adj=900, unified={"pids.max": "100"})
    assert agent.resource_updates[-1] == (cid, {"cpu": {"shares": 1024, "quota": 200000, "period": 100000},
                                                "memory": {"limit": 256 * MiB}, "pids": {"limit": 100}})
    now = await status_resources(node, cid)
    assert (now.cpu_shares, now.cpu_quota, now.memory_limit_in_bytes) == (1024, 200000, 256 * MiB)
    assert dict(now.unified) == {"pids.max": "100"}
    # The node's record keeps them on disk.
    (saved,) = [c for c in node.store.load(Container) if c.id == cid]
    assert saved.resources["memory"] == {"limit": 256 * MiB}

    # Nothing to change asks nothing; what the conversion refuses never reaches the cell.
    await update(node, cid)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await update(node, cid, unified={"pids.max": "lots"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pids.max" in err.value.details()
    assert len(agent.resource_updates) == 2


async def test_a_container_that_runs_no_more_is_a_success_that_changes_nothing(node):
    sid = await run_pod(node)
    agent = node.agent_of(sid)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await update(node, "f" * 64, memory_limit_in_bytes=64 * MiB)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Stopped: as containerd answers, OK; the cell is not asked.
    stopped = await limited_container(node, sid, memory_limit_in_bytes=128 * MiB)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=stopped))
    await node.rt.StopContainer(pb.StopContainerRequest(container_id=stopped, timeout=1))
    await update(node, stopped, memory_limit_in_bytes=64 * MiB)
    assert agent.resource_updates == []
    assert (await status_resources(node, stopped)).memory_limit_in_bytes == 128 * MiB

    # Ended in the cell before the node heard: the cell's 409 is the same success.
    await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=stopped))
    ended = await limited_container(node, sid, memory_limit_in_bytes=128 * MiB)
    agent.containers[ended].state = "exited"
    await update(node, ended, memory_limit_in_bytes=64 * MiB)
    assert [cid for cid, _ in agent.resource_updates] == [ended]
    assert (await status_resources(node, ended)).memory_limit_in_bytes == 128 * MiB

    # A cell that cannot be reached is an error the kubelet retries.
    await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=ended))
    live = await limited_container(node, sid)
    agent.unreachable = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await update(node, live, memory_limit_in_bytes=64 * MiB)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and live in err.value.details()


async def test_pod_resources_are_recorded_and_shown_never_sent_to_the_cell(node):
    sid = await run_pod(node)
    await limited_container(node, sid)
    resources = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=300000, memory_limit_in_bytes=512 * MiB)
    overhead = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=25000, memory_limit_in_bytes=64 * MiB)
    await node.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=sid, resources=resources, overhead=overhead))
    info = json.loads((await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=sid, verbose=True))).info["info"])
    assert info["pod_resources"] == {  # converted as a container's limits are
        "resources": {"cpu": {"quota": 300000, "period": 100000}, "memory": {"limit": 512 * MiB}},
        "overhead": {"cpu": {"quota": 25000, "period": 100000}, "memory": {"limit": 64 * MiB}}}
    assert node.agent_of(sid).resource_updates == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_checkpoint_container_says_why_it_is_not_implemented(node):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.CheckpointContainer(pb.CheckpointContainerRequest(container_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in err.value.details() and "CRIU" in err.value.details()
