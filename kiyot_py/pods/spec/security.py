"""Privilege: capabilities, no_new_privs and the masked and read-only /proc and /sys paths.

Capabilities come from the cell's facts, never from this machine: ALL and the default
set are clipped to the bounding set a container in that cell can hold
(`CellFacts.capabilities`), and a capability asked for by name that the cell cannot
give is an error here rather than an obscure failure of runc in the cell. AppArmor and
SELinux options are ignored (cells run neither).
"""

from __future__ import annotations

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import CellFacts
from kiyot_py.pods.spec.errors import SpecError

# containerd's default capability set (pkg/oci defaultUnixCaps).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Every capability a name may give, in kernel number order (CAP_CHOWN = 0 ... 40).
ALL_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

DEFAULT_READONLY_PATHS = (
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


def cell_capabilities(facts: CellFacts) -> list[str]:
    """The bounding set a container in the cell can hold, in the cell's order.

    An agent that reported none (an older one) is taken to allow every capability
    named here, which is what a root runc gives on a current kernel.
    """
    seen: list[str] = []
    for name in facts.capabilities or ALL_CAPABILITIES:
        upper = name.strip().upper()
        if upper and upper not in seen:
            seen.append(upper)
    return seen


def _cap_name(name: str) -> str:
    upper = name.strip().upper()
    if not upper.startswith("CAP_"):
        upper = "CAP_" + upper
    if upper not in ALL_CAPABILITIES:
        raise SpecError(f"unknown capability {name!r}")
    return upper


def capabilities(sc: api_pb2.LinuxContainerSecurityContext, facts: CellFacts) -> dict[str, list[str]]:
    """process.capabilities, in containerd's order of adds and drops."""
    available = cell_capabilities(facts)
    if sc.privileged:
        return {"bounding": list(available), "effective": list(available), "permitted": list(available)}

    def held(name: str) -> str:
        if name not in available:
            raise SpecError(
                f"capability {name} is not available in this cell "
                f"({facts.architecture}, kernel {facts.kernel or 'unknown'})"
            )
        return name

    caps = [c for c in DEFAULT_CAPABILITIES if c in available]
    ambient: list[str] = []
    if sc.HasField("capabilities"):
        c = sc.capabilities
        adds = list(c.add_capabilities)
        drops = list(c.drop_capabilities)
        # containerd's order: add ALL, drop ALL, then individual adds, then
        # individual drops (so drop wins over add).
        if any(a.strip().upper() == "ALL" for a in adds):
            caps = list(available)
        if any(d.strip().upper() == "ALL" for d in drops):
            caps = []
        for a in adds:
            if a.strip().upper() == "ALL":
                continue
            name = held(_cap_name(a))
            if name not in caps:
                caps.append(name)
        dropped = {_cap_name(d) for d in drops if d.strip().upper() != "ALL"}
        caps = [x for x in caps if x not in dropped]
        for a in c.add_ambient_capabilities:
            name = held(_cap_name(a))
            if name not in ambient:
                ambient.append(name)
                if name not in caps:
                    caps.append(name)
    result = {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)}
    if ambient:
        # Ambient capabilities must also be inheritable (and permitted).
        result["inheritable"] = list(ambient)
        result["ambient"] = list(ambient)
    return result


def masked_and_readonly_paths(sc: api_pb2.LinuxContainerSecurityContext) -> tuple[list[str], list[str]]:
    if sc.privileged:
        return [], []
    return (list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS),
            list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS))
