"""The container's process: argv, environment, working directory, user and stop signal.

The node is the one owner of every image default: it merges the image config's
Entrypoint/Cmd, Env, WorkingDir, User and StopSignal with the CRI config here, and the
agent runs what it is sent. Only a symbolic user is left to the agent, which looks the
name up in the rootfs (see `ContainerSpec.user`).
"""

from __future__ import annotations

import posixpath
import re
import signal
from typing import Any

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.pods.spec.errors import SpecError

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STOP_SIGNAL = "SIGTERM"
MAX_ID = 2**32 - 2

# Linux's real-time signal range (the kernel's, not a libc's: glibc reserves 32 and 33).
_SIGRTMIN, _SIGRTMAX = 34, 64


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"image config {what} must be a list of strings")
    return list(value)


def args(config: api_pb2.ContainerConfig, img: dict) -> list[str]:
    command = list(config.command)
    cri_args = list(config.args)
    entrypoint = _str_list(img.get("Entrypoint"), "Entrypoint")
    cmd = _str_list(img.get("Cmd"), "Cmd")
    if entrypoint == [""]:  # `ENTRYPOINT [""]` resets the entrypoint
        entrypoint = []
    if command:
        argv = command + cri_args
    elif cri_args:
        argv = entrypoint + cri_args
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


def env(config: api_pb2.ContainerConfig, hostname: str, img: dict) -> list[str]:
    # Ordered map: a later value for a key replaces the earlier one in place.
    out: dict[str, str] = {}

    def put(entry: str) -> None:
        out[entry.split("=", 1)[0]] = entry

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
    if "PATH" not in out:
        # containerd puts the default PATH first when the image has none.
        out = {"PATH": DEFAULT_PATH_ENV, **out}
    return list(out.values())


def cwd(config: api_pb2.ContainerConfig, img: dict) -> str:
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
        if value > MAX_ID:
            raise SpecError(f"{what} {text} is out of range")
        return value
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.\-]*\$?", text):
        raise SpecError(f"invalid {what} {text!r}")
    return None


def user(sc: api_pb2.LinuxContainerSecurityContext, img: dict) -> tuple[dict[str, Any], str]:
    """(process.user, the user for the agent to resolve in the rootfs)."""
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
        if not 0 <= sc.run_as_user.value <= MAX_ID:
            raise SpecError(f"run_as_user {sc.run_as_user.value} is out of range")
        name = str(sc.run_as_user.value)
    elif sc.run_as_username:
        name = sc.run_as_username
    else:
        name = img_user or "0"

    if has_gid:
        if not 0 <= sc.run_as_group.value <= MAX_ID:
            raise SpecError(f"run_as_group {sc.run_as_group.value} is out of range")
        group = str(sc.run_as_group.value)
    elif name == (img_user or "0"):
        # The kubelet copies the image's uid/name into run_as_user/username;
        # the image's group then still applies.
        group = img_group
    else:
        group = ""

    uid = _parse_id(name, "user")
    gid = _parse_id(group, "group") if group else 0

    additional = []
    for g in sc.supplemental_groups:
        if not 0 <= g <= MAX_ID:
            raise SpecError(f"supplemental group {g} is out of range")
        additional.append(int(g))

    # The agent resolves the user in the rootfs, as containerd does: a name's uid, the
    # uid's primary group when no group is given (0 when /etc/passwd has no entry), and
    # (policy Merge) the groups /etc/group gives the user. Names get placeholders here.
    resolve = f"{name}:{group}" if group else name
    if uid is None or gid is None:
        uid = gid = 0
    proc_user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional:
        proc_user["additionalGids"] = additional
    return proc_user, resolve


def stop_signal(config: api_pb2.ContainerConfig, img: dict) -> str:
    """The CRI config's stop signal, else the image's StopSignal, else SIGTERM: canonical."""
    if config.stop_signal:  # 0 is RUNTIME_DEFAULT
        return normalize_signal(api_pb2.Signal.Name(config.stop_signal))
    sig = img.get("StopSignal")
    if not sig:
        return DEFAULT_STOP_SIGNAL
    return normalize_signal(str(sig))


def normalize_signal(sig: str) -> str:
    """A signal as its canonical Linux name: "SIGTERM", "SIGRTMIN+3", "SIGRTMAX-1".

    Takes a name with or without "SIG" in any case, an alias ("SIGCLD" → "SIGCHLD"), a
    number ("9" → "SIGKILL", "37" → "SIGRTMIN+3") or the CRI enum's spelling
    ("SIGRTMINPLUS3"). The one normalizer of the node.
    """
    text = sig.strip().upper()
    if text.isdigit():
        n = int(text)
        if _SIGRTMIN <= n <= _SIGRTMAX:
            if n - _SIGRTMIN <= (_SIGRTMAX - _SIGRTMIN) // 2:
                return _rt("SIGRTMIN", n - _SIGRTMIN)
            return _rt("SIGRTMAX", _SIGRTMAX - n)
        try:
            return signal.Signals(n).name
        except ValueError:
            raise SpecError(f"unknown stop signal {sig!r}") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    text = text.replace("PLUS", "+").replace("MINUS", "-")
    m = re.fullmatch(r"SIGRT(MIN|MAX)(?:([+-])(\d{1,2}))?", text)
    if m:
        base, sign, offset = f"SIGRT{m[1]}", m[2], int(m[3] or 0)
        if sign is None or offset == 0:
            return base
        if (base == "SIGRTMIN") != (sign == "+") or offset > _SIGRTMAX - _SIGRTMIN:
            raise SpecError(f"unknown stop signal {sig!r}")  # SIGRTMIN-n, SIGRTMAX+n, too far
        return f"{base}{sign}{offset}"
    member = signal.Signals.__members__.get(text)
    if member is None or text in ("SIGRTMIN", "SIGRTMAX"):
        raise SpecError(f"unknown stop signal {sig!r}")
    return member.name  # an alias's canonical name


def _rt(base: str, offset: int) -> str:
    if offset == 0:
        return base
    return f"{base}{'+' if base == 'SIGRTMIN' else '-'}{offset}"
