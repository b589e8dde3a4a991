"""A container's resource limits as the node changes them (POST /v1/containers/{id}/resources).

The body is the part of an OCI `linux.resources` that the node's CRI conversion makes
(kiyot_py/pods/spec/resources.py, the one CreateContainer uses, so that create and update
agree) and `runc update` changes in place: `cpu` (shares, quota, period, cpus, mems),
`memory` (limit, swap) and `pids` (limit). Unified (cgroup v2) keys and hugepage limits
are refused: runc refuses unified keys on the v1 hosts cells run on, and the node sets
neither at create. Everything is checked before runc runs, so bad input changes nothing.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import invalid

# Bounds the kernel itself sets (v1 cpu.shares, CFS period and quota in µs): outside
# them it refuses or silently clamps, and a clamped value is not the one asked for.
CPU_SHARES = (2, 262144)
CPU_PERIOD = (1000, 1_000_000)
CPU_QUOTA = (1000, (1 << 44) - 1)
INT64_MAX = (1 << 63) - 1
CPUSET_RE = re.compile(r"^\d{1,4}(-\d{1,4})?(,\d{1,4}(-\d{1,4})?)*$")

# What each section may hold: an integer range (-1 for "no limit" where allowed), or a cpuset.
_INTS: dict[str, dict[str, tuple[int, int, bool]]] = {  # key -> (min, max, -1 allowed)
    "cpu": {"shares": (*CPU_SHARES, False), "period": (*CPU_PERIOD, False), "quota": (*CPU_QUOTA, True)},
    "memory": {"limit": (1, INT64_MAX, True), "swap": (1, INT64_MAX, True)},
    "pids": {"limit": (1, INT64_MAX, True)},
}
_CPUSETS = {"cpu": ("cpus", "mems")}
SECTIONS = tuple(_INTS)


def _key_ok(section: str, key: str) -> bool:
    return key in _INTS[section] or key in _CPUSETS.get(section, ())


def _check_value(section: str, key: str, value: Any) -> None:
    where = f"'{section}.{key}'"
    if key in _CPUSETS.get(section, ()):
        if not isinstance(value, str) or len(value) > 1024 or not CPUSET_RE.match(value):
            raise invalid(f"{where} must be a cpuset list such as \"0-3,6\", got {value!r:.80}")
        return
    low, high, unlimited = _INTS[section][key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"{where} must be an integer, got {value!r:.80}")
    if not (low <= value <= high or (unlimited and value == -1)):
        also = " or -1 (no limit)" if unlimited else ""
        raise invalid(f"{where} must be between {low} and {high}{also}, got {value}")


def check(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The change `body` asks for, every value checked; `400` for anything else."""
    for section in body:
        if section not in SECTIONS:
            raise invalid(f"'{section}' cannot be updated: only {', '.join(SECTIONS)}")
    change: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = body.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise invalid(f"'{section}' must be an object")
        for key, value in values.items():
            if not _key_ok(section, key):
                raise invalid(f"'{section}.{key}' cannot be updated")
            _check_value(section, key, value)
        if values:
            change[section] = dict(values)
    memory = change.get("memory", {})
    if memory.get("limit", -1) > 0 and 0 < memory.get("swap", -1) < memory["limit"]:
        raise invalid("'memory.swap' is memory and swap together: it cannot be below 'memory.limit'")
    if not change:
        raise invalid(f"no resources to update: give one of {', '.join(SECTIONS)}")
    return change


def merge(current: dict[str, Any], change: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The limits in force once `change` is applied over `current`."""
    out = {section: dict(values) for section, values in current.items()}
    for section, values in change.items():
        out.setdefault(section, {}).update(values)
    return out


def of_config(config: dict[str, Any]) -> dict[str, Any]:
    """The limits a new container's bundle config gives it (what `runc create` applied)."""
    given = (config.get("linux") or {}).get("resources") or {}
    out = {}
    for section in SECTIONS:
        values = {k: v for k, v in (given.get(section) or {}).items() if _key_ok(section, k)}
        if values:
            out[section] = values
    return out
