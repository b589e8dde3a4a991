"""The container's mounts: the standard /proc, /dev, /sys set plus the CRI's bind mounts.

CRI mounts replace a standard mount at the same place, parents come before children,
and the propagation of the mounts sets the rootfs's, as in containerd. The agent adds
the pod's /etc/hostname, /etc/hosts and /etc/resolv.conf (unless the kubelet gave them).
A recursive read-only mount needs a cell whose runc and kernel give one
(`CellFacts.recursive_read_only_mounts`); elsewhere it is an error, as in containerd.
"""

from __future__ import annotations

import posixpath

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import CellFacts
from kiyot_py.pods.spec.errors import SpecError


def standard_mounts(privileged: bool) -> list[dict]:
    sys_opts = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    cg_opts = ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",  # noqa: S108 - a mount in the container's spec
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


def mounts(config: api_pb2.ContainerConfig, privileged: bool, facts: CellFacts) -> tuple[list[dict], str | None]:
    """(spec.mounts, linux.rootfsPropagation or None)."""
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
            if not facts.recursive_read_only_mounts:
                raise SpecError(
                    f"recursive read-only mount {m.container_path}: this cell's runtime or "
                    f"kernel ({facts.kernel or 'unknown'}) does not support recursive read-only mounts"
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
    out = [
        m
        for m in standard_mounts(privileged)
        if m["destination"] not in taken
        and not ("/dev" in taken and m["destination"].startswith("/dev/"))
    ]
    out.extend(cri_mounts)
    # Parents before children (stable: equal depths keep their order).
    out.sort(key=lambda m: _depth(m["destination"]))
    return out, rootfs_propagation
