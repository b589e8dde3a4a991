"""The bundle's config.json: the node's spec plus what only the cell knows.

umoci writes a runnable config.json for the image. The agent keeps from it what is not an
image default (runc's default namespaces, mounts, masked and read-only paths, device
rules, capabilities) and drops what is: the image's args, env, cwd and user, which the node
alone owns and sends as the final `process` (it merged them with the CRI config), and
umoci's hostname and rlimits, which the agent owns. The node's `spec` wins for every key
it sets. Then the cell's part: root.path, the network namespace, the pod's namespaces when
asked for, cgroupsPath, the pod's hostname and /etc files (unless the node's spec mounts its
own there), the device nodes asked for (resolved in the cell), the RLIMIT_NOFILE default,
rlimits and capabilities clamped to what the cell can grant, and `terminal` true only for a
container with a TTY (conmon then makes its console; runc refuses a terminal without one).
"""

from __future__ import annotations

import copy
import errno
import os
import posixpath
import resource
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import invalid

ETC_FILES = ("hostname", "hosts", "resolv.conf")
NOFILE_DEFAULT = 1048576
# Keys of umoci's `process` that are image defaults (the node's) or the agent's own.
_DROPPED_PROCESS_KEYS = ("args", "env", "cwd", "user", "rlimits")


@dataclass(frozen=True)
class CellContext:
    """What only the cell knows about one container's bundle."""

    rootfs: Path
    netns: str | None
    cgroups_path: str
    pod_etc: Path | None       # None until PUT /v1/pod
    pod_hostname: str | None
    pod_namespaces: dict[str, str] = field(default_factory=dict)  # kind -> path, e.g. the pod's IPC


GROUPS_POLICIES = ("Merge", "Strict")


def check_process(proc: Any) -> None:
    """The node's `spec.process` is the final one: a command, and env and cwd when given."""
    if not isinstance(proc, dict):
        raise invalid("'spec.process' must be an object")
    args = proc.get("args")
    if not args:
        raise invalid("no command: 'spec.process.args' is empty (the node sends the final command)")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise invalid("'spec.process.args' must be a list of strings")
    env = proc.get("env")
    if env is not None and (not isinstance(env, list) or not all(isinstance(e, str) for e in env)):
        raise invalid("'spec.process.env' must be a list of strings")
    cwd = proc.get("cwd")
    if cwd and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise invalid(f"'spec.process.cwd' must be an absolute path, got {cwd!r}")


