"""Namespaces and the namespaced sysctls.

IPC ``POD`` (the default) and PID ``POD`` (shareProcessNamespace) share the pod's
namespaces, which the agent keeps per cell (`ContainerSpec.pod_namespaces` names them
and the agent sets their paths); PID ``TARGET`` joins the PID namespace of
`ContainerSpec.pid_target`. ``NODE`` omits the namespace: a cell is the pod's "host",
so that is the cell's own. The network namespace is always listed without a path: the
agent points it at the cell's. User namespaces are not supported yet.
"""

from __future__ import annotations

import re

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.pods.spec.errors import SpecError

_SYSCTL_NAME = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-_/a-z0-9]*[a-z0-9])?)*$")


def namespaces(
    sc: api_pb2.LinuxContainerSecurityContext,
) -> tuple[list[dict[str, str]], tuple[str, ...], str | None]:
    """The container's namespaces, which of them are the pod's (paths set by the agent),
    and the container whose PID namespace it joins (mode TARGET)."""
    nso = sc.namespace_options  # unset: every mode is POD (0), as for containerd
    NODE, POD, TARGET = api_pb2.NODE, api_pb2.POD, api_pb2.TARGET
    out = []
    pod_namespaces: list[str] = []
    pid_target = None
    # The kubelet's default for PID is CONTAINER (a namespace of the container's own);
    # POD is shareProcessNamespace; TARGET is an ephemeral container beside its target.
    # Unset options (crictl) mean POD, as in containerd.
    if nso.pid != NODE:
        out.append({"type": "pid"})
        if nso.pid == POD:
            pod_namespaces.append("pid")
        elif nso.pid == TARGET:
            if not nso.target_id:
                raise SpecError("PID namespace mode TARGET needs a target_id")
            pid_target = nso.target_id
    if nso.ipc != NODE:
        out.append({"type": "ipc"})
        if nso.ipc == POD:
            pod_namespaces.append("ipc")
    out.append({"type": "uts"})
    out.append({"type": "mount"})
    # The agent sets the path to the cell's network namespace.
    out.append({"type": "network"})
    if nso.HasField("userns_options"):
        u = nso.userns_options
        if u.mode == POD and (len(u.uids) or len(u.gids)):
            raise SpecError("user namespaces are not supported")
    return out, tuple(pod_namespaces), pid_target


def _sysctl_name(name: str) -> str:
    # Kubernetes accepts '/' as the separator: net/ipv4/ip_forward.
    dot, slash = name.find("."), name.find("/")
    if slash != -1 and (dot == -1 or slash < dot):
        name = name.translate(str.maketrans("./", "/."))
    return name


def sysctls(sandbox: api_pb2.PodSandboxConfig, sc: api_pb2.LinuxContainerSecurityContext) -> dict[str, str]:
    out: dict[str, str] = {}
    host_ipc = sc.HasField("namespace_options") and sc.namespace_options.ipc == api_pb2.NODE
    for raw, value in sandbox.linux.sysctls.items():
        name = _sysctl_name(raw)
        if not _SYSCTL_NAME.match(name):
            raise SpecError(f"invalid sysctl name {raw!r}")
        ipc = name.startswith(("kernel.shm", "kernel.msg")) or name == "kernel.sem"
        if not (ipc or name.startswith(("fs.mqueue.", "net."))):
            raise SpecError(
                f"sysctl {raw!r} is not namespaced: only kernel.shm*, kernel.msg*, "
                "kernel.sem, fs.mqueue.* and net.* may be set"
            )
        if (ipc or name.startswith("fs.mqueue.")) and host_ipc:
            raise SpecError(f"sysctl {raw!r} cannot be set with the node's IPC namespace")
        if not value or any(ch in value for ch in "\n\x00"):
            raise SpecError(f"invalid value {value!r} for sysctl {raw!r}")
        out[name] = value
    return out
