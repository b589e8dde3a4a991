"""The pod's volumes in a cell that cannot see the node's disk (see API.md, volumes).

The node ships what the kubelet laid out for the pod (configmaps, secrets, projected
tokens, downward API files, /etc/hosts, the termination-log file) and names what the
cell makes itself (emptyDir). A memory volume is a tmpfs of its own: its files never
touch the cell's disk. An "atomic" volume keeps the kubelet's layout: the files in a
`..<version>` directory, `..data` a symlink to it, and the visible names links through
`..data`; a new version is written beside the old one and `..data` swapped by rename,
so that a reader that resolves `..data` once never sees a mix of versions.
"""

from __future__ import annotations

import base64
import binascii
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import log
from .errors import invalid, not_found
from .pod import is_mount_point

_log = log.get("volumes")

NAME = re.compile(r"^[0-9a-f]{8,64}$")
VERSION = re.compile(r"^\.\.[A-Za-z0-9_.\-]{1,200}$")
KINDS = ("atomic", "tree", "file", "empty")
MEDIA = ("memory", "disk")
DEFAULT_MEMORY_LIMIT = 64 * 1024 * 1024  # a memory volume without a limit of its own
MAX_ENTRIES = 4096
READ_BACK_MAX = 4096  # the kubelet reads at most 4 KiB of a termination message


