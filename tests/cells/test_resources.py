"""POST /v1/containers/{id}/resources on a real agent: `runc update` changes the limits in
the container's own cgroup (read here from the cgroup files themselves), bad input is
refused before anything changes, what the kernel refuses or a container that has just ended
changes nothing either, and the record keeps the limits across an agent restart."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cells.conftest import Agent, needs_root, spec_of, wait_until

pytestmark = needs_root

MiB = 1 << 20
ROOT = Path("/sys/fs/cgroup")


class Cgroup:
    """A container's cgroup as the kernel shows it: v1 hierarchies per controller, else v2."""

    def __init__(self, agent: Agent, cid: str) -> None:
        self.relative = Path("kiyot-cell-tests") / agent.workdir.name / cid
        self.v1 = (ROOT / "memory" / self.relative).is_dir()

    def read(self, v1_controller: str, v1_file: str, v2_file: str) -> str:
        path = ROOT / v1_controller / self.relative / v1_file if self.v1 else ROOT / self.relative / v2_file
        return path.read_text().strip()

    def memory_limit(self) -> int:
        value = self.read("memory", "memory.limit_in_bytes", "memory.max")
        return -1 if value == "max" else int(value)

    def cpu_quota_period(self) -> tuple[int, int]:
        if self.v1:
            return int(self.read("cpu", "cpu.cfs_quota_us", "")), int(self.read("cpu", "cpu.cfs_period_us", ""))
        quota, period = self.read("", "", "cpu.max").split()
        return (-1 if quota == "max" else int(quota)), int(period)

    def cpu_shares(self) -> int:
        if self.v1:
            return int(self.read("cpu", "cpu.shares", ""))
        weight = int(self.read("", "", "cpu.weight"))  # runc's shares → weight, undone
        return 2 + (weight - 1) * 262142 // 9999

    def pids_limit(self) -> int:
        value = self.read("pids", "pids.max", "pids.max")
        return -1 if value == "max" else int(value)


def limited(**resources) -> dict:
    """A create spec running `sleep 3600` with these linux.resources."""
    return spec_of(["sleep", "3600"], linux={"resources": resources})


def create(agent: Agent, busybox, spec: dict, start: bool = True) -> dict:
    body = {"id": secrets.token_hex(32), "name": "limited", "image_digest": agent.digest(busybox), "spec": spec}
    rec = agent.ok("POST", "/v1/containers", body)
    return agent.ok("POST", f"/v1/containers/{rec['id']}/start") if start else rec


def update(agent: Agent, cid: str, body: dict):
    return agent.call("POST", f"/v1/containers/{cid}/resources", body)


def test_a_memory_limit_update_reaches_the_cgroup_and_the_record(agent, busybox):
    rec = create(agent, busybox, limited(memory={"limit": 128 * MiB}, cpu={"shares": 256}))
    cg = Cgroup(agent, rec["id"])
    assert rec["resources"] == {"memory": {"limit": 128 * MiB}, "cpu": {"shares": 256}}
    assert cg.memory_limit() == 128 * MiB
    t0 = time.monotonic()
    r = update(agent, rec["id"], {"memory": {"limit": 64 * MiB}})
    print(f"runc update: {time.monotonic() - t0:.3f}s")
    assert r.status == 200, r.body
    assert cg.memory_limit() == 64 * MiB
    # What the update left out stays as it was, in the cgroup and in the record.
    assert cg.cpu_shares() == 256
    assert r.json()["resources"] == {"memory": {"limit": 64 * MiB}, "cpu": {"shares": 256}}
    assert agent.record(rec["id"])["resources"] == r.json()["resources"]
    # -1 lifts the limit.
    assert update(agent, rec["id"], {"memory": {"limit": -1}}).status == 200
    assert cg.memory_limit() > 1 << 40


def test_cpu_and_pids_updates_reach_the_cgroup_of_a_created_container_too(agent, busybox):
    rec = create(agent, busybox, limited(cpu={"shares": 1024, "quota": 100000, "period": 100000}), start=False)
    assert rec["state"] == "created"
    cg = Cgroup(agent, rec["id"])
    assert cg.cpu_quota_period() == (100000, 100000)
    r = update(agent, rec["id"], {"cpu": {"shares": 512, "quota": 25000, "period": 50000}, "pids": {"limit": 64}})
    assert r.status == 200, r.body
    assert cg.cpu_quota_period() == (25000, 50000)
    assert cg.cpu_shares() == 512
    assert cg.pids_limit() == 64
    assert r.json()["resources"] == {"cpu": {"shares": 512, "quota": 25000, "period": 50000}, "pids": {"limit": 64}}
    # The limits hold once it runs.
    assert agent.ok("POST", f"/v1/containers/{rec['id']}/start")["state"] == "running"
    assert cg.cpu_quota_period() == (25000, 50000)


