"""Image pulls into the cell's one OCI layout, so layers are shared between containers.

`skopeo copy docker://<pull-path>/<name>@<digest> oci:<layout>:<digest-hex>`: the cell
fetches from the node's pull path only (never a registry), over TLS with the cell's own
certificate as its client identity (`--tls-dir`), and with no credentials: the node
fetched the image with them and serves it by digest. Pulling *by digest* makes skopeo
verify the manifest against what the node resolved. Every new
layer is then checked (layercheck) before anything may unpack it; a refused pull removes
what it added. Pulls are serialized per cell; unpacks share the layout with each other
but never with a pull writing it. Each image is unpacked once per cell; its containers
get overlays on that one tree. Every layer is checked against the config's diff_id too
(what umoci will verify), and every helper (skopeo, umoci) runs under a bound past which
it is killed, so a stuck one never keeps the image locks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layercheck, log
from .config import AgentConfig
from .errors import ApiError, conflict, invalid
from .records import atomic_write_json
from .runtime import die_with_parent

_log = log.get("images")
# Bounds on the helpers the agent runs (seconds): past one the helper is killed, what it
# left is removed and the image locks are free again. A pull's bound is the agent's
# `pull_timeout` (AgentConfig); the others are these.
UNPACK_TIMEOUT = 120.0   # each step of one image's unpack (tree, then config.json)
GC_TIMEOUT = 120.0       # `umoci gc` of the layout
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REF_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._\-]*(:[0-9]+)?(/[a-zA-Z0-9._\-]+)+$")
REF_ANNOTATION = "org.opencontainers.image.ref.name"


class RWLock:
    """Many readers (unpacks) or one writer (a pull)."""

    def __init__(self) -> None:
        self._readers = 0
        self._cond = asyncio.Condition()
        self._writer = False

    async def acquire_read(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


def split_ref(ref: str, digest: str) -> str:
    """Turn the node's ref into `name@digest`, refusing one that names another digest."""
    name, _, ref_digest = ref.partition("@")
    if ref_digest and ref_digest != digest:
        raise invalid(f"ref digest {ref_digest} differs from digest {digest}")
    # Drop a tag: a ':' after the last '/' (a ':' before it is a registry port).
    parts = name.rsplit("/", 1)
    if len(parts) == 2 and ":" in parts[1]:
        name = parts[0] + "/" + parts[1].split(":", 1)[0]
    if not REF_NAME_RE.match(name):
        raise invalid(f"malformed image reference {ref!r} (want host[:port]/path[:tag][@digest])")
    return f"{name}@{digest}"


MAX_SOURCES = 8


@dataclass(frozen=True)
class Source:
    """One place a pull may fetch from: the node's pull path, or (a cell that pulls for
    itself) a registry or mirror, with the pod's credentials for it if it needs any."""

    ref: str  # host[:port]/path@digest
    direct: bool = False
    tls_verify: bool = True
    auth: dict[str, str] | None = field(default=None, repr=False)  # as in an auth.json entry

    @property
    def host(self) -> str:
        return self.ref.split("/", 1)[0]


def _sources(body: dict[str, Any], digest: str, direct_pulls: bool) -> list[Source]:
    """The pull's sources: `ref` (the node's pull path), or `sources` (registries; only a
    cell started with --direct-pulls takes them, and credentials only there)."""
    if "sources" not in body:
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise invalid("'ref' (or 'sources') is required")
        if "auth" in body:
            raise invalid("credentials never reach a cell that fetches from the node: the node fetched the image")
        return [Source(split_ref(ref, digest))]
    if not direct_pulls:
        raise invalid("this cell fetches images from the node's pull path only ('ref'), never from a registry")
    given = body["sources"]
    if not isinstance(given, list) or not 1 <= len(given) <= MAX_SOURCES:
        raise invalid(f"'sources' must be a list of 1 to {MAX_SOURCES} sources")
    sources = []
    for s in given:
        if not isinstance(s, dict) or not isinstance(s.get("ref"), str):
            raise invalid("each source needs a 'ref'")
        tls_verify = s.get("tls_verify", True)
        if not isinstance(tls_verify, bool):
            raise invalid("'tls_verify' must be true or false")
        auth = s.get("auth")
        entry: dict[str, str] | None = None
        if auth is not None:
            if not isinstance(auth, dict):
                raise invalid("'auth' must be an object")
            if isinstance(auth.get("identity_token"), str) and auth["identity_token"]:
                entry = {"identitytoken": auth["identity_token"]}
            elif isinstance(auth.get("username"), str) and isinstance(auth.get("password"), str):
                entry = {"auth": base64.b64encode(f"{auth['username']}:{auth['password']}".encode()).decode()}
            else:
                raise invalid("'auth' needs username and password, or identity_token")
        sources.append(Source(split_ref(s["ref"], digest), direct=True, tls_verify=tls_verify, auth=entry))
    return sources


