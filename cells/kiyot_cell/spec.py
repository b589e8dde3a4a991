"""The bundle's config.json: the node's spec plus what only the cell knows.

umoci writes a runnable config.json from the image (args, env, cwd, user, default
namespaces and mounts). The node's `spec` wins for every key it sets; whatever it leaves
out comes from umoci's, so a minimal spec such as `{"process": {"args": [...]}}` works.
Then the cell's facts: root.path, the network namespace, the pod's IPC namespace when asked
for, cgroupsPath, the pod's /etc files (unless the node's spec mounts its own there), and
`terminal: false` (runc refuses a terminal when detached under conmon).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import invalid

ETC_FILES = ("hostname", "hosts", "resolv.conf")


@dataclass(frozen=True)
class CellFacts:
    rootfs: Path
    netns: str | None
    cgroups_path: str
    pod_etc: Path | None       # None until PUT /v1/pod
    pod_hostname: str | None
    pod_namespaces: dict[str, str] = field(default_factory=dict)  # kind -> path, e.g. the pod's IPC


def _merge_env(image_env: list[str], spec_env: list[str]) -> list[str]:
    out: dict[str, str] = {}
    for e in image_env + spec_env:
        k = e.split("=", 1)[0]
        out[k] = e
    return list(out.values())


GROUPS_POLICIES = ("Merge", "Strict")


def build(image_cfg: dict[str, Any], spec: dict[str, Any], facts: CellFacts, user: str | None,
          groups_policy: str = "Merge") -> dict[str, Any]:
    cfg = copy.deepcopy(image_cfg)
    for key, val in spec.items():
        if key in ("process", "linux") and isinstance(val, dict):
            base = cfg.setdefault(key, {})
            for k, v in val.items():
                if key == "process" and k == "env":
                    base["env"] = _merge_env(base.get("env", []), list(v or []))
                elif key == "process" and k in ("args", "cwd") and not v:
                    continue  # empty: keep the image's
                else:
                    base[k] = copy.deepcopy(v)
        else:
            cfg[key] = copy.deepcopy(val)

    proc = cfg.setdefault("process", {})
    if not proc.get("args"):
        raise invalid("no command: neither spec.process.args nor the image's config gives one")
    proc["terminal"] = False
    proc.pop("consoleSize", None)
    proc.setdefault("cwd", "/")

    cfg["root"] = {"path": str(facts.rootfs), "readonly": bool(spec.get("root", {}).get("readonly", False))}

    linux = cfg.setdefault("linux", {})
    namespaces = [dict(ns) for ns in linux.get("namespaces", [])]
    if facts.netns:
        net = [ns for ns in namespaces if ns.get("type") == "network"]
        if net:
            net[0]["path"] = facts.netns
        else:
            namespaces.append({"type": "network", "path": facts.netns})
    else:
        # No cell netns: share the agent's network (local tests).
        namespaces = [ns for ns in namespaces if ns.get("type") != "network"]
    for kind, path in facts.pod_namespaces.items():
        namespaces = [ns for ns in namespaces if ns.get("type") != kind] + [{"type": kind, "path": path}]
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = facts.cgroups_path

    if facts.pod_hostname and "hostname" not in spec and any(ns.get("type") == "uts" for ns in namespaces):
        cfg["hostname"] = facts.pod_hostname

    if facts.pod_etc is not None:
        # A file the node mounts itself wins: the kubelet's /etc/hosts carries hostAliases.
        given = {m.get("destination") for m in spec.get("mounts") or []}
        ours = [n for n in ETC_FILES if f"/etc/{n}" not in given]
        mounts = [m for m in cfg.get("mounts", []) if m.get("destination") not in {f"/etc/{n}" for n in ours}]
        for n in ours:
            mounts.append({
                "destination": f"/etc/{n}", "type": "bind",
                "source": str(facts.pod_etc / n), "options": ["rbind", "rprivate"],
            })
        cfg["mounts"] = mounts

    if proc.get("rlimits"):
        proc["rlimits"] = clamp_rlimits(proc["rlimits"])
    if proc.get("capabilities"):
        proc["capabilities"] = clamp_capabilities(proc["capabilities"])
    if user:
        proc["user"] = resolve_user(facts.rootfs, user, proc.get("user", {}).get("additionalGids", []),
                                    merge_image_groups=groups_policy == "Merge")
    return cfg


def process_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """uid, gid and every group (primary first, then the rest sorted) of a bundle's process."""
    user = cfg.get("process", {}).get("user", {})
    gid = int(user.get("gid", 0))
    groups = [gid] + sorted({int(g) for g in user.get("additionalGids") or []} - {gid})
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


def clamp_capabilities(caps: dict[str, Any]) -> dict[str, Any]:
    """Keep only the capabilities this cell can grant (its own bounding set).

    A privileged container (or "add ALL") asks for every capability the node's kernel
    knows; a cell that does not hold one of them (CAP_SYS_RESOURCE on some hosts) would
    make `runc create` fail with EPERM. containerd gives a privileged container the
    capabilities it holds itself, for the same reason.
    """
    held = _own_capabilities()
    if not held:
        return caps
    allowed = {name for i, name in enumerate(CAPABILITIES) if held >> i & 1}
    return {kind: [c for c in names if c in allowed] if isinstance(names, list) else names
            for kind, names in caps.items()}


def clamp_rlimits(rlimits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cap each rlimit at what this cell can grant.

    runc (under conmon, with the agent's limits) gets EPERM raising a hard limit above its
    own without CAP_SYS_RESOURCE, and nothing may exceed fs.nr_open for NOFILE: a node's
    generic 1048576 must not make `runc create` fail on a cell that cannot give it.
    """
    import resource

    cap = _has_cap_sys_resource()
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = None
    out = []
    for rl in rlimits:
        rl = dict(rl)
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


# --- user resolution ------------------------------------------------------------------------

def _read_db(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _safe_etc(rootfs: Path, name: str) -> Path:
    # /etc/passwd may be a symlink in the image: never follow it out of the rootfs.
    p = rootfs / "etc" / name
    if p.is_symlink() or (rootfs / "etc").is_symlink():
        return rootfs / "nonexistent"
    return p


def resolve_user(rootfs: Path, user: str, extra_gids: list[int], merge_image_groups: bool = True) -> dict[str, Any]:
    """`uid`, `name`, `uid:gid`, `name:group` against the image's passwd/group.

    With `merge_image_groups` (SupplementalGroupsPolicy Merge) the groups /etc/group gives
    the user come first, then `extra_gids`; without it (Strict) only `extra_gids`."""
    passwd = _read_db(_safe_etc(rootfs, "passwd"))
    group = _read_db(_safe_etc(rootfs, "group"))
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
