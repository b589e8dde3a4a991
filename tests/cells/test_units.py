"""Unit tests of the agent's pure parts (no root, no registry)."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cells"))

from kiyot_cell import layercheck, spec
from kiyot_cell.errors import ApiError
from kiyot_cell.images import split_ref
from kiyot_cell.runtime import parse_signal


def _tar(tmp_path: Path, *entries: tuple[str, bytes, str]) -> Path:
    p = tmp_path / "layer.tar"
    with tarfile.open(p, "w") as tf:
        for name, kind, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = link
            tf.addfile(ti, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return p


@pytest.mark.parametrize("entry", [
    ("/etc/passwd", tarfile.REGTYPE, ""),
    ("a/../../x", tarfile.REGTYPE, ""),
    ("../x", tarfile.REGTYPE, ""),
    ("h", tarfile.LNKTYPE, "/etc/shadow"),
    ("h", tarfile.LNKTYPE, "../outside"),
    ("a/h", tarfile.LNKTYPE, "a/../../x"),
    ("s", tarfile.SYMTYPE, "../x"),
    ("a/b/s", tarfile.SYMTYPE, "../../../x"),
    ("./s", tarfile.SYMTYPE, ".."),
])
def test_escaping_entries_are_refused(tmp_path, entry):
    with pytest.raises(layercheck.LayerRejected):
        layercheck.check_layer(_tar(tmp_path, ("ok", tarfile.REGTYPE, ""), entry), "tar")


@pytest.mark.parametrize("entry", [
    ("bin/sh", tarfile.SYMTYPE, "/bin/busybox"),     # absolute: resolved inside the rootfs
    ("bin/sh", tarfile.SYMTYPE, "busybox"),
    ("a/b/s", tarfile.SYMTYPE, "../../c"),
    ("./usr/lib/x", tarfile.SYMTYPE, "../../lib/x"),
    ("h", tarfile.LNKTYPE, "bin/busybox"),
    ("./a..b", tarfile.REGTYPE, ""),
])
def test_normal_entries_pass(tmp_path, entry):
    layercheck.check_layer(_tar(tmp_path, entry), "tar")


def test_garbage_layer_is_refused(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(layercheck.LayerRejected):
        layercheck.check_layer(p, "tar+gzip")


def test_split_ref():
    d = "sha256:" + "a" * 64
    assert split_ref("127.0.0.1:5000/busybox:latest", d) == f"127.0.0.1:5000/busybox@{d}"
    assert split_ref(f"10.89.0.1:5380/127.0.0.1_5000/busybox@{d}", d) == f"10.89.0.1:5380/127.0.0.1_5000/busybox@{d}"
    assert split_ref("reg/x/y", d) == f"reg/x/y@{d}"
    for bad in ("busybox", "reg/x y", "-reg/x", f"reg/x@sha256:{'b' * 64}"):
        with pytest.raises(ApiError):
            split_ref(bad, d)


def test_resolve_user(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\napp:x:1001:\nextra:x:2000:app,other\nweb:x:3000:\n")
    assert spec.resolve_user(tmp_path, "app", []) == {"uid": 1000, "gid": 1001, "additionalGids": [2000]}
    assert spec.resolve_user(tmp_path, "1000", [5]) == {"uid": 1000, "gid": 1001, "additionalGids": [2000, 5]}
    assert spec.resolve_user(tmp_path, "app:web", []) == {"uid": 1000, "gid": 3000, "additionalGids": [2000]}
    assert spec.resolve_user(tmp_path, "4242", []) == {"uid": 4242, "gid": 0}
    assert spec.resolve_user(tmp_path, "4242:7", []) == {"uid": 4242, "gid": 7}
    for bad in ("nobody", "app:nogroup", ":1"):
        with pytest.raises(ApiError) as e:
            spec.resolve_user(tmp_path, bad, [])
        assert e.value.status == 400


UMOCI_CFG = {  # what umoci writes: the image's args, env, cwd, user; runc's defaults
    "process": {"args": ["sh"], "env": ["PATH=/bin", "A=1", "TERM=xterm"], "cwd": "/home/app", "terminal": True,
                "user": {"uid": 1000, "gid": 1000}, "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "capabilities": {"bounding": ["CAP_KILL"]}, "noNewPrivileges": True},
    "hostname": "umoci-default",
    "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "uts"}],
              "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
}


def _ctx(tmp_path, **kw):
    base = {"rootfs": tmp_path / "rootfs", "netns": "/run/netns/c1", "cgroups_path": "/kiyot/c1/x",
            "pod_etc": tmp_path / "etc", "pod_hostname": "web-0"}
    return spec.CellContext(**{**base, **kw})


def test_build_fills_what_only_the_cell_knows(tmp_path):
    out = spec.build(UMOCI_CFG, {"process": {"args": ["true"]}}, _ctx(tmp_path), None)
    assert out["process"]["terminal"] is False  # umoci's true, runc's refusal without a console
    tty = spec.build(UMOCI_CFG, {"process": {"args": ["sh"], "terminal": False}}, _ctx(tmp_path), None, terminal=True)
    assert tty["process"]["terminal"] is True  # conmon makes the console
    assert {"type": "network", "path": "/run/netns/c1"} in out["linux"]["namespaces"]
    assert out["linux"]["cgroupsPath"] == "/kiyot/c1/x" and out["root"]["path"] == str(tmp_path / "rootfs")
    assert out["hostname"] == "web-0"
    assert {m["destination"] for m in out["mounts"]} == {"/proc", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    # What umoci's config holds that is not an image default stays.
    assert out["process"]["noNewPrivileges"] is True and out["process"]["capabilities"]["bounding"] == ["CAP_KILL"]
    assert out["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    no_net = spec.build(UMOCI_CFG, {"process": {"args": ["true"]}}, _ctx(tmp_path, netns=None), None)
    assert all(ns["type"] != "network" for ns in no_net["linux"]["namespaces"])


def test_build_adds_no_image_defaults(tmp_path):
    out = spec.build(UMOCI_CFG, {"process": {"args": ["echo", "hi"], "env": ["B=3"]}}, _ctx(tmp_path), None)
    p = out["process"]
    assert p["args"] == ["echo", "hi"] and p["env"] == ["B=3"] and p["cwd"] == "/"
    assert p["user"] == {"uid": 0, "gid": 0}  # the image's user comes from the node (`user`), not umoci
    bare = spec.build(UMOCI_CFG, {"process": {"args": ["true"]}}, _ctx(tmp_path), None)["process"]
    assert bare["env"] == [] and bare["cwd"] == "/"
    assert spec.build(UMOCI_CFG, {"process": {"args": ["true"], "cwd": "/srv"}}, _ctx(tmp_path),
                      None)["process"]["cwd"] == "/srv"
    for bad in ({}, {"process": {}}, {"process": {"args": []}}, {"process": {"env": ["PATH=/bin"]}}):
        with pytest.raises(ApiError) as e:
            spec.build(UMOCI_CFG, bad, _ctx(tmp_path), None)
        assert e.value.status == 400 and "no command" in e.value.message
    for bad in ({"args": "sh"}, {"args": ["sh"], "env": "A=1"}, {"args": ["sh"], "cwd": "rel"}):
        with pytest.raises(ApiError):
            spec.check_process(bad)


def test_the_hostname_is_the_pods_in_one_place(tmp_path):
    node = {"process": {"args": ["true"]}, "hostname": "what-the-node-says"}
    assert spec.build(UMOCI_CFG, node, _ctx(tmp_path), None)["hostname"] == "web-0"
    # Before PUT /v1/pod, or sharing the cell's UTS namespace: no hostname at all (runc
    # refuses one without a UTS namespace of the container's own).
    assert "hostname" not in spec.build(UMOCI_CFG, node, _ctx(tmp_path, pod_hostname=None), None)
    shared_uts = {**node, "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}
    assert "hostname" not in spec.build(UMOCI_CFG, shared_uts, _ctx(tmp_path), None)


def test_nofile_default_is_the_agents(tmp_path):
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)
    assert spec.default_nofile() == {"type": "RLIMIT_NOFILE", "hard": want, "soft": want}
    out = spec.build(UMOCI_CFG, {"process": {"args": ["true"]}}, _ctx(tmp_path), None)
    assert [rl for rl in out["process"]["rlimits"] if rl["type"] == "RLIMIT_NOFILE"] == \
        spec.clamp_rlimits([spec.default_nofile()])  # not umoci's 1024
    given = [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}, {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    out = spec.build(UMOCI_CFG, {"process": {"args": ["true"], "rlimits": given}}, _ctx(tmp_path), None)
    assert out["process"]["rlimits"] == given
    core_only = [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    out = spec.build(UMOCI_CFG, {"process": {"args": ["true"], "rlimits": core_only}}, _ctx(tmp_path), None)
    assert [rl["type"] for rl in out["process"]["rlimits"]] == ["RLIMIT_CORE", "RLIMIT_NOFILE"]


def _dev(path="/dev/x", major=1, minor=3, access="rwm"):
    return spec.Device(path=path, kind="c", major=major, minor=minor, file_mode=0o666, uid=0, gid=0, access=access)


def test_device_rules_unless_everything_is_allowed():
    linux = {"devices": [{"path": "/dev/x", "type": "c", "major": 9, "minor": 9}],
             "resources": {"devices": [{"allow": False, "access": "rwm"}]}}
    spec.add_devices(linux, [_dev(access="rw"), _dev("/dev/y", 1, 5)])
    assert [d["path"] for d in linux["devices"]] == ["/dev/x", "/dev/y"] and linux["devices"][0]["major"] == 1
    assert linux["resources"]["devices"][1:] == [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
        {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}]
    for allow_all in ({"allow": True, "access": "rwm"}, {"allow": True, "type": "a", "access": "rwm"}):
        linux = {"resources": {"devices": [allow_all]}}
        spec.add_devices(linux, [_dev()])
        assert linux["resources"]["devices"] == [allow_all] and len(linux["devices"]) == 1
    linux = {"resources": {"devices": [{"allow": True, "type": "c", "access": "rwm"}]}}  # only every char device
    spec.add_devices(linux, [_dev()])
    assert len(linux["resources"]["devices"]) == 2


def test_resolve_devices():
    (null,) = spec.resolve_devices([{"host_path": "/dev/null", "permissions": "wr"}])
    assert (null.path, null.kind, null.major, null.minor, null.access) == ("/dev/null", "c", 1, 3, "rw")
    assert spec.resolve_devices(None) == []
    for bad, needle in (([{"host_path": "/etc/passwd"}], "/etc/passwd"),
                        ([{"host_path": "/nonexistent"}], "/nonexistent"),
                        ([{"host_path": "rel"}], "rel"), ([{"host_path": "/dev/null", "permissions": "x"}], "'x'"),
                        ([{"container_path": "/dev/null"}], "None"), ("/dev/null", "list")):
        with pytest.raises(ApiError) as e:
            spec.resolve_devices(bad)
        assert e.value.status == 400 and needle in e.value.message, e.value.message


def test_parse_signal():
    assert parse_signal("SIGTERM") == 15 and parse_signal("KILL") == 9 and parse_signal("2") == 2
    assert parse_signal(None, "SIGINT") == 2 and parse_signal("", "SIGTERM") == 15
    # Real-time signals as Linux numbers them (moby/containerd), whatever the agent's libc.
    assert parse_signal("SIGRTMIN") == 34 and parse_signal("SIGRTMIN+3") == 37 and parse_signal("RTMIN+30") == 64
    assert parse_signal("SIGRTMAX") == 64 and parse_signal("SIGRTMAX-1") == 63 and parse_signal("SIGIOT") == 6
    for bad in ("SIGNOPE", "SIGRTMIN+31", "SIGRTMIN-1", "SIGRTMAX+1", "0", "65", "SIGRT"):
        with pytest.raises(ApiError):
            parse_signal(bad)


def test_architecture_names():
    from kiyot_cell.facts import architecture, kernel_version

    assert architecture("x86_64") == ("amd64", "") and architecture("aarch64") == ("arm64", "v8")
    assert architecture("armv7l") == ("arm", "v7") and architecture("armv6l") == ("arm", "v6")
    assert architecture("i686") == ("386", "") and architecture("ppc64le") == ("ppc64le", "")
    assert architecture("s390x") == ("s390x", "") and architecture("riscv64") == ("riscv64", "")
    assert kernel_version("6.1.0-18-amd64") == (6, 1) and kernel_version("5.12") == (5, 12)


def test_seccomp_profile_file(tmp_path):
    from kiyot_cell.facts import read_seccomp_profile

    assert read_seccomp_profile(tmp_path / "none.json") is None and read_seccomp_profile(None) is None
    (tmp_path / "p.json").write_text('{"defaultAction": "SCMP_ACT_ERRNO"}')
    assert read_seccomp_profile(tmp_path / "p.json") == {"defaultAction": "SCMP_ACT_ERRNO"}
    (tmp_path / "bad.json").write_text("{nope")
    assert read_seccomp_profile(tmp_path / "bad.json") is None


def test_rlimits_are_clamped_to_what_the_cell_can_grant():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = spec.clamp_rlimits([{"type": "RLIMIT_NOFILE", "hard": 1 << 40, "soft": 1 << 40},
                              {"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32},
                              {"type": "RLIMIT_BOGUS", "hard": 5, "soft": 5}])
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert out[0]["hard"] <= nr_open and out[0]["soft"] == out[0]["hard"]
    if not spec._has_cap_sys_resource():
        assert out[0]["hard"] <= hard
    assert out[1] == {"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}
    assert out[2] == {"type": "RLIMIT_BOGUS", "hard": 5, "soft": 5}


def test_a_log_cut_without_a_live_conmon_changes_nothing(tmp_path):
    from kiyot_cell.containers import _cut_log
    from kiyot_cell.runtime import ContainerPaths

    paths = ContainerPaths(tmp_path)
    paths.log.write_bytes(b"2026-11-24T10:00:00.000000000Z stdout F kept\n")
    assert _cut_log(paths, conmon_pid=0, cid="c" * 64) is False
    assert paths.log.read_bytes().endswith(b"F kept\n") and not paths.log_prev.exists()


def test_capabilities_are_clamped_to_the_cells_bounding_set(monkeypatch):
    # A cell without CAP_SYS_RESOURCE (24) and CAP_BPF (39): privileged asks for both.
    held = (1 << len(spec.CAPABILITIES)) - 1 & ~(1 << 24) & ~(1 << 39)
    monkeypatch.setattr(spec, "_own_capabilities", lambda field_name="CapBnd": held)
    wanted = {"bounding": list(spec.CAPABILITIES), "effective": ["CAP_SYS_RESOURCE", "CAP_KILL"],
              "permitted": ["CAP_BPF"]}
    assert spec.held_capabilities() == [c for c in spec.CAPABILITIES if c not in ("CAP_SYS_RESOURCE", "CAP_BPF")]
    out = spec.clamp_capabilities(wanted)
    assert out["bounding"] == [c for c in spec.CAPABILITIES if c not in ("CAP_SYS_RESOURCE", "CAP_BPF")]
    assert out["effective"] == ["CAP_KILL"]
    assert out["permitted"] == []


def test_capability_names_follow_the_kernels_numbers():
    # CAP_SYS_RESOURCE is 24 and CAP_CHECKPOINT_RESTORE 40 in <linux/capability.h>.
    assert spec.CAPABILITIES.index("CAP_SYS_RESOURCE") == 24
    assert spec.CAPABILITIES.index("CAP_CHECKPOINT_RESTORE") == 40


def test_resolve_user_merge_and_strict(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:50000:app\n")
    merged = spec.resolve_user(tmp_path, "1000", [1234])
    assert merged == {"uid": 1000, "gid": 1000, "additionalGids": [50000, 1234]}
    strict = spec.resolve_user(tmp_path, "1000", [1234], merge_image_groups=False)
    assert strict == {"uid": 1000, "gid": 1000, "additionalGids": [1234]}
    # A uid the image does not know: group 0, nothing merged.
    assert spec.resolve_user(tmp_path, "4242", []) == {"uid": 4242, "gid": 0}
    # The identity the node reports: primary group first, then the rest sorted.
    identity = spec.process_identity({"process": {"user": merged}})
    assert identity == {"uid": 1000, "gid": 1000, "groups": [1000, 1234, 50000]}


def test_a_pid_counts_as_in_a_cgroup_only_while_it_is_there():
    import os

    from kiyot_cell.containers import in_cgroup

    mine = Path("/proc/self/cgroup").read_text().splitlines()[-1].split(":", 2)[2]
    assert in_cgroup(os.getpid(), mine)
    assert not in_cgroup(os.getpid(), mine.rstrip("/") + "/kiyot-cell/" + "0" * 64)  # another container's
    assert not in_cgroup(2**22 + 12345, mine)  # no such process (beyond pid_max)
