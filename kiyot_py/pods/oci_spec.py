"""Build the OCI runtime spec (config.json) of a container from CRI input.

The node builds the whole spec from the kubelet's ``ContainerConfig`` and
``PodSandboxConfig`` plus the image's config; the agent in the cell then fills
in only the facts of the cell: ``root.path``, the path of the cell's network
namespace, ``linux.cgroupsPath``, bind mounts for the pod's ``/etc/hostname``,
``/etc/hosts`` and ``/etc/resolv.conf``, and -- when :attr:`ContainerSpec.user`
is set -- the uid/gid of a symbolic user looked up in the rootfs.

Semantics follow containerd's CRI plugin (Kubernetes), with these deliberate
differences, all forced by cells or by the hosts (see DESIGN.md):

* a negative ``oom_score_adj`` is clamped to 0 (runc create fails with one on
  these hosts);
* ``process.terminal`` is always false (no tty support in the agent yet);
* IPC ``POD`` (the default) and PID ``POD`` (shareProcessNamespace) share the
  pod's namespaces, which the agent keeps per cell: ``ContainerSpec.pod_namespaces``
  names them and the agent sets their paths; PID ``TARGET`` joins the PID namespace
  of ``ContainerSpec.pid_target``. ``NODE`` omits the namespace (a cell is the
  pod's "host", so that is the cell's own);
* the network namespace is always listed without a path: the agent points it
  at the cell's namespace (a cell is the pod's "host", even for hostNetwork);
* AppArmor and SELinux options are ignored;
* a privileged container gets every capability, no seccomp, no masked or
  read-only paths, a writable /sys and an allow-all device cgroup, but no host
  devices are copied in (the node's /dev is not the cell's).
"""

from __future__ import annotations

import errno as errno_mod
import json
import logging
import os
import platform
import posixpath
import re
import signal
import stat
from dataclasses import dataclass
from typing import Any, Iterable

from kiyot_py.gen.runtime.v1 import api_pb2

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SECCOMP_PROFILE = "/usr/share/containers/seccomp.json"
DEFAULT_STOP_SIGNAL = "SIGTERM"
NOFILE_LIMIT = 1048576

ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANNOTATION_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_IMAGE_NAME = "io.kubernetes.cri.image-name"
# Which RuntimeDefault seccomp profile was used: the path of the
# containers-common file, or "builtin" for the small deny list below.
ANNOTATION_SECCOMP_SOURCE = "io.kiyot.seccomp-default-source"

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

# Every capability, in kernel number order (CAP_CHOWN = 0 ... 40).
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

# The small RuntimeDefault profile used when containers-common's file is
# missing: allow everything except these, each unless the container holds the
# capability that makes the call legitimate (None: always blocked).
BUILTIN_DENIED_SYSCALLS: dict[str, str | None] = {
    "kexec_load": "CAP_SYS_BOOT",
    "kexec_file_load": "CAP_SYS_BOOT",
    "reboot": "CAP_SYS_BOOT",
    "open_by_handle_at": "CAP_DAC_READ_SEARCH",
    "init_module": "CAP_SYS_MODULE",
    "finit_module": "CAP_SYS_MODULE",
    "delete_module": "CAP_SYS_MODULE",
    "swapon": "CAP_SYS_ADMIN",
    "swapoff": "CAP_SYS_ADMIN",
    "mount": "CAP_SYS_ADMIN",
    "umount2": "CAP_SYS_ADMIN",
    "pivot_root": "CAP_SYS_ADMIN",
    "unshare": "CAP_SYS_ADMIN",
    "setns": "CAP_SYS_ADMIN",
    "bpf": "CAP_SYS_ADMIN",
    "perf_event_open": "CAP_SYS_ADMIN",
    "ptrace": "CAP_SYS_PTRACE",
    "acct": "CAP_SYS_PACCT",
    "settimeofday": "CAP_SYS_TIME",
    "clock_settime": "CAP_SYS_TIME",
    "stime": "CAP_SYS_TIME",
    "keyctl": None,
    "add_key": None,
    "request_key": None,
}

