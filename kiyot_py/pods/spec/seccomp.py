"""linux.seccomp for the cell: its RuntimeDefault profile, or the built-in deny list.

Everything here is the cell's: ``RuntimeDefault`` converts the profile the cell
reported (`CellFacts.seccomp_profile`, containers-common/moby JSON), or the small
built-in deny list when it reported none; moby's ``archMap`` and ``includes``/
``excludes`` are resolved against the cell's architecture and kernel and the
container's bounding capabilities. Only ``Localhost`` profiles are read on the node:
the kubelet puts them there.

A cell whose kernel does not filter syscalls (``CellFacts.seccomp`` false) gets no
seccomp at all; asking it for any profile but Unconfined is an error, as containerd
answers "seccomp is not supported".
"""

from __future__ import annotations

import errno as errno_mod
import json
import posixpath
import re
from typing import Any

import structlog

from kiyot_py import platforms
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import CellFacts
from kiyot_py.pods.spec.errors import SpecError

log = structlog.get_logger("kiyot.pods.spec")

SOURCE_CELL = "cell"
SOURCE_BUILTIN = "builtin"

# The built-in RuntimeDefault profile, for a cell that reported none: allow everything
# except these, each unless the container holds the capability that makes the call
# legitimate (None: always blocked).
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

_ACTIONS = {
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
_OPS = {
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}


def seccomp(
    sc: api_pb2.LinuxContainerSecurityContext,
    caps: list[str],
    facts: CellFacts,
    localhost_root: str,
) -> tuple[dict | None, str | None]:
    """(linux.seccomp or None, the RuntimeDefault source when used: "cell" or "builtin").

    A privileged container gets none (the caller skips it), as in containerd.
    """
    P = api_pb2.SecurityProfile
    if sc.HasField("seccomp"):
        prof = sc.seccomp
        if prof.profile_type not in (P.Unconfined, P.RuntimeDefault, P.Localhost):
            raise SpecError(f"unknown seccomp profile type {prof.profile_type}")
        if prof.profile_type != P.Localhost and prof.localhost_ref:
            raise SpecError("a seccomp localhost_ref is only for profile type Localhost")
        kind, ref = P.ProfileType.Name(prof.profile_type), prof.localhost_ref
    else:
        path = sc.seccomp_profile_path
        if path in ("", "unconfined"):  # kubelet default: Unconfined
            kind, ref = "Unconfined", ""
        elif path in ("runtime/default", "docker/default"):
            kind, ref = "RuntimeDefault", ""
        elif path.startswith("localhost/"):
            kind, ref = "Localhost", path[len("localhost/"):]
        else:
            raise SpecError(f"unknown seccomp profile {path!r}")
    if kind == "Unconfined":
        return None, None
    if not facts.seccomp:
        raise SpecError(f"seccomp is not supported in this cell: profile {kind} cannot be applied")
    if kind == "RuntimeDefault":
        return runtime_default(caps, facts)
    return localhost(ref, caps, facts, localhost_root), None


def localhost(ref: str, caps: list[str], facts: CellFacts, root: str) -> dict:
    """A Localhost profile: a file on the node, under `root` unless absolute."""
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
    return convert(data, caps, facts, where=path)


def runtime_default(caps: list[str], facts: CellFacts) -> tuple[dict, str]:
    """The RuntimeDefault profile for a container with these (bounding) caps in this cell:
    (profile, "cell") from the cell's own profile, else (the built-in list, "builtin")."""
    if facts.seccomp_profile is None:
        log.debug("the cell reported no seccomp profile: using the built-in deny list",
                  architecture=facts.architecture)
        return builtin(caps, facts), SOURCE_BUILTIN
    return convert(facts.seccomp_profile, caps, facts, where="the cell's RuntimeDefault profile"), SOURCE_CELL


def builtin(caps: list[str], facts: CellFacts) -> dict:
    a = platforms.arch(facts.architecture)
    held = set(caps)
    denied = [n for n, cap in BUILTIN_DENIED_SYSCALLS.items() if cap is None or cap not in held]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [a.seccomp, *a.sub_arches],
        "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": errno_mod.EPERM}],
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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def kernel_at_least(kernel: str, minimum: str) -> bool:
    """The cell's kernel (uname -r) is at least `minimum` (major.minor). An unknown kernel
    is not: a rule for newer kernels is left out, one for older kernels kept."""
    have = _version(kernel)
    return bool(have) and have >= _version(minimum)


def convert(profile: Any, caps: list[str], facts: CellFacts, *, where: str = "seccomp profile") -> dict:
    """Convert a seccomp profile (OCI or Docker/moby format) to linux.seccomp for the cell.

    moby's ``includes``/``excludes`` (caps, arches, minKernel) are applied against
    ``caps`` (the bounding set), the cell's architecture and its kernel, and
    ``archMap`` is reduced to the cell's native architecture and its sub-arches.
    """
    if not isinstance(profile, dict):
        raise SpecError(f"{where}: a seccomp profile must be a JSON object")
    a = platforms.arch(facts.architecture)
    held = set(caps)
    default_action = profile.get("defaultAction")
    if default_action not in _ACTIONS:
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
        out["architectures"] = [str(x) for x in architectures]
    elif arch_map:
        for entry in arch_map:
            if isinstance(entry, dict) and entry.get("architecture") == a.seccomp:
                out["architectures"] = [a.seccomp, *(entry.get("subArchitectures") or [])]
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
        if exc.get("arches") and a.moby in exc["arches"]:
            continue
        if exc.get("caps") and any(c in held for c in exc["caps"]):
            continue
        if exc.get("minKernel") and kernel_at_least(facts.kernel, exc["minKernel"]):
            continue
        if inc.get("arches") and a.moby not in inc["arches"]:
            continue
        if inc.get("caps") and not all(c in held for c in inc["caps"]):
            continue
        if inc.get("minKernel") and not kernel_at_least(facts.kernel, inc["minKernel"]):
            continue
        names = call.get("names")
        if call.get("name"):
            if names:
                raise SpecError(f"{here}: give either name or names, not both")
            names = [call["name"]]
        if not names or not isinstance(names, list):
            raise SpecError(f"{here} has no syscall names")
        action = call.get("action")
        if action not in _ACTIONS:
            raise SpecError(f"{here}: unknown action {action!r}")
        rule: dict[str, Any] = {"names": [str(n) for n in names], "action": action}
        ret = _errno_ret(call, "errnoRet", "errno", here)
        if ret is not None:
            rule["errnoRet"] = ret
        args = []
        for arg in call.get("args") or []:
            if not isinstance(arg, dict) or arg.get("op") not in _OPS:
                raise SpecError(f"{here}: bad argument filter {arg!r}")
            try:
                f = {"index": int(arg["index"]), "value": int(arg.get("value", 0)), "op": arg["op"]}
                if arg.get("valueTwo"):
                    f["valueTwo"] = int(arg["valueTwo"])
            except (KeyError, TypeError, ValueError):
                raise SpecError(f"{here}: bad argument filter {arg!r}") from None
            args.append(f)
        if args:
            rule["args"] = args
        syscalls.append(rule)
    if syscalls:
        out["syscalls"] = syscalls
    return out
