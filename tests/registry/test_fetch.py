"""The node fetches images into its content store, and credentials go only where they belong.

PullImage's fetch writes the platform manifest, the config and every layer, each checked
against its digest and size before it lands; a registry that lies gets nothing stored.
Credentials are sent to the host they were given for (the CRI's `server_address`, else
the image's registry), never to a mirror on another host (issue #12 point 3).
"""

from __future__ import annotations

import hashlib

import pytest

from kiyot_py.model import Credentials
from kiyot_py.platforms import Platform
from kiyot_py.registry.client import RegistryClient, RegistryError, credentials_host
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.reference import parse_reference
from tests.registry.fake import PASSWORD, USER, FakeRegistry, sha
from tests.support import images

HOST = Platform("linux", images.host_arch())
AMD64 = Platform("linux", "amd64")


@pytest.fixture
async def client():
    c = RegistryClient(connect_timeout=5, read_timeout=10)
    yield c
    await c.close()


@pytest.fixture
async def mirror():
    """A second registry, on another host:port: the mirror that must never get credentials."""
    m = FakeRegistry()
    await m.start()
    yield m
    await m.stop()


async def test_a_pull_fetches_every_blob_into_the_store(client, test_images, tmp_path):
    store = ContentStore(tmp_path / "content")
    img = test_images["busybox-index"]
    got = await client.resolve(parse_reference(img.digest_ref), platform=HOST, config=RegistriesConfig(), store=store)
    blobs = store.manifest_blobs(got.platform_manifest_digest)
    assert got.platform_manifest_digest != img.manifest_digest  # the host's manifest, not the index
    assert blobs[0] == got.platform_manifest_digest and got.config_digest in blobs and len(blobs) >= 3
    for digest in blobs:
        data = store.read(digest)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert oct(store.path(digest).stat().st_mode & 0o777) == "0o444"
    assert not store.has(img.manifest_digest)  # cells run a platform's manifest, never the index
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


async def test_present_blobs_are_not_fetched_again(client, fake, tmp_path):
    store = ContentStore(tmp_path / "content")
    ref = parse_reference(f"{fake.host}/open/app:latest")  # its blobs redirect to /storage
    await client.resolve(ref, platform=AMD64, config=RegistriesConfig(), store=store)
    assert store.has(sha(fake.layer))
    assert any(path == f"/storage/{sha(fake.layer)}" for _, path, _ in fake.requests)
    fake.requests.clear()
    await client.resolve(ref, platform=AMD64, config=RegistriesConfig(), store=store)
    assert not any(path.endswith(sha(fake.layer)) for _, path, _ in fake.requests)  # the config is read again


async def test_a_layer_that_does_not_match_its_digest_is_not_stored(client, fake, tmp_path):
    store = ContentStore(tmp_path / "content")
    layer = sha(fake.layer)
    fake.blobs[layer] = b"x" * len(fake.layer)  # the same length, other bytes
    with pytest.raises(RegistryError, match=f"layer {layer}: blob digest mismatch"):
        await client.resolve(parse_reference(f"{fake.host}/basic/app:latest"), platform=AMD64,
                             auth=Credentials(USER, PASSWORD), config=RegistriesConfig(), store=store)
    fake.blobs[layer] = fake.layer * 2  # longer than its descriptor says
    with pytest.raises(RegistryError, match="longer than its descriptor"):
        await client.resolve(parse_reference(f"{fake.host}/basic/app:latest"), platform=AMD64,
                             auth=Credentials(USER, PASSWORD), config=RegistriesConfig(), store=store)
    assert not store.has(layer) and not store.has(sha(fake.manifest))  # no manifest without its layers
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def _basic_headers(registry: FakeRegistry) -> list[str]:
    return [auth for _, _, auth in registry.requests if auth and auth.startswith("Basic ")]


async def test_credentials_never_go_to_a_mirror_on_another_host(client, fake, mirror, tmp_path):
    config = RegistriesConfig.parse(
        f'[[registry]]\nlocation = "{fake.host}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n')
    store = ContentStore(tmp_path / "content")
    got = await client.resolve(parse_reference(f"{fake.host}/basic/app:latest"), platform=AMD64,
                               auth=Credentials(USER, PASSWORD), config=config, store=store)
    assert got.endpoint == fake.host  # the mirror asked for credentials, had none, and was passed over
    assert mirror.requests and _basic_headers(mirror) == []
    assert _basic_headers(fake)


async def test_credentials_go_only_to_the_host_they_name(client, fake, tmp_path):
    ref = parse_reference(f"{fake.host}/basic/app:latest")
    elsewhere = Credentials(USER, PASSWORD, server_address="https://registry.example/v1/")
    with pytest.raises(RegistryError, match="no credentials were given"):
        await client.resolve(ref, platform=AMD64, auth=elsewhere, config=RegistriesConfig())
    assert _basic_headers(fake) == []
    for named in (f"https://{fake.host}/v1/", fake.host, f"{fake.host}/basic"):
        await client.resolve(ref, platform=AMD64, auth=Credentials(USER, PASSWORD, named), config=RegistriesConfig())
    assert _basic_headers(fake)


def test_the_host_credentials_are_for():
    assert credentials_host("", "quay.io") == "quay.io"
    assert credentials_host("https://index.docker.io/v1/", "docker.io") == "docker.io"
    assert credentials_host("registry-1.docker.io", "quay.io") == "docker.io"
    assert credentials_host("http://user@Registry.Example:5000/path", "x") == "registry.example:5000"
