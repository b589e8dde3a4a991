"""Small, deterministic test images, built in pure Python and pushed over plain HTTP.

The base layer is a busybox rootfs made from the host's Debian `busybox-static`
(/bin/busybox). Every tar entry has a fixed mtime, owner and order and gzip has a fixed
header, so digests are stable from run to run on one machine (they change only with
the busybox binary or zlib).

`push_test_images(registry)` pushes, under `<registry>/test/`:

  busybox          Docker schema 2 manifest, tags `latest` and `1.36` (one manifest)
  busybox-oci      the same rootfs as an OCI manifest
  busybox-index    OCI index: a host-arch manifest and one for another arch (arm64 on amd64)
  app              OCI; busybox plus a small layer; Entrypoint/Cmd/Env/WorkingDir/User/...
  evil-dotdot      busybox plus a layer with an entry `../escape.txt`
  evil-abs         busybox plus a layer with an entry `/abs.txt`
  evil-hardlink    busybox plus a layer with a hard link `x` -> `../../etc/shadow`
  evil-symlink     busybox plus a layer with a symlink `up` -> `../../../../etc`, then `up/escape.txt`

and returns `{short name: TestImage}`. Each image's config carries a label naming it, so
no two repositories share an image id (config digest) except the two busybox tags.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import platform
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

NAMESPACE = "test"
MTIME = 1700000000  # 2023-11-14T22:13:20Z, every tar entry
CREATED = "2023-11-14T22:13:20Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "org.kiyot.test.image"

BUSYBOX_APPLETS = (
    "sh", "echo", "sleep", "cat", "httpd", "wget", "id", "ls", "env", "hostname", "nc",
    "true", "false", "kill", "ps", "pwd", "test", "grep", "mkdir", "touch",
    "tty", "stty", "head", "dd", "sha256sum", "wc", "tr",
)
INDEX_HTML = b"<html><body>hello from kiyot</body></html>\n"
PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\n"
    b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    b"app:x:1000:1000:app:/home/app:/bin/sh\n"
)
GROUP = (
    b"root:x:0:\n"
    b"nogroup:x:65534:\n"
    b"app:x:1000:\n"
    b"extra:x:2000:app\n"
)


@dataclass(frozen=True)
class TestImage:
    """One pushed image. For an index, `manifest_digest`/`media_type` are the index's and
    `config_digest`/`size` those of the host-arch image it resolves to. `size` is the
    config's size plus the compressed layers' sizes."""

    __test__ = False  # not a test class (pytest collects Test*)

    ref: str  # e.g. "127.0.0.1:5000/test/busybox:latest"
    manifest_digest: str
    config_digest: str
    media_type: str
    size: int
    # For an index: architecture -> (manifest digest, config digest) of each entry.
    platforms: dict[str, tuple[str, str]] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """The reference without tag: "127.0.0.1:5000/test/busybox"."""
        return self.ref.rsplit(":", 1)[0]

    @property
    def digest_ref(self) -> str:
        return f"{self.name}@{self.manifest_digest}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_arch() -> str:
    """The host's architecture as OCI/Go spells it."""
    m = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


def other_arch() -> str:
    return "arm64" if host_arch() != "arm64" else "amd64"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --- layers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0


def Dir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)


def File(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, tarfile.REGTYPE, data=data, mode=mode, uid=uid, gid=gid)


def Symlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def Hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, mode=0o644, linkname=target)


def CharDevice(name: str, major: int, minor: int) -> Entry:
    return Entry(name, tarfile.CHRTYPE, mode=0o666, devmajor=major, devminor=minor)


def Fifo(name: str) -> Entry:
    return Entry(name, tarfile.FIFOTYPE, mode=0o644)


@dataclass(frozen=True)
class Layer:
    blob: bytes  # gzip-compressed tar
    diff_id: str  # digest of the uncompressed tar
    digest: str  # digest of the blob

    @property
    def size(self) -> int:
        return len(self.blob)


