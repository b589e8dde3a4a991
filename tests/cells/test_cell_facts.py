"""What only the cell knows: its network namespace and its cgroup."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tests.cells.conftest import Agent, needs_root

pytestmark = needs_root


@pytest.fixture
def netns_agent(tmp_path):
    name = f"kcell-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    a = Agent(tmp_path)
    a.extra_args = ["--netns", f"/run/netns/{name}"]
    try:
        yield a.start()
    finally:
        a.cleanup()
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_containers_join_the_cells_netns(netns_agent, cell_images):
    a = netns_agent
    img = cell_images["busybox"]
    a.pull(img)
    rec = a.run(img, ["cat", "/proc/net/dev"])
    assert a.wait_state(rec["id"], "exited")["exit_code"] == 0
    log = a.call("GET", f"/v1/containers/{rec['id']}/logs").body.decode()
    ifaces = {ln.split(" F ", 1)[1].split(":")[0].strip() for ln in log.splitlines()[2:]}
    assert ifaces == {"lo"}, log  # the cell's fresh netns, not the host's interfaces


def test_without_netns_containers_share_the_agents_network(agent, busybox):
    rec = agent.run(busybox, ["cat", "/proc/net/dev"])
    agent.wait_state(rec["id"], "exited")
    host_ifaces = {ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]}
    log = agent.call("GET", f"/v1/containers/{rec['id']}/logs").body.decode()
    assert all(i in log for i in host_ifaces)


def test_cgroup_under_the_cells_parent_with_limits(agent, busybox):
    cid = secrets.token_hex(32)
    spec = {"process": {"args": ["sleep", "1000"]},
            "linux": {"resources": {"memory": {"limit": 64 * 1024 * 1024}}}}
    agent.ok("POST", "/v1/containers", {"id": cid, "name": "m", "image_digest": busybox.manifest_digest, "spec": spec})
    agent.ok("POST", f"/v1/containers/{cid}/start")
    cg = Path("/sys/fs/cgroup/memory") / "kiyot-cell-tests" / agent.workdir.name / cid
    assert (cg / "memory.limit_in_bytes").read_text().strip() == str(64 * 1024 * 1024)
    rec = agent.record(cid)
    assert str(rec["pid"]) in (cg / "cgroup.procs").read_text().split()


def test_oom_kill_is_reported(agent, busybox):
    cid = secrets.token_hex(32)
    limit = 16 * 1024 * 1024
    spec = {"process": {"args": ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"]},
            "linux": {"resources": {"memory": {"limit": limit, "swap": limit}}}}
    agent.ok("POST", "/v1/containers", {"id": cid, "name": "oom", "image_digest": busybox.manifest_digest,
                                        "spec": spec})
    agent.ok("POST", f"/v1/containers/{cid}/start")
    rec = agent.wait_state(cid, "exited")
    assert rec["exit_code"] == 137 and rec["reason"] == "OOMKilled", rec