def build(image_cfg: dict[str, Any], spec: dict[str, Any], ctx: CellContext, user: str | None,
          groups_policy: str = "Merge", devices: list[Device] | None = None, *,
          terminal: bool = False) -> dict[str, Any]:
    cfg = copy.deepcopy(image_cfg)
    base_proc = cfg.setdefault("process", {})
    for k in _DROPPED_PROCESS_KEYS:
        base_proc.pop(k, None)
    cfg.pop("hostname", None)
    for key, val in spec.items():
        if key == "hostname":
            continue  # the agent's: the pod's, below
        if key in ("process", "linux") and isinstance(val, dict):
            cfg.setdefault(key, {}).update(copy.deepcopy(val))
        else:
            cfg[key] = copy.deepcopy(val)

    proc = cfg.setdefault("process", {})
    check_process(proc)
    proc["env"] = proc.get("env") or []
    proc["cwd"] = proc.get("cwd") or "/"
    proc["terminal"] = terminal
    proc.pop("consoleSize", None)

    cfg["root"] = {"path": str(ctx.rootfs), "readonly": bool(spec.get("root", {}).get("readonly", False))}

    linux = cfg.setdefault("linux", {})
    namespaces = [dict(ns) for ns in linux.get("namespaces", [])]
    if ctx.netns:
        net = [ns for ns in namespaces if ns.get("type") == "network"]
        if net:
            net[0]["path"] = ctx.netns
        else:
            namespaces.append({"type": "network", "path": ctx.netns})
    else:
        # No cell netns: share the agent's network (local tests).
        namespaces = [ns for ns in namespaces if ns.get("type") != "network"]
    for kind, path in ctx.pod_namespaces.items():
        namespaces = [ns for ns in namespaces if ns.get("type") != kind] + [{"type": kind, "path": path}]
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = ctx.cgroups_path

    # The one place a container's host name is set: the pod's (PUT /v1/pod), in a UTS
    # namespace of its own. Without one it shares the cell's, and runc refuses a hostname.
    if ctx.pod_hostname and any(ns.get("type") == "uts" for ns in namespaces):
        cfg["hostname"] = ctx.pod_hostname

    if ctx.pod_etc is not None:
        # A file the node mounts itself wins: the kubelet's /etc/hosts carries hostAliases.
        given = {m.get("destination") for m in spec.get("mounts") or []}
        ours = [n for n in ETC_FILES if f"/etc/{n}" not in given]
        mounts = [m for m in cfg.get("mounts", []) if m.get("destination") not in {f"/etc/{n}" for n in ours}]
        for n in ours:
            mounts.append({
                "destination": f"/etc/{n}", "type": "bind",
                "source": str(ctx.pod_etc / n), "options": ["rbind", "rprivate"],
            })
        cfg["mounts"] = mounts

    if devices:
        add_devices(linux, devices)

    rlimits = list(proc.get("rlimits") or [])
    if not any(rl.get("type") == "RLIMIT_NOFILE" for rl in rlimits if isinstance(rl, dict)):
        rlimits.append(default_nofile())
    proc["rlimits"] = clamp_rlimits(rlimits)
    if proc.get("capabilities"):
        proc["capabilities"] = clamp_capabilities(proc["capabilities"])
    if user:
        proc["user"] = resolve_user(ctx.rootfs, user, proc.get("user", {}).get("additionalGids", []),
                                    merge_image_groups=groups_policy == "Merge")
    proc.setdefault("user", {"uid": 0, "gid": 0})
    return cfg


def process_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """uid, gid and every group (primary first, then the rest sorted) of a bundle's process."""
    user = cfg.get("process", {}).get("user", {})
    gid = int(user.get("gid", 0))
    groups = [gid, *sorted({int(g) for g in user.get("additionalGids") or []} - {gid})]
    return {"uid": int(user.get("uid", 0)), "gid": gid, "groups": groups}


# --- capabilities and rlimits ---------------------------------------------------------------

# Capability names in kernel number order (CAP_CHOWN = 0 ...).
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def _own_capabilities(field_name: str = "CapBnd") -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _has_cap_sys_resource() -> bool:
    return bool(_own_capabilities("CapEff") & (1 << 24))


def held_capabilities() -> list[str]:
    """The capabilities a container in this cell can hold at most: the agent's own bounding
    set (CapBnd), as CAP_* names in kernel order. Empty when it cannot be read."""
    held = _own_capabilities()
    return [name for i, name in enumerate(CAPABILITIES) if held >> i & 1]


def clamp_capabilities(caps: dict[str, Any]) -> dict[str, Any]:
    """Keep only the capabilities this cell can grant (its own bounding set).

    A privileged container (or "add ALL") asks for every capability the node's kernel
    knows; a cell that does not hold one of them (CAP_SYS_RESOURCE on some hosts) would
    make `runc create` fail with EPERM. containerd gives a privileged container the
    capabilities it holds itself, for the same reason.
    """
    allowed = set(held_capabilities())
    if not allowed:
        return caps
    return {kind: [c for c in names if c in allowed] if isinstance(names, list) else names
            for kind, names in caps.items()}