# Sub-architectures a native seccomp architecture also covers (moby archMap).
_SUB_ARCHES = {
    "SCMP_ARCH_X86_64": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "SCMP_ARCH_AARCH64": ["SCMP_ARCH_ARM"],
    "SCMP_ARCH_S390X": ["SCMP_ARCH_S390"],
    "SCMP_ARCH_PPC64LE": ["SCMP_ARCH_PPC64", "SCMP_ARCH_PPC"],
    "SCMP_ARCH_RISCV64": [],
}

# uname machine -> (Go/libseccomp arch name used in moby "arches", SCMP_ARCH)
_MACHINES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "amd64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "arm64": ("arm64", "SCMP_ARCH_AARCH64"),
    "i386": ("x86", "SCMP_ARCH_X86"),
    "i686": ("x86", "SCMP_ARCH_X86"),
    "armv7l": ("arm", "SCMP_ARCH_ARM"),
    "armv6l": ("arm", "SCMP_ARCH_ARM"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "mips64": ("mips64", "SCMP_ARCH_MIPS64"),
    "loongarch64": ("loong64", "SCMP_ARCH_LOONGARCH64"),
}

_SECCOMP_ACTIONS = {
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
}
_SECCOMP_OPS = {
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}

_SYSCTL_NAME = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-_/a-z0-9]*[a-z0-9])?)*$")
_MAX_ID = 2**32 - 2


class SpecError(ValueError):
    """The CRI input cannot be turned into a runnable OCI spec."""


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
    stop_signal: str
    groups_policy: str = "Merge"
    # Namespaces the container shares with its pod ("ipc", "pid"): the agent sets their paths.
    pod_namespaces: tuple[str, ...] = ()
    # PID mode TARGET: the container whose PID namespace this one joins.
    pid_target: str | None = None


# --------------------------------------------------------------------------- #
# entry points


def build_container_spec(
    config: api_pb2.ContainerConfig,
    sandbox: api_pb2.PodSandboxConfig,
    image_config: dict | None,
    *,
    hostname: str | None = None,
    seccomp_profile_root: str = "/var/lib/kubelet/seccomp",
    default_seccomp_profile: str = DEFAULT_SECCOMP_PROFILE,
) -> ContainerSpec:
    """Build a container's OCI runtime spec from CRI and image config.

    ``image_config`` is the ``config`` object of the OCI image config (any key
    may be absent or null). ``hostname`` is the pod's effective host name (the
    sandbox config's, else the cell's own). Raises :class:`SpecError` for input
    that cannot run.
    """
    if hostname is None:
        hostname = sandbox.hostname
    img = image_config or {}
    if not isinstance(img, dict):
        raise SpecError("image config must be a JSON object")
    linux = config.linux if config.HasField("linux") else api_pb2.LinuxContainerConfig()
    sc = linux.security_context
    privileged = sc.privileged

    args = _process_args(config, img)
    env = _process_env(config, hostname, img)
    cwd = _working_dir(config, img)
    proc_user, resolve = _user(sc, img)
    caps = _capabilities(sc)
    stop_signal = _stop_signal(config, img)

    process: dict[str, Any] = {
        "terminal": False,
        "user": proc_user,
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": caps,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}],
        "noNewPrivileges": bool(sc.no_new_privs),
    }

    namespaces, pod_namespaces, pid_target = _namespaces(sc)
    linux_spec: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": {},
    }

    resources = linux_spec["resources"]
    if linux.HasField("resources"):
        _apply_resources(linux.resources, resources, process)

    devices, device_rules = _devices(config, privileged)
    resources["devices"] = device_rules
    if devices:
        linux_spec["devices"] = devices

    if privileged:
        linux_spec["maskedPaths"] = []
        linux_spec["readonlyPaths"] = []
    else:
        linux_spec["maskedPaths"] = list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS)
        linux_spec["readonlyPaths"] = list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)

    sysctls = _sysctls(sandbox, sc)
    if sysctls:
        linux_spec["sysctl"] = sysctls

    annotations = _annotations(config, sandbox)
    if not privileged:
        seccomp, source = _seccomp(
            sc, caps["bounding"], seccomp_profile_root, default_seccomp_profile
        )
        if seccomp is not None:
            linux_spec["seccomp"] = seccomp
        if source is not None:
            annotations[ANNOTATION_SECCOMP_SOURCE] = source

    mounts, rootfs_propagation = _mounts(config, privileged)
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
    if hostname:
        spec["hostname"] = hostname
    return ContainerSpec(spec=spec, user=resolve, stop_signal=stop_signal, pod_namespaces=pod_namespaces,
                         pid_target=pid_target,
                         groups_policy=api_pb2.SupplementalGroupsPolicy.Name(sc.supplemental_groups_policy))