BAD = [
    {},
    {"memory": {"limit": 0}},
    {"memory": {"limit": -5}},
    {"memory": {"limit": "64M"}},
    {"memory": {"limit": True}},
    {"memory": {"limit": 64 * MiB, "swap": 32 * MiB}},
    {"memory": {"reservation": 64 * MiB}},
    {"memory": 64 * MiB},
    {"cpu": {"shares": 1}},
    {"cpu": {"shares": 1 << 20}},
    {"cpu": {"quota": 999}},
    {"cpu": {"period": 2_000_000}},
    {"cpu": {"cpus": "0-1; echo"}},
    {"cpu": {"quota": 50000}, "unified": {"memory.high": "1"}},
    {"hugepageLimits": [{"pageSize": "2MB", "limit": 0}]},
    {"pids": {"limit": 0}},
]


@pytest.mark.parametrize("body", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_400_and_changes_nothing(agent, busybox, body):
    rec = create(agent, busybox, limited(memory={"limit": 128 * MiB}, cpu={"quota": 50000, "period": 100000}))
    cg = Cgroup(agent, rec["id"])
    r = update(agent, rec["id"], body)
    assert r.status == 400 and r.json()["error"] == "invalid", r.body
    assert r.json()["message"]
    assert cg.memory_limit() == 128 * MiB and cg.cpu_quota_period() == (50000, 100000)
    assert agent.record(rec["id"])["resources"] == rec["resources"]


@pytest.mark.skipif(Path("/proc/swaps").read_text().count("\n") > 1,
                    reason="with swap the kernel moves the memory out instead of refusing")
def test_a_limit_the_kernel_refuses_is_500_with_its_reason_and_keeps_the_record(agent, busybox):
    # A shell that holds 64 MiB of its own (anonymous memory, which only swap could reclaim).
    hold = "x=$(busybox yes | busybox head -c 67108864); while :; do sleep 3600; done"
    rec = create(agent, busybox, {**limited(cpu={"shares": 256}), "process": spec_of(["sh", "-c", hold])["process"]})
    cg = Cgroup(agent, rec["id"])
    wait_until(lambda: int(cg.read("memory", "memory.usage_in_bytes", "memory.current")) > 64 * MiB,
               what="64 MiB held")
    r = update(agent, rec["id"], {"memory": {"limit": 16 * MiB}})
    assert r.status == 500 and "memory limit" in r.json()["message"], r.body
    assert cg.memory_limit() > 1 << 40  # none, as before
    assert agent.record(rec["id"])["resources"] == {"cpu": {"shares": 256}}
    assert agent.record(rec["id"])["state"] == "running"


def test_a_container_that_ended_before_its_exit_is_recorded_is_409(agent, busybox):
    rec = create(agent, busybox, limited(memory={"limit": 128 * MiB}))
    conmon = int((agent.state_dir / "containers" / rec["id"] / "conmon.pid").read_text())
    os.kill(conmon, signal.SIGSTOP)  # it cannot write the exit file: the record stays "running"
    try:
        subprocess.run(["runc", "kill", rec["id"], "KILL"], check=True, capture_output=True, timeout=30)
        wait_until(lambda: json.loads(subprocess.run(["runc", "state", rec["id"]], capture_output=True, check=True,
                                                     timeout=30).stdout)["status"] == "stopped",
                   what="runc to see it stopped")
        assert agent.record(rec["id"])["state"] == "running"
        r = update(agent, rec["id"], {"memory": {"limit": 64 * MiB}})
        assert r.status == 409 and r.json()["error"] == "conflict", r.body
        assert agent.record(rec["id"])["resources"] == {"memory": {"limit": 128 * MiB}}
    finally:
        os.kill(conmon, signal.SIGCONT)
    assert agent.wait_state(rec["id"], "exited")["exit_code"] == 137


def test_an_ended_container_is_409_and_an_unknown_one_404(agent, busybox):
    rec = create(agent, busybox, spec_of(["true"]))
    agent.wait_state(rec["id"], "exited")
    r = update(agent, rec["id"], {"memory": {"limit": 64 * MiB}})
    assert r.status == 409 and r.json()["error"] == "conflict", r.body
    assert agent.record(rec["id"])["resources"] == {}
    assert update(agent, "f" * 64, {"memory": {"limit": 64 * MiB}}).status == 404
    assert update(agent, "not-an-id", {"memory": {"limit": 64 * MiB}}).status == 400


def test_an_agent_restart_keeps_the_recorded_limits(agent, busybox):
    rec = create(agent, busybox, limited(memory={"limit": 128 * MiB}))
    assert update(agent, rec["id"], {"memory": {"limit": 96 * MiB}, "cpu": {"shares": 300}}).status == 200
    agent.stop()
    agent.start()  # a fresh agent over the same state
    after = agent.record(rec["id"])
    assert after["state"] == "running"
    assert after["resources"] == {"memory": {"limit": 96 * MiB}, "cpu": {"shares": 300}}
    assert Cgroup(agent, rec["id"]).memory_limit() == 96 * MiB
    # And it still updates what it re-attached to.
    assert update(agent, rec["id"], {"memory": {"limit": 80 * MiB}}).status == 200
    assert Cgroup(agent, rec["id"]).memory_limit() == 80 * MiB
