"""Pull, create, start, exit codes, logs, stop, exec, delete: runc under conmon, for real."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from tests.cells.conftest import PATH_ENV, needs_root, process, spec_of, wait_until
from tests.support.images import host_arch

pytestmark = needs_root


def test_pull_by_digest_is_verified_and_idempotent(agent, cell_images):
    img = cell_images["busybox"]
    t0 = time.monotonic()
    out = agent.pull(img)
    print(f"pull: {time.monotonic() - t0:.3f}s")
    assert out["digest"] == img.manifest_digest and out["size"] > 0
    assert agent.pull(img) == out
    # A ref that names another digest than the one the node resolved.
    other = "sha256:" + "1" * 64
    name = agent.pull_body(img)["ref"].split("@")[0]
    r = agent.call("POST", "/v1/images/pull", {"ref": f"{name}@{other}", "digest": img.manifest_digest})
    assert r.status == 400
    # A digest the pull path does not serve this cell: the pull path's message, 422.
    r = agent.call("POST", "/v1/images/pull", {"ref": name, "digest": other})
    assert r.status == 422 and r.json()["error"] == "pull_failed" and "not among" in r.json()["message"]
    r = agent.call("POST", "/v1/images/pull", {"ref": "not a ref", "digest": other})
    assert r.status == 400
    # Credentials never reach a cell: a body that carries them is refused, and not logged.
    r = agent.call("POST", "/v1/images/pull", {**agent.pull_body(img), "auth": {"username": "u", "password": "s3cr3t"}})
    assert r.status == 400 and "credentials" in r.json()["message"]
    assert "s3cr3t" not in agent.log_file.read_text()


def test_create_unpulled_image_is_409(agent):
    r = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "x",
                                              "image_digest": "sha256:" + "2" * 64, "spec": spec_of(["true"])})
    assert r.status == 409


def test_exit_code_reason_and_cri_log(agent, busybox):
    t0 = time.monotonic()
    rec = agent.create(busybox, ["sh", "-c", "echo hello-from-cell; echo to-stderr >&2; exit 3"])
    assert rec["state"] == "created" and rec["pid"] > 0
    started = agent.ok("POST", f"/v1/containers/{rec['id']}/start")
    print(f"create+start: {time.monotonic() - t0:.3f}s")
    assert started["state"] in ("running", "exited")
    done = agent.wait_state(rec["id"], "exited")
    assert done["exit_code"] == 3 and done["reason"] == "Error"
    assert done["finished_at"] >= done["started_at"] >= done["created_at"] > 0
    r = agent.call("GET", f"/v1/containers/{rec['id']}/logs?offset=0")
    assert r.status == 200 and r.headers["X-Log-Offset"] == "0"
    lines = r.body.decode().splitlines()
    assert any(ln.endswith(" stdout F hello-from-cell") for ln in lines), lines
    assert any(ln.endswith(" stderr F to-stderr") for ln in lines), lines
    assert done["log_size"] == len(r.body)
    # From an offset: the tail only.
    first = len(lines[0]) + 1
    tail = agent.call("GET", f"/v1/containers/{rec['id']}/logs?offset={first}")
    assert tail.body == r.body[first:] and tail.headers["X-Log-Offset"] == str(first)
    assert agent.call("GET", f"/v1/containers/{rec['id']}/logs?offset={len(r.body) + 1}").status == 416
    # Follow on an exited container: every byte, then the end.
    assert agent.call("GET", f"/v1/containers/{rec['id']}/logs?offset=0&follow=1").body == r.body
    # start again: not created any more
    assert agent.call("POST", f"/v1/containers/{rec['id']}/start").status == 409
    # exit 0 is Completed
    ok = agent.run(busybox, ["true"])
    assert agent.wait_state(ok["id"], "exited")["reason"] == "Completed"


def test_create_is_idempotent(agent, busybox):
    cid = secrets.token_hex(32)
    a = agent.create(busybox, ["sleep", "5"], id=cid)
    r = agent.call("POST", "/v1/containers", {"id": cid, "name": "c", "image_digest": busybox.manifest_digest,
                                              "spec": spec_of(["sleep", "5"])})
    assert r.status == 200 and r.json()["created_at"] == a["created_at"]
    r = agent.call("POST", "/v1/containers", {"id": cid, "name": "other", "image_digest": busybox.manifest_digest,
                                              "spec": spec_of(["sleep", "5"])})
    assert r.status == 409
    assert agent.call("DELETE", f"/v1/containers/{cid}").status == 200
    assert agent.call("GET", f"/v1/containers/{cid}").status == 404
    assert not (agent.state_dir / "containers" / cid).exists()
    assert agent.call("DELETE", f"/v1/containers/{cid}").status == 200


def test_follow_streams_until_exit(agent, busybox):
    rec = agent.run(busybox, ["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done"])
    c = agent.conn(60)
    c.request("GET", f"/v1/containers/{rec['id']}/logs?offset=0&follow=1")
    resp = c.getresponse()
    assert resp.status == 200
    body = resp.read()  # returns only when the agent ends the stream
    c.close()
    text = body.decode()
    assert [f"line{i}" in text for i in range(1, 6)] == [True] * 5
    assert agent.record(rec["id"])["state"] == "exited"


def test_stop_sigterm_ignored_then_sigkill(agent, busybox):
    rec = agent.run(busybox, ["sleep", "1000"])
    assert rec["state"] == "running"
    assert agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 1})["state"] == "exited"
    done = agent.record(rec["id"])
    assert done["exit_code"] == 137 and done["reason"] == "Error"
    # Stop of a stopped container: 200 at once.
    assert agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 1})["state"] == "exited"


def test_stop_with_a_handled_signal(agent, busybox):
    rec = agent.run(busybox, ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
    wait_until(lambda: agent.record(rec["id"])["state"] == "running")
    time.sleep(0.3)  # let the trap be set
    done = agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 30, "signal": "SIGTERM"})
    assert done["state"] == "exited" and done["exit_code"] == 0 and done["reason"] == "Completed"


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _procs_with_cmdline(needle: bytes) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes() == needle:
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_exec_sync_output_exit_code_and_timeout(agent, busybox):
    rec = agent.run(busybox, ["sleep", "1000"])
    t0 = time.monotonic()
    r = agent.ok("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["sh", "-c", "echo out; echo err >&2; exit 7"],
                                                             "timeout": 30})
    print(f"exec: {time.monotonic() - t0:.3f}s")
    assert r["exit_code"] == 7
    assert base64.b64decode(r["stdout"]) == b"out\n" and base64.b64decode(r["stderr"]) == b"err\n"
    r = agent.ok("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["id", "-u"]})
    assert base64.b64decode(r["stdout"]) == b"0\n" and r["exit_code"] == 0
    # Timeout: 504 and the exec'd process is gone.
    r = agent.call("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["sleep", "4242"], "timeout": 1})
    assert r.status == 504 and r.json()["error"] == "timeout"
    wait_until(lambda: not _procs_with_cmdline(b"sleep\x004242\x00"), what="exec'd sleep killed")
    assert agent.record(rec["id"])["state"] == "running"
    # Not running → 409
    agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 0})
    assert agent.call("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["true"]}).status == 409


def test_user_resolution(agent, busybox):
    rec = agent.run(busybox, ["sleep", "1000"], user="65534:65534")
    r = agent.ok("POST", f"/v1/containers/{rec['id']}/exec", {"cmd": ["id", "-u"]})
    assert base64.b64decode(r["stdout"]) == b"65534\n"
    r = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "u",
                                              "image_digest": busybox.manifest_digest,
                                              "spec": spec_of(["true"]), "user": "no-such-user"})
    assert r.status == 400 and "no-such-user" in r.json()["message"]
    assert len(agent.ok("GET", "/v1/containers")) == 1


def test_conmon_killed_is_monitor_lost(agent, busybox):
    rec = agent.run(busybox, ["sleep", "1000"])
    cpid = int((agent.state_dir / "containers" / rec["id"] / "conmon.pid").read_text())
    # runc's default root
    assert subprocess.run(["runc", "state", rec["id"]], check=False, capture_output=True).returncode == 0
    os.kill(cpid, signal.SIGKILL)
    lost = agent.wait_state(rec["id"], "unknown")
    assert lost["reason"] == "MonitorLost" and lost["exit_code"] == 0
    # stop kills what may still run, but invents no exit code
    stopped = agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 1})
    assert stopped["state"] == "unknown" and stopped["reason"] == "MonitorLost"
    wait_until(lambda: _gone(lost["pid"]), what="container killed by stop")
    # delete still cleans the container itself up
    assert agent.call("DELETE", f"/v1/containers/{rec['id']}").status == 200
    wait_until(lambda: not Path(f"/proc/{lost['pid']}").exists(), what="orphaned container killed by delete")


def test_other_image_kinds_pull_and_run(agent, cell_images):
    """An image index (the node picked the host's platform's manifest) and an OCI-format image."""
    for k in ("busybox-index", "busybox-oci"):
        img = cell_images[k]
        assert agent.pull(img)["digest"] == (img.platforms[host_arch()][0] if img.platforms else img.manifest_digest)
        rec = agent.run(img, ["sh", "-c", "echo kind-ok"], name=k)
        assert agent.wait_state(rec["id"], "exited")["exit_code"] == 0
        assert b"stdout F kind-ok" in agent.call("GET", f"/v1/containers/{rec['id']}/logs").body


def test_failed_create_reports_the_runtime_error_and_leaves_nothing(agent, busybox):
    cid = secrets.token_hex(32)
    r = agent.call("POST", "/v1/containers", {"id": cid, "name": "bad", "image_digest": busybox.manifest_digest,
                                              "spec": spec_of(["/no/such/binary"])})
    assert r.status == 500, r.body
    assert "no/such/binary" in r.json()["message"] or "no such file" in r.json()["message"].lower(), r.body
    assert agent.call("GET", f"/v1/containers/{cid}").status == 404
    assert not (agent.state_dir / "containers" / cid).exists()
    # The same id can be created properly afterwards.
    assert agent.create(busybox, ["true"], id=cid)["state"] == "created"


def test_parallel_creates_and_pulls(agent, cell_images):
    from concurrent.futures import ThreadPoolExecutor

    img = cell_images["busybox"]
    with ThreadPoolExecutor(8) as ex:
        pulls = list(ex.map(lambda _: agent.pull(img), range(4)))
        assert {p["digest"] for p in pulls} == {img.manifest_digest}
        recs = list(ex.map(lambda i: agent.run(img, ["sh", "-c", f"exit {i}"], name=f"p{i}"), range(8)))
    for i, rec in enumerate(recs):
        assert agent.wait_state(rec["id"], "exited")["exit_code"] == i


def test_stop_and_delete_of_created_and_running(agent, busybox):
    created = agent.create(busybox, ["sleep", "1000"], name="never-started")
    done = agent.ok("POST", f"/v1/containers/{created['id']}/stop", {"timeout": 1})
    # runc's init, still waiting for `start`, dies of the signal: whatever code conmon saw, not 0
    assert done["state"] == "exited" and done["exit_code"] != 0
    other = agent.create(busybox, ["sleep", "1000"], name="created-then-deleted")
    running = agent.run(busybox, ["sleep", "1000"], name="running-then-deleted")
    for rec in (other, running, created):
        assert agent.call("DELETE", f"/v1/containers/{rec['id']}").status == 200
        assert not (agent.state_dir / "containers" / rec["id"]).exists()
        wait_until(lambda pid=rec["pid"]: not Path(f"/proc/{pid}").exists(), what="container process gone")
    assert agent.ok("GET", "/v1/containers") == []
    assert agent.call("POST", f"/v1/containers/{running['id']}/start").status == 404


def _run_and_log(agent, img, spec: dict, **extra) -> bytes:
    cid = secrets.token_hex(32)
    agent.ok("POST", "/v1/containers", {"id": cid, "name": extra.pop("name", "c"),
                                        "image_digest": img.manifest_digest, "spec": spec, **extra})
    agent.ok("POST", f"/v1/containers/{cid}/start")
    agent.wait_state(cid, "exited")
    return agent.call("GET", f"/v1/containers/{cid}/logs").body


def test_the_agent_adds_no_image_defaults(agent, cell_images):
    """The node sends the final process: the image's Entrypoint/Cmd, Env, WorkingDir and
    User (all set in the app image) are never merged in the cell."""
    img = cell_images["app"]
    agent.pull(img)
    for spec in ({}, {"process": {"env": [PATH_ENV]}}, {"process": {"args": []}}):
        r = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "noargs",
                                                  "image_digest": img.manifest_digest, "spec": spec})
        assert r.status == 400 and "no command" in r.json()["message"], (spec, r.body)
    assert agent.ok("GET", "/v1/containers") == []
    # Only the spec's env (no GREETING), cwd "/" and uid 0 when the spec gives none.
    log = _run_and_log(agent, img, {"process": process(["sh", "-c", "echo $(id -u):$(pwd):${GREETING-unset}:$EXTRA"],
                                                       ["EXTRA=x"])})
    assert b"stdout F 0:/:unset:x" in log, log
    # No env at all: none of the image's Env, nor umoci's TERM (sh makes up a PATH of its own).
    log = _run_and_log(agent, img, {"process": {"args": ["/bin/sh", "-c",
                                                         "echo ${GREETING-unset}:${TERM-unset}:$PATH"]}})
    assert b"stdout F unset:unset:" in log and b"/usr/local/sbin" not in log, log
    # cwd and user as the node gives them; a user by name gets its supplementary group.
    log = _run_and_log(agent, img, {"process": process(["sh", "-c", "echo ids=$(id -u):$(id -g):$(id -G):$(pwd)"],
                                                       cwd="/home/app")}, user="app")
    assert b"stdout F ids=1000:1000:1000 2000:/home/app" in log, log
    r = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "rel",
                                              "image_digest": img.manifest_digest,
                                              "spec": {"process": process(["true"], cwd="home")}})
    assert r.status == 400 and "cwd" in r.json()["message"]


def _trapping(sig: str) -> list[str]:
    return ["sh", "-c", f"trap 'echo got-{sig}; exit 0' {sig}; while true; do sleep 0.1; done"]


def test_the_stop_signal_is_the_nodes_never_the_images(agent, cell_images):
    img = cell_images["app"]  # its StopSignal is SIGUSR1
    agent.pull(img)
    # No stop_signal: SIGTERM, not the image's.
    script = "trap 'echo got-usr1; exit 0' USR1; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.1; done"
    rec = agent.run(img, ["sh", "-c", script])
    time.sleep(0.3)  # let the traps be set
    assert agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 30})["exit_code"] == 0
    assert b"got-term" in agent.call("GET", f"/v1/containers/{rec['id']}/logs").body
    # The node's canonical names, a real-time one too: SIGRTMIN+3 is 37 (systemd's halt).
    for name, trap in (("SIGUSR1", "USR1"), ("SIGRTMIN+3", "37")):
        rec = agent.run(img, _trapping(trap), stop_signal=name, name=f"s{trap}")
        time.sleep(0.3)
        assert agent.ok("POST", f"/v1/containers/{rec['id']}/stop", {"timeout": 30})["exit_code"] == 0, name
        assert f"got-{trap}".encode() in agent.call("GET", f"/v1/containers/{rec['id']}/logs").body, name
    r = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "bad",
                                              "image_digest": img.manifest_digest, "spec": spec_of(["true"]),
                                              "stop_signal": "SIGRTMIN+99"})
    assert r.status == 400


def test_rlimits_nofile_default_and_clamp(agent, busybox):
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the agent's own (it inherits ours)
    want = 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)
    log = _run_and_log(agent, busybox, spec_of(["sh", "-c", "echo soft=$(ulimit -Sn) hard=$(ulimit -Hn)"]))
    assert f"stdout F soft={want} hard={want}".encode() in log, log
    # What the spec asks beyond the cell is clamped (runc create would fail otherwise).
    spec = {"process": process(["sh", "-c", "ulimit -n"],
                               rlimits=[{"type": "RLIMIT_NOFILE", "hard": 1 << 40, "soft": 1 << 40}])}
    log = _run_and_log(agent, busybox, spec, name="rl")
    assert b"stdout F " in log
    spec = {"process": process(["sh", "-c", "echo n=$(ulimit -n)"],
                               rlimits=[{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 2048}])}
    assert b"stdout F n=2048" in _run_and_log(agent, busybox, spec, name="rl2")


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_containers_of_an_image_share_one_unpack_and_never_change_it(agent, busybox):
    unpacked = agent.state_dir / "images" / "unpacked"
    writer = agent.run(busybox, ["sh", "-c", "echo mine > /etc/motd; rm /bin/true; sleep 1000"], name="writer")
    wait_until((agent.state_dir / "containers" / writer["id"] / "upper" / "etc" / "motd").exists,
               what="the writer's change in its own layer")
    reader = agent.run(busybox, ["sleep", "1000"], name="reader")
    assert [p.name for p in unpacked.iterdir()] == [busybox.manifest_digest.split(":")[1]]
    rootfs = unpacked / busybox.manifest_digest.split(":")[1] / "rootfs"
    # The image's tree is as umoci left it; the other container sees the image, not the change.
    assert not (rootfs / "etc" / "motd").exists() and (rootfs / "bin" / "true").is_symlink()
    r = agent.ok("POST", f"/v1/containers/{reader['id']}/exec", {"cmd": ["sh", "-c", "cat /etc/motd; ls /bin/true"]})
    assert base64.b64decode(r["stdout"]) == b"/bin/true\n" and b"motd" in base64.b64decode(r["stderr"])
    # Deleting a container takes its overlay with it.
    reader_rootfs = agent.state_dir / "containers" / reader["id"] / "bundle" / "rootfs"
    assert _mounted(reader_rootfs)
    agent.call("DELETE", f"/v1/containers/{reader['id']}")
    assert not _mounted(reader_rootfs) and not reader_rootfs.exists()
    assert (rootfs / "bin" / "true").is_symlink()


def _cri_lines(log: bytes) -> list[str]:
    """Whole lines of a CRI-format log, with partial (P) pieces joined."""
    lines, part = [], ""
    for record in log.decode().splitlines():
        _, _, tag, text = record.split(" ", 3)
        part += text
        if tag == "F":
            lines.append(part)
            part = ""
    return lines


def test_a_long_log_is_cut_in_the_cell_and_a_follower_loses_nothing(tmp_path, cell_images):
    from tests.cells.conftest import Agent

    agent = Agent(tmp_path, extra_args=["--log-max-size", "65536"]).start()
    try:
        img = cell_images["busybox"]
        agent.pull(img)
        # Bursts of ~50 KiB a second: the cell cuts the log several times while it runs.
        script = ("i=0; for b in 1 2 3 4 5 6; do j=0; while [ $j -lt 1500 ]; do "
                  "echo line $i; i=$((i+1)); j=$((j+1)); done; sleep 1; done")
        rec = agent.create(img, ["sh", "-c", script])
        conn = agent.conn()
        conn.request("GET", f"/v1/containers/{rec['id']}/logs?offset=0&follow=1")
        follow = conn.getresponse()
        agent.ok("POST", f"/v1/containers/{rec['id']}/start")
        followed = follow.read()  # ends once the container has exited and every byte was sent
        conn.close()
        assert _cri_lines(followed) == [f"line {i}" for i in range(9000)], \
            "a follower connected throughout misses nothing"

        done = agent.wait_state(rec["id"], "exited")
        assert done["log_size"] == len(followed)  # offsets are logical: the whole log's length
        cdir = agent.state_dir / "containers" / rec["id"]
        assert sorted(p.name for p in cdir.glob("ctr.log*")) == ["ctr.log", "ctr.log.1"]
        kept = sum(p.stat().st_size for p in cdir.glob("ctr.log*"))
        assert kept < len(followed) // 2  # the cell holds only the last two segments
        # A late reader from 0 is told where the kept bytes begin; they match the log's end.
        late = agent.call("GET", f"/v1/containers/{rec['id']}/logs?offset=0")
        start = int(late.headers["X-Log-Offset"])
        assert start == len(followed) - kept and late.body == followed[start:]
        assert followed[start - 1:start] == b"\n"  # segments begin on a line
    finally:
        agent.cleanup()