# --------------------------------------------------------------------------- #
# process


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"image config {what} must be a list of strings")
    return list(value)


def _process_args(config: api_pb2.ContainerConfig, img: dict) -> list[str]:
    command = list(config.command)
    args = list(config.args)
    entrypoint = _str_list(img.get("Entrypoint"), "Entrypoint")
    cmd = _str_list(img.get("Cmd"), "Cmd")
    if entrypoint == [""]:  # `ENTRYPOINT [""]` resets the entrypoint
        entrypoint = []
    if command:
        argv = command + args
    elif args:
        argv = entrypoint + args
    else:
        argv = entrypoint + cmd
    if not argv:
        raise SpecError(
            "no command specified: neither the container config nor the image "
            "has a command or entrypoint"
        )
    if not argv[0]:
        raise SpecError("the command's first element (the program) is empty")
    return argv


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def _process_env(config: api_pb2.ContainerConfig, hostname: str, img: dict) -> list[str]:
    # Ordered map: a later value for a key replaces the earlier one in place.
    env: dict[str, str] = {}

    def put(entry: str) -> None:
        env[_env_key(entry)] = entry

    if hostname:
        put(f"HOSTNAME={hostname}")
    for entry in _str_list(img.get("Env"), "Env"):
        if entry:
            put(entry)
    for kv in config.envs:
        key = kv.key
        if not key or "=" in key or "\x00" in key:
            raise SpecError(f"invalid environment variable name {key!r}")
        value = kv.value
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"environment variable {key} is not valid UTF-8") from None
        if "\x00" in value:
            raise SpecError(f"environment variable {key} contains a NUL byte")
        put(f"{key}={value}")
    if "PATH" not in env:
        # containerd puts the default PATH first when the image has none.
        env = {"PATH": DEFAULT_PATH_ENV, **env}
    return list(env.values())


def _working_dir(config: api_pb2.ContainerConfig, img: dict) -> str:
    if config.working_dir:
        if not config.working_dir.startswith("/"):
            raise SpecError(f"working_dir {config.working_dir!r} must be an absolute path")
        return config.working_dir
    wd = img.get("WorkingDir")
    if wd:
        if not isinstance(wd, str):
            raise SpecError("image config WorkingDir must be a string")
        return posixpath.normpath(posixpath.join("/", wd))
    return "/"


def _parse_id(text: str, what: str) -> int | None:
    """An id as int when numeric, None when it is a name."""
    if text.isdigit():
        value = int(text)
        if value > _MAX_ID:
            raise SpecError(f"{what} {text} is out of range")
        return value
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.\-]*\$?", text):
        raise SpecError(f"invalid {what} {text!r}")
    return None


