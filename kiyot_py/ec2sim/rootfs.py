"""A simulated instance's root filesystem: what its init sees instead of the node's disk.

A real instance boots from an image with the OS installed and sees nothing of the node
that launched it. A simulated one gets the same: its init (PID 1 of its PID namespace, in
a mount namespace of its own) runs this file first, which builds a root on a tmpfs:

- the OS, read-only, from the node: /usr and /etc (and /bin, /sbin, /lib, /lib64 as they
  are on the node: symlinks into /usr, or read-only copies of real directories);
- /proc for the machine's PID namespace, /sys and /dev as the node's (runc needs the
  cgroup mounts under /sys/fs/cgroup), a fresh /dev/shm, a fresh /run;
- /tmp, /var, /root and /home of the machine's own, on its disk (`<machine>/os`);
- the Python environment its agent runs from, read-only, at the same absolute paths;
- the machine's own directory (its disk, its runtime state, its console), read-write at its
  same absolute path, so that the agent's argv and what the node does from outside (find
  the machine's processes by `<machine>/disk` in their argv, look into the disk) hold.

Then it pivots into that root, drops the node's, and execs the init's argv. Every mount is
in the machine's mount namespace only, private: the node never sees one, and when the
machine powers off they all go with it; on the node, `<machine>/root` and `<machine>/os`
are plain directories that the teardown deletes.

Run as `python -I -S rootfs.py --machine DIR [--ro PATH]... -- ARGV...` inside the new
mount namespace: it imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

OS_READ_ONLY = ("/usr", "/etc")  # the node's OS, as the image would hold it
OS_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # usr-merged: symlinks
OWN_DIRS = (("tmp", 0o1777), ("var", 0o755), ("root", 0o700), ("home", 0o755))  # on the machine's disk
SYSTEM = ("/proc", "/sys", "/dev")  # nothing of the machine's may be made in these
PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                   "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}


class RootfsError(RuntimeError):
    pass


def python_paths() -> list[str]:
    """What the agent's Python needs that is not the OS: the environment (a venv and the
    Python it was made from), the interpreter, and the `kiyot_cell` package's source (the
    package may be installed editable, from the repository's cells/)."""
    found = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, sys.executable}
    spec = importlib.util.find_spec("kiyot_cell")
    if spec is not None:
        found.update(spec.submodule_search_locations or ([spec.origin] if spec.origin else []))
    return sorted({os.path.realpath(p) for p in found if p})


def _under(path: str, base: str) -> bool:
    return base == "/" or path == base or path.startswith(base.rstrip("/") + "/")


def exposures(machine: str, read_only: Iterable[str]) -> list[tuple[str, bool]]:
    """The node's paths bound into the machine's root at their same absolute paths, as
    (path, read-only), parents first: the read-only ones but for what the OS's binds hold
    already or another of them does, then the machine's own directory, read-write."""
    machine = os.path.realpath(machine)
    if any(_under(machine, base) for base in (*OS_READ_ONLY, *SYSTEM)) or machine == "/":
        raise RootfsError(f"the machine's directory {machine} is not a place for a machine's own files")
    paths = sorted({os.path.realpath(p) for p in read_only})
    for path in paths:
        if any(_under(path, base) for base in SYSTEM) or path == "/":
            raise RootfsError(f"{path} cannot be bound into a machine")
    kept = [p for p in paths if not any(_under(p, base) for base in OS_READ_ONLY)
            and not any(q != p and _under(p, q) for q in paths)]
    out = [(p, True) for p in kept] + [(machine, False)]
    return sorted(out, key=lambda item: (item[0].count("/"), item[0]))


# -- the mounts (in the machine's mount namespace only) -------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                   data and data.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(errno)}")


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at_or_under(target: str) -> list[tuple[str, int]]:
    """(mount point, per-mount flags but read-only) of every mount at or below `target`."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if _under(point, target):
                flags = 0
                for option in fields[5].split(","):
                    flags |= PER_MOUNT_FLAGS.get(option, 0)
                found.append((point, flags))
    return found


def bind(source: str, target: str, *, read_only: bool, recursive: bool = True) -> None:
    """`source` on `target` (made if missing: a directory, or a file for a file)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a"):
                pass
    _mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        # A bind's read-only flag is per mount: every mount of the recursive bind gets it.
        for point, flags in mounts_at_or_under(target):
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)


