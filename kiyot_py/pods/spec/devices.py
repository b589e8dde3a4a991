"""Devices: the default device cgroup rules here, the requested devices in the cell.

The node's /dev is not the cell's, so the node never stats a device: it checks each
CRI Device and hands it on as `ContainerSpec.devices` ({"host_path", "container_path",
"permissions"}); the agent expands it in the cell (a directory into the nodes under
it) and adds linux.devices and the cgroup allow rules. The spec built here holds only
runc's default rules, or allow-all for a privileged container (whose devices are still
not copied in from anywhere).
"""

from __future__ import annotations

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.pods.spec.errors import SpecError


def device_rules(privileged: bool) -> list[dict]:
    """linux.resources.devices before the agent adds the requested devices' rules."""
    if privileged:
        return [{"allow": True, "access": "rwm"}]
    return [
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


def requested_devices(config: api_pb2.ContainerConfig) -> list[dict[str, str]]:
    """The CRI devices, checked, for the agent: permissions ⊆ "rwm" (default "rwm"),
    absolute paths, the container path defaulting to the host path."""
    out: list[dict[str, str]] = []
    for d in config.devices:
        perms = d.permissions or "rwm"
        if not set(perms) <= set("rwm"):
            raise SpecError(f"invalid device permissions {d.permissions!r} for {d.host_path}")
        if not d.host_path.startswith("/"):
            raise SpecError(f"device host path {d.host_path!r} must be absolute")
        target = d.container_path or d.host_path
        if not target.startswith("/"):
            raise SpecError(f"device container path {target!r} must be absolute")
        out.append({"host_path": d.host_path, "container_path": target, "permissions": perms})
    return out
