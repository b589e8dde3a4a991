"""GET /v1/facts: what the cell says about itself.

The node builds every container's OCI spec and picks every image's platform from these,
never from its own machine (an arm64 cell may sit behind an amd64 node). They are read
once, on first use, and cached: nothing here changes while the agent runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from . import log
from .spec import held_capabilities

_log = log.get("facts")

# uname -m -> (GOARCH, variant), as image indexes name platforms.
_ARCHES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""),
    "i386": ("386", ""), "i686": ("386", ""),
    "riscv64": ("riscv64", ""),
}


def architecture(machine: str | None = None) -> tuple[str, str]:
    """(GOARCH, variant) of `machine` (default: this one's uname -m)."""
    m = (machine or platform.machine()).lower()
    return _ARCHES.get(m, (m, ""))


def kernel_version(release: str | None = None) -> tuple[int, int]:
    nums = [int(x) for x in re.findall(r"\d+", release or os.uname().release)[:2]]
    padded = [*nums, 0, 0]
    return padded[0], padded[1]


def cgroup_version(root: Path = Path("/sys/fs/cgroup")) -> int:
    return 2 if (root / "cgroup.controllers").exists() else 1


def seccomp_available() -> bool:
    """The kernel filters syscalls (CONFIG_SECCOMP_FILTER)."""
    if Path("/proc/sys/kernel/seccomp/actions_avail").exists():
        return True
    try:
        return any(line.startswith("Seccomp:") for line in Path("/proc/self/status").read_text().splitlines())
    except OSError:
        return False


def read_seccomp_profile(path: Path | None) -> dict[str, Any] | None:
    """The cell's RuntimeDefault profile (the parsed JSON), or None when it has none."""
    if path is None:
        return None
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _log.warning("seccomp_profile_unreadable", path=str(path), error=str(e))
        return None
    if not isinstance(profile, dict):
        _log.warning("seccomp_profile_unreadable", path=str(path), error="not a JSON object")
        return None
    return profile


async def runtime_features(runtime_path: str) -> dict[str, Any]:
    """`<runtime> features` as JSON; {} when the runtime cannot tell."""
    try:
        proc = await asyncio.create_subprocess_exec(
            runtime_path, "features", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        _log.warning("runtime_features_failed", runtime=runtime_path, error=str(e))
        return {}
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        _log.warning("runtime_features_failed", runtime=runtime_path, error="timed out")
        return {}
    if proc.returncode != 0:
        _log.warning("runtime_features_failed", runtime=runtime_path, error=err.decode(errors="replace").strip())
        return {}
    try:
        features = json.loads(out)
    except ValueError:
        return {}
    return features if isinstance(features, dict) else {}


async def gather(runtime_path: str, seccomp_profile: Path | None) -> dict[str, Any]:
    arch, variant = architecture()
    features = await runtime_features(runtime_path)
    # mount_setattr(2) (Linux 5.12) is what makes `rro` recursive.
    rro = "rro" in (features.get("mountOptions") or []) and kernel_version() >= (5, 12)
    return {
        "os": "linux",
        "architecture": arch,
        "variant": variant,
        "kernel": os.uname().release,
        "capabilities": held_capabilities(),
        "cgroup_version": cgroup_version(),
        "seccomp": seccomp_available(),
        "seccomp_profile": await asyncio.to_thread(read_seccomp_profile, seccomp_profile),
        "recursive_read_only_mounts": rro,
        # The agent maps no ids (no idmapped rootfs, no uid/gid mappings): user-namespaced
        # pods are not offered, whatever the kernel could do.
        "user_namespaces": False,
    }


class CellFactsCache:
    """The facts, gathered once (the first caller waits; the rest get the same dict)."""

    def __init__(self, runtime_path: str, seccomp_profile: Path | None) -> None:
        self._runtime_path = runtime_path
        self._seccomp_profile = seccomp_profile
        self._facts: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, Any]:
        if self._facts is None:
            async with self._lock:
                if self._facts is None:
                    self._facts = await gather(self._runtime_path, self._seccomp_profile)
                    _log.info("facts", **{k: v for k, v in self._facts.items()
                                          if k not in ("capabilities", "seccomp_profile")})
        return self._facts