def _user(
    sc: api_pb2.LinuxContainerSecurityContext, img: dict
) -> tuple[dict[str, Any], str]:
    has_uid = sc.HasField("run_as_user")
    has_gid = sc.HasField("run_as_group")
    if has_uid and sc.run_as_username:
        raise SpecError("only one of run_as_user and run_as_username may be given")
    if has_gid and not (has_uid or sc.run_as_username):
        raise SpecError("run_as_group needs run_as_user or run_as_username")

    image_user = img.get("User") or ""
    if not isinstance(image_user, str):
        raise SpecError("image config User must be a string")
    img_user, _, img_group = image_user.partition(":")
    if ":" in img_group or (image_user and not img_user) or (":" in image_user and not img_group):
        raise SpecError(f"invalid image user {image_user!r}")

    if has_uid:
        if not 0 <= sc.run_as_user.value <= _MAX_ID:
            raise SpecError(f"run_as_user {sc.run_as_user.value} is out of range")
        user = str(sc.run_as_user.value)
    elif sc.run_as_username:
        user = sc.run_as_username
    else:
        user = img_user or "0"

    if has_gid:
        if not 0 <= sc.run_as_group.value <= _MAX_ID:
            raise SpecError(f"run_as_group {sc.run_as_group.value} is out of range")
        group = str(sc.run_as_group.value)
    elif user == (img_user or "0"):
        # The kubelet copies the image's uid/name into run_as_user/username;
        # the image's group then still applies.
        group = img_group
    else:
        group = ""

    uid = _parse_id(user, "user")
    gid = _parse_id(group, "group") if group else 0

    additional = []
    for g in sc.supplemental_groups:
        if not 0 <= g <= _MAX_ID:
            raise SpecError(f"supplemental group {g} is out of range")
        additional.append(int(g))

    # The agent resolves the user in the rootfs, as containerd does: a name's uid, the
    # uid's primary group when no group is given (0 when /etc/passwd has no entry), and
    # (policy Merge) the groups /etc/group gives the user. Names get placeholders here.
    resolve = f"{user}:{group}" if group else user
    if uid is None or gid is None:
        uid = gid = 0
    proc_user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional:
        proc_user["additionalGids"] = additional
    return proc_user, resolve


def _stop_signal(config: api_pb2.ContainerConfig, img: dict) -> str:
    if config.stop_signal:
        name = api_pb2.Signal.Name(config.stop_signal)
        name = name.replace("PLUS", "+").replace("MINUS", "-")
        return name
    sig = img.get("StopSignal")
    if not sig:
        return DEFAULT_STOP_SIGNAL
    return _normalize_signal(str(sig))


def _normalize_signal(sig: str) -> str:
    text = sig.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            raise SpecError(f"unknown stop signal {sig!r}") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    if re.fullmatch(r"SIGRTM(IN\+|AX-)\d{1,2}", text) or text in ("SIGRTMIN", "SIGRTMAX"):
        return text
    if text in ("SIGCLD", "SIGPOLL", "SIGIOT") or text in signal.Signals.__members__:
        return text
    raise SpecError(f"unknown stop signal {sig!r}")


# --------------------------------------------------------------------------- #
# capabilities


def _supported_caps() -> list[str]:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read().strip())
    except (OSError, ValueError):
        return list(ALL_CAPABILITIES)
    return list(ALL_CAPABILITIES[: last + 1])


def _cap_name(name: str) -> str:
    upper = name.strip().upper()
    if not upper.startswith("CAP_"):
        upper = "CAP_" + upper
    if upper not in ALL_CAPABILITIES:
        raise SpecError(f"unknown capability {name!r}")
    return upper


def _capabilities(sc: api_pb2.LinuxContainerSecurityContext) -> dict[str, list[str]]:
    if sc.privileged:
        caps = _supported_caps()
        return {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)}

    caps = list(DEFAULT_CAPABILITIES)
    ambient: list[str] = []
    if sc.HasField("capabilities"):
        c = sc.capabilities
        adds = [a for a in c.add_capabilities]
        drops = [d for d in c.drop_capabilities]
        # containerd's order: add ALL, drop ALL, then individual adds, then
        # individual drops (so drop wins over add).
        if any(a.strip().upper() == "ALL" for a in adds):
            caps = _supported_caps()
        if any(d.strip().upper() == "ALL" for d in drops):
            caps = []
        for a in adds:
            if a.strip().upper() == "ALL":
                continue
            name = _cap_name(a)
            if name not in caps:
                caps.append(name)
        dropped = {_cap_name(d) for d in drops if d.strip().upper() != "ALL"}
        caps = [x for x in caps if x not in dropped]
        for a in c.add_ambient_capabilities:
            name = _cap_name(a)
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


# --------------------------------------------------------------------------- #
# namespaces, sysctls, resources, devices


