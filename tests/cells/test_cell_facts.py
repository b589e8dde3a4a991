"""What only the cell knows: what it says about itself (GET /v1/facts), its network
namespace, its cgroup and its device nodes."""

from __future__ import annotations

import json
import os
import platform
import secrets
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from tests.cells.conftest import Agent, needs_root, process, spec_of

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
    spec = {"process": process(["sleep", "1000"]),
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
    spec = {"process": process(["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"]),
            "linux": {"resources": {"memory": {"limit": limit, "swap": limit}}}}
    agent.ok("POST", "/v1/containers", {"id": cid, "name": "oom", "image_digest": busybox.manifest_digest,
                                        "spec": spec})
    agent.ok("POST", f"/v1/containers/{cid}/start")
    rec = agent.wait_state(cid, "exited")
    assert rec["exit_code"] == 137 and rec["reason"] == "OOMKilled", rec


# --- GET /v1/facts ---------------------------------------------------------------------------

FACT_KEYS = {"os", "architecture", "variant", "kernel", "capabilities", "cgroup_version", "seccomp",
             "seccomp_profile", "recursive_read_only_mounts", "user_namespaces"}
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
          "riscv64": "riscv64", "i686": "386"}


def _cell_agent(tmp_path, *args: str) -> Agent:
    return Agent(tmp_path, extra_args=list(args)).start()


def test_facts_say_what_this_cell_is(tmp_path):
    from kiyot_cell.spec import CAPABILITIES

    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    (tmp_path / "seccomp.json").write_text(json.dumps(profile))
    a = _cell_agent(tmp_path, "--seccomp-profile", str(tmp_path / "seccomp.json"))
    try:
        facts = a.ok("GET", "/v1/facts")
        assert set(facts) == FACT_KEYS, facts
        assert facts["os"] == "linux"
        assert facts["architecture"] == GOARCH.get(platform.machine(), platform.machine())
        assert facts["variant"] == {"arm64": "v8", "arm": "v7"}.get(facts["architecture"], "")
        assert facts["kernel"] == os.uname().release
        caps = facts["capabilities"]
        assert caps and set(caps) <= set(CAPABILITIES) and "CAP_CHOWN" in caps
        assert caps == sorted(caps, key=CAPABILITIES.index)
        assert facts["cgroup_version"] == (2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1)
        assert facts["seccomp"] is Path("/proc/sys/kernel/seccomp/actions_avail").exists()
        assert facts["seccomp_profile"] == profile
        features = json.loads(subprocess.run(["runc", "features"], capture_output=True, check=True).stdout)
        kernel = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
        assert facts["recursive_read_only_mounts"] is ("rro" in features.get("mountOptions", []) and
                                                       kernel >= (5, 12))
        assert facts["user_namespaces"] is False
        assert a.ok("GET", "/v1/facts") == facts  # cached: the same answer
        with pytest.raises((ssl.SSLError, ConnectionError)):  # only the node's certificate is answered
            a.call("GET", "/v1/facts", identity="none")
    finally:
        a.cleanup()


def test_facts_without_a_seccomp_profile_say_null(tmp_path):
    a = _cell_agent(tmp_path, "--seccomp-profile", str(tmp_path / "no-such-profile.json"))
    try:
        assert a.ok("GET", "/v1/facts")["seccomp_profile"] is None
    finally:
        a.cleanup()


# --- devices, resolved in the cell -----------------------------------------------------------

def _mknod(path: Path, major: int, minor: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o620 | stat.S_IFCHR, os.makedev(major, minor))
    path.chmod(0o620)  # whatever the umask


def _create(agent, img, spec: dict, **extra):
    cid = secrets.token_hex(32)
    return cid, agent.call("POST", "/v1/containers", {"id": cid, "name": "dev", "image_digest": img.manifest_digest,
                                                      "spec": spec, **extra})


def _bundle(agent, cid: str) -> dict:
    return json.loads((agent.state_dir / "containers" / cid / "bundle" / "config.json").read_text())


