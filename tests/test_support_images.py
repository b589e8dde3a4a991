"""The pushed test images read back with a real client (skopeo), as a runtime would."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from tests.support import images

NON_EVIL = ["busybox", "busybox-oci", "busybox-index", "app"]
EVIL = ["evil-dotdot", "evil-abs", "evil-hardlink", "evil-symlink"]


def skopeo(*args: str) -> bytes:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is not installed: run scripts/setup.sh", pytrace=False)
    out = subprocess.run(["skopeo", *args], check=False, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def raw(ref: str) -> bytes:
    return skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_every_image_is_there(test_images):
    assert set(test_images) == set(NON_EVIL + EVIL)
    for short, t in test_images.items():
        assert t.ref == f"127.0.0.1:5000/test/{short}:latest"


@pytest.mark.parametrize("short", NON_EVIL)
def test_manifest_reads_back(test_images, short):
    t = test_images[short]
    body = raw(t.ref)
    assert sha(body) == t.manifest_digest
    assert json.loads(body)["mediaType"] == t.media_type
    assert raw(t.digest_ref) == body


def test_busybox_is_docker_schema2_with_two_tags(test_images):
    t = test_images["busybox"]
    assert t.media_type == images.DOCKER_MANIFEST
    assert sha(raw("127.0.0.1:5000/test/busybox:1.36")) == t.manifest_digest
    m = json.loads(raw(t.ref))
    assert m["config"]["mediaType"] == images.DOCKER_CONFIG
    assert [layer["mediaType"] for layer in m["layers"]] == [images.DOCKER_LAYER]
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", "docker://127.0.0.1:5000/test/busybox"))
    assert {"latest", "1.36"} <= set(tags["Tags"])
    cfg = json.loads(skopeo("inspect", "--tls-verify=false", "--config", f"docker://{t.ref}"))
    assert cfg["config"]["Cmd"] == ["sh"]
    assert cfg["architecture"] == images.host_arch() and cfg["os"] == "linux"


def test_oci_images_differ_from_busybox_by_id(test_images):
    ids = [test_images[s].config_digest for s in NON_EVIL + EVIL]
    assert len(set(ids)) == len(ids)
    assert test_images["busybox-oci"].media_type == images.OCI_MANIFEST


def test_index_resolves_to_the_host_arch(test_images):
    t = test_images["busybox-index"]
    assert t.media_type == images.OCI_INDEX
    index = json.loads(raw(t.ref))
    archs = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert set(archs) == {images.host_arch(), images.other_arch()}
    assert archs[images.host_arch()] == t.platforms[images.host_arch()][0]
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{t.ref}"))
    assert info["Digest"] == t.manifest_digest
    assert info["Architecture"] == images.host_arch()
    cfg = skopeo("inspect", "--tls-verify=false", "--config", "--raw", f"docker://{t.ref}")
    assert sha(cfg) == t.config_digest
    other = skopeo("inspect", "--tls-verify=false", "--override-arch", images.other_arch(),
                   "--config", "--raw", f"docker://{t.ref}")
    assert sha(other) == t.platforms[images.other_arch()][1] != t.config_digest
    assert json.loads(other)["architecture"] == images.other_arch()


def test_app_config(test_images):
    t = test_images["app"]
    cfg_raw = skopeo("inspect", "--tls-verify=false", "--config", "--raw", f"docker://{t.ref}")
    assert sha(cfg_raw) == t.config_digest
    c = json.loads(cfg_raw)["config"]
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["echo default-cmd"]
    assert "GREETING=hello" in c["Env"] and c["WorkingDir"] == "/home/app"
    assert c["User"] == "app" and c["StopSignal"] == "SIGUSR1" and c["Labels"]
    assert len(json.loads(raw(t.ref))["layers"]) == 2


@pytest.mark.parametrize("short", EVIL)
def test_evil_manifests_are_pushed(test_images, short):
    t = test_images[short]
    assert sha(raw(t.ref)) == t.manifest_digest
    assert len(json.loads(raw(t.ref))["layers"]) == 2


def test_digests_are_stable(test_images, registry):
    again = images.push_test_images(registry)
    assert {k: (v.manifest_digest, v.config_digest) for k, v in again.items()} == \
        {k: (v.manifest_digest, v.config_digest) for k, v in test_images.items()}


def test_busybox_rootfs_contents():
    layer = images.make_layer(images.busybox_rootfs_entries())
    import gzip
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["tmp"].mode == 0o1777
        assert (members["home/app"].uid, members["home/app"].gid) == (1000, 1000)
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
        assert b"hello from kiyot" in tar.extractfile("www/index.html").read()
        assert b"extra:x:2000:app" in tar.extractfile("etc/group").read()