def tar_bytes_of(entries: list[Entry], end: bool = True) -> bytes:
    """The uncompressed GNU tar of ENTRIES in the given order; without `end`, no end-of-archive
    blocks (a stream another part goes on from)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mtime = MTIME
            info.linkname = e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.type == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                info.size = 0
                tar.addfile(info)
        if not end:
            return raw.getvalue()  # before close() writes the end blocks
    return raw.getvalue()


def layer_of(tar_bytes: bytes, blob: bytes | None = None) -> Layer:
    """A layer of these uncompressed bytes: gzip'd (fixed header), or BLOB as given."""
    if blob is None:
        blob = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    return Layer(blob, sha256(tar_bytes), sha256(blob))


def make_layer(entries: list[Entry], sort: bool = True) -> Layer:
    """A gzip'd tar of ENTRIES, written as given (names are not cleaned: evil ones stay evil)."""
    if sort:
        entries = sorted(entries, key=lambda e: e.name)
    return layer_of(tar_bytes_of(entries))


def busybox_binary() -> bytes:
    for p in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if p and Path(p).is_file():
            return Path(p).read_bytes()
    raise FileNotFoundError("no /bin/busybox: install busybox-static (run scripts/setup.sh)")


def busybox_rootfs_entries() -> list[Entry]:
    entries = [
        Dir("bin"), Dir("dev"), Dir("etc"), Dir("home"), Dir("home/app", uid=1000, gid=1000),
        Dir("proc"), Dir("root", mode=0o700), Dir("run"), Dir("sys"), Dir("tmp", mode=0o1777),
        Dir("www"),
        File("bin/busybox", busybox_binary(), mode=0o755),
        File("etc/passwd", PASSWD), File("etc/group", GROUP),
        File("www/index.html", INDEX_HTML),
    ]
    entries += [Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    return entries


def app_layer_entries() -> list[Entry]:
    return [
        Dir("home/app", uid=1000, gid=1000),
        File("home/app/hello.txt", b"hello from the app layer\n", uid=1000, gid=1000),
        Dir("etc/app"),
        File("etc/app/app.conf", b"greeting=hello\n"),
    ]


EVIL_LAYERS: dict[str, list[Entry]] = {
    "evil-dotdot": [File("../escape.txt", b"escaped via ..\n")],
    "evil-abs": [File("/abs.txt", b"escaped via an absolute name\n")],
    "evil-hardlink": [Hardlink("x", "../../etc/shadow")],
    "evil-symlink": [Symlink("up", "../../../../etc"), File("up/escape.txt", b"escaped via a symlink\n")],
}


# Hostile layers that a tar reader can be made to read differently from Go's (umoci's), and
# special files where the agent or umoci reads the image's users and groups.

def multistream_layer() -> Layer:
    """Two gzip members: the first a tar that simply stops (no end blocks), the second one
    going on with `../../x`. Go's gzip (umoci) reads both; Python's tarfile stream mode,
    the first only, and sees a clean end of archive."""
    first = tar_bytes_of([File("ok.txt", b"first member\n")], end=False)
    second = tar_bytes_of([File("../../x", b"escaped via a second gzip member\n")])
    blob = gzip.compress(first, mtime=0) + gzip.compress(second, mtime=0)
    return layer_of(first + second, blob)


def nul_led_checksum_layer() -> Layer:
    """`a.txt`, then `b.txt` whose checksum field is NUL-led ("\\0" + 6 octal digits + " "),
    then `../../x`. Python's tarfile reads the checksum as 0 and takes the header for the end
    of the archive; Go trims the NULs, finds it right and reads on to `../../x`."""
    raw = bytearray(tar_bytes_of([File("a.txt", b"a\n"), File("b.txt", b"b\n"),
                                  File("../../x", b"escaped past a NUL-led checksum\n")]))
    at = 2 * 512  # a.txt: header and one data block
    assert raw[at:at + 5] == b"b.txt"
    chk = int(raw[at + 148:at + 154], 8)  # as tarfile wrote it: "%06o\0 "
    raw[at + 148:at + 156] = b"\x00" + b"%06o" % chk + b" "
    return layer_of(bytes(raw))


HOSTILE_LAYERS: dict[str, list[Entry] | None] = {
    "hostile-multistream": None,       # multistream_layer()
    "hostile-nulchecksum": None,       # nul_led_checksum_layer()
    "hostile-chardev": [CharDevice("dev-zero", 1, 5)],
    "hostile-fifo-group": [Fifo("etc/group")],          # with User "app"
    "hostile-chardev-passwd": [CharDevice("etc/passwd", 1, 5)],  # with User "app"
}


def push_hostile_images(registry: str, namespace: str = NAMESPACE) -> dict[str, TestImage]:
    """Push, under `<registry>/test/`, busybox plus one hostile layer each (HOSTILE_LAYERS),
    every one with the app's config (User "app"); idempotent. {short name: TestImage}."""
    p = Pusher(registry)
    base = make_layer(busybox_rootfs_entries())
    built = {"hostile-multistream": multistream_layer(), "hostile-nulchecksum": nul_led_checksum_layer()}
    out = {}
    for short, entries in HOSTILE_LAYERS.items():
        layer = built[short] if entries is None else make_layer(entries, sort=False)
        out[short] = p.push_image(f"{namespace}/{short}", ["latest"], host_arch(), [base, layer],
                                  APP_CONFIG, short)
    return out


# --- configs and manifests ---------------------------------------------------------------

def image_config(arch: str, layers: list[Layer], cfg: dict, label: str) -> bytes:
    cfg = dict(cfg)
    cfg["Labels"] = {**cfg.get("Labels", {}), LABEL: label}
    doc = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": f"kiyot tests: layer {i}"}
                    for i in range(len(layers))],
    }
    if arch == "arm64":
        doc["variant"] = "v8"
    return canonical_json(doc)


