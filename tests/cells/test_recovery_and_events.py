"""Agent restarts under `supervise`, refused images, and the event stream."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cells.conftest import Agent, needs_root, spec_of, wait_until

pytestmark = needs_root


@pytest.fixture
def supervised(tmp_path):
    a = Agent(tmp_path, mode="supervise")
    a.extra_args = ["--runtime-root", str(tmp_path / "runc-root")]  # and an agent-private runc root
    a.start()
    try:
        yield a
    finally:
        a.cleanup()


def test_kill9_under_supervise_loses_nothing(supervised, cell_images):
    a = supervised
    img = cell_images["busybox"]
    a.pull(img)
    runner = a.run(img, ["sleep", "1000"], name="runner")
    waiter = a.run(img, ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo bye; exit 5"], name="waiter")
    # Keep the supervisor from restarting the agent until the waiter has exited.
    sup = a.proc.pid
    old = a.serve_pid()
    assert old > 0
    os.kill(sup, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{old}").exists() or
                   Path(f"/proc/{old}/stat").read_text().split(") ")[1].startswith("Z"), what="agent dead")
        (a.state_dir / "containers" / waiter["id"] / "bundle" / "rootfs" / "tmp" / "go").touch()
        exit_file = a.state_dir / "containers" / waiter["id"] / "exit" / waiter["id"]
        wait_until(exit_file.exists, what="conmon's exit file while the agent is down")
    finally:
        os.kill(sup, signal.SIGCONT)
    a.wait_healthy()
    wait_until(lambda: a.serve_pid() not in (0, old), what="a new agent process")
    w = a.wait_state(waiter["id"], "exited")
    assert w["exit_code"] == 5 and w["reason"] == "Error"
    r = a.record(runner["id"])
    assert r["state"] == "running" and Path(f"/proc/{runner['pid']}").exists()
    assert "stdout F bye" in a.call("GET", f"/v1/containers/{waiter['id']}/logs").body.decode()
    # The re-attached container is still fully managed.
    assert a.ok("POST", f"/v1/containers/{runner['id']}/stop", {"timeout": 0})["exit_code"] == 137


def test_supervisor_sigterm_leaves_containers_running(supervised, cell_images):
    a = supervised
    img = cell_images["busybox"]
    a.pull(img)
    rec = a.run(img, ["sleep", "1000"])
    a.stop()
    assert a.proc.returncode == 0
    assert Path(f"/proc/{rec['pid']}").exists()
    a.start()  # a fresh agent over the same state re-attaches
    assert a.record(rec["id"])["state"] == "running"


EVIL = ("evil-dotdot", "evil-abs", "evil-hardlink", "evil-symlink")


@pytest.mark.parametrize("name", EVIL)
def test_evil_image_is_refused_and_leaves_nothing(agent, cell_images, name):
    img = cell_images[name]
    layout = agent.state_dir / "images" / "layout"
    agent.pull(cell_images["busybox"])  # layers shared with the evil image stay
    blobs = layout / "blobs" / "sha256"
    before = set(os.listdir(blobs))
    index_before = json.loads((layout / "index.json").read_text())
    r = agent.call("POST", "/v1/images/pull", agent.pull_body(img))
    assert r.status == 422, r.body
    assert r.json()["error"] == "pull_failed" and "refused" in r.json()["message"]
    assert set(os.listdir(blobs)) == before
    assert json.loads((layout / "index.json").read_text()) == index_before
    # Nothing the layers name landed anywhere (they were never unpacked).
    for p in (Path("/abs.txt"), Path("/etc/escape.txt"), Path("/escape.txt"), agent.workdir / "escape.txt",
              agent.state_dir / "escape.txt", agent.state_dir / "images" / "escape.txt"):
        assert not p.exists(), p
    assert not (agent.state_dir / "containers").exists() or not os.listdir(agent.state_dir / "containers")
    assert not os.listdir(agent.state_dir / "tmp"), "leftovers in tmp"
    # not pulled: a container of it is refused
    r = agent.call("POST", "/v1/containers", {"id": "e" * 64, "name": "evil", "image_digest": img.manifest_digest,
                                              "spec": spec_of(["true"])})
    assert r.status == 409
    # and a second try is refused the same way (nothing was remembered as checked)
    assert agent.call("POST", "/v1/images/pull", agent.pull_body(img)).status == 422


def _lines(resp):
    while True:
        line = resp.readline()
        if not line:
            return
        if line.strip():
            yield json.loads(line)


def test_events_snapshot_then_changes(agent, busybox):
    first = agent.run(busybox, ["sleep", "1000"], name="first")
    c = agent.conn(30)
    c.request("GET", "/v1/events")
    resp = c.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("application/x-ndjson")
    events = _lines(resp)
    snap = next(events)
    assert snap["type"] == "snapshot" and [r["id"] for r in snap["containers"]] == [first["id"]]
    rec = agent.create(busybox, ["sh", "-c", "exit 4"], name="second")
    agent.ok("POST", f"/v1/containers/{rec['id']}/start")
    seen = []
    for ev in events:  # bounded by the socket timeout and the count
        if ev["type"] == "container" and ev["container"]["id"] == rec["id"]:
            seen.append(ev["container"]["state"])
            if ev["container"]["state"] == "exited":
                assert ev["container"]["exit_code"] == 4
                break
        assert len(seen) < 10
    assert seen == ["created", "running", "exited"]
    agent.call("DELETE", f"/v1/containers/{rec['id']}")
    for ev in events:
        if ev["type"] == "removed":
            assert ev["id"] == rec["id"]
            break
    c.close()


def test_events_heartbeat(agent):
    c = agent.conn(30)
    c.request("GET", "/v1/events")
    resp = c.getresponse()
    events = _lines(resp)
    assert next(events)["type"] == "snapshot"
    t0 = time.monotonic()
    assert next(events) == {"type": "heartbeat"}
    print(f"heartbeat after {time.monotonic() - t0:.1f}s")
    c.close()
