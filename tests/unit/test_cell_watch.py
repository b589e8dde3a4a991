"""Cells that go away behind the node's back: only the provider's word on the instance
decides, and the reason the kubelet sees says what happened."""

from __future__ import annotations

import asyncio
import json

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Cell
from kiyot_py.pods.cellwatch import why_gone
from kiyot_py.providers.base import CellEvent, ProviderUnavailable

from .test_verbs import Node, create, run_pod


@pytest.fixture
async def node(tmp_path):
    n = await Node(tmp_path).start()
    yield n
    await n.stop()


async def _running_pod(node: Node) -> tuple[str, str, str]:
    sid = await run_pod(node)
    cid = await create(node, sid)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    cell_id = node.runtime.index.sandboxes[sid].cell.id
    return sid, cid, cell_id


async def _statuses(node: Node, sid: str, cid: str) -> tuple[pb.PodSandboxStatus, pb.ContainerStatus]:
    sandbox = (await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True)))
    container = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
    return sandbox, container


async def _until(predicate, rounds: int = 300) -> bool:
    for _ in range(rounds):  # bounded: 3 s
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_a_spot_notice_is_recorded_then_the_termination_reads_spot_interrupted(node):
    sid, cid, cell_id = await _running_pod(node)
    node.agent_of(sid).announce("spot-interruption")
    sb = node.runtime.index.sandboxes[sid]
    assert await _until(lambda: sb.cell.notices)
    assert sb.cell.notices[0]["kind"] == "spot-interruption" and sb.cell.notices[0]["source"] == "agent"
    assert node.provider.interruptions == [cell_id]  # it keeps new cells off that capacity
    sandbox, container = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_READY  # a notice is not the end yet
    assert json.loads(sandbox.info["info"])["cell"]["notices"][0]["action"] == "terminate"

    gone = node.provider.cells[cell_id]
    gone.state, gone.state_reason = "terminated", "Server.SpotInstanceTermination: Spot instance termination"
    await node.runtime.watch.check()
    sandbox, container = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_NOTREADY
    assert (container.state, container.exit_code, container.reason) == (pb.CONTAINER_EXITED, 137, "SpotInterrupted")
    assert "Spot instance termination" in container.message and "notice via agent" in container.message
    assert cell_id not in node.provider.cells  # what was left of it released


async def test_stopped_behind_the_nodes_back_reads_instance_stopped_and_is_released(node):
    sid, cid, cell_id = await _running_pod(node)
    node.provider.cells[cell_id].state = "stopped"
    await node.runtime.watch.check()
    sandbox, container = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_NOTREADY
    assert (container.state, container.exit_code, container.reason) == (pb.CONTAINER_EXITED, 137, "InstanceStopped")
    assert node.provider.terminated == [cell_id]  # a stopped instance still holds its disk: terminated


async def test_a_stopped_cell_not_released_when_lost_is_released_by_stop_pod_sandbox(node):
    sid, cid, cell_id = await _running_pod(node)
    node.provider.cells[cell_id].state = "stopped"
    node.provider.fail_terminate = ProviderUnavailable("throttled")
    await node.runtime.watch.check()
    sandbox, _ = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_NOTREADY and cell_id in node.provider.cells
    assert node.runtime.index.sandboxes[sid].cell.state == "stopped"
    await node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))  # the kubelet's next step
    assert node.provider.terminated == [cell_id]
    assert node.runtime.index.sandboxes[sid].cell.state == "terminated"  # a repeat asks nothing more


async def test_a_cell_the_provider_no_longer_knows_is_lost_after_two_rounds(node):
    sid, cid, cell_id = await _running_pod(node)
    del node.provider.cells[cell_id]
    await node.runtime.watch.check()
    assert (await _statuses(node, sid, cid))[0].status.state == pb.SANDBOX_READY  # eventual consistency
    await node.runtime.watch.check()
    sandbox, container = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_NOTREADY and container.reason == "InstanceTerminated"


async def test_a_silent_agent_changes_nothing_while_its_instance_runs(node):
    sid, cid, _ = await _running_pod(node)
    agent = node.agent_of(sid)
    agent.unreachable = True
    agent.break_stream()
    for _ in range(3):
        await node.runtime.watch.check()
    await asyncio.sleep(0.3)  # the watcher retried meanwhile, and failed
    sandbox, container = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_READY and container.state == pb.CONTAINER_RUNNING
    agent.unreachable = False


async def test_the_providers_feed_records_notices_and_brings_the_check_forward(node):
    sid, cid, cell_id = await _running_pod(node)
    node.provider.post(CellEvent(cell_id, "rebalance-recommendation", time="2026-12-02T10:00:00Z", source="sqs"))
    node.provider.post(CellEvent(cell_id, "spot-interruption", action="terminate", source="sqs"))
    sb = node.runtime.index.sandboxes[sid]
    assert [n["kind"] for n in sb.cell.notices] == ["rebalance-recommendation", "spot-interruption"]
    node.provider.post(CellEvent(cell_id, "spot-interruption", action="terminate", source="sqs"))
    assert len(sb.cell.notices) == 2  # once per kind
    assert node.provider.interruptions == [cell_id]  # a rebalance recommendation is not one
    node.provider.cells[cell_id].state = "terminated"
    node.provider.post(CellEvent(cell_id, "state", state="shutting-down", source="sqs"))
    # No round of the 10 s period is due: the event brings one forward.
    assert await _until(lambda: sb.state == "SANDBOX_NOTREADY")
    container = (await _statuses(node, sid, cid))[1]
    assert container.reason == "SpotInterrupted" and "notice via sqs" in container.message


async def test_events_of_unknown_instances_change_nothing(node):
    sid, cid, _ = await _running_pod(node)
    node.provider.post(CellEvent("i-0123456789abcdef0", "state", state="terminated", source="sqs"))
    node.provider.post(CellEvent("i-0123456789abcdef0", "spot-interruption", source="sqs"))
    await asyncio.sleep(1.2)
    sandbox, _ = await _statuses(node, sid, cid)
    assert sandbox.status.state == pb.SANDBOX_READY
    assert node.runtime.index.sandboxes[sid].cell.notices == []


def test_why_gone_says_what_happened():
    recorded = Cell(id="i-1", sandbox_id="s", address="10.0.0.2", agent_url="https://10.0.0.2:9276")
    assert why_gone(recorded, None)[0] == "InstanceTerminated"
    stopped = Cell(id="i-1", sandbox_id="s", address="", agent_url="", state="stopped",
                   state_reason="Client.UserInitiatedShutdown: User initiated shutdown")
    assert why_gone(recorded, stopped) == (
        "InstanceStopped", "the cell's instance i-1 was stopped: Client.UserInitiatedShutdown: User initiated shutdown")
    spot = Cell(id="i-1", sandbox_id="s", address="", agent_url="", state="terminated",
                state_reason="Server.SpotInstanceTermination: Spot instance termination")
    assert why_gone(recorded, spot)[0] == "SpotInterrupted"  # EC2's reason alone, no notice heard
