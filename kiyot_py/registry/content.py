"""The node's content store: every blob of every image the node pulled, by digest.

PullImage fetches an image's manifest, config and layers here (the node authenticates
upstream; the credentials never leave it), and cells fetch them from here through the
pull path, by digest only. One directory, laid out as an OCI image layout's blobs:

    <dir>/blobs/sha256/<hex>     complete, verified blobs (written once, then read-only)
    <dir>/ingest/                blobs being written; emptied at start (a crash leaves them)

A blob lands only after its bytes hash to its digest and its length matches the
descriptor: a registry that sends anything else gets nothing stored. Blobs are shared by
every image that names them; `collect` removes those no image record names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import structlog

log = structlog.get_logger("kiyot.registry.content")

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ContentError(Exception):
    """A blob did not match its digest or its size; nothing was stored."""


class ContentStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._blobs = directory / "blobs" / "sha256"
        self._ingest = directory / "ingest"
        self._blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._ingest, ignore_errors=True)  # what a crash left half-written
        self._ingest.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self._blobs / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def manifest_blobs(self, manifest_digest: str) -> list[str]:
        """An image manifest's digest with its config's and its layers': what a cell fetches
        to run it. [] when the store lacks the manifest."""
        try:
            manifest = json.loads(self.read(manifest_digest))
        except (FileNotFoundError, ValueError):
            return []
        digests = [manifest_digest]
        for d in [manifest.get("config"), *(manifest.get("layers") or [])]:
            if isinstance(d, dict) and isinstance(d.get("digest"), str) and DIGEST_RE.match(d["digest"]):
                digests.append(d["digest"])
        return digests

    def put(self, digest: str, data: bytes) -> None:
        """A small blob held in memory (a manifest, a config), checked like any other."""
        if self.has(digest):
            return
        with self._ingesting(digest, len(data)) as (out, hasher):
            hasher.update(data)
            out.write(data)

    async def put_stream(self, digest: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        """A blob from a stream, never held whole in memory; refused past `size` bytes."""
        if self.has(digest):
            return
        with self._ingesting(digest, size) as (out, hasher):
            written = 0
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise ContentError(f"blob {digest} is longer than its descriptor's {size} bytes")
                hasher.update(chunk)
                out.write(chunk)

    def collect(self, keep: set[str]) -> int:
        """Remove every blob not in `keep`; the bytes freed. The caller makes sure no pull
        is writing meanwhile (ImageManager runs it between pulls)."""
        freed = 0
        for blob in self._blobs.iterdir():
            digest = f"sha256:{blob.name}"
            if digest in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                freed += blob.stat().st_size
                blob.unlink()
        if freed:
            log.info("content store collected", freed=freed)
        return freed

    @contextlib.contextmanager
    def _ingesting(self, digest: str, size: int) -> Iterator[tuple[BinaryIO, Any]]:
        final = self.path(digest)
        fd, tmp = tempfile.mkstemp(dir=self._ingest, prefix=final.name[:12] + ".")
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                yield out, hasher
                if out.tell() != size:
                    raise ContentError(f"blob {digest} is {out.tell()} bytes, its descriptor says {size}")
                actual = f"sha256:{hasher.hexdigest()}"
                if actual != digest:
                    raise ContentError(f"blob digest mismatch: asked for {digest}, got {actual}")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
