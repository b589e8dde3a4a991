"""The pull path the node offers its cells, against the real registry on 127.0.0.1:5000."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil

import aiohttp
import pytest

from kiyot_py.registry.client import ACCEPT_MANIFESTS
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.pullpath import PullPath, cell_reference, registry_host, registry_key
from kiyot_py.registry.reference import parse_reference
from tests.registry.conftest import free_port
from tests.registry.fake import PASSWORD, USER, sha


def test_registry_key_round_trip():
    assert registry_key("127.0.0.1:5000") == "127.0.0.1_5000"
    assert registry_key("docker.io") == "docker.io"
    assert registry_key("Registry.K8s.io") == "registry.k8s.io"
    assert registry_key("my-host:80") == "my-host_80"
    for host in ("127.0.0.1:5000", "docker.io", "localhost", "quay.io:443"):
        assert registry_host(registry_key(host)) == host
    with pytest.raises(ValueError):
        registry_key("[::1]:5000")
    with pytest.raises(ValueError):
        registry_host("a_b_c")


def test_cell_reference():
    d = "sha256:" + "ab" * 32
    ref = parse_reference("127.0.0.1:5000/test/busybox:latest")
    assert cell_reference("10.89.0.1:5380", ref, d) == f"10.89.0.1:5380/127.0.0.1_5000/test/busybox@{d}"
    assert cell_reference("10.89.0.1:5380", parse_reference("busybox")) == \
        "10.89.0.1:5380/docker.io/library/busybox:latest"
    # What the cell pulls is itself a valid reference on the pull path's host.
    parsed = parse_reference(cell_reference("10.89.0.1:5380", ref, d))
    assert parsed.registry == "10.89.0.1:5380" and parsed.digest == d


@pytest.fixture
async def pull_path():
    pp = PullPath(RegistriesConfig())
    await pp.start("127.0.0.1", free_port())
    yield pp
    await pp.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def _path(ref_s: str) -> tuple[str, str]:
    ref = parse_reference(ref_s)
    return f"{registry_key(ref.registry)}/{ref.repository}", ref.tag or "latest"


async def test_root(pull_path, http):
    base = f"http://{pull_path.address}"
    # Without Authorization: a Basic challenge, so that skopeo sends the credentials it has.
    async with http.get(f"{base}/v2/") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic ")
    async with http.get(f"{base}/v2/", headers={"Authorization": "Basic Og=="}) as r:
        assert r.status == 200 and await r.json() == {}
    async with http.head(f"{base}/v2/", headers={"Authorization": "Basic Og=="}) as r:
        assert r.status == 200
    async with http.post(f"{base}/v2/") as r:
        assert r.status == 405


async def test_root_without_challenge(http):
    pp = PullPath(RegistriesConfig(), basic_challenge=False)
    await pp.start("127.0.0.1", 0)
    try:
        async with http.get(f"http://{pp.address}/v2/") as r:
            assert r.status == 200 and await r.json() == {}
    finally:
        await pp.stop()


async def test_manifest_and_blob(pull_path, http, test_images):
    image = test_images["busybox"]
    name, tag = _path(image.ref)
    base = f"http://{pull_path.address}/v2/{name}"

    async with http.get(f"{base}/manifests/{tag}", headers={"Accept": ACCEPT_MANIFESTS}) as r:
        assert r.status == 200
        body = await r.read()
        assert r.headers["Docker-Content-Digest"] == image.manifest_digest
        assert r.headers["Content-Type"] == image.media_type
        assert int(r.headers["Content-Length"]) == len(body)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest
    manifest = json.loads(body)

    async with http.head(f"{base}/manifests/{image.manifest_digest}", headers={"Accept": ACCEPT_MANIFESTS}) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(body)
        assert await r.read() == b""

    layer = manifest["layers"][0]
    async with http.get(f"{base}/blobs/{layer['digest']}") as r:
        assert r.status == 200
        h = hashlib.sha256()
        n = 0
        async for chunk in r.content.iter_chunked(65536):
            h.update(chunk)
            n += len(chunk)
        assert int(r.headers["Content-Length"]) == n == layer["size"]
    assert f"sha256:{h.hexdigest()}" == layer["digest"]

    async with http.get(f"{base}/blobs/{manifest['config']['digest']}", headers={"Range": "bytes=0-9"}) as r:
        assert r.status in (200, 206)
        if r.status == 206:
            assert await r.read() == (await _config(http, base, manifest))[:10]


async def _config(http, base, manifest) -> bytes:
    async with http.get(f"{base}/blobs/{manifest['config']['digest']}") as r:
        return await r.read()


async def test_errors_pass_through(pull_path, http, test_images):
    name, _ = _path(test_images["busybox"].ref)
    base = f"http://{pull_path.address}/v2"
    async with http.get(f"{base}/{name}/manifests/no-such-tag", headers={"Accept": ACCEPT_MANIFESTS}) as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    async with http.delete(f"{base}/{name}/manifests/latest") as r:
        assert r.status == 405
    async with http.put(f"{base}/{name}/blobs/uploads/") as r:
        assert r.status == 405
    async with http.get(f"{base}/{name}/tags/list") as r:
        assert r.status == 404
    async with http.get(f"{base}/127.0.0.1_5000/UPPER/manifests/latest") as r:
        assert r.status == 400 and "lowercase" in (await r.json())["errors"][0]["message"]
    async with http.get(f"{base}/{name}/blobs/latest") as r:
        assert r.status == 400
    async with http.get(f"{base}/127.0.0.1_{free_port()}/x/manifests/latest") as r:
        assert r.status == 502


async def test_mirror_config_on_the_pull_path(http, test_images, registry):
    image = test_images["busybox-oci"]
    repo = parse_reference(image.ref).repository
    config = RegistriesConfig.parse(
        f'[[registry]]\nprefix = "registry.k8s.io"\nlocation = "{registry}"\ninsecure = true\n'
        f'[[registry]]\nprefix = "blocked.example"\nblocked = true\n'
    )
    pp = PullPath(config)
    await pp.start("127.0.0.1", 0)
    try:
        base = f"http://{pp.address}/v2"
        manifest_url = f"{base}/registry.k8s.io/{repo}/manifests/latest"
        async with http.get(manifest_url, headers={"Accept": ACCEPT_MANIFESTS}) as r:
            assert r.status == 200
            assert sha(await r.read()) == image.manifest_digest
        async with http.get(f"{base}/blocked.example/{repo}/manifests/latest") as r:
            assert r.status == 403 and "blocked" in await r.text()
    finally:
        await pp.stop()


BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


async def test_forwards_authorization_and_follows_redirects(pull_path, http, fake):
    base = f"http://{pull_path.address}/v2/{registry_key(fake.host)}"
    async with http.get(f"{base}/basic/app/manifests/latest") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="fake"'
    async with http.get(f"{base}/basic/app/manifests/latest", headers={"Authorization": BASIC}) as r:
        assert r.status == 200 and sha(await r.read()) == sha(fake.manifest)
    layer = sha(fake.layer)
    async with http.get(f"{base}/open/app/blobs/{layer}", headers={"Authorization": "Basic Og=="}) as r:
        assert r.status == 200 and sha(await r.read()) == layer
    assert any(req[1] == f"/storage/{layer}" for req in fake.requests)
    # Empty credentials are not forwarded.
    assert all(req[2] != "Basic Og==" for req in fake.requests)


async def test_bearer_upstream_token_flow_on_the_node(pull_path, http, fake):
    base = f"http://{pull_path.address}/v2/{registry_key(fake.host)}"
    for _ in range(2):
        async with http.get(f"{base}/bearer/app/manifests/latest", headers={"Authorization": BASIC}) as r:
            assert r.status == 200 and sha(await r.read()) == sha(fake.manifest)
    assert len([req for req in fake.requests if req[1].startswith("/token")]) == 1  # cached
    async with http.get(f"{base}/bearer/app/manifests/latest",
                        headers={"Authorization": "Basic " + base64.b64encode(b"alice:bad-pw").decode()}) as r:
        assert r.status == 401
        text = await r.text()
        assert "incorrect username or password" in text and "bad-pw" not in text


async def _skopeo(source: str, dest, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false", *extra, f"docker://{source}", f"oci:{dest}:x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode()


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
@pytest.mark.parametrize("kind", ["basic", "bearer"])
async def test_skopeo_with_credentials(pull_path, fake, tmp_path, kind):
    source = f"{pull_path.address}/{registry_key(fake.host)}/{kind}/app@{sha(fake.manifest)}"
    code, out = await _skopeo(source, tmp_path / "no-creds", "--src-no-creds")
    assert code != 0 and "unauthorized" in out.lower(), out
    code, out = await _skopeo(source, tmp_path / "creds", "--src-creds", f"{USER}:{PASSWORD}")
    assert code == 0, out
    index = json.loads((tmp_path / "creds" / "index.json").read_text())
    assert len(index["manifests"]) == 1
    assert any(req[2] and req[2].startswith("Basic ") for req in fake.requests)  # the cell's creds went up


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_skopeo_copies_through_the_pull_path(pull_path, test_images, tmp_path):
    for key in ("busybox", "busybox-index"):
        image = test_images[key]
        ref = parse_reference(image.ref)
        source = cell_reference(pull_path.address, ref, image.manifest_digest)
        assert source.startswith(f"{pull_path.address}/127.0.0.1_5000/")
        dest = tmp_path / key
        code, out = await _skopeo(source, dest, "--src-no-creds")  # as the cell agent runs it
        assert code == 0, out
        index = json.loads((dest / "index.json").read_text())
        (entry,) = index["manifests"]
        manifest = json.loads((dest / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes())
        # Every blob arrived whole (skopeo verified digests on the way; check again).
        for desc in [manifest["config"], *manifest["layers"]]:
            blob = (dest / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
            assert len(blob) == desc["size"] and sha(blob) == desc["digest"]


async def test_pull_path_mirrors_fall_back(http, test_images, registry):
    image = test_images["busybox"]
    ref = parse_reference(image.ref)
    config = RegistriesConfig.parse(
        f"""
        [[registry]]
        prefix = "{registry}"
        location = "{registry}"
        [[registry.mirror]]
        location = "127.0.0.1:{free_port()}/dead"
        [[registry.mirror]]
        location = "{registry}/nothing-here"
        """
    )
    pp = PullPath(config)
    await pp.start("127.0.0.1", 0)
    try:
        url = f"http://{pp.address}/v2/{registry_key(registry)}/{ref.repository}/manifests/{image.manifest_digest}"
        async with http.get(url, headers={"Accept": ACCEPT_MANIFESTS}) as r:
            assert r.status == 200 and sha(await r.read()) == image.manifest_digest
    finally:
        await pp.stop()