def _own_dirs(machine: str) -> str:
    """The machine's own /tmp, /var, /root and /home, on its disk (seeded once)."""
    base = os.path.join(machine, "os")
    for name, mode in OWN_DIRS:
        path = os.path.join(base, name)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
    var = os.path.join(base, "var")
    os.makedirs(os.path.join(var, "tmp"), exist_ok=True)
    os.chmod(os.path.join(var, "tmp"), 0o1777)  # noqa: S103 - /var/tmp is world-writable, sticky
    for name, points_to in (("run", "../run"), ("lock", "../run/lock")):  # relative: never the node's /run
        with contextlib.suppress(FileExistsError):
            os.symlink(points_to, os.path.join(var, name))
    return base


def build(machine: str, read_only: Sequence[str]) -> str:
    """The machine's root, mounted on `<machine>/root`; its path."""
    machine = os.path.realpath(machine)
    exposed = exposures(machine, read_only)
    _mount(None, "/", None, MS_REC | MS_SLAVE)  # nothing made below goes back to the node
    new = os.path.join(machine, "root")
    os.makedirs(new, exist_ok=True)
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")

    def at(path: str) -> str:
        return new + path

    for path in OS_READ_ONLY:
        bind(path, at(path), read_only=True)
    for path in OS_LINKS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), at(path))
        elif os.path.isdir(path):
            bind(path, at(path), read_only=True)
    os.makedirs(at("/proc"))
    _mount("proc", at("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # the machine's PIDs
    bind("/sys", at("/sys"), read_only=False)  # with the cgroup hierarchies runc uses
    bind("/dev", at("/dev"), read_only=False)
    shm = at("/dev/shm")  # noqa: S108 - the machine's own, fresh
    if os.path.isdir(shm):
        _mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if os.path.isdir(at("/dev/mqueue")):  # the machine has an IPC namespace of its own
        with contextlib.suppress(OSError):
            _mount("mqueue", at("/dev/mqueue"), "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(at("/run"))
    _mount("tmpfs", at("/run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.makedirs(at("/run/lock"))
    os.chmod(at("/run/lock"), 0o1777)  # noqa: S103 - as /run/lock is
    own = _own_dirs(machine)
    for name, _ in OWN_DIRS:
        bind(os.path.join(own, name), at("/" + name), read_only=False, recursive=False)
    for path, ro in exposed:
        # The machine's directory alone, not what is mounted below it (this root).
        bind(path, at(path), read_only=ro, recursive=ro)
    _mount(None, new, None, MS_REC | MS_PRIVATE)
    return new


def pivot(new: str) -> None:
    """`new` becomes / of this mount namespace; the node's root goes."""
    os.chdir(new)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is not None:
        if _libc.syscall(ctypes.c_long(number), b".", b".") != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"pivot_root {new}: {os.strerror(errno)}")
    else:
        subprocess.run(["pivot_root", ".", "."], check=True)
    # The old root is stacked on the new one now: detach it and what is under it.
    if _libc.umount2(b".", MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"umount the node's root: {os.strerror(errno)}")
    os.chdir("/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiyot-ec2sim-rootfs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machine", required=True, help="the machine's directory (bound read-write)")
    ap.add_argument("--ro", action="append", default=[], metavar="PATH", help="a node path the machine sees, read-only")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the init's argv")
    ns = ap.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        ap.error("no command to run in the machine")
    try:
        pivot(build(ns.machine, ns.ro))
        os.execv(command[0], command)  # noqa: S606 - the init's argv, as given
    except (OSError, RootfsError, subprocess.CalledProcessError) as e:
        print(f"kiyot-ec2sim machine: no root filesystem: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