def _namespaces(
    sc: api_pb2.LinuxContainerSecurityContext,
) -> tuple[list[dict[str, str]], tuple[str, ...], str | None]:
    """The container's namespaces, which of them are the pod's (paths set by the agent),
    and the container whose PID namespace it joins (mode TARGET)."""
    nso = sc.namespace_options  # unset: every mode is POD (0), as for containerd
    NODE, POD, TARGET = api_pb2.NODE, api_pb2.POD, api_pb2.TARGET
    namespaces = []
    pod_namespaces: list[str] = []
    pid_target = None
    # The kubelet's default for PID is CONTAINER (a namespace of the container's own);
    # POD is shareProcessNamespace; TARGET is an ephemeral container beside its target.
    # Unset options (crictl) mean POD, as in containerd.
    if nso.pid != NODE:
        namespaces.append({"type": "pid"})
        if nso.pid == POD:
            pod_namespaces.append("pid")
        elif nso.pid == TARGET:
            if not nso.target_id:
                raise SpecError("PID namespace mode TARGET needs a target_id")
            pid_target = nso.target_id
    if nso.ipc != NODE:
        namespaces.append({"type": "ipc"})
        if nso.ipc == POD:
            pod_namespaces.append("ipc")
    namespaces.append({"type": "uts"})
    namespaces.append({"type": "mount"})
    # The agent sets the path to the cell's network namespace.
    namespaces.append({"type": "network"})
    if nso.HasField("userns_options"):
        u = nso.userns_options
        if u.mode == POD and (len(u.uids) or len(u.gids)):
            raise SpecError("user namespaces are not supported")
    return namespaces, tuple(pod_namespaces), pid_target


def _sysctl_name(name: str) -> str:
    # Kubernetes accepts '/' as the separator: net/ipv4/ip_forward.
    dot, slash = name.find("."), name.find("/")
    if slash != -1 and (dot == -1 or slash < dot):
        name = name.translate(str.maketrans("./", "/."))
    return name


def _sysctls(
    sandbox: api_pb2.PodSandboxConfig, sc: api_pb2.LinuxContainerSecurityContext
) -> dict[str, str]:
    out: dict[str, str] = {}
    host_ipc = sc.HasField("namespace_options") and sc.namespace_options.ipc == api_pb2.NODE
    for raw, value in sandbox.linux.sysctls.items():
        name = _sysctl_name(raw)
        if not _SYSCTL_NAME.match(name):
            raise SpecError(f"invalid sysctl name {raw!r}")
        ipc = name.startswith(("kernel.shm", "kernel.msg")) or name == "kernel.sem"
        if not (ipc or name.startswith("fs.mqueue.") or name.startswith("net.")):
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


def _apply_resources(
    r: api_pb2.LinuxContainerResources, resources: dict, process: dict
) -> None:
    cpu: dict[str, Any] = {}
    if r.cpu_shares > 0:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota != 0:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period > 0:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    if cpu:
        resources["cpu"] = cpu
    memory: dict[str, Any] = {}
    if r.memory_limit_in_bytes > 0:
        memory["limit"] = r.memory_limit_in_bytes
    if r.memory_swap_limit_in_bytes > 0:
        memory["swap"] = r.memory_swap_limit_in_bytes
    if memory:
        resources["memory"] = memory
    pids = r.unified.get("pids.max")
    if pids:
        if pids == "max":
            pass
        elif pids.isdigit() and int(pids) > 0:
            resources["pids"] = {"limit": int(pids)}
        else:
            raise SpecError(f"invalid pids.max {pids!r}")
    # Other unified (cgroup v2) keys and hugepage limits are not applied:
    # runc refuses unified keys on the cgroup v1 hosts cells run on.
    # A negative oom_score_adj makes runc create fail on these hosts: clamp.
    process["oomScoreAdj"] = max(0, min(int(r.oom_score_adj), 1000))


