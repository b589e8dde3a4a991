"""Build the OCI runtime spec (config.json) of a container from CRI input and the cell's facts.

The node builds the spec from the kubelet's ``ContainerConfig`` and
``PodSandboxConfig``, the image's config and the facts of the cell it will run in
(`kiyot_py.model.CellFacts`: architecture, kernel, capabilities, seccomp, ...), never
from its own machine: an arm64 VM behind an amd64 node gets an arm64 spec. The agent
in the cell then fills in what only it knows: ``root.path``, the paths of the cell's
network namespace and of the pod's shared namespaces, ``linux.cgroupsPath``,
``hostname``, rlimits, bind mounts for the pod's /etc files, the requested devices
(`ContainerSpec.devices`) and -- when `ContainerSpec.user` is a name -- the uid/gid
looked up in the rootfs. The image defaults (argv, env, cwd, user, stop signal) are
merged here and only here.

Semantics follow containerd's CRI plugin (Kubernetes), with these deliberate
differences, all forced by cells (see DESIGN.md):

* a negative ``oom_score_adj`` is clamped to 0;
* ``process.terminal`` is false here: the agent sets it from the create body's ``tty``,
  as conmon then makes the container's console;
* ``NODE`` namespaces are the cell's own (a cell is the pod's "host");
* AppArmor and SELinux options are ignored;
* a privileged container gets every capability the cell has, no seccomp, no masked or
  read-only paths, a writable /sys and an allow-all device cgroup, but no host
  devices are copied in.

One module per concern: process, security (capabilities), seccomp, mounts, devices,
resources, namespaces (and sysctls), annotations.
"""

# No `from __future__ import annotations` here: it would bind the name `annotations`
# in this package and hide the submodule of that name.

from dataclasses import dataclass, field
from typing import Any

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import CellFacts
from kiyot_py.pods.spec import annotations as _annotations
from kiyot_py.pods.spec import devices as _devices
from kiyot_py.pods.spec import mounts as _mounts
from kiyot_py.pods.spec import namespaces as _namespaces
from kiyot_py.pods.spec import process as _process
from kiyot_py.pods.spec import resources as _resources
from kiyot_py.pods.spec import seccomp as _seccomp
from kiyot_py.pods.spec import security as _security
from kiyot_py.pods.spec.errors import SpecError

__all__ = ["DEFAULT_SECCOMP_PROFILE_ROOT", "OCI_VERSION", "ContainerSpec", "SpecError", "build_container_spec"]

OCI_VERSION = "1.0.2"
DEFAULT_SECCOMP_PROFILE_ROOT = "/var/lib/kubelet/seccomp"


@dataclass(frozen=True)
class ContainerSpec:
    """An OCI runtime spec plus what the agent still has to settle.

    ``user`` is the user the agent resolves in the rootfs (``"1000"``, ``"app"``,
    ``"app:1000"``, ``"1000:grp"``); where a name is involved ``spec`` holds
    uid/gid placeholders 0/0 for the agent to replace. ``groups_policy`` is the
    SupplementalGroupsPolicy: ``"Merge"`` adds the groups the image's /etc/group
    gives the user, ``"Strict"`` only the configured supplemental groups.
    """

    spec: dict
    user: str
    stop_signal: str  # canonical: "SIGTERM", "SIGRTMIN+3"
    groups_policy: str = "Merge"
    # Namespaces the container shares with its pod ("ipc", "pid"): the agent sets their paths.
    pod_namespaces: tuple[str, ...] = ()
    # PID mode TARGET: the container whose PID namespace this one joins.
    pid_target: str | None = None
    # The CRI devices, checked, for the agent to expand in the cell:
    # [{"host_path", "container_path", "permissions"}].
    devices: list[dict[str, str]] = field(default_factory=list)


def build_container_spec(
    config: api_pb2.ContainerConfig,
    sandbox: api_pb2.PodSandboxConfig,
    image_config: dict | None,
    facts: CellFacts,
    *,
    hostname: str | None = None,
    seccomp_profile_root: str = DEFAULT_SECCOMP_PROFILE_ROOT,
) -> ContainerSpec:
    """Build a container's OCI runtime spec for the cell described by `facts`.

    ``image_config`` is the ``config`` object of the OCI image config of the cell's
    platform (any key may be absent or null). ``hostname`` is the pod's effective host
    name (the sandbox config's, else the cell's own), used for the HOSTNAME variable;
    the agent sets ``spec.hostname`` itself. Localhost seccomp profiles are read under
    ``seccomp_profile_root`` on the node. Raises :class:`SpecError` for input that
    cannot run in this cell.
    """
    if hostname is None:
        hostname = sandbox.hostname
    img = image_config or {}
    if not isinstance(img, dict):
        raise SpecError("image config must be a JSON object")
    linux = config.linux if config.HasField("linux") else api_pb2.LinuxContainerConfig()
    sc = linux.security_context
    privileged = sc.privileged

    proc_user, resolve = _process.user(sc, img)
    caps = _security.capabilities(sc, facts)
    process: dict[str, Any] = {
        "terminal": False,
        "user": proc_user,
        "args": _process.args(config, img),
        "env": _process.env(config, hostname, img),
        "cwd": _process.cwd(config, img),
        "capabilities": caps,
        "noNewPrivileges": bool(sc.no_new_privs),
    }
    stop_signal = _process.stop_signal(config, img)

    namespaces, pod_namespaces, pid_target = _namespaces.namespaces(sc)
    resources: dict[str, Any] = {}
    linux_spec: dict[str, Any] = {"namespaces": namespaces, "resources": resources}
    if linux.HasField("resources"):
        _resources.apply_resources(linux.resources, resources, process)
    resources["devices"] = _devices.device_rules(privileged)
    devices = _devices.requested_devices(config)

    masked, readonly = _security.masked_and_readonly_paths(sc)
    linux_spec["maskedPaths"] = masked
    linux_spec["readonlyPaths"] = readonly

    sysctls = _namespaces.sysctls(sandbox, sc)
    if sysctls:
        linux_spec["sysctl"] = sysctls

    annotations = _annotations.container_annotations(config, sandbox)
    if not privileged:  # containerd: a privileged container gets no seccomp, whatever was asked
        seccomp, source = _seccomp.seccomp(sc, caps["bounding"], facts, seccomp_profile_root)
        if seccomp is not None:
            linux_spec["seccomp"] = seccomp
        if source is not None:
            annotations[_annotations.ANNOTATION_SECCOMP_SOURCE] = source

    mounts, rootfs_propagation = _mounts.mounts(config, privileged, facts)
    if rootfs_propagation:
        linux_spec["rootfsPropagation"] = rootfs_propagation

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs", "readonly": bool(sc.readonly_rootfs)},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_spec,
    }
    return ContainerSpec(
        spec=spec,
        user=resolve,
        stop_signal=stop_signal,
        groups_policy=api_pb2.SupplementalGroupsPolicy.Name(sc.supplemental_groups_policy),
        pod_namespaces=pod_namespaces,
        pid_target=pid_target,
        devices=devices,
    )
