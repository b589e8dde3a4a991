"""Unit tests for kiyot_py.pods.spec (the OCI spec from CRI input and the cell's facts),
plus a real `runc run` when root. The cell-platform cases (an arm64 cell behind this
node) are in tests/unit/test_cell_platform.py."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import uuid

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as cri
from kiyot_py.model import CellFacts
from kiyot_py.pods.spec import (
    ContainerSpec,
    SpecError,
    build_container_spec,
)
from kiyot_py.pods.spec.annotations import ANNOTATION_SECCOMP_SOURCE
from kiyot_py.pods.spec.process import DEFAULT_PATH_ENV
from kiyot_py.pods.spec.security import ALL_CAPABILITIES, DEFAULT_CAPABILITIES, DEFAULT_READONLY_PATHS

CONTAINERS_SECCOMP = "/usr/share/containers/seccomp.json"

# An amd64 cell that reported no RuntimeDefault profile (the built-in deny list applies).
FACTS = CellFacts(architecture="amd64", kernel="6.1.0-18-amd64", capabilities=list(ALL_CAPABILITIES))


def containers_common_facts() -> CellFacts:
    """An amd64 cell whose RuntimeDefault is containers-common's profile (read here, by
    the test, as the agent would read it in the cell)."""
    with open(CONTAINERS_SECCOMP) as f:
        profile = json.load(f)
    return CellFacts(architecture="amd64", kernel="6.1.0-18-amd64",
                     capabilities=list(ALL_CAPABILITIES), seccomp_profile=profile)


def cfg(**kw) -> cri.ContainerConfig:
    kw.setdefault("metadata", cri.ContainerMetadata(name="app"))
    return cri.ContainerConfig(**kw)


def sc(**kw) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**kw))


def sandbox(**kw) -> cri.PodSandboxConfig:
    kw.setdefault(
        "metadata", cri.PodSandboxMetadata(name="pod", namespace="ns", uid="u-1")
    )
    kw.setdefault("hostname", "pod-host")
    return cri.PodSandboxConfig(**kw)


IMG = {"Cmd": ["/bin/sh"]}


def build(config=None, sb=None, img=IMG, facts=FACTS, **kw) -> ContainerSpec:
    return build_container_spec(config or cfg(), sb or sandbox(), img, facts, **kw)


# --------------------------------------------------------------------------- args


@pytest.mark.parametrize(
    "command,args,entrypoint,cmd,expected",
    [
        ([], [], ["/ep"], ["c1"], ["/ep", "c1"]),
        ([], [], None, ["/c", "x"], ["/c", "x"]),
        ([], [], ["/ep"], None, ["/ep"]),
        ([], ["a1"], ["/ep"], ["c1"], ["/ep", "a1"]),
        (["/cmd"], [], ["/ep"], ["c1"], ["/cmd"]),
        (["/cmd"], ["a1", "a2"], ["/ep"], ["c1"], ["/cmd", "a1", "a2"]),
        ([], ["/a"], None, ["c1"], ["/a"]),
        ([], [], [""], ["/c"], ["/c"]),  # ENTRYPOINT [""] resets
    ],
)
def test_args_merge(command, args, entrypoint, cmd, expected):
    img = {"Entrypoint": entrypoint, "Cmd": cmd}
    s = build(cfg(command=command, args=args), img=img)
    assert s.spec["process"]["args"] == expected


@pytest.mark.parametrize("img", [{}, {"Entrypoint": None, "Cmd": None}, {"Cmd": []}])
def test_no_command_is_an_error(img):
    with pytest.raises(SpecError, match="no command"):
        build(img=img)


def test_none_image_config_with_command():
    s = build(cfg(command=["/x"]), img=None)
    assert s.spec["process"]["args"] == ["/x"]


def test_bad_image_config_types():
    with pytest.raises(SpecError):
        build(img={"Cmd": "sh -c x"})


# --------------------------------------------------------------------------- env/cwd


def test_env_merge_order_and_override():
    img = {"Cmd": ["/x"], "Env": ["PATH=/img/bin", "A=1", "B=2"]}
    c = cfg(envs=[cri.KeyValue(key="B", value=b"20"), cri.KeyValue(key="C", value=b"3")])
    env = build(c, img=img).spec["process"]["env"]
    assert env == ["HOSTNAME=pod-host", "PATH=/img/bin", "A=1", "B=20", "C=3"]


def test_env_default_path_and_cri_path_wins():
    env = build(img={"Cmd": ["/x"]}).spec["process"]["env"]
    assert env[0] == DEFAULT_PATH_ENV
    c = cfg(envs=[cri.KeyValue(key="PATH", value=b"/mine")])
    env = build(c, img={"Cmd": ["/x"], "Env": ["PATH=/img"]}).spec["process"]["env"]
    assert "PATH=/mine" in env and "PATH=/img" not in env


def test_env_value_with_equals_and_bad_key():
    c = cfg(envs=[cri.KeyValue(key="X", value=b"a=b")])
    assert "X=a=b" in build(c).spec["process"]["env"]
    with pytest.raises(SpecError):
        build(cfg(envs=[cri.KeyValue(key="A=B", value=b"1")]))
    with pytest.raises(SpecError):
        build(cfg(envs=[cri.KeyValue(key="", value=b"1")]))


def test_cwd():
    assert build().spec["process"]["cwd"] == "/"
    assert build(img={"Cmd": ["/x"], "WorkingDir": "/srv"}).spec["process"]["cwd"] == "/srv"
    s = build(cfg(working_dir="/work"), img={"Cmd": ["/x"], "WorkingDir": "/srv"})
    assert s.spec["process"]["cwd"] == "/work"
    with pytest.raises(SpecError):
        build(cfg(working_dir="rel"))


# --------------------------------------------------------------------------- user


def test_user_default_root():
    s = build()
    assert s.spec["process"]["user"] == {"uid": 0, "gid": 0}
    assert s.user == "0"  # the agent looks up uid 0's groups in the rootfs
    assert s.groups_policy == "Merge"


@pytest.mark.parametrize(
    "kw,image_user,expected_user,resolve",
    [
        ({"run_as_user": cri.Int64Value(value=1000)}, "", {"uid": 1000, "gid": 0}, "1000"),
        (
            {"run_as_user": cri.Int64Value(value=1000), "run_as_group": cri.Int64Value(value=50)},
            "app:grp",
            {"uid": 1000, "gid": 50},
            "1000:50",
        ),
        ({}, "1000", {"uid": 1000, "gid": 0}, "1000"),
        ({}, "1000:2000", {"uid": 1000, "gid": 2000}, "1000:2000"),
        # the kubelet copies the image uid into run_as_user: image gid kept
        ({"run_as_user": cri.Int64Value(value=1000)}, "1000:2000", {"uid": 1000, "gid": 2000}, "1000:2000"),
        ({"run_as_user": cri.Int64Value(value=7)}, "1000:2000", {"uid": 7, "gid": 0}, "7"),
        ({}, "app", {"uid": 0, "gid": 0}, "app"),
        ({}, "app:grp", {"uid": 0, "gid": 0}, "app:grp"),
        ({}, "1000:grp", {"uid": 0, "gid": 0}, "1000:grp"),
        ({"run_as_username": "app"}, "", {"uid": 0, "gid": 0}, "app"),
        (
            {"run_as_username": "app", "run_as_group": cri.Int64Value(value=1000)},
            "",
            {"uid": 0, "gid": 0},
            "app:1000",
        ),
        ({"run_as_username": "web"}, "app:grp", {"uid": 0, "gid": 0}, "web"),
    ],
)
def test_user_cases(kw, image_user, expected_user, resolve):
    s = build(cfg(linux=sc(**kw)), img={"Cmd": ["/x"], "User": image_user})
    assert s.spec["process"]["user"] == expected_user
    assert s.user == resolve


def test_supplemental_groups():
    s = build(cfg(linux=sc(run_as_user=cri.Int64Value(value=5), supplemental_groups=[10, 20])))
    assert s.spec["process"]["user"] == {"uid": 5, "gid": 0, "additionalGids": [10, 20]}
    assert s.groups_policy == "Merge"
    s = build(cfg(linux=sc(run_as_user=cri.Int64Value(value=5), supplemental_groups_policy=cri.Strict)))
    assert s.groups_policy == "Strict"


def test_user_errors():
    with pytest.raises(SpecError, match="run_as_group"):
        build(cfg(linux=sc(run_as_group=cri.Int64Value(value=1))))
    with pytest.raises(SpecError, match="only one"):
        build(cfg(linux=sc(run_as_user=cri.Int64Value(value=1), run_as_username="x")))
    with pytest.raises(SpecError):
        build(cfg(linux=sc(run_as_user=cri.Int64Value(value=-1))))
    with pytest.raises(SpecError):
        build(img={"Cmd": ["/x"], "User": "a:b:c"})
    with pytest.raises(SpecError):
        build(img={"Cmd": ["/x"], "User": ":5"})


# --------------------------------------------------------------------------- caps


def caps_of(s: ContainerSpec) -> dict:
    return s.spec["process"]["capabilities"]


def test_default_caps():
    c = caps_of(build())
    assert c["bounding"] == list(DEFAULT_CAPABILITIES)
    assert c["effective"] == c["permitted"] == c["bounding"]
    assert len(c["bounding"]) == 14
    assert "ambient" not in c and "inheritable" not in c


def capcfg(add=(), drop=(), **kw):
    return cfg(
        linux=sc(
            capabilities=cri.Capability(add_capabilities=list(add), drop_capabilities=list(drop)),
            **kw,
        )
    )


def test_caps_add_drop_prefix_and_case():
    c = caps_of(build(capcfg(add=["sys_admin", "CAP_NET_ADMIN"], drop=["chown", "Cap_Kill"])))
    b = c["bounding"]
    assert "CAP_SYS_ADMIN" in b and "CAP_NET_ADMIN" in b
    assert "CAP_CHOWN" not in b and "CAP_KILL" not in b
    assert "CAP_SETUID" in b


def test_caps_drop_all_then_add():
    c = caps_of(build(capcfg(add=["NET_BIND_SERVICE"], drop=["ALL"])))
    assert c["bounding"] == ["CAP_NET_BIND_SERVICE"]
    assert c["effective"] == ["CAP_NET_BIND_SERVICE"]


def test_caps_add_all_then_drop():
    c = caps_of(build(capcfg(add=["all"], drop=["CHOWN"])))
    assert "CAP_SYS_ADMIN" in c["bounding"] and "CAP_CHOWN" not in c["bounding"]
    assert len(c["bounding"]) >= 37


def test_caps_drop_wins_over_add():
    assert "CAP_SYS_TIME" not in caps_of(build(capcfg(add=["SYS_TIME"], drop=["SYS_TIME"])))["bounding"]


def test_unknown_capability():
    with pytest.raises(SpecError, match="unknown capability"):
        build(capcfg(add=["FLY"]))
    with pytest.raises(SpecError, match="unknown capability"):
        build(capcfg(drop=["CAP_NOPE"]))


def test_ambient_caps():
    c = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="a"),
        linux=sc(capabilities=cri.Capability(add_ambient_capabilities=["NET_ADMIN"])),
    )
    caps = caps_of(build(c))
    assert caps["ambient"] == caps["inheritable"] == ["CAP_NET_ADMIN"]
    assert "CAP_NET_ADMIN" in caps["permitted"]


def test_privileged():
    s = build(
        cfg(linux=sc(privileged=True, seccomp=cri.SecurityProfile(profile_type=0))),
    )
    spec = s.spec
    assert "CAP_SYS_ADMIN" in spec["process"]["capabilities"]["bounding"]
    assert "seccomp" not in spec["linux"]
    assert spec["linux"]["maskedPaths"] == [] and spec["linux"]["readonlyPaths"] == []
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    sysfs = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert "ro" not in sysfs["options"]
    cg = next(m for m in spec["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert "ro" not in cg["options"]


def test_readonly_rootfs_and_nnp():
    s = build(cfg(linux=sc(readonly_rootfs=True, no_new_privs=True)))
    assert s.spec["root"] == {"path": "rootfs", "readonly": True}
    assert s.spec["process"]["noNewPrivileges"] is True
    s = build()
    assert s.spec["root"]["readonly"] is False and s.spec["process"]["noNewPrivileges"] is False


def test_masked_and_readonly_paths():
    s = build()
    assert "/proc/kcore" in s.spec["linux"]["maskedPaths"]
    assert "/sys/devices/virtual/powercap" in s.spec["linux"]["maskedPaths"]
    assert s.spec["linux"]["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)
    s = build(cfg(linux=sc(masked_paths=["/m"], readonly_paths=["/r"])))
    assert s.spec["linux"]["maskedPaths"] == ["/m"]
    assert s.spec["linux"]["readonlyPaths"] == ["/r"]


# --------------------------------------------------------------------------- seccomp


def secfg(profile_type=None, ref="", path="", caps_add=()):
    kw = {}
    if profile_type is not None:
        kw["seccomp"] = cri.SecurityProfile(profile_type=profile_type, localhost_ref=ref)
    if path:
        kw["seccomp_profile_path"] = path
    if caps_add:
        kw["capabilities"] = cri.Capability(add_capabilities=list(caps_add))
    return cfg(linux=sc(**kw))


def rule_for(profile: dict, name: str, caps_filter=None) -> list[dict]:
    return [r for r in profile.get("syscalls", []) if name in r["names"]]


def allowed(profile: dict, name: str) -> bool:
    """Allowed unconditionally (an ALLOW rule without arg filters)."""
    rules = rule_for(profile, name)
    if any(r["action"] == "SCMP_ACT_ALLOW" and not r.get("args") for r in rules):
        return True
    if any(r["action"] != "SCMP_ACT_ALLOW" and not r.get("args") for r in rules):
        return False
    return profile["defaultAction"] == "SCMP_ACT_ALLOW"


def test_seccomp_default_is_unconfined():
    assert "seccomp" not in build().spec["linux"]
    assert "seccomp" not in build(secfg(path="unconfined")).spec["linux"]
    assert "seccomp" not in build(secfg(cri.SecurityProfile.Unconfined)).spec["linux"]


needs_containers_seccomp = pytest.mark.skipif(
    not os.path.exists(CONTAINERS_SECCOMP), reason=f"{CONTAINERS_SECCOMP} not installed"
)


@needs_containers_seccomp
def test_seccomp_runtime_default_converts_the_cells_profile():
    facts = containers_common_facts()
    s = build(secfg(cri.SecurityProfile.RuntimeDefault), facts=facts)
    prof = s.spec["linux"]["seccomp"]
    assert s.spec["annotations"][ANNOTATION_SECCOMP_SOURCE] == "cell"
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO"
    assert prof["defaultErrnoRet"] == 38
    assert prof["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for r in prof["syscalls"]:
        assert set(r) <= {"names", "action", "errnoRet", "args"}
    assert allowed(prof, "read")
    assert not allowed(prof, "kexec_load")
    # includes/excludes by cap: without CAP_SYS_ADMIN bpf is denied (EPERM)
    assert not allowed(prof, "bpf")
    assert any(r["action"] == "SCMP_ACT_ERRNO" and r.get("errnoRet") == 1 for r in rule_for(prof, "bpf"))
    assert not allowed(prof, "open_by_handle_at")
    # ... with it added, bpf is allowed and the EPERM rule is excluded
    prof2 = build(secfg(cri.SecurityProfile.RuntimeDefault, caps_add=["SYS_ADMIN"]), facts=facts).spec[
        "linux"
    ]["seccomp"]
    assert allowed(prof2, "bpf")
    assert not any(r["action"] == "SCMP_ACT_ERRNO" for r in rule_for(prof2, "bpf"))
    assert not allowed(prof2, "open_by_handle_at")
    # dropping a default cap flips its rule: chroot needs CAP_SYS_CHROOT
    prof4 = build(
        cfg(linux=sc(seccomp=cri.SecurityProfile(profile_type=0),
                     capabilities=cri.Capability(drop_capabilities=["SYS_CHROOT"]))),
        facts=facts,
    ).spec["linux"]["seccomp"]
    assert not allowed(prof4, "chroot")
    # chroot: CAP_SYS_CHROOT is a default cap
    assert allowed(prof, "chroot")
    # deprecated path form gives the same profile
    prof3 = build(secfg(path="runtime/default"), facts=facts).spec["linux"]["seccomp"]
    assert prof3 == prof
    assert build(secfg(path="docker/default"), facts=facts).spec["linux"]["seccomp"] == prof


@needs_containers_seccomp
def test_seccomp_arch_includes():
    prof = build(secfg(cri.SecurityProfile.RuntimeDefault), facts=containers_common_facts()).spec[
        "linux"]["seccomp"]
    assert allowed(prof, "arch_prctl")
    assert not rule_for(prof, "s390_runtime_instr")


def test_seccomp_builtin_fallback():
    s = build(secfg(cri.SecurityProfile.RuntimeDefault))  # FACTS reports no profile
    prof = s.spec["linux"]["seccomp"]
    assert s.spec["annotations"][ANNOTATION_SECCOMP_SOURCE] == "builtin"
    assert prof["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    assert allowed(prof, "read")
    for name in ("kexec_load", "mount", "ptrace", "keyctl", "bpf", "unshare", "setns", "reboot"):
        assert not allowed(prof, name), name
    prof2 = build(secfg(cri.SecurityProfile.RuntimeDefault, caps_add=["SYS_ADMIN"])).spec["linux"]["seccomp"]
    assert allowed(prof2, "mount") and not allowed(prof2, "keyctl")


def test_seccomp_localhost(tmp_path):
    moby = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []}],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errno": "EPERM"},
        ],
    }
    (tmp_path / "moby.json").write_text(json.dumps(moby))
    prof = build(
        secfg(cri.SecurityProfile.Localhost, ref="moby.json"), seccomp_profile_root=str(tmp_path)
    ).spec["linux"]["seccomp"]
    assert prof["architectures"] == ["SCMP_ARCH_X86_64"]
    assert prof["syscalls"][0] == {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}
    assert not rule_for(prof, "mount")
    assert rule_for(prof, "chmod")[0]["errnoRet"] == 1
    oci = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }
    p = tmp_path / "oci.json"
    p.write_text(json.dumps(oci))
    prof = build(secfg(cri.SecurityProfile.Localhost, ref=str(p))).spec["linux"]["seccomp"]
    assert prof == oci
    prof = build(secfg(path=f"localhost/{p}")).spec["linux"]["seccomp"]
    assert prof == oci
    # no seccomp section when the annotation marks RuntimeDefault only
    assert ANNOTATION_SECCOMP_SOURCE not in build(
        secfg(path=f"localhost/{p}")
    ).spec["annotations"]


def test_seccomp_localhost_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        build(secfg(cri.SecurityProfile.Localhost, ref=str(tmp_path / "missing.json")))
    with pytest.raises(SpecError, match="does not exist"):
        build(secfg(cri.SecurityProfile.Localhost, ref="x.json"), seccomp_profile_root=str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        build(secfg(cri.SecurityProfile.Localhost, ref=str(tmp_path / "bad.json")))
    (tmp_path / "noact.json").write_text('{"syscalls": []}')
    with pytest.raises(SpecError, match="defaultAction"):
        build(secfg(cri.SecurityProfile.Localhost, ref=str(tmp_path / "noact.json")))
    with pytest.raises(SpecError, match="escapes"):
        build(secfg(cri.SecurityProfile.Localhost, ref="../etc/x"), seccomp_profile_root=str(tmp_path))
    with pytest.raises(SpecError):
        build(secfg(cri.SecurityProfile.Localhost, ref=""))


def test_seccomp_unknown_type_and_path():
    with pytest.raises(SpecError, match="unknown seccomp profile"):
        build(secfg(7))
    with pytest.raises(SpecError, match="unknown seccomp profile"):
        build(secfg(path="foo/bar"))


# --------------------------------------------------------------------------- mounts


def mount(container_path, host_path, readonly=False, propagation=0, **kw):
    return cri.Mount(
        container_path=container_path,
        host_path=host_path,
        readonly=readonly,
        propagation=propagation,
        **kw,
    )


def test_standard_mounts():
    ms = build().spec["mounts"]
    dests = [m["destination"] for m in ms]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"):
        assert d in dests
    sysfs = next(m for m in ms if m["destination"] == "/sys")
    assert sysfs["type"] == "sysfs" and "ro" in sysfs["options"]
    cg = next(m for m in ms if m["destination"] == "/sys/fs/cgroup")
    assert cg["type"] == "cgroup" and "ro" in cg["options"]


def test_cri_mounts_override_order_propagation():
    c = cfg(
        mounts=[
            mount("/data/sub", "/h/sub", readonly=True),
            mount("/dev/shm", "/h/shm"),
            mount("/data", "/h/data", propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
            mount("/x", "/h/x", propagation=cri.PROPAGATION_BIDIRECTIONAL),
            mount("/ro", "/h/ro", readonly=True, recursive_read_only=True),
        ]
    )
    spec = build(c, facts=dataclasses.replace(FACTS, recursive_read_only_mounts=True)).spec
    ms = spec["mounts"]
    by = {m["destination"]: m for m in ms}
    assert by["/dev/shm"] == {
        "destination": "/dev/shm", "type": "bind", "source": "/h/shm", "options": ["rbind", "rprivate", "rw"]
    }
    assert [m["destination"] for m in ms].count("/dev/shm") == 1
    assert by["/data/sub"]["options"] == ["rbind", "rprivate", "ro"]
    assert by["/data"]["options"] == ["rbind", "rslave", "rw"]
    assert by["/x"]["options"] == ["rbind", "rshared", "rw"]
    assert by["/ro"]["options"] == ["rbind", "rprivate", "rro"]
    assert spec["linux"]["rootfsPropagation"] == "rshared"
    dests = [m["destination"] for m in ms]
    assert dests.index("/data") < dests.index("/data/sub")
    assert dests.index("/dev") < dests.index("/dev/shm")
    assert dests.index("/sys") < dests.index("/sys/fs/cgroup")
    # parents always before children
    for i, a in enumerate(dests):
        for b in dests[i + 1:]:
            assert not a.startswith(b.rstrip("/") + "/"), (a, b)


def test_recursive_read_only_needs_a_cell_that_has_it():
    c = cfg(mounts=[mount("/ro", "/h/ro", readonly=True, recursive_read_only=True)])
    with pytest.raises(SpecError, match="does not support recursive read-only"):
        build(c)  # FACTS: recursive_read_only_mounts False


def test_cri_dev_mount_replaces_dev_children():
    dests = [m["destination"] for m in build(cfg(mounts=[mount("/dev", "/h/dev")])).spec["mounts"]]
    assert dests.count("/dev") == 1 and not any(d.startswith("/dev/") for d in dests)


def test_host_to_container_sets_rslave_rootfs():
    spec = build(cfg(mounts=[mount("/a", "/h", propagation=cri.PROPAGATION_HOST_TO_CONTAINER)])).spec
    assert spec["linux"]["rootfsPropagation"] == "rslave"
    assert "rootfsPropagation" not in build().spec["linux"]


def test_mount_errors():
    with pytest.raises(SpecError):
        build(cfg(mounts=[mount("rel", "/h")]))
    with pytest.raises(SpecError):
        build(cfg(mounts=[mount("/a", "")]))
    with pytest.raises(SpecError, match="must be read-only"):
        build(cfg(mounts=[mount("/a", "/h", recursive_read_only=True)]))
    with pytest.raises(SpecError, match="image volume"):
        build(cfg(mounts=[cri.Mount(container_path="/a", image=cri.ImageSpec(image="busybox"))]))


# --------------------------------------------------------------------------- namespaces/hostname


def ns_types(spec):
    return [n["type"] for n in spec["linux"]["namespaces"]]


def test_namespaces():
    spec = build().spec
    assert ns_types(spec) == ["pid", "ipc", "uts", "mount", "network"]
    assert all("path" not in n for n in spec["linux"]["namespaces"])
    for mode in (cri.CONTAINER, cri.POD):
        spec = build(cfg(linux=sc(namespace_options=cri.NamespaceOption(pid=mode)))).spec
        assert "pid" in ns_types(spec)
    spec = build(
        cfg(linux=sc(namespace_options=cri.NamespaceOption(pid=cri.NODE, network=cri.NODE)))
    ).spec
    assert "pid" not in ns_types(spec) and "network" in ns_types(spec)


def ns_option(**modes):
    return cfg(linux=sc(namespace_options=cri.NamespaceOption(**modes)))


def test_pod_namespaces_follow_the_modes():
    assert build().pod_namespaces == ("pid", "ipc")  # no options at all: POD, as containerd reads it
    kubelet = build(ns_option(network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD))
    assert kubelet.pod_namespaces == ("ipc",) and kubelet.pid_target is None
    assert {"pid", "ipc"} <= set(ns_types(kubelet.spec))
    own = build(ns_option(pid=cri.CONTAINER, ipc=cri.CONTAINER))
    assert own.pod_namespaces == () and {"pid", "ipc"} <= set(ns_types(own.spec))
    cell = build(ns_option(pid=cri.NODE, ipc=cri.NODE))
    assert cell.pod_namespaces == () and not {"pid", "ipc"} & set(ns_types(cell.spec))
    debug = build(ns_option(pid=cri.TARGET, target_id="ab" * 32, ipc=cri.POD))
    assert debug.pid_target == "ab" * 32 and debug.pod_namespaces == ("ipc",)
    with pytest.raises(SpecError, match="target_id"):
        build(ns_option(pid=cri.TARGET))


def test_hostname_and_annotations():
    c = cfg(
        annotations={"a": "b"},
        image=cri.ImageSpec(image="docker.io/library/busybox:1"),
        metadata=cri.ContainerMetadata(name="web"),
    )
    spec = build(c).spec
    assert "hostname" not in spec  # the agent sets the pod's
    assert "HOSTNAME=pod-host" in spec["process"]["env"]
    ann = spec["annotations"]
    assert ann["a"] == "b"
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.container-name"] == "web"
    assert ann["io.kubernetes.cri.sandbox-name"] == "pod"
    assert ann["io.kubernetes.cri.image-name"] == "docker.io/library/busybox:1"
    assert not any(e.startswith("HOSTNAME=") for e in build(sb=sandbox(hostname="")).spec["process"]["env"])
    assert "HOSTNAME=cell-7" in build(hostname="cell-7").spec["process"]["env"]


# --------------------------------------------------------------------------- sysctls


def test_sysctls_valid():
    sb = sandbox(
        linux=cri.LinuxPodSandboxConfig(
            sysctls={
                "net.ipv4.ip_unprivileged_port_start": "0",
                "kernel.shm_rmid_forced": "1",
                "kernel.msgmax": "65536",
                "kernel.sem": "250 32000 100 128",
                "fs.mqueue.msg_max": "20",
                "net/ipv4/conf/eth0.100/forwarding": "1",
            }
        )
    )
    sysctl = build(sb=sb).spec["linux"]["sysctl"]
    assert sysctl["net.ipv4.ip_unprivileged_port_start"] == "0"
    assert sysctl["kernel.sem"] == "250 32000 100 128"
    assert sysctl["net.ipv4.conf.eth0/100.forwarding"] == "1"


@pytest.mark.parametrize(
    "name,value",
    [("kernel.pid_max", "10"), ("vm.swappiness", "1"), ("kernel.hostname", "x"),
     ("net.ipv4.ip_forward", ""), ("Net.Bad", "1"), ("fs.file-max", "10")],
)
def test_sysctls_rejected(name, value):
    sb = sandbox(linux=cri.LinuxPodSandboxConfig(sysctls={name: value}))
    with pytest.raises(SpecError):
        build(sb=sb)


def test_no_sysctl_section_by_default():
    assert "sysctl" not in build().spec["linux"]


# --------------------------------------------------------------------------- resources


def rescfg(**kw):
    return cfg(linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(**kw)))


def test_resources():
    spec = build(
        rescfg(
            cpu_shares=512,
            cpu_quota=50000,
            cpu_period=100000,
            cpuset_cpus="0-1",
            cpuset_mems="0",
            memory_limit_in_bytes=64 << 20,
            oom_score_adj=1000,
            unified={"pids.max": "100"},
            hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=1 << 21)],
        )
    ).spec
    r = spec["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"}
    assert r["memory"] == {"limit": 64 << 20}
    assert r["pids"] == {"limit": 100}
    assert "hugepageLimits" not in r and "unified" not in r
    assert spec["process"]["oomScoreAdj"] == 1000


@pytest.mark.parametrize("adj", [-997, -1000, -1])
def test_negative_oom_score_adj_never_emitted(adj):
    spec = build(rescfg(oom_score_adj=adj, memory_limit_in_bytes=1 << 20)).spec
    assert spec["process"]["oomScoreAdj"] == 0
    assert "-" not in json.dumps(spec["process"].get("oomScoreAdj"))


def test_no_oom_score_adj_without_resources():
    spec = build().spec
    assert "oomScoreAdj" not in spec["process"]
    assert set(spec["linux"]["resources"]) == {"devices"}


# --------------------------------------------------------------------------- devices


def test_default_device_rules():
    rules = build().spec["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed_nodes = {(r.get("major"), r.get("minor")) for r in rules[1:] if r["allow"]}
    for mm in [(1, 3), (1, 5), (1, 7), (5, 0), (1, 9), (1, 8), (5, 2), (136, None)]:
        assert mm in allowed_nodes
    assert "devices" not in build().spec["linux"]


def test_cri_devices_go_to_the_cell():
    # The node never stats a device (its /dev is not the cell's): it checks each one and
    # hands it on; the agent adds linux.devices and the allow rules in the cell.
    c = cfg(devices=[
        cri.Device(host_path="/dev/null", container_path="/dev/mynull", permissions="rw"),
        cri.Device(host_path="/dev/missing-on-this-node"),
        cri.Device(host_path="/dev/net", container_path="/dev/net", permissions=""),
    ])
    s = build(c)
    assert s.devices == [
        {"host_path": "/dev/null", "container_path": "/dev/mynull", "permissions": "rw"},
        {"host_path": "/dev/missing-on-this-node", "container_path": "/dev/missing-on-this-node",
         "permissions": "rwm"},
        {"host_path": "/dev/net", "container_path": "/dev/net", "permissions": "rwm"},
    ]
    assert "devices" not in s.spec["linux"]
    assert s.spec["linux"]["resources"]["devices"] == build().spec["linux"]["resources"]["devices"]
    assert build().devices == []
    privileged = build(cfg(linux=sc(privileged=True), devices=[cri.Device(host_path="/dev/fuse")]))
    assert privileged.spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert privileged.devices[0]["host_path"] == "/dev/fuse"


def test_cri_device_errors():
    with pytest.raises(SpecError, match="permissions"):
        build(cfg(devices=[cri.Device(host_path="/dev/null", container_path="/dev/x", permissions="rwx")]))
    with pytest.raises(SpecError, match="host path"):
        build(cfg(devices=[cri.Device(host_path="dev/null", container_path="/dev/x")]))
    with pytest.raises(SpecError, match="container path"):
        build(cfg(devices=[cri.Device(host_path="/dev/null", container_path="x")]))


# --------------------------------------------------------------------------- process misc


def test_process_defaults_and_stop_signal():
    s = build()
    p = s.spec["process"]
    assert s.spec["ociVersion"] == "1.0.2"
    assert p["terminal"] is False
    assert "rlimits" not in p  # the agent's
    assert s.stop_signal == "SIGTERM"
    assert build(img={"Cmd": ["/x"], "StopSignal": "SIGQUIT"}).stop_signal == "SIGQUIT"
    assert build(img={"Cmd": ["/x"], "StopSignal": "usr1"}).stop_signal == "SIGUSR1"
    assert build(img={"Cmd": ["/x"], "StopSignal": "9"}).stop_signal == "SIGKILL"
    assert build(img={"Cmd": ["/x"], "StopSignal": "SIGRTMIN+3"}).stop_signal == "SIGRTMIN+3"
    assert build(cfg(stop_signal=cri.SIGINT), img={"Cmd": ["/x"], "StopSignal": "SIGQUIT"}).stop_signal == "SIGINT"
    assert build(cfg(stop_signal=cri.SIGRTMINPLUS3)).stop_signal == "SIGRTMIN+3"
    assert build(cfg(stop_signal=cri.SIGRTMAXMINUS1)).stop_signal == "SIGRTMAX-1"
    assert build(img={"Cmd": ["/x"], "StopSignal": "37"}).stop_signal == "SIGRTMIN+3"
    assert build(img={"Cmd": ["/x"], "StopSignal": "SIGCLD"}).stop_signal == "SIGCHLD"
    with pytest.raises(SpecError, match="stop signal"):
        build(img={"Cmd": ["/x"], "StopSignal": "SIGNOPE"})


def test_spec_is_json_serialisable():
    json.dumps(build(capcfg(add=["ALL"])).spec)


# --------------------------------------------------------------------------- runc run


BUSYBOX = "/bin/busybox"


def _runc_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run runc"
    if not shutil.which("runc"):
        return "runc is not installed"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} (Debian busybox-static) is not installed"
    try:
        out = subprocess.run(["file", "-b", BUSYBOX], check=False, capture_output=True, text=True).stdout
        if out and "static" not in out:
            return f"{BUSYBOX} is not statically linked"
    except FileNotFoundError:
        pass
    return None


def _bundle(tmp_path, spec: dict) -> str:
    """A bundle of the spec with what the agent adds in a cell: the rootfs, a cgroup and
    the pod's host name (a fresh network namespace of its own stands for the cell's)."""
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    os.symlink("busybox", rootfs / "bin" / "sh")
    spec = json.loads(json.dumps(spec))
    spec["root"]["path"] = str(rootfs)
    assert {"type": "network"} in spec["linux"]["namespaces"]
    spec["linux"]["cgroupsPath"] = f"kiyot-test/{uuid.uuid4().hex[:12]}"
    spec["hostname"] = "pod-host"
    (bundle / "config.json").write_text(json.dumps(spec))
    return str(bundle)


def _this_machine_facts(profile: str) -> CellFacts:
    """This machine as a cell would describe itself (runc runs here, so it is the cell)."""
    seccomp_profile = None
    if profile == "containers-common":
        with open(CONTAINERS_SECCOMP) as f:
            seccomp_profile = json.load(f)
    machine = os.uname().machine
    goarch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    return CellFacts(architecture=goarch, kernel=os.uname().release,
                     capabilities=list(ALL_CAPABILITIES[: last + 1]), seccomp_profile=seccomp_profile)


def _runc_run(bundle: str) -> subprocess.CompletedProcess:
    cid = "kiyot-test-" + uuid.uuid4().hex[:12]
    try:
        return subprocess.run(
            ["runc", "run", "--bundle", bundle, cid],
            stdin=subprocess.DEVNULL,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["runc", "delete", "--force", cid], check=False, capture_output=True)
        # drop the (then empty) kiyot-test parent cgroups runc left behind
        for sub in [*glob.glob("/sys/fs/cgroup/*/kiyot-test"), "/sys/fs/cgroup/kiyot-test"]:
            with contextlib.suppress(OSError):
                os.rmdir(sub)


@pytest.mark.skipif(_runc_skip_reason() is not None, reason=str(_runc_skip_reason()))
@pytest.mark.parametrize("seccomp", ["default", "runtime-default", "builtin"])
def test_runc_runs_the_spec(tmp_path, seccomp):
    kw = {"run_as_user": cri.Int64Value(value=1000)}
    if seccomp != "default":
        kw["seccomp"] = cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    if seccomp == "runtime-default" and not os.path.exists(CONTAINERS_SECCOMP):
        pytest.skip(f"{CONTAINERS_SECCOMP} not installed")
    facts = _this_machine_facts("containers-common" if seccomp == "runtime-default" else "builtin")
    c = cfg(
        command=["sh", "-c", "echo $GREETING; id -u; exit 3"],
        envs=[cri.KeyValue(key="GREETING", value=b"hello from kiyot")],
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(**kw),
            resources=cri.LinuxContainerResources(
                memory_limit_in_bytes=64 << 20, cpu_shares=256, oom_score_adj=-997
            ),
        ),
        mounts=[mount("/data", str(tmp_path), readonly=True)],
    )
    s = build_container_spec(c, sandbox(), {"Env": ["PATH=/bin"]}, facts)
    assert s.user == "1000"
    res = _runc_run(_bundle(tmp_path, s.spec))
    assert res.returncode == 3, res.stderr
    assert res.stdout.splitlines() == ["hello from kiyot", "1000"], (res.stdout, res.stderr)


@pytest.mark.skipif(_runc_skip_reason() is not None, reason=str(_runc_skip_reason()))
@pytest.mark.parametrize("profile", ["unconfined", "containers-common", "builtin"])
def test_runc_enforces_seccomp(tmp_path, profile):
    if profile == "containers-common" and not os.path.exists(CONTAINERS_SECCOMP):
        pytest.skip(f"{CONTAINERS_SECCOMP} not installed")
    kw = {}
    if profile != "unconfined":
        kw["seccomp"] = cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    c = cfg(
        command=["sh", "-c", "grep Seccomp: /proc/self/status; unshare -U true; echo unshare=$?"],
        linux=sc(**kw),
    )
    s = build_container_spec(c, sandbox(), {}, _this_machine_facts(profile))
    res = _runc_run(_bundle(tmp_path, s.spec))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[1] == ("0" if profile == "unconfined" else "2"), res.stdout
    # the built-in deny list blocks unshare; containers-common allows it
    assert lines[-1] == ("unshare=1" if profile == "builtin" else "unshare=0"), res.stdout


def test_ipc_node_and_target_namespaces():
    spec = build(cfg(linux=sc(namespace_options=cri.NamespaceOption(ipc=cri.NODE, pid=cri.TARGET,
                                                                    target_id="ab" * 32)))).spec
    assert ns_types(spec) == ["pid", "uts", "mount", "network"]
    sb = sandbox(linux=cri.LinuxPodSandboxConfig(sysctls={"kernel.shmmax": "1"}))
    with pytest.raises(SpecError, match="IPC"):
        build(cfg(linux=sc(namespace_options=cri.NamespaceOption(ipc=cri.NODE))), sb=sb)


def test_user_namespaces_rejected():
    nso = cri.NamespaceOption(
        userns_options=cri.UserNamespace(mode=cri.POD, uids=[cri.IDMapping(host_id=1, container_id=0, length=1)])
    )
    with pytest.raises(SpecError, match="user namespaces"):
        build(cfg(linux=sc(namespace_options=nso)))


@pytest.mark.skipif(_runc_skip_reason() is not None, reason=str(_runc_skip_reason()))
def test_runc_readonly_and_masked(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("hi\n")
    c = cfg(
        command=[
            "sh",
            "-c",
            "cat /data/hello; "
            "touch /data/new 2>/dev/null || echo data=ro; "
            "touch /new 2>/dev/null || echo root=ro; "
            "cat /proc/kcore 2>/dev/null | head -c1 | wc -c; hostname",
        ],
        mounts=[mount("/data", str(data), readonly=True)],
        linux=sc(readonly_rootfs=True),
    )
    s = build_container_spec(c, sandbox(), {}, _this_machine_facts("builtin"))
    res = _runc_run(_bundle(tmp_path, s.spec))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hi", "data=ro", "root=ro", "0", "pod-host"], res.stdout