def _devices(
    config: api_pb2.ContainerConfig, privileged: bool
) -> tuple[list[dict], list[dict]]:
    if privileged:
        rules = [{"allow": True, "access": "rwm"}]
    else:
        rules = [
            {"allow": False, "access": "rwm"},
            # like runc's defaults: mknod anything, use the standard nodes
            {"allow": True, "type": "c", "access": "m"},
            {"allow": True, "type": "b", "access": "m"},
            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # null
            {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # zero
            {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # full
            {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # tty
            {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # urandom
            {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # random
            {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # ptmx
            {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # pts/*
        ]
    devices: list[dict] = []
    for d in config.devices:
        perms = d.permissions or "rwm"
        if not set(perms) <= set("rwm"):
            raise SpecError(f"invalid device permissions {d.permissions!r} for {d.host_path}")
        if not d.host_path.startswith("/"):
            raise SpecError(f"device host path {d.host_path!r} must be absolute")
        target = d.container_path or d.host_path
        if not target.startswith("/"):
            raise SpecError(f"device container path {target!r} must be absolute")
        for host, ctr in _device_nodes(d.host_path, target):
            st = os.stat(host)
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            devices.append(
                {
                    "path": ctr,
                    "type": kind,
                    "major": major,
                    "minor": minor,
                    "fileMode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                }
            )
            if not privileged:
                rules.append(
                    {"allow": True, "type": kind, "major": major, "minor": minor, "access": perms}
                )
    return devices, rules


def _device_nodes(host: str, target: str) -> Iterable[tuple[str, str]]:
    try:
        st = os.stat(host)
    except OSError as e:
        raise SpecError(f"device {host}: {e.strerror}") from None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return [(host, target)]
    if not stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{host} is not a device")
    found = []
    for dirpath, _dirs, files in os.walk(host):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rel = os.path.relpath(path, host)
                found.append((path, posixpath.join(target, rel)))
    if not found:
        raise SpecError(f"no devices found under {host}")
    return found


# --------------------------------------------------------------------------- #
# mounts


def _standard_mounts(privileged: bool) -> list[dict]:
    sys_opts = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    cg_opts = ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": cg_opts},
    ]


def _depth(path: str) -> int:
    clean = posixpath.normpath(path)
    return 0 if clean == "/" else clean.count("/")


def _mounts(config: api_pb2.ContainerConfig, privileged: bool) -> tuple[list[dict], str | None]:
    P = api_pb2
    rootfs_propagation: str | None = None
    cri_mounts: list[dict] = []
    for m in config.mounts:
        if m.HasField("image") and m.image.image:
            raise SpecError(f"image volume mounts are not supported ({m.container_path})")
        if len(m.uidMappings) or len(m.gidMappings):
            raise SpecError(f"id-mapped mounts are not supported ({m.container_path})")
        if not m.container_path.startswith("/"):
            raise SpecError(f"mount container path {m.container_path!r} must be absolute")
        if not m.host_path.startswith("/"):
            raise SpecError(f"mount host path {m.host_path!r} must be absolute")
        options = ["rbind"]
        if m.propagation == P.PROPAGATION_PRIVATE:
            options.append("rprivate")
        elif m.propagation == P.PROPAGATION_HOST_TO_CONTAINER:
            options.append("rslave")
            if rootfs_propagation not in ("rshared", "rslave"):
                rootfs_propagation = "rslave"
        elif m.propagation == P.PROPAGATION_BIDIRECTIONAL:
            options.append("rshared")
            rootfs_propagation = "rshared"
        else:
            raise SpecError(f"unknown mount propagation {m.propagation}")
        if m.recursive_read_only:
            if not m.readonly:
                raise SpecError(f"recursive read-only mount {m.container_path} must be read-only")
            if m.propagation != P.PROPAGATION_PRIVATE:
                raise SpecError(
                    f"recursive read-only mount {m.container_path} needs private propagation"
                )
            options.append("rro")
        else:
            options.append("ro" if m.readonly else "rw")
        cri_mounts.append(
            {
                "destination": posixpath.normpath(m.container_path),
                "type": "bind",
                "source": m.host_path,
                "options": options,
            }
        )
    # containerd: a CRI mount replaces the standard one at the same place,
    # and a CRI /dev replaces every standard mount under /dev.
    taken = {m["destination"] for m in cri_mounts}
    mounts = [
        m
        for m in _standard_mounts(privileged)
        if m["destination"] not in taken
        and not ("/dev" in taken and m["destination"].startswith("/dev/"))
    ]
    mounts.extend(cri_mounts)
    # Parents before children (stable: equal depths keep their order).
    mounts.sort(key=lambda m: _depth(m["destination"]))
    return mounts, rootfs_propagation


# --------------------------------------------------------------------------- #
# annotations


def _annotations(config: api_pb2.ContainerConfig, sandbox: api_pb2.PodSandboxConfig) -> dict:
    annotations = dict(config.annotations)
    annotations[ANNOTATION_CONTAINER_TYPE] = "container"
    annotations[ANNOTATION_CONTAINER_NAME] = config.metadata.name
    if sandbox.metadata.name:
        annotations[ANNOTATION_SANDBOX_NAME] = sandbox.metadata.name
    if sandbox.metadata.namespace:
        annotations[ANNOTATION_SANDBOX_NAMESPACE] = sandbox.metadata.namespace
    if sandbox.metadata.uid:
        annotations[ANNOTATION_SANDBOX_UID] = sandbox.metadata.uid
    if config.image.image:
        annotations[ANNOTATION_IMAGE_NAME] = config.image.image
    return annotations


# --------------------------------------------------------------------------- #
# seccomp


def host_arch() -> tuple[str, str]:
    """(moby arch name, SCMP_ARCH_*) of this machine."""
    machine = platform.machine().lower()
    try:
        return _MACHINES[machine]
    except KeyError:
        return machine, "SCMP_ARCH_" + machine.upper()


def _seccomp(
    sc: api_pb2.LinuxContainerSecurityContext,
    caps: list[str],
    root: str,
    default_path: str,
) -> tuple[dict | None, str | None]:
    """(linux.seccomp or None, the RuntimeDefault source when used)."""
    P = api_pb2.SecurityProfile
    if sc.HasField("seccomp"):
        prof = sc.seccomp
        if prof.profile_type == P.Unconfined:
            return None, None
        if prof.profile_type == P.RuntimeDefault:
            return runtime_default_seccomp(caps, default_path)
        if prof.profile_type == P.Localhost:
            return _localhost_seccomp(prof.localhost_ref, caps, root), None
        raise SpecError(f"unknown seccomp profile type {prof.profile_type}")
    path = sc.seccomp_profile_path
    if path in ("", "unconfined"):  # kubelet default: Unconfined
        return None, None
    if path in ("runtime/default", "docker/default"):
        return runtime_default_seccomp(caps, default_path)
    if path.startswith("localhost/"):
        return _localhost_seccomp(path[len("localhost/"):], caps, root), None
    raise SpecError(f"unknown seccomp profile {path!r}")


def _localhost_seccomp(ref: str, caps: list[str], root: str) -> dict:
    if ref.startswith("localhost/"):
        ref = ref[len("localhost/"):]
    if not ref:
        raise SpecError("Localhost seccomp profile needs a localhost_ref")
    if ref.startswith("/"):
        path = ref
    else:
        path = posixpath.normpath(posixpath.join(root, ref))
        if not (path + "/").startswith(posixpath.normpath(root) + "/"):
            raise SpecError(f"seccomp profile {ref!r} escapes {root}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"seccomp profile {path} does not exist") from None
    except OSError as e:
        raise SpecError(f"cannot read seccomp profile {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"seccomp profile {path} is not valid JSON: {e}") from None
    return convert_seccomp(data, caps, where=path)


def runtime_default_seccomp(
    caps: list[str], path: str = DEFAULT_SECCOMP_PROFILE
) -> tuple[dict, str]:
    """The RuntimeDefault profile for a container with these (bounding) caps.

    containers-common's profile when ``path`` exists, else a small built-in
    deny list. Returns (profile, source) where source is ``path`` or
    ``"builtin"``.
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        log.debug("%s is missing: using the built-in seccomp deny list", path)
        return builtin_seccomp(caps), "builtin"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"default seccomp profile {path} is unusable: {e}") from None
    return convert_seccomp(data, caps, where=path), path


def builtin_seccomp(caps: list[str]) -> dict:
    _arch, native = host_arch()
    held = set(caps)
    denied = [n for n, cap in BUILTIN_DENIED_SYSCALLS.items() if cap is None or cap not in held]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [native] + _SUB_ARCHES.get(native, []),
        "syscalls": [
            {"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": errno_mod.EPERM}
        ],
    }


def _errno_ret(entry: dict, key_ret: str, key_name: str, where: str) -> int | None:
    ret = entry.get(key_ret)
    if ret is not None:
        if not isinstance(ret, int) or isinstance(ret, bool) or ret < 0:
            raise SpecError(f"{where}: {key_ret} must be a non-negative integer")
        return ret
    name = entry.get(key_name)
    if name:
        value = getattr(errno_mod, str(name), None)
        if not isinstance(value, int):
            raise SpecError(f"{where}: unknown errno {name!r}")
        return value
    return None


def _kernel_at_least(minimum: str) -> bool:
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    try:
        return parse(platform.release()) >= parse(minimum)
    except ValueError:
        return True


def convert_seccomp(profile: Any, caps: list[str], *, where: str = "seccomp profile") -> dict:
    """Convert a seccomp profile (OCI or Docker/moby format) to linux.seccomp.

    moby's ``includes``/``excludes`` (caps, arches, minKernel) are applied
    against ``caps`` (the bounding set) and this machine's architecture, and
    ``archMap`` is reduced to the native architecture and its sub-arches.
    """
    if not isinstance(profile, dict):
        raise SpecError(f"{where}: a seccomp profile must be a JSON object")
    arch, native = host_arch()
    held = set(caps)
    default_action = profile.get("defaultAction")
    if default_action not in _SECCOMP_ACTIONS:
        raise SpecError(f"{where}: unknown or missing defaultAction {default_action!r}")
    out: dict[str, Any] = {"defaultAction": default_action}
    ret = _errno_ret(profile, "defaultErrnoRet", "defaultErrno", where)
    if ret is not None:
        out["defaultErrnoRet"] = ret

    architectures = profile.get("architectures") or []
    arch_map = profile.get("archMap") or []
    if architectures and arch_map:
        raise SpecError(f"{where}: give either architectures or archMap, not both")
    if architectures:
        if not isinstance(architectures, list):
            raise SpecError(f"{where}: architectures must be a list")
        out["architectures"] = [str(a) for a in architectures]
    elif arch_map:
        for entry in arch_map:
            if isinstance(entry, dict) and entry.get("architecture") == native:
                out["architectures"] = [native] + list(entry.get("subArchitectures") or [])
                break
    for key in ("flags", "listenerPath", "listenerMetadata"):
        if profile.get(key):
            out[key] = profile[key]

    syscalls = []
    for i, call in enumerate(profile.get("syscalls") or []):
        here = f"{where}: syscalls[{i}]"
        if not isinstance(call, dict):
            raise SpecError(f"{here} must be an object")
        inc = call.get("includes") or {}
        exc = call.get("excludes") or {}
        if exc.get("arches") and arch in exc["arches"]:
            continue
        if exc.get("caps") and any(c in held for c in exc["caps"]):
            continue
        if exc.get("minKernel") and _kernel_at_least(exc["minKernel"]):
            continue
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if inc.get("caps") and not all(c in held for c in inc["caps"]):
            continue
        if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"]):
            continue
        names = call.get("names")
        if call.get("name"):
            if names:
                raise SpecError(f"{here}: give either name or names, not both")
            names = [call["name"]]
        if not names or not isinstance(names, list):
            raise SpecError(f"{here} has no syscall names")
        action = call.get("action")
        if action not in _SECCOMP_ACTIONS:
            raise SpecError(f"{here}: unknown action {action!r}")
        entry: dict[str, Any] = {"names": [str(n) for n in names], "action": action}
        ret = _errno_ret(call, "errnoRet", "errno", here)
        if ret is not None:
            entry["errnoRet"] = ret
        args = []
        for arg in call.get("args") or []:
            if not isinstance(arg, dict) or arg.get("op") not in _SECCOMP_OPS:
                raise SpecError(f"{here}: bad argument filter {arg!r}")
            try:
                a = {"index": int(arg["index"]), "value": int(arg.get("value", 0)),
                     "op": arg["op"]}
                if arg.get("valueTwo"):
                    a["valueTwo"] = int(arg["valueTwo"])
            except (KeyError, TypeError, ValueError):
                raise SpecError(f"{here}: bad argument filter {arg!r}") from None
            args.append(a)
        if args:
            entry["args"] = args
        syscalls.append(entry)
    if syscalls:
        out["syscalls"] = syscalls
    return out