def manifest_body(config: bytes, layers: list[Layer], docker: bool) -> tuple[bytes, str]:
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                   "size": len(config), "digest": sha256(config)},
        "layers": [{"mediaType": DOCKER_LAYER if docker else OCI_LAYER,
                    "size": layer.size, "digest": layer.digest} for layer in layers],
    }
    return canonical_json(doc), media_type


# --- registry client ---------------------------------------------------------------------

class Pusher:
    """Blob and manifest pushes over the registry's plain-HTTP API (no auth)."""

    def __init__(self, registry: str, user: tuple[str, str] | None = None):
        self.registry = registry
        self._auth = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode() if user else ""
        self.base = f"http://{registry}"
        self._present: set[tuple[str, str]] = set()  # (repo, digest)
        self._where: dict[str, str] = {}  # digest -> a repo that has it (for mounts)

    def _open(self, req: urllib.request.Request, timeout: float = 60):
        if self._auth:
            req.add_header("Authorization", self._auth)
        return urllib.request.urlopen(req, timeout=timeout)

    def has_blob(self, repo: str, digest: str) -> bool:
        req = urllib.request.Request(f"{self.base}/v2/{repo}/blobs/{digest}", method="HEAD")
        try:
            with self._open(req, 30) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if (repo, digest) in self._present:
            return digest
        if not self.has_blob(repo, digest):
            self._upload(repo, digest, data)
        self._present.add((repo, digest))
        self._where.setdefault(digest, repo)
        return digest

    def _upload(self, repo: str, digest: str, data: bytes) -> None:
        url = f"{self.base}/v2/{repo}/blobs/uploads/"
        src = self._where.get(digest)
        if src and src != repo:  # cross-repository mount: no bytes sent
            url += "?" + urllib.parse.urlencode({"mount": digest, "from": src})
        req = urllib.request.Request(url, method="POST", data=b"",
                                     headers={"Content-Length": "0"})
        with self._open(req, 30) as r:
            if r.status == 201:  # mounted
                return
            location = self._absolute(r.headers["Location"])
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}{urllib.parse.urlencode({'digest': digest})}", method="PUT", data=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        with self._open(put, 120) as r:
            if r.status != 201:
                raise RuntimeError(f"blob upload {repo}@{digest}: HTTP {r.status}")

    def push_manifest(self, repo: str, reference: str, media_type: str, body: bytes) -> str:
        digest = sha256(body)
        req = urllib.request.Request(f"{self.base}/v2/{repo}/manifests/{reference}", method="PUT",
                                     data=body, headers={"Content-Type": media_type})
        try:
            with self._open(req, 30) as r:
                if r.status != 201:
                    raise RuntimeError(f"manifest {repo}:{reference}: HTTP {r.status}")
                got = r.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"manifest {repo}:{reference}: HTTP {e.code}: {e.read()[:500]!r}") from e
        if got and got != digest:
            raise RuntimeError(f"manifest {repo}:{reference}: registry says {got}, we computed {digest}")
        return digest

    def push_image(self, repo: str, tags: list[str], arch: str, layers: list[Layer], cfg: dict,
                   label: str, docker: bool = False) -> TestImage:
        config = image_config(arch, layers, cfg, label)
        self.push_blob(repo, config)
        for layer in layers:
            self.push_blob(repo, layer.blob)
        body, media_type = manifest_body(config, layers, docker)
        refs = tags or [sha256(body)]
        for ref in refs:
            digest = self.push_manifest(repo, ref, media_type, body)
        tag = tags[0] if tags else None
        ref = f"{self.registry}/{repo}:{tag}" if tag else f"{self.registry}/{repo}@{digest}"
        return TestImage(ref, digest, sha256(config), media_type,
                         len(config) + sum(layer.size for layer in layers))