def test_devices_are_resolved_in_the_cell_and_seen_in_the_container(agent, busybox, tmp_path):
    # A directory of nodes (as /dev/dri is): every node under it, paths kept relative.
    devs = tmp_path / "devs"
    _mknod(devs / "sub" / "zero", 1, 5)
    _mknod(devs / "full", 1, 7)
    (devs / "not-a-device").write_text("x")
    script = ("stat -c '%n %t:%T %F' /dev/mynull /dev/extra/full /dev/extra/sub/zero; "
              "echo x > /dev/mynull && echo wrote; head -c 3 /dev/extra/sub/zero | od -An -tx1; "
              "ls /dev/extra /dev/extra/sub")
    cid, r = _create(agent, busybox, spec_of(["sh", "-c", script]), devices=[
        {"host_path": "/dev/null", "container_path": "/dev/mynull", "permissions": "rw"},
        {"host_path": str(devs), "container_path": "/dev/extra"},
    ])
    assert r.status == 201, r.body
    cfg = _bundle(agent, cid)
    nodes = {d["path"]: d for d in cfg["linux"]["devices"]}
    assert set(nodes) == {"/dev/mynull", "/dev/extra/full", "/dev/extra/sub/zero"}
    null = os.stat("/dev/null")
    assert nodes["/dev/mynull"] == {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3,
                                    "fileMode": stat.S_IMODE(null.st_mode), "uid": null.st_uid, "gid": null.st_gid}
    assert nodes["/dev/extra/sub/zero"]["fileMode"] == 0o620
    rules = cfg["linux"]["resources"]["devices"]
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in rules
    assert {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"} in rules
    agent.ok("POST", f"/v1/containers/{cid}/start")
    assert agent.wait_state(cid, "exited")["exit_code"] == 0
    log = agent.call("GET", f"/v1/containers/{cid}/logs").body.decode()
    assert "/dev/mynull 1:3 character special file" in log, log
    assert "/dev/extra/full 1:7 character special file" in log, log
    assert "/dev/extra/sub/zero 1:5 character special file" in log, log
    assert "stdout F wrote" in log and "00 00 00" in log, log
    assert "not-a-device" not in log


def test_a_privileged_spec_gets_the_nodes_and_no_extra_rules(agent, busybox):
    allow_all = [{"allow": True, "access": "rwm"}]
    cid, r = _create(agent, busybox, spec_of(["true"], linux={"resources": {"devices": allow_all}}),
                     devices=[{"host_path": "/dev/zero"}])
    assert r.status == 201, r.body
    cfg = _bundle(agent, cid)
    assert [d["path"] for d in cfg["linux"]["devices"]] == ["/dev/zero"]
    assert cfg["linux"]["resources"]["devices"] == allow_all


def test_what_is_not_a_device_is_400_naming_the_path(agent, busybox, tmp_path):
    (tmp_path / "empty").mkdir()
    for dev, needle in (({"host_path": "/etc/passwd"}, "/etc/passwd"),
                        ({"host_path": "/dev/no-such-device"}, "/dev/no-such-device"),
                        ({"host_path": str(tmp_path / "empty")}, str(tmp_path / "empty")),
                        ({"host_path": "dev/null"}, "dev/null"),
                        ({"host_path": "/dev/null", "container_path": "null"}, "null"),
                        ({"host_path": "/dev/null", "permissions": "rwx"}, "rwx")):
        _, r = _create(agent, busybox, spec_of(["true"]), devices=[dev])
        assert r.status == 400 and r.json()["error"] == "invalid", (dev, r.body)
        assert needle in r.json()["message"], (dev, r.json())
    _, r = _create(agent, busybox, spec_of(["true"]), devices={"host_path": "/dev/null"})
    assert r.status == 400
    assert agent.ok("GET", "/v1/containers") == []
    assert not os.listdir(agent.state_dir / "containers")


def test_facts_report_containers_commons_profile_by_default(agent):
    default = Path("/usr/share/containers/seccomp.json")
    want = json.loads(default.read_text()) if default.exists() else None
    assert agent.ok("GET", "/v1/facts")["seccomp_profile"] == want
