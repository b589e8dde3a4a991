"""The cell's platform decides, not this node's: an arm64 cell behind an amd64 node gets
the arm64 manifest of a multi-arch index and an arm64 seccomp profile, and its spec is
clipped to what the cell reported (kiyot_py.model.CellFacts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kiyot_py.errors import FailedPrecondition
from kiyot_py.gen.runtime.v1 import api_pb2 as cri
from kiyot_py.model import Cell, CellFacts, Image, PlatformImage, from_json, to_json
from kiyot_py.platforms import Platform, arch, normalize_arch
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.spec import SpecError, build_container_spec
from kiyot_py.pods.spec.process import normalize_signal
from kiyot_py.pods.spec.security import ALL_CAPABILITIES, DEFAULT_CAPABILITIES
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.store import Store

ARM64 = CellFacts(architecture="arm64", variant="v8", kernel="6.8.0-1012-aws",
                  capabilities=list(ALL_CAPABILITIES))
AMD64 = Platform("linux", "amd64")

# A moby-format profile (the shape of containers-common's seccomp.json), cut down.
MOBY = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    ],
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["arch_prctl", "modify_ldt"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
        {"names": ["arm_fadvise64_64", "arm_sync_file_range"], "action": "SCMP_ACT_ALLOW",
         "includes": {"arches": ["arm", "arm64"]}},
        {"names": ["not_on_arm64"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["arm64"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["new_in_6_2"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.2"}},
        {"names": ["new_in_7_0"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "7.0"}},
    ],
}


def cfg(**sc) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="app"),
                               linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**sc)))


def runtime_default(**sc) -> cri.ContainerConfig:
    return cfg(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault), **sc)


def build(config: cri.ContainerConfig, facts: CellFacts):
    return build_container_spec(config, cri.PodSandboxConfig(hostname="pod"), {"Cmd": ["/bin/sh"]}, facts)


def names(profile: dict) -> set[str]:
    return {n for r in profile.get("syscalls", []) for n in r["names"]}


# -- seccomp by the cell's architecture and kernel ------------------------------------------


def test_arm64_cell_gets_an_arm64_profile_from_its_own():
    facts = dataclasses.replace(ARM64, seccomp_profile=MOBY)
    s = build(runtime_default(), facts)
    prof = s.spec["linux"]["seccomp"]
    assert prof["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    got = names(prof)
    assert {"read", "write", "arm_fadvise64_64", "arm_sync_file_range"} <= got
    assert not {"arch_prctl", "modify_ldt", "not_on_arm64"} & got  # gated by includes/excludes.arches
    assert "bpf" not in got  # no CAP_SYS_ADMIN by default
    assert "new_in_6_2" in got and "new_in_7_0" not in got  # minKernel against the cell's 6.8
    assert s.spec["annotations"]["io.kiyot.seccomp-default-source"] == "cell"

    # The same profile for an amd64 cell: amd64's architectures and syscalls.
    amd = build(runtime_default(), CellFacts(kernel="5.10.0", capabilities=list(ALL_CAPABILITIES),
                                             seccomp_profile=MOBY)).spec["linux"]["seccomp"]
    assert amd["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    got = names(amd)
    assert {"arch_prctl", "modify_ldt", "not_on_arm64"} <= got
    assert not {"arm_fadvise64_64", "new_in_6_2"} & got


def test_arm64_cell_without_a_profile_gets_the_builtin_list_for_arm64():
    s = build(runtime_default(), ARM64)
    prof = s.spec["linux"]["seccomp"]
    assert prof["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW" and "mount" in names(prof)
    assert s.spec["annotations"]["io.kiyot.seccomp-default-source"] == "builtin"


def test_unknown_kernel_keeps_only_rules_for_any_kernel():
    facts = CellFacts(capabilities=list(ALL_CAPABILITIES), seccomp_profile=MOBY)  # kernel ""
    got = names(build(runtime_default(), facts).spec["linux"]["seccomp"])
    assert "read" in got and not {"new_in_6_2", "new_in_7_0"} & got


def test_cell_without_seccomp():
    # containerd: "seccomp is not supported" for any profile but Unconfined.
    facts = CellFacts(capabilities=list(ALL_CAPABILITIES), seccomp=False, seccomp_profile=MOBY)
    with pytest.raises(SpecError, match="seccomp is not supported"):
        build(runtime_default(), facts)
    with pytest.raises(SpecError, match="seccomp is not supported"):
        build(cfg(seccomp_profile_path="runtime/default"), facts)
    assert "seccomp" not in build(cfg(), facts).spec["linux"]  # the kubelet's default: Unconfined
    unconfined = cfg(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined))
    assert "seccomp" not in build(unconfined, facts).spec["linux"]
    # A privileged container never gets seccomp, so asking is no error (as containerd).
    assert "seccomp" not in build(runtime_default(privileged=True), facts).spec["linux"]


# -- capabilities clipped to the cell's ------------------------------------------------------


SMALL = ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"]


def caps(config, facts):
    return build(config, facts).spec["process"]["capabilities"]


def test_capabilities_clipped_to_the_cell():
    facts = CellFacts(capabilities=SMALL)
    assert caps(cfg(), facts)["bounding"] == [c for c in DEFAULT_CAPABILITIES if c in SMALL]
    everything = caps(cfg(capabilities=cri.Capability(add_capabilities=["ALL"])), facts)
    assert everything["bounding"] == SMALL
    assert caps(cfg(privileged=True), facts)["bounding"] == SMALL
    added = caps(cfg(capabilities=cri.Capability(add_capabilities=["SYS_ADMIN"])), facts)
    assert "CAP_SYS_ADMIN" in added["bounding"]
    with pytest.raises(SpecError, match="CAP_NET_ADMIN is not available in this cell"):
        build(cfg(capabilities=cri.Capability(add_capabilities=["NET_ADMIN"])), facts)
    with pytest.raises(SpecError, match="CAP_BPF is not available"):
        build(cfg(capabilities=cri.Capability(add_ambient_capabilities=["BPF"])), facts)
    # A newer kernel's capability the cell reports is given to a privileged container.
    newer = CellFacts(capabilities=[*ALL_CAPABILITIES, "CAP_FUTURE"])
    assert caps(cfg(privileged=True), newer)["bounding"][-1] == "CAP_FUTURE"
    # An agent that reported no capabilities: every capability known here.
    assert caps(cfg(privileged=True), CellFacts())["bounding"] == list(ALL_CAPABILITIES)


# -- platforms --------------------------------------------------------------------------------


def test_platform_strings_and_tables():
    assert str(Platform.from_facts(ARM64)) == "linux/arm64/v8"
    assert str(Platform("linux", "arm64")) == "linux/arm64/v8"  # arm64's default variant
    assert str(Platform("linux", "aarch64")) == "linux/arm64/v8"
    assert str(Platform("linux", "x86_64")) == "linux/amd64"
    assert str(Platform("linux", "arm")) == "linux/arm/v7"
    assert Platform.parse("linux/arm64") == Platform("linux", "arm64", "v8")
    assert Platform.parse("linux/arm/v6") == Platform("linux", "arm", "v6")
    assert Platform.parse("arm64") == Platform("linux", "arm64")
    with pytest.raises(ValueError):
        Platform.parse("linux//x")
    assert Platform.from_image_config({"os": "linux", "architecture": "arm64"}) == Platform("linux", "arm64", "v8")
    assert Platform.from_image_config({}) is None
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert not Platform("linux", "arm64").matches(AMD64)
    assert normalize_arch("armv6l") == ("arm", "v6")
    assert arch("arm64").seccomp == "SCMP_ARCH_AARCH64" and arch("arm64").sub_arches == ("SCMP_ARCH_ARM",)
    assert arch("386").moby == "x86"
    assert arch("sparc64").seccomp == "SCMP_ARCH_SPARC64"


def test_one_signal_normalizer():
    assert [normalize_signal(s) for s in ("term", "9", "SIGRTMINPLUS3", "SIGRTMIN+3", "37", "SIGRTMAX-1", "iot")] == [
        "SIGTERM", "SIGKILL", "SIGRTMIN+3", "SIGRTMIN+3", "SIGRTMIN+3", "SIGRTMAX-1", "SIGABRT"]
    for bad in ("SIGNOPE", "SIGRTMIN-1", "SIGRTMAX+1", "99", "SIGRTMIN+31"):
        with pytest.raises(SpecError):
            normalize_signal(bad)


def test_image_platforms_round_trip_the_store_format():
    record = Image(id="sha256:" + "a" * 64, platform_digest="sha256:" + "b" * 64,
                   platforms={"linux/arm64/v8": PlatformImage("sha256:" + "c" * 64, {"architecture": "arm64"})})
    back = from_json(Image, to_json(record))
    assert back == record and isinstance(back.platforms["linux/arm64/v8"], PlatformImage)
    assert back.platform_digests() == ["sha256:" + "b" * 64, "sha256:" + "c" * 64]


# -- the image for an arm64 cell behind an amd64 node ----------------------------------------


@pytest.fixture
async def manager(tmp_path: Path):
    client = RegistryClient(connect_timeout=5, read_timeout=10)
    store = Store(tmp_path / "state.db")
    content = ContentStore(tmp_path / "content")
    yield ImageManager(store, client, RegistriesConfig(), content, default_platform=AMD64), store, tmp_path
    await client.close()
    store.close()


async def test_arm64_cell_gets_the_arm64_manifest(fake, manager):
    images, _store, tmp_path = manager
    record = await images.pull(f"{fake.host}/multi/app:latest", None)
    amd_manifest, amd_config = fake.platforms["linux/amd64"]
    arm_manifest, _arm_config = fake.platforms["linux/arm64/v8"]
    assert (record.id, record.platform_digest) == (amd_config, amd_manifest)  # the default platform's

    same = await images.for_cell(record, CellFacts(architecture="amd64"))
    assert same.platform_digest == amd_manifest and same.config is record.config

    got = await images.for_cell(record, ARM64)
    assert got.platform_digest == arm_manifest
    assert got.config["architecture"] == "arm64" and got.config["config"]["Cmd"] == ["/bin/arm64"]
    assert record.id == amd_config  # the image id stays the default platform's config digest

    # Asked once: the answer is kept in the record, the state db, and the content store.
    fake.requests.clear()
    assert await images.for_cell(record, CellFacts(architecture="arm64")) == got
    assert fake.requests == []
    reloaded = ImageManager(Store(tmp_path / "state.db"), RegistryClient(), RegistriesConfig(),
                            images.content, default_platform=AMD64).get(record.id)
    assert reloaded.platforms["linux/arm64/v8"] == got
    arm_blobs = images.content.manifest_blobs(arm_manifest)
    assert len(arm_blobs) >= 3 and all(images.content.has(d) for d in arm_blobs)

    cell = Cell(id="c1", sandbox_id="s1", address="10.0.0.2", agent_url="https://x",
                pull_path="10.89.0.1:5380")
    pull = images.cell_pull(record, cell, got.platform_digest)
    assert pull == {"ref": f"10.89.0.1:5380/multi/app@{arm_manifest}", "digest": arm_manifest}

    # The spec for that cell: the arm64 image's config and an arm64 seccomp profile.
    s = build_container_spec(cfg(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)),
                             cri.PodSandboxConfig(hostname="pod"), got.config["config"], ARM64)
    assert s.spec["process"]["args"] == ["/bin/arm64"] and s.user == "1000"
    assert s.spec["linux"]["seccomp"]["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


async def test_a_platform_missing_from_the_index_is_a_clear_error(fake, manager):
    images, _, _ = manager
    record = await images.pull(f"{fake.host}/multi/app:latest", None)
    with pytest.raises(FailedPrecondition, match=rf"image {fake.host}/multi/app:latest has no linux/s390x manifest"):
        await images.for_cell(record, CellFacts(architecture="s390x"))
    assert record.platforms == {}


async def test_a_single_platform_image_has_no_other(fake, manager):
    images, _, _ = manager
    record = await images.pull(f"{fake.host}/open/app:latest", None)  # one amd64 manifest, no index
    fake.requests.clear()
    with pytest.raises(FailedPrecondition, match="has no linux/arm64/v8 manifest: it is built for linux/amd64 only"):
        await images.for_cell(record, ARM64)
    assert fake.requests == []  # nothing to ask the registry


async def test_pull_resolves_for_the_default_platform(fake, tmp_path: Path):
    async with RegistryClient() as client:
        images = ImageManager(Store(tmp_path / "s.db"), client, RegistriesConfig(), ContentStore(tmp_path / "c"),
                              default_platform=Platform("linux", "arm64"))
        record = await images.pull(f"{fake.host}/multi/app:latest", None)
        assert (record.platform_digest, record.id) == fake.platforms["linux/arm64/v8"]
        amd = await images.for_cell(record, CellFacts(architecture="amd64"))
        assert amd.platform_digest == fake.platforms["linux/amd64"][0]
