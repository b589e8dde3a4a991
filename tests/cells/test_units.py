"""Unit tests of the agent's pure parts (no root, no registry)."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cells"))

from kiyot_cell import layercheck, spec  # noqa: E402
from kiyot_cell.errors import ApiError  # noqa: E402
from kiyot_cell.images import split_ref  # noqa: E402
from kiyot_cell.runtime import parse_signal  # noqa: E402


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


def test_build_fills_cell_facts(tmp_path):
    image_cfg = {"process": {"args": ["sh"], "env": ["PATH=/bin", "A=1"], "cwd": "/", "terminal": True},
                 "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "uts"}]},
                 "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}
    facts = spec.CellFacts(rootfs=tmp_path / "rootfs", netns="/run/netns/c1", cgroups_path="/kiyot/c1/x",
                           pod_etc=tmp_path / "etc", pod_hostname="web-0")
    out = spec.build(image_cfg, {"process": {"env": ["A=2", "B=3"], "args": []}}, facts, None)
    assert out["process"]["args"] == ["sh"] and out["process"]["terminal"] is False
    assert out["process"]["env"] == ["PATH=/bin", "A=2", "B=3"]
    assert {"type": "network", "path": "/run/netns/c1"} in out["linux"]["namespaces"]
    assert out["linux"]["cgroupsPath"] == "/kiyot/c1/x" and out["root"]["path"] == str(tmp_path / "rootfs")
    assert out["hostname"] == "web-0"
    assert {m["destination"] for m in out["mounts"]} == {"/proc", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    no_net = spec.build(image_cfg, {}, facts.__class__(**{**facts.__dict__, "netns": None}), None)
    assert all(ns["type"] != "network" for ns in no_net["linux"]["namespaces"])


def test_parse_signal():
    assert parse_signal("SIGTERM") == 15 and parse_signal("KILL") == 9 and parse_signal("2") == 2
    assert parse_signal(None, "SIGINT") == 2
    with pytest.raises(ApiError):
        parse_signal("SIGNOPE")


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