def default_nofile() -> dict[str, Any]:
    """The container's RLIMIT_NOFILE when the node gives none: 1048576, or the agent's own
    hard limit if lower (containerd's default, bounded by what the cell can grant)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = NOFILE_DEFAULT if hard == resource.RLIM_INFINITY else min(NOFILE_DEFAULT, hard)
    return {"type": "RLIMIT_NOFILE", "hard": n, "soft": n}


def clamp_rlimits(rlimits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cap each rlimit at what this cell can grant.

    runc (under conmon, with the agent's limits) gets EPERM raising a hard limit above its
    own without CAP_SYS_RESOURCE, and nothing may exceed fs.nr_open for NOFILE: a limit
    the spec asks for must not make `runc create` fail on a cell that cannot give it.
    """
    cap = _has_cap_sys_resource()
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = None
    out = []
    for given in rlimits:
        rl = dict(given)
        kind = str(rl.get("type", ""))
        res = getattr(resource, kind, None)
        if isinstance(res, int):
            hard, soft = int(rl.get("hard", 0)), int(rl.get("soft", 0))
            _, our_hard = resource.getrlimit(res)
            limit = None
            if not cap and our_hard != resource.RLIM_INFINITY:
                limit = our_hard
            if kind == "RLIMIT_NOFILE" and nr_open:
                limit = min(limit, nr_open) if limit is not None else nr_open
            if limit is not None and hard > limit:
                hard = limit
            rl["hard"], rl["soft"] = hard, min(soft, hard)
        out.append(rl)
    return out


# --- devices --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """One device node of the cell, as the container gets it."""

    path: str          # in the container
    kind: str          # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int
    access: str        # drawn from "rwm"

    def node(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.kind, "major": self.major, "minor": self.minor,
                "fileMode": self.file_mode, "uid": self.uid, "gid": self.gid}

    def rule(self) -> dict[str, Any]:
        return {"allow": True, "type": self.kind, "major": self.major, "minor": self.minor, "access": self.access}


def resolve_devices(requests: Any) -> list[Device]:
    """The create body's `devices`, stat'ed in the cell: a char/block device is one node,
    a directory every such node under it (sorted; container paths keep their place
    relative to `container_path`). Anything else is a 400 naming the path."""
    if requests is None:
        return []
    if not isinstance(requests, list):
        raise invalid("'devices' must be a list of {host_path, container_path, permissions}")
    out: list[Device] = []
    for d in requests:
        if not isinstance(d, dict):
            raise invalid("each of 'devices' must be an object with 'host_path'")
        host = d.get("host_path")
        target = d.get("container_path") or host
        perms = d.get("permissions") or "rwm"
        if not isinstance(host, str) or not host.startswith("/"):
            raise invalid(f"device host_path {host!r} must be an absolute path")
        if not isinstance(target, str) or not target.startswith("/"):
            raise invalid(f"device container_path {target!r} (of {host}) must be an absolute path")
        if not isinstance(perms, str) or not set(perms) <= set("rwm"):
            raise invalid(f"device permissions {perms!r} (of {host}) must be drawn from 'rwm'")
        access = "".join(c for c in "rwm" if c in perms)
        for path, st in _device_nodes(host):
            rel = os.path.relpath(path, host)
            out.append(Device(
                path=posixpath.normpath(target if rel == "." else posixpath.join(target, rel)),
                kind="c" if stat.S_ISCHR(st.st_mode) else "b",
                major=os.major(st.st_rdev), minor=os.minor(st.st_rdev),
                file_mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, access=access))
    return out


def _is_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)


def _device_nodes(host: str) -> list[tuple[str, os.stat_result]]:
    try:
        st = os.stat(host)
    except OSError as e:
        raise invalid(f"device {host}: {e.strerror or e} in the cell") from None
    if _is_device(st):
        return [(host, st)]
    if not stat.S_ISDIR(st.st_mode):
        raise invalid(f"device {host} is neither a device node nor a directory of them in the cell")
    found = []
    for dirpath, dirs, files in os.walk(host):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            try:
                fst = os.stat(path)
            except OSError:
                continue  # a dangling link
            if _is_device(fst):
                found.append((path, fst))
    if not found:
        raise invalid(f"device {host}: no device nodes under this directory in the cell")
    return found


def _allows_all(rule: Any) -> bool:
    """A rule that lets the container use every device (a privileged container's)."""
    return (isinstance(rule, dict) and rule.get("allow") is True and set(rule.get("access") or "") >= set("rwm")
            and rule.get("type") in (None, "", "a") and rule.get("major") in (None, -1)
            and rule.get("minor") in (None, -1))


