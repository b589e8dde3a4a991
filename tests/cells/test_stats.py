"""GET /v1/stats and the `stats` events of a real agent, over containers run by runc under
conmon: CPU that a busy loop burns, memory a shell holds (checked against the cgroup's
own files), the pod's figures, writable layers, and what is forgotten."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.cells.conftest import Agent, needs_root, wait_until

pytestmark = needs_root

SECOND = 1_000_000_000
MiB = 1 << 20
# A shell that holds 64 MiB of its own (a variable, so anonymous memory of the container's
# cgroup), once /tmp/go exists; then it says so in /tmp/filled and sleeps, in a loop (a
# last command alone would be exec'ed in its place, and the memory freed).
HOLD_64M = ("while [ ! -e /tmp/go ]; do sleep 0.05; done; x=$(busybox yes | busybox head -c 67108864); "
            "touch /tmp/filled; while :; do sleep 3600; done")


@pytest.fixture
def fast_agent(tmp_path):
    """An agent that samples every 0.2 s (its layers every 2 s)."""
    a = Agent(tmp_path, extra_args=["--stats-interval", "0.2"]).start()
    try:
        yield a
    finally:
        a.cleanup()


def sample_of(agent: Agent, cid: str, after: int = 0) -> dict:
    """The first sample of `cid` taken after `after` (ns since the epoch)."""
    def found():
        for s in agent.ok("GET", "/v1/stats")["containers"]:
            if s["id"] == cid and s["timestamp"] > after:
                return s
        return None
    return wait_until(found, what=f"a sample of {cid[:12]} after {after}")


def cgroup_working_set(agent: Agent, cid: str) -> int:
    """The container's working set as its cgroup's own files give it (v1 or v2)."""
    relative = Path("kiyot-cell-tests") / agent.workdir.name / cid
    v1 = Path("/sys/fs/cgroup/memory") / relative
    if v1.is_dir():
        usage = int((v1 / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (v1 / "memory.stat").read_text().splitlines())
        return max(usage - int(stat["total_inactive_file"]), 0)
    v2 = Path("/sys/fs/cgroup") / relative
    stat = dict(line.split() for line in (v2 / "memory.stat").read_text().splitlines())
    return max(int((v2 / "memory.current").read_text()) - int(stat["inactive_file"]), 0)


def test_a_two_second_busy_loop_shows_in_the_cpu(fast_agent, cell_images):
    a = fast_agent
    a.pull(cell_images["busybox"])
    rec = a.run(cell_images["busybox"], ["sleep", "100000"])
    before = sample_of(a, rec["id"])
    # exec joins the container's cgroup; the agent kills the loop at its 2 s timeout.
    r = a.call("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["sh", "-c", "while :; do :; done"], "timeout": 2})
    assert r.status == 504
    after = sample_of(a, rec["id"], after=time.time_ns())
    burnt = after["cpu"]["usage_core_nano_seconds"] - before["cpu"]["usage_core_nano_seconds"]
    print(f"CPU over a 2 s busy loop: {burnt / SECOND:.2f} s")
    assert burnt >= 1.5 * SECOND, (before, after)
    assert after["cpu"]["usage_nano_cores"] is not None


def test_memory_held_shows_in_the_working_set_as_the_cgroup_says(fast_agent, cell_images):
    a = fast_agent
    a.pull(cell_images["busybox"])
    rec = a.run(cell_images["busybox"], ["sh", "-c", HOLD_64M])
    rootfs = a.state_dir / "containers" / rec["id"] / "bundle" / "rootfs"
    before = sample_of(a, rec["id"])["memory"]
    (rootfs / "tmp" / "go").touch()
    wait_until((rootfs / "tmp" / "filled").exists, what="the shell holding 64 MiB")
    after = sample_of(a, rec["id"], after=time.time_ns())["memory"]
    own = cgroup_working_set(a, rec["id"])
    print(f"working set {before['working_set_bytes'] / MiB:.1f} -> {after['working_set_bytes'] / MiB:.1f} MiB, "
          f"the cgroup's own figure {own / MiB:.1f} MiB")
    assert after["working_set_bytes"] - before["working_set_bytes"] >= 50 * MiB
    assert abs(after["working_set_bytes"] - own) <= 0.1 * own
    assert after["rss_bytes"] >= 50 * MiB and after["usage_bytes"] >= after["working_set_bytes"]
    assert after["available_bytes"] is None  # no limit was set


def test_the_pod_is_its_containers_and_more(fast_agent, cell_images):
    a = fast_agent
    a.pull(cell_images["busybox"])
    ids = [a.run(cell_images["busybox"], ["sleep", "100000"], name=f"c{i}")["id"] for i in range(2)]
    for cid in ids:
        sample_of(a, cid)

    def settled():
        # Each container's `sleep` alone: right after a start, runc's own processes may
        # still be leaving its cgroup between the containers' reads and the pod's.
        body = a.ok("GET", "/v1/stats")
        return all(s["process_count"] == 1 for s in body["containers"]) and body
    body = wait_until(settled, what="the containers' processes settled")
    pod, containers = body["pod"], {s["id"]: s for s in body["containers"]}
    assert set(containers) == set(ids)
    assert pod["process_count"] >= sum(s["process_count"] for s in containers.values()) >= 2
    assert pod["cpu"]["usage_core_nano_seconds"] >= sum(s["cpu"]["usage_core_nano_seconds"]
                                                        for s in containers.values())
    assert pod["memory"]["usage_bytes"] > 0
    # Without --netns the pod shares the agent's network: its interfaces, loopback left out.
    host = {ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]} - {"lo"}
    assert {i["name"] for i in pod["network"]["interfaces"]} == host


def test_writable_layer_grows_and_the_deleted_are_forgotten(fast_agent, cell_images):
    a = fast_agent
    a.pull(cell_images["busybox"])
    rec = a.run(cell_images["busybox"], ["sh", "-c", "busybox head -c 3145728 /dev/zero > /tmp/3m; sleep 100000"])

    def layer():
        s = sample_of(a, rec["id"])
        wl = s["writable_layer"]
        return wl if wl is not None and wl["used_bytes"] >= 3 * MiB else None
    wl = wait_until(layer, what="the 3 MiB file in the writable layer")
    assert wl["inodes_used"] >= 2  # /tmp and the file
    a.ok("DELETE", f"/v1/containers/{rec['id']}")
    gone_at = time.time_ns()
    wait_until(lambda: (body := a.ok("GET", "/v1/stats"))["pod"]["timestamp"] > gone_at and body,
               what="a pass after the delete")
    assert a.ok("GET", "/v1/stats")["containers"] == []


def test_the_event_stream_carries_stats_when_asked(fast_agent, cell_images):
    a = fast_agent
    a.pull(cell_images["busybox"])
    rec = a.run(cell_images["busybox"], ["sleep", "100000"])
    c = a.conn(30)
    c.request("GET", "/v1/events?stats=1")
    resp = c.getresponse()
    assert json.loads(resp.readline())["type"] == "snapshot"
    for _ in range(100):  # bounded: the stream never ends
        event = json.loads(resp.readline())
        if event["type"] == "stats" and any(s["id"] == rec["id"] for s in event["stats"]["containers"]):
            break
    else:
        raise AssertionError("no stats event named the container")
    assert event["stats"]["pod"]["cpu"]["usage_core_nano_seconds"] > 0
    c.close()
