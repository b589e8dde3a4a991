"""Warm pools (kiyot_py/pods/pool.py) over the fake provider and agents: a RunPodSandbox
claims a standby cell, the pool refills, one cell never goes to two pods (also across a
restart between the claim and the retag), a pool that shrank lets go of its extra cells,
a dead standby cell is replaced, and the orphan collector never takes a standby cell."""

from __future__ import annotations

import asyncio

from kiyot_py.config import PoolSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Sandbox
from kiyot_py.pods.cells import launch_token
from kiyot_py.pods.gc import OrphanCollector
from kiyot_py.providers.base import CellShape
from tests.unit.test_verbs import Node, pod_config, run_pod

STANDBY = {"kiyot-node": "node-a", "kiyot-role": "standby"}


def pooled(tmp_path, size: int = 2) -> Node:
    node = Node(tmp_path)
    node.settings.pools = [PoolSettings(name="small", size=size)]
    return node


async def full(node: Node, ready: int | None = None) -> None:
    """Until every pool has `ready` (default: its size) standby cells (bounded: 10 s)."""
    for _ in range(1000):
        assert node.runtime.pools is not None
        if all(r == (size if ready is None else ready) for r, size in node.runtime.pools.sizes().values()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pools not full: {node.runtime.pools.sizes()}")


def standby_ids(node: Node) -> set[str]:
    return {c.id for c in node.provider.cells.values() if c.tags.get("kiyot-role") == "standby"}


async def test_a_pod_claims_a_standby_cell_and_the_pool_refills(tmp_path):
    node = await pooled(tmp_path).start()
    try:
        await full(node)
        waiting = standby_ids(node)
        assert len(waiting) == 2

        sid = await run_pod(node)

        cell = node.provider.cells[node.runtime.index.sandboxes[sid].cell.id]
        assert cell.id in waiting  # no launch of its own
        assert launch_token("node-a", "uid-1", 0) not in node.provider.launches
        assert cell.tags["kiyot-role"] == "pod" and cell.tags["kiyot-sandbox"] == sid
        assert cell.tags["kiyot-pool"] == "small" and cell.tags["pod-label:app"] == "web"
        assert cell.sandbox_id == sid
        assert node.agent_of(sid).pod["sandbox_id"] == sid  # handed the pod, as a new cell is
        await full(node)
        assert len(standby_ids(node)) == 2 and cell.id not in standby_ids(node)
    finally:
        await node.stop()


async def test_concurrent_pods_never_share_a_standby_cell(tmp_path):
    node = await pooled(tmp_path).start()
    try:
        await full(node)
        sids = await asyncio.gather(*(run_pod(node, name=f"p{i}", uid=f"uid-{i}") for i in range(5)))
        cells = [node.runtime.index.sandboxes[sid].cell.id for sid in sids]
        assert len(set(cells)) == 5
        from_pool = [c for c in cells if "kiyot-pool" in node.provider.cells[c].tags]
        assert len(from_pool) >= 2  # the two that were ready (and refills, if they came up in time)
    finally:
        await node.stop()


async def test_a_claim_cut_short_by_a_restart_stays_with_its_sandbox(tmp_path):
    """The node died after the sandbox recorded its claim, before the cell was retagged:
    the standby-tagged cell is the adopted sandbox's, and the pool makes up its size."""
    token = launch_token("node-a", "uid-1", 0)
    claimed = Sandbox(id="a" * 64, name="web", namespace="default", uid="uid-1", attempt=0,
                      config=pod_config().SerializeToString(), launch_token=token)

    async def seed(node: Node) -> None:
        claimed.cell = await node.provider.launch(CellShape(tags={**STANDBY, "kiyot-pool": "small"}), "s1" * 16)
        await node.provider.launch(CellShape(tags={**STANDBY, "kiyot-pool": "small"}), "s2" * 16)
        node.store.put(claimed)

    node = await pooled(tmp_path).start(seed)
    try:
        sid = await run_pod(node)  # the kubelet's retry joins the adopted creation
        assert sid == claimed.id
        cell = node.provider.cells[claimed.cell.id]
        assert cell.tags["kiyot-role"] == "pod" and cell.tags["kiyot-sandbox"] == sid
        assert token not in node.provider.launches  # no second cell for the pod
        await full(node)
        assert claimed.cell.id not in standby_ids(node) and len(standby_ids(node)) == 2
        status = (await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))).status
        assert status.state == pb.SANDBOX_READY
    finally:
        await node.stop()


async def test_a_pool_that_shrank_or_went_away_lets_its_cells_go(tmp_path):
    async def seed(node: Node) -> None:
        for i in range(3):
            await node.provider.launch(CellShape(tags={**STANDBY, "kiyot-pool": "small"}), f"k{i}" * 16)
        await node.provider.launch(CellShape(tags={**STANDBY, "kiyot-pool": "gone"}), "g0" * 16)

    node = await pooled(tmp_path, size=1).start(seed)
    try:
        await full(node)
        for _ in range(500):  # bounded: 5 s (terminations run in the background)
            if len(node.provider.terminated) == 3:
                break
            await asyncio.sleep(0.01)
        assert sorted(node.provider.terminated) == sorted(["fk1k1k1k1k1k1", "fk2k2k2k2k2k2", "fg0g0g0g0g0g0"])
        assert standby_ids(node) == {"fk0k0k0k0k0k0"}  # the oldest kept; no new launch
    finally:
        await node.stop()


async def test_a_dead_standby_cell_is_replaced_at_its_claim(tmp_path):
    node = await pooled(tmp_path, size=1).start()
    try:
        await full(node)
        (dead,) = standby_ids(node)
        node.agents.by_cell[dead].unreachable = True

        sid = await run_pod(node)

        assert dead in node.provider.terminated
        cell = node.runtime.index.sandboxes[sid].cell
        assert cell.id != dead and node.provider.launches[launch_token("node-a", "uid-1", 0)] == 1
    finally:
        await node.stop()


async def test_the_orphan_collector_leaves_standby_cells_alone(tmp_path):
    node = await pooled(tmp_path).start()
    try:
        await full(node)
        waiting = standby_ids(node)
        collector = OrphanCollector(node.runtime.index, node.provider, "node-a", grace=0.0)
        for _ in range(3):
            await collector.collect()
        assert node.provider.terminated == [] and standby_ids(node) == waiting
    finally:
        await node.stop()


async def test_a_pod_too_big_for_the_pool_gets_its_own_cell(tmp_path):
    node = await pooled(tmp_path, size=1).start()
    node.provider.fits = lambda cell, shape: shape.memory_bytes == 0  # type: ignore[method-assign]
    try:
        await full(node)
        sid = await run_pod(node)  # asks for 512 MiB (pod_config)
        assert node.runtime.index.sandboxes[sid].cell.id not in standby_ids(node) | set(node.provider.terminated)
        assert len(standby_ids(node)) == 1
    finally:
        await node.stop()


async def test_a_pod_waits_for_a_standby_cell_coming_up_rather_than_launch_its_own(tmp_path):
    node = pooled(tmp_path, size=1)
    node.provider.running_delay = 0.3  # the standby cell is still booting when the pod comes
    await node.start()
    try:
        assert node.runtime.pools is not None and node.runtime.pools.sizes() == {"small": (0, 1)}
        sid = await run_pod(node)
        cell = node.runtime.index.sandboxes[sid].cell
        assert cell.tags.get("kiyot-pool") == "small"
        assert launch_token("node-a", "uid-1", 0) not in node.provider.launches
    finally:
        await node.stop()