def add_devices(linux: dict[str, Any], devices: list[Device]) -> None:
    """Each node into `linux.devices` (replacing one at the same path) and, unless the
    rules already allow every device, its allow rule into `linux.resources.devices`."""
    paths = {d.path for d in devices}
    linux["devices"] = [n for n in linux.get("devices") or [] if n.get("path") not in paths] + \
        [d.node() for d in devices]
    resources = linux.setdefault("resources", {})
    rules = list(resources.get("devices") or [])
    if not any(_allows_all(r) for r in rules):
        rules += [d.rule() for d in devices]
    resources["devices"] = rules


# --- user resolution ------------------------------------------------------------------------

# /etc/passwd and /etc/group are read only when they are regular files of at most this size.
ETC_DB_MAX = 1024 * 1024


def _read_db(rootfs: Path, name: str) -> list[list[str]]:
    """The rows of the image's /etc/<name>; none when it is missing or a symlink (never
    followed: it could lead out of the rootfs). Anything but a regular file there (a FIFO,
    a device, a directory), or one over ETC_DB_MAX, is a 400 at once: it is opened without
    following a link and without blocking, checked with fstat, and read at most to the bound."""
    what = f"the image's /etc/{name}"
    try:
        etc = os.open(rootfs / "etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        if e.errno == errno.ELOOP:  # /etc is a symlink
            return []
        raise invalid(f"{what}: {e.strerror}") from None
    try:
        try:
            st = os.lstat(name, dir_fd=etc)
        except FileNotFoundError:
            return []
        if stat.S_ISLNK(st.st_mode):
            return []
        if not stat.S_ISREG(st.st_mode):
            raise invalid(f"{what} is {_file_kind(st.st_mode)}, not a regular file: cannot resolve users from it")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=etc)
        except OSError as e:
            raise invalid(f"{what}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())  # what was opened, whatever the name points at now
            if not stat.S_ISREG(fst.st_mode):
                raise invalid(f"{what} is {_file_kind(fst.st_mode)}, not a regular file: cannot resolve users from it")
            if fst.st_size > ETC_DB_MAX:
                raise invalid(f"{what} is {fst.st_size} bytes, more than the {ETC_DB_MAX} the cell reads")
            data = f.read(ETC_DB_MAX + 1)
        if len(data) > ETC_DB_MAX:
            raise invalid(f"{what} is more than the {ETC_DB_MAX} bytes the cell reads")
    finally:
        os.close(etc)
    text = data.decode(errors="replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a char device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return f"of mode {mode:o}"


def resolve_user(rootfs: Path, user: str, extra_gids: list[int], merge_image_groups: bool = True) -> dict[str, Any]:
    """`uid`, `name`, `uid:gid`, `name:group` against the image's passwd/group.

    With `merge_image_groups` (SupplementalGroupsPolicy Merge) the groups /etc/group gives
    the user come first, then `extra_gids`; without it (Strict) only `extra_gids`."""
    passwd = _read_db(rootfs, "passwd")
    group = _read_db(rootfs, "group")
    u, _, g = user.partition(":")
    if not u:
        raise invalid(f"bad user {user!r}")
    name: str | None = None
    gid: int | None = None
    if u.isdigit():
        uid = int(u)
        for row in passwd:
            if len(row) >= 4 and row[2] == u:
                name, gid = row[0], int(row[3]) if row[3].isdigit() else 0
                break
    else:
        for row in passwd:
            if len(row) >= 4 and row[0] == u and row[2].isdigit():
                name, uid, gid = u, int(row[2]), int(row[3]) if row[3].isdigit() else 0
                break
        else:
            raise invalid(f"user {u!r} is not in the image's /etc/passwd")
    if g:
        if g.isdigit():
            gid = int(g)
        else:
            for row in group:
                if len(row) >= 3 and row[0] == g and row[2].isdigit():
                    gid = int(row[2])
                    break
            else:
                raise invalid(f"group {g!r} is not in the image's /etc/group")
    if gid is None:
        gid = 0
    extra: list[int] = []
    if name and merge_image_groups:
        for row in group:
            if len(row) >= 4 and name in row[3].split(",") and row[2].isdigit():
                extra.append(int(row[2]))
    for x in extra_gids:
        if x not in extra:
            extra.append(int(x))
    out: dict[str, Any] = {"uid": uid, "gid": gid}
    gids = [x for x in extra if x != gid]
    if gids:
        out["additionalGids"] = gids
    return out