# --- the test images ---------------------------------------------------------------------

BUSYBOX_CONFIG = {"Cmd": ["sh"], "Env": [PATH_ENV]}
APP_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo default-cmd"],
    "Env": [PATH_ENV, "GREETING=hello"],
    "WorkingDir": "/home/app",
    "User": "app",
    "StopSignal": "SIGUSR1",
    "Labels": {"org.kiyot.test.role": "app", "org.opencontainers.image.title": "kiyot test app"},
}


def push_busybox(registry: str, user: tuple[str, str] | None = None, repo: str = f"{NAMESPACE}/busybox") -> TestImage:
    """Only the test busybox, to REGISTRY (with `user`'s Basic auth, if it wants one)."""
    return Pusher(registry, user).push_image(repo, ["latest"], host_arch(), [make_layer(busybox_rootfs_entries())],
                                             BUSYBOX_CONFIG, "busybox", docker=True)


def push_test_images(registry: str, namespace: str = NAMESPACE) -> dict[str, TestImage]:
    """Build and push every test image to REGISTRY (host:port, plain HTTP); idempotent."""
    p = Pusher(registry)
    arch = host_arch()
    base = make_layer(busybox_rootfs_entries())
    images: dict[str, TestImage] = {}

    def repo(short: str) -> str:
        return f"{namespace}/{short}"

    images["busybox"] = p.push_image(repo("busybox"), ["latest", "1.36"], arch, [base],
                                     BUSYBOX_CONFIG, "busybox", docker=True)
    images["busybox-oci"] = p.push_image(repo("busybox-oci"), ["latest"], arch, [base],
                                         BUSYBOX_CONFIG, "busybox-oci")

    # An index: the host's arch and another one, each pushed by digest only.
    r = repo("busybox-index")
    entries, per_arch, sizes = [], {}, {}
    for a in (arch, other_arch()):
        img = p.push_image(r, [], a, [base], BUSYBOX_CONFIG, f"busybox-index/{a}")
        manifest_size = len(manifest_body(image_config(a, [base], BUSYBOX_CONFIG, f"busybox-index/{a}"),
                                          [base], False)[0])
        plat = {"architecture": a, "os": "linux"}
        if a == "arm64":
            plat["variant"] = "v8"
        entries.append({"mediaType": OCI_MANIFEST, "digest": img.manifest_digest,
                        "size": manifest_size, "platform": plat})
        per_arch[a] = (img.manifest_digest, img.config_digest)
        sizes[a] = img.size
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    digest = p.push_manifest(r, "latest", OCI_INDEX, index)
    images["busybox-index"] = TestImage(f"{registry}/{r}:latest", digest, per_arch[arch][1],
                                        OCI_INDEX, sizes[arch], platforms=per_arch)

    app = make_layer(app_layer_entries())
    images["app"] = p.push_image(repo("app"), ["latest"], arch, [base, app], APP_CONFIG, "app")

    for short, layer_entries in EVIL_LAYERS.items():
        evil = make_layer(layer_entries, sort=False)
        images[short] = p.push_image(repo(short), ["latest"], arch, [base, evil],
                                     BUSYBOX_CONFIG, short)
    return images


if __name__ == "__main__":  # python -m tests.support.images [registry]
    import sys

    for k, v in push_test_images(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:5000").items():
        print(f"{k:15} {v.ref:50} {v.manifest_digest} {v.media_type}")
