"""Warm pools on local cells, through the socket: a pod claims a standby cell and runs in
it, the pool refills, standby cells outlive the orphan collector's passes, a kill -9 in the
middle of a claim leaves the cell with exactly one pod and the pool at its size, and a
pool made smaller lets its extra cells go."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.hostnet import remove_host_network

from .conftest import Service, cleanup, new_service
from .helpers import cell_dir, remove_pod, run, sandbox_config, wait_for, wait_state

BRIDGE, SUBNET = "kiyotpl0", "10.130.0.0/24"
GC_INTERVAL = 0.5


def write_config(svc: Service, size: int) -> None:
    text = re.sub(r"\n\[\[pools\]\][^\[]*", "\n", svc.config.read_text())
    if not text.startswith("gc_interval"):  # top-level keys go before the first table
        text = f"gc_interval = {GC_INTERVAL}\ngc_grace = {GC_INTERVAL}\n" + text
    svc.config.write_text(text.rstrip("\n") + f'\n[[pools]]\nname = "local"\nsize = {size}\n')


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, registry):
    svc = new_service(tmp_path_factory.mktemp("kiyot-pools"), BRIDGE, SUBNET)
    write_config(svc, 2)
    svc.start()
    yield svc
    cleanup(svc)
    if svc.proc.poll() is None:
        svc.stop()
    # Standby cells outlive the service, as VMs would: reset takes them.
    subprocess.run([sys.executable, "-m", "kiyot_py.cli", "reset", "--yes", "--config", str(svc.config)],
                   check=False, capture_output=True)
    remove_host_network(BRIDGE)


@pytest.fixture
def busybox(pooled, test_images) -> str:
    ref = test_images["busybox"].ref
    pooled.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def pool_fill(svc: Service) -> dict[str, int]:
    info = svc.runtime.Status(pb.StatusRequest(verbose=True)).info
    return json.loads(info["pools"])["local"]


def wait_full(svc: Service, ready: int) -> None:
    assert wait_for(lambda: pool_fill(svc) == {"ready": ready, "size": ready}, 60), pool_fill(svc)


def cells_by_role(svc: Service) -> dict[str, set[str]]:
    roles: dict[str, set[str]] = {}
    for path in (svc.state_dir / "cells").glob("*/cell.json"):
        tags = json.loads(path.read_text())["tags"]
        roles.setdefault(tags.get("kiyot-role", ""), set()).add(path.parent.name)
    return roles


def gc_passes(svc: Service) -> int:
    return svc.log_file.read_text().count("orphan collection pass")


def test_a_pod_runs_in_a_claimed_standby_cell_and_the_pool_refills(pooled, busybox, tmp_path):
    wait_full(pooled, 2)
    standby = cells_by_role(pooled)["standby"]
    assert len(standby) == 2

    config = sandbox_config("pooled", tmp_path)
    t0 = time.monotonic()
    sandbox_id = pooled.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    print(f"RunPodSandbox with a warm pool: {(time.monotonic() - t0) * 1000:.0f} ms")
    try:
        its_dir = cell_dir(pooled.state_dir, sandbox_id)
        assert its_dir.name in standby
        record = json.loads((its_dir / "cell.json").read_text())
        assert record["tags"]["kiyot-role"] == "pod" and record["tags"]["kiyot-pool"] == "local"
        assert record["tags"]["kiyot-sandbox"] == sandbox_id and record["tags"]["pod-label:app"] == "pooled"
        status = pooled.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        assert status.state == pb.SANDBOX_READY and status.network.ip == record["address"]

        cid = run(pooled.runtime, (sandbox_id, config), "hello", busybox, ["sh", "-c", "hostname; echo hi"])
        assert wait_state(pooled.runtime, cid, pb.CONTAINER_EXITED).exit_code == 0

        wait_full(pooled, 2)
        roles = cells_by_role(pooled)
        assert len(roles["standby"]) == 2 and its_dir.name not in roles["standby"]
        assert roles["pod"] == {its_dir.name}

        # The orphan collector passes three times (grace 0.5 s, standby cells older than
        # that): every standby cell is still there.
        waiting, passes = roles["standby"], gc_passes(pooled)
        assert wait_for(lambda: gc_passes(pooled) >= passes + 3, 30)
        assert cells_by_role(pooled)["standby"] == waiting
    finally:
        remove_pod(pooled.runtime, sandbox_id)


@pytest.mark.parametrize("step", ["pool-claim-recorded", "pool-cell-retagged"])
def test_a_kill_9_in_a_claim_leaves_the_cell_with_one_pod_and_the_pool_full(pooled, step, tmp_path):
    wait_full(pooled, 2)
    standby = cells_by_role(pooled)["standby"]
    config = sandbox_config("claim-crash", tmp_path)
    pooled.stop()
    pooled.start(crash_at=step)
    with pytest.raises(grpc.RpcError):
        pooled.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
    assert pooled.proc.wait(timeout=60) == -9, f"the service did not reach {step}"
    pooled.channel.close()
    pooled.start()

    sandbox_id = pooled.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id  # the retry
    try:
        sandboxes = pooled.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert [sb.id for sb in sandboxes if sb.metadata.uid == config.metadata.uid] == [sandbox_id]
        its_dir = cell_dir(pooled.state_dir, sandbox_id)
        assert its_dir.name in standby  # the cell claimed before the kill, and no other
        wait_full(pooled, 2)
        roles = cells_by_role(pooled)
        assert roles["pod"] == {its_dir.name} and its_dir.name not in roles["standby"]
        assert len(roles["standby"]) == 2
    finally:
        remove_pod(pooled.runtime, sandbox_id)
    assert "pod" not in cells_by_role(pooled)


def test_a_smaller_pool_lets_its_extra_cells_go(pooled):
    # Last in this module: it leaves the pool at one cell.
    wait_full(pooled, 2)
    before = cells_by_role(pooled)["standby"]
    pooled.stop()
    write_config(pooled, 1)
    pooled.start()
    wait_full(pooled, 1)
    assert wait_for(lambda: len(cells_by_role(pooled).get("standby", set())) == 1, 30)
    assert cells_by_role(pooled)["standby"] < before  # one of the old ones kept, none launched