def _relative(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\0" in path:
        raise invalid(f"{what} {path!r} must be a relative path")
    clean = posixpath.normpath(path)
    if clean == "." or clean.startswith("..") or "/../" in f"/{clean}/":
        raise invalid(f"{what} {path!r} leaves its volume")
    return clean


def _link_target(path: str, target: Any) -> str:
    """A symlink's target: relative, and inside the volume once resolved from where it is."""
    if not isinstance(target, str) or not target or target.startswith("/") or "\0" in target:
        raise invalid(f"symlink {path!r}: target {target!r} must be a relative path")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise invalid(f"symlink {path!r}: target {target!r} leaves its volume")
    return target


def _entries(body: dict[str, Any]) -> list[dict[str, Any]]:
    entries = body.get("files") or []
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise invalid(f"files must be a list of at most {MAX_ENTRIES} entries")
    out: list[dict[str, Any]] = []
    for e in entries:
        if not isinstance(e, dict):
            raise invalid("each file is an object")
        path = _relative(e.get("path"), "file path")
        mode = e.get("mode", 0o644)
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise invalid(f"file {path!r}: mode {mode!r} is not a permission")
        if "symlink" in e:
            out.append({"path": path, "symlink": _link_target(path, e["symlink"])})
        elif e.get("dir"):
            out.append({"path": path, "dir": True, "mode": mode & 0o777})
        else:
            try:
                data = base64.b64decode(e.get("data") or "", validate=True)
            except (binascii.Error, TypeError):
                raise invalid(f"file {path!r}: data is not base64") from None
            out.append({"path": path, "data": data, "mode": mode & 0o777})
    return out


def _write_tree(root: Path, entries: list[dict[str, Any]]) -> None:
    """Writes entries into `root`, a directory this call made: every name is new, nothing
    is followed (O_EXCL|O_NOFOLLOW), and links come last, so none can redirect a write."""
    for e in sorted((e for e in entries if e.get("dir")), key=lambda e: e["path"].count("/")):
        (root / e["path"]).mkdir(mode=e["mode"], parents=True, exist_ok=True)
    for e in entries:
        if "data" not in e:
            continue
        target = root / e["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, e["mode"])
        try:
            os.fchmod(fd, e["mode"])  # past the umask
            view = memoryview(e["data"])
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    for e in entries:
        if "symlink" in e:
            link = root / e["path"]
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(e["symlink"], link)


class Volumes:
    def __init__(self, volumes_dir: Path) -> None:
        self._dir = volumes_dir

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME.match(name):
            raise invalid(f"volume name {name!r} is not 8 to 64 lowercase hex digits")
        return self._dir / name

    # -- PUT /v1/volumes/{name} -----------------------------------------------------------

    def put(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        home = self.path(name)
        kind, medium = body.get("kind"), body.get("medium", "disk")
        if kind not in KINDS:
            raise invalid(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if medium not in MEDIA:
            raise invalid(f"medium {medium!r} is not one of {', '.join(MEDIA)}")
        limit = body.get("size_limit", 0)
        if not isinstance(limit, int) or limit < 0:
            raise invalid(f"size_limit {limit!r} is not a number of bytes")
        entries = _entries(body)
        self._make(home, medium, limit)
        if kind == "atomic":
            version = body.get("version")
            if not isinstance(version, str) or not VERSION.match(version) or version in ("..data", "..data_tmp"):
                raise invalid(f"version {version!r} is not a '..' directory name")
            self._swap(home, version, entries)
        elif kind == "file":
            data = entries[0]["data"] if entries and "data" in entries[0] else b""
            mode = entries[0]["mode"] if entries and "data" in entries[0] else 0o644
            target = home / "file"
            if not target.exists():
                _write_tree(home, [{"path": "file", "data": data, "mode": mode}])
            return {"path": str(target)}
        elif kind == "tree":
            shipped = self._dir / f"{name}.shipped"  # beside the volume: the container never sees it
            if not shipped.exists():
                _write_tree(home, entries)
                shipped.touch()  # a repeat of the same PUT changes nothing
            return {"path": str(home)}
        return {"path": str(home), **({"version": body["version"]} if kind == "atomic" else {})}

    def _make(self, home: Path, medium: str, limit: int) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        if medium == "disk":
            home.mkdir(mode=0o755, exist_ok=True)
            return
        if is_mount_point(home):
            return
        home.mkdir(mode=0o755, exist_ok=True)
        size = limit or DEFAULT_MEMORY_LIMIT
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755,nosuid,nodev", "tmpfs", str(home)],
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cannot make a memory volume: {done.stderr.strip()}")
        _log.info("volume_made", volume=home.name, medium=medium, size_limit=limit)

    def _swap(self, home: Path, version: str, entries: list[dict[str, Any]]) -> None:
        """The kubelet's AtomicWriter, replayed: new version beside the old, `..data`
        renamed over, the visible links made to match, the old versions removed."""
        data_link = home / "..data"
        try:
            if os.readlink(data_link) == version:
                return  # idempotent: this version is the one in place
        except FileNotFoundError:
            pass
        files = [e for e in entries if not e["path"].startswith("..")]
        staged = home / version
        if staged.exists():
            shutil.rmtree(staged)  # a half-written try of the same version
        staged.mkdir(mode=0o755)
        _write_tree(staged, files)
        tmp = home / "..data_tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(version, tmp)
        os.rename(tmp, data_link)
        visible = {e["path"].split("/", 1)[0] for e in files}
        for top in visible:
            link = home / top
            if not link.is_symlink():
                os.symlink(f"..data/{top}", link)
        for entry in os.scandir(home):
            if entry.name.startswith(".."):
                if entry.name not in ("..data", version) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name not in visible and entry.is_symlink():
                os.unlink(entry.path)
        _log.info("volume_version", volume=home.name, version=version)

    # -- GET /v1/volumes/{name}/file --------------------------------------------------------

    def read_file(self, name: str) -> bytes:
        """The first bytes of a file volume (a termination message), never through a link."""
        target = self.path(name) / "file"
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise not_found(f"no file volume {name}") from None
        try:
            return os.read(fd, READ_BACK_MAX)
        finally:
            os.close(fd)

    # -- DELETE /v1/volumes/{name} -----------------------------------------------------------

    def delete(self, name: str) -> None:
        home = self.path(name)
        if is_mount_point(home):
            subprocess.run(["umount", "-l", str(home)], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