def _memory_file(data: bytes) -> int:
    """A file in memory only (memfd) holding `data`, at offset 0; the caller closes it."""
    fd = os.memfd_create("kiyot-pull-auth", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class ImageStore:
    cfg: AgentConfig
    lock: RWLock = field(default_factory=RWLock)
    _pull_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Layer digest -> the digest of its uncompressed stream, for every layer that passed the check.
    checked: dict[str, str] = field(default_factory=dict)
    _unpack_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def layout(self) -> Path:
        return self.cfg.images_dir / "layout"

    @property
    def _unpacked_dir(self) -> Path:
        return self.cfg.images_dir / "unpacked"

    @property
    def _images_file(self) -> Path:
        return self.cfg.images_dir / "images.json"

    @property
    def _checked_file(self) -> Path:
        return self.cfg.images_dir / "checked-layers.json"

    @property
    def _policy_file(self) -> Path:
        return self.cfg.images_dir / "policy.json"

    @property
    def _registries_file(self) -> Path:
        return self.cfg.images_dir / "registries.conf"

    @property
    def _certs_dir(self) -> Path:
        return self.cfg.images_dir / "pull-certs"

    def load(self) -> None:
        self.cfg.images_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
        if self._images_file.exists():
            self.images = json.loads(self._images_file.read_text())
        if self._checked_file.exists():
            known = json.loads(self._checked_file.read_text())
            # A list is the old form (no diff ids, an older check): every layer is checked again.
            self.checked = {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}
        for leftover in self._unpacked_dir.glob(".tmp-*"):  # an unpack cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        # Accept any signature: integrity comes from pulling by digest, not from a policy
        # file the cell image may or may not carry.
        if not self._policy_file.exists():
            atomic_write_json(self._policy_file, {"default": [{"type": "insecureAcceptAnything"}]})
        # No mirrors, no search: the cell fetches from the node's pull path and nowhere else,
        # whatever registries.conf the cell image carries.
        self._registries_file.write_text("")
        # skopeo's --src-cert-dir: the CA that signs the pull path's certificate, and the
        # cell's own certificate as its client identity (a .cert and .key of one name).
        self._certs_dir.mkdir(mode=0o700, exist_ok=True)
        for name, target in (("ca.crt", "ca.crt"), ("cell.cert", "cell.crt"), ("cell.key", "cell.key")):
            link = self._certs_dir / name
            if not link.is_symlink() or os.readlink(link) != str(self.cfg.tls_dir / target):
                link.unlink(missing_ok=True)
                link.symlink_to(self.cfg.tls_dir / target)

    async def _run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None,
                   pass_fds: tuple[int, ...] = ()) -> tuple[int | None, bytes, bytes]:
        return await _run(argv, timeout, env, pass_fds, die_with_caller=self.cfg.helpers_die_with_agent)

    def has(self, digest: str) -> bool:
        return digest in self.images

    @staticmethod
    def tag(digest: str) -> str:
        return digest.split(":", 1)[1]

    # --- pull -----------------------------------------------------------------------------

    async def pull(self, body: dict[str, Any]) -> dict[str, Any]:
        digest = body.get("digest")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise invalid("'digest' must be sha256:<64 hex>")
        sources = _sources(body, digest, self.cfg.direct_pulls)

        async with self._pull_lock:  # one pull at a time per cell
            if digest in self.images:
                return {"digest": digest, "size": self.images[digest]["size"]}
            await self.lock.acquire_write()
            try:
                failures: list[str] = []
                for source in sources:  # mirrors first, as the node listed them
                    try:
                        return await self._pull_locked(source, digest)
                    except ApiError as e:
                        if e.code != "pull_failed" or source is sources[-1]:
                            if failures:
                                raise ApiError(e.code, "; ".join([*failures, e.message])) from None
                            raise
                        failures.append(e.message)
                raise AssertionError("unreachable: sources is never empty")
            finally:
                await self.lock.release_write()

    async def _pull_locked(self, source: Source, digest: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tag = self.tag(digest)
        blobs_before = self._blob_names()
        src = source.ref
        argv = [self.cfg.skopeo_path, "--policy", str(self._policy_file),
                "--registries-conf", str(self._registries_file), "copy", "--quiet"]
        pass_fds: tuple[int, ...] = ()
        if source.direct:
            # A cell of its own (a VM) at the registry: the pod's credentials, if any, in
            # a memory file skopeo reads by its descriptor (never in argv, never on disk).
            if not source.tls_verify:
                argv.append("--src-tls-verify=false")
            if source.auth is not None:
                pass_fds = (_memory_file(json.dumps({"auths": {source.host: source.auth}}).encode()),)
                argv += ["--src-authfile", f"/dev/fd/{pass_fds[0]}"]
            else:
                argv.append("--src-no-creds")
        else:
            argv += ["--src-no-creds", "--src-cert-dir", str(self._certs_dir)]
        argv += [f"docker://{src}", f"oci:{self.layout}:{tag}"]
        env = dict(os.environ, TMPDIR=str(self.cfg.tmp_dir))
        try:
            rc, out, err = await self._run(argv, self.cfg.pull_timeout, env=env, pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)
        if rc is None:
            await self._undo(tag, blobs_before)
            _log.warning("pull_timeout", src=src, seconds=self.cfg.pull_timeout)
            raise ApiError("pull_failed", f"pull of {src} timed out after {self.cfg.pull_timeout:.0f}s "
                                          "(skopeo was killed)")
        if rc != 0:
            await self._undo(tag, blobs_before)
            msg = (err or out).decode(errors="replace").strip()
            _log.warning("pull_failed", src=src, message=msg)
            raise ApiError("pull_failed", msg or f"skopeo exited {rc}")

        try:
            manifest = self._manifest_for(tag)
            layers = manifest.get("layers", [])
            diff_ids = self._diff_ids(manifest, digest, len(layers))
            for layer, diff_id in zip(layers, diff_ids, strict=True):
                ldigest, mtype = layer["digest"], layer.get("mediaType", "")
                if self.checked.get(ldigest) == diff_id:
                    continue  # checked when another image brought it
                try:
                    if ldigest in self.checked:  # checked, and another config names other bytes
                        raise layercheck.LayerRejected(
                            f"uncompressed digest {self.checked[ldigest]} differs from the image config's "
                            f"diff_id {diff_id}")
                    blob = self.layout / "blobs" / ldigest.replace(":", "/", 1)
                    await asyncio.to_thread(layercheck.check_layer, blob, mtype, diff_id)
                except layercheck.LayerRejected as e:
                    raise ApiError("pull_failed", f"image {digest} refused: layer {ldigest}: {e}") from e
                self.checked[ldigest] = diff_id
        except ApiError as e:
            await self._undo(tag, blobs_before)
            _log.warning("pull_refused", src=src, reason=e.message)
            raise
        size = int(manifest.get("config", {}).get("size", 0)) + sum(
            int(layer.get("size", 0)) for layer in manifest.get("layers", []))
        self.images[digest] = {"size": size, "tag": tag}
        atomic_write_json(self._checked_file, dict(sorted(self.checked.items())))
        atomic_write_json(self._images_file, self.images)
        _log.info("pulled", src=src, size=size, seconds=round(loop.time() - t0, 3))
        return {"digest": digest, "size": size}

    def _blob_names(self) -> set[str]:
        d = self.layout / "blobs" / "sha256"
        return set(os.listdir(d)) if d.is_dir() else set()

    def _index(self) -> dict[str, Any]:
        return json.loads((self.layout / "index.json").read_text())

    def _manifest_for(self, tag: str) -> dict[str, Any]:
        for m in self._index().get("manifests", []):
            if m.get("annotations", {}).get(REF_ANNOTATION) == tag:
                blob = self.layout / "blobs" / m["digest"].replace(":", "/", 1)
                return json.loads(blob.read_text())
        raise ApiError("pull_failed", f"pulled image has no manifest tagged {tag} in the layout")

    def _diff_ids(self, manifest: dict[str, Any], digest: str, n_layers: int) -> list[str]:
        """The image config's `rootfs.diff_ids`: one per layer, each the digest of that
        layer's uncompressed stream (umoci checks the same when it unpacks)."""
        try:
            cfg_blob = self.layout / "blobs" / str(manifest["config"]["digest"]).replace(":", "/", 1)
            diff_ids = json.loads(cfg_blob.read_text())["rootfs"]["diff_ids"]
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ApiError("pull_failed", f"image {digest} refused: its config has no rootfs.diff_ids ({e})") from e
        if not isinstance(diff_ids, list) or len(diff_ids) != n_layers or \
                not all(isinstance(d, str) and DIGEST_RE.match(d) for d in diff_ids):
            raise ApiError("pull_failed", f"image {digest} refused: its config's rootfs.diff_ids do not name "
                                          f"its {n_layers} layers one by one (sha256:<64 hex> each)")
        return diff_ids

    async def _undo(self, tag: str, blobs_before: set[str]) -> None:
        """Remove what a failed pull added: its tag and every blob that was not there before."""

        def undo() -> None:
            self._untag(tag)
            d = self.layout / "blobs" / "sha256"
            for name in self._blob_names() - blobs_before:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / name)
            for p in self.cfg.tmp_dir.iterdir():  # skopeo's leftovers if it was cut short
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

        await asyncio.to_thread(undo)

    # --- shared unpacks -------------------------------------------------------------------

    async def use_shared(self, body: dict[str, Any]) -> dict[str, Any]:
        """Take an image the node unpacked on its own disk (a cell that shares it): its tree
        becomes the containers' lower layer here, read as it is, never written, never
        pulled. The node checked its layers as a pull here would have."""
        digest = body.get("digest")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise invalid("'digest' must be sha256:<64 hex>")
        root = self.cfg.shared_images_dir
        if root is None:
            raise invalid("this cell takes no shared images (it was started without --shared-images)")
        path = body.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise invalid("'path' must be an absolute path")
        real = Path(os.path.realpath(path))  # noqa: ASYNC240 - a few stats of the node's own disk
        if real.parent != root.resolve() or real.name != self.tag(digest):
            raise invalid(f"'path' must be {root}/{self.tag(digest)}, got {path!r}")
        size = body.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid("'size' must be a number of bytes")
        if not (real / "rootfs").is_dir() or not (real / "config.json").is_file():
            raise conflict(f"no unpacked image at {real} (rootfs/ and config.json)")
        async with self._pull_lock:
            known = self.images.get(digest)
            if known is None or known.get("shared") != str(real):
                if known is not None and "shared" not in known:
                    return {"digest": digest, "size": known["size"]}  # pulled here before: keep it
                self.images[digest] = {"size": size, "tag": self.tag(digest),
                                       "shared": str(real)}
                atomic_write_json(self._images_file, self.images)
        return {"digest": digest, "size": self.images[digest]["size"]}

    # --- remove and usage -----------------------------------------------------------------

    async def remove(self, digest: str, in_use: bool) -> None:
        """Forget an image: its unpacked tree, its tag, and the blobs no other image holds.

        `in_use`: a container of the cell still has it as its lower layer (409)."""
        if not DIGEST_RE.match(digest):
            raise invalid("image digest must be sha256:<64 hex>")
        if digest not in self.images:
            return
        if in_use:
            raise conflict(f"image {digest} is in use by a container of this cell")
        if "shared" in self.images[digest]:  # the node's tree: only forgotten here
            async with self._pull_lock:
                del self.images[digest]
                atomic_write_json(self._images_file, self.images)
            _log.info("image_removed", digest=digest, shared=True)
            return
        async with self._pull_lock:
            await self.lock.acquire_write()
            try:
                await asyncio.to_thread(shutil.rmtree, self._unpacked_dir / self.tag(digest), True)
                await asyncio.to_thread(self._untag, self.tag(digest))
                rc, out, err = await self._run([self.cfg.umoci_path, "gc", "--layout", str(self.layout)], GC_TIMEOUT)
                if rc is None:
                    raise ApiError("internal", f"umoci gc did not finish within {GC_TIMEOUT:.0f}s (killed)")
                if rc != 0:
                    raise ApiError("internal", f"umoci gc failed: {(err or out).decode(errors='replace').strip()}")
                del self.images[digest]
                atomic_write_json(self._images_file, self.images)
            finally:
                await self.lock.release_write()
        _log.info("image_removed", digest=digest)

    def _untag(self, tag: str) -> None:
        idx_path = self.layout / "index.json"
        if idx_path.exists():
            idx = self._index()
            idx["manifests"] = [m for m in idx.get("manifests", [])
                                if m.get("annotations", {}).get(REF_ANNOTATION) != tag]
            atomic_write_json(idx_path, idx)

    def usage(self) -> dict[str, int]:
        """Bytes and inodes the cell's images take on its disk (blobs and unpacked trees)."""
        return disk_usage(self.cfg.images_dir)

    # --- unpack ---------------------------------------------------------------------------

    async def unpacked(self, digest: str) -> Path:
        """The image's one unpacked bundle (`rootfs/` and umoci's `config.json`), made on
        first use and shared by every container of the image: each gets an overlay with
        this rootfs as its read-only lower layer, so nothing ever writes to it."""
        if digest not in self.images:
            raise conflict(f"image {digest} has not been pulled in this cell")
        if "shared" in self.images[digest]:
            return Path(self.images[digest]["shared"])
        final = self._unpacked_dir / self.tag(digest)
        async with self._unpack_locks.setdefault(digest, asyncio.Lock()):
            if final.is_dir():
                return final
            # Unpacked aside and renamed into place: a crash never leaves half an image.
            tmp = self._unpacked_dir / f".tmp-{self.tag(digest)}"
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            self._unpacked_dir.mkdir(parents=True, exist_ok=True)
            t0 = asyncio.get_running_loop().time()
            image = f"{self.layout}:{self.tag(digest)}"
            await self.lock.acquire_read()
            try:
                # `umoci raw`, not `umoci unpack`: the same layers and the same config.json,
                # without the mtree manifest `unpack` writes for a later `repack` (never
                # done here), which takes over nine tenths of its time.
                tmp.mkdir()
                rc, out, err = await self._run([self.cfg.umoci_path, "raw", "unpack", "--image", image,
                                           str(tmp / "rootfs")], UNPACK_TIMEOUT)
                if rc == 0:  # the config after the tree: it reads the image's users from it
                    rc, out, err = await self._run([self.cfg.umoci_path, "raw", "runtime-config", "--image", image,
                                               "--rootfs", str(tmp / "rootfs"), str(tmp / "config.json")],
                                              UNPACK_TIMEOUT)
            finally:
                await self.lock.release_read()
            if rc != 0:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                if rc is None:
                    _log.warning("unpack_timeout", digest=digest, seconds=UNPACK_TIMEOUT)
                    raise ApiError("timeout", f"the unpack of image {digest} (umoci) did not finish within "
                                              f"{UNPACK_TIMEOUT:.0f}s; it was killed")
                raise ApiError("internal", f"umoci failed to unpack image {digest}: "
                                           f"{(err or out).decode(errors='replace').strip()}")
            os.rename(tmp, final)
            _log.info("unpacked", digest=digest, seconds=round(asyncio.get_running_loop().time() - t0, 3))
        return final


async def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None,
               pass_fds: tuple[int, ...] = (), die_with_caller: bool = True) -> tuple[int | None, bytes, bytes]:
    """(exit code, stdout, stderr) of a helper; (None, ...) when it ran past `timeout` and
    was killed (and reaped). A cancelled caller kills it too: no helper outlives its request."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds,
        preexec_fn=die_with_parent if die_with_caller else None)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        return None, b"", b""
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode, out, err


def disk_usage(root: Path) -> dict[str, int]:
    """{"bytes", "inodes"} under `root` as the disk counts them: allocated blocks, each
    hard-linked inode once, nothing followed through a symlink or onto another mount."""
    seen: set[int] = set()
    used = 0
    try:
        dev = root.stat().st_dev
    except FileNotFoundError:
        return {"bytes": 0, "inodes": 0}
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != dev or st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            used += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return {"bytes": used, "inodes": len(seen)}
