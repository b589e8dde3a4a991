"""Refuse image layers that try to write outside their root.

Checked before any unpack: an absolute name, a `..` component, a hard link whose target
is absolute or climbs out, a symlink whose *relative* target climbs above the root.
Absolute symlink targets are normal in images (`/bin/sh -> /bin/busybox`); umoci resolves
them inside the rootfs, so they are allowed.
"""

from __future__ import annotations

import posixpath
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import IO


class LayerRejected(Exception):
    pass


def _climbs_out(path: str) -> bool:
    norm = posixpath.normpath(path)
    return norm == ".." or norm.startswith("../")


def check_member(m: tarfile.TarInfo) -> str | None:
    """Why this entry is refused, or None if it is fine."""
    name = m.name
    if name.startswith("/"):
        return f"absolute path {name!r}"
    if ".." in name.split("/"):
        return f"'..' in path {name!r}"
    if m.islnk():
        target = m.linkname
        if target.startswith("/"):
            return f"hard link {name!r} -> absolute {target!r}"
        if ".." in target.split("/") or _climbs_out(target):
            return f"hard link {name!r} -> {target!r} leaves the root"
    elif m.issym():
        target = m.linkname
        # A relative target is relative to the link's own directory.
        if not target.startswith("/") and _climbs_out(
            posixpath.join(posixpath.dirname(posixpath.normpath(name)), target)
        ):
            return f"symlink {name!r} -> {target!r} climbs above the root"
    return None


def _open_stream(blob: Path, media_type: str) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    if "zstd" in media_type:
        zstd = shutil.which("zstd")
        if not zstd:
            raise LayerRejected("zstd-compressed layer and no zstd on this cell")
        p = subprocess.Popen([zstd, "-dc", str(blob)], stdout=subprocess.PIPE)
        assert p.stdout is not None
        return p.stdout, p
    return open(blob, "rb"), None


def check_layer(blob: Path, media_type: str) -> None:
    """Raise LayerRejected with a clear reason, reading the layer as a stream (no extraction)."""
    f, proc = _open_stream(blob, media_type)
    try:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for m in tf:
                    why = check_member(m)
                    if why:
                        raise LayerRejected(why)
        except tarfile.TarError as e:
            raise LayerRejected(f"unreadable layer: {e}") from e
    finally:
        f.close()
        if proc is not None:
            proc.kill()
            proc.wait()
