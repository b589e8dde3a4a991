"""The node's registry client against the real registry on 127.0.0.1:5000 (and a fake one
for auth, redirects and misbehaviour)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from dataclasses import dataclass

import pytest

from kiyot_py.platforms import Platform
from kiyot_py.registry.client import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    ImageNotFound,
    PlatformNotFound,
    RegistryClient,
    RegistryError,
    parse_www_authenticate,
    select_platform,
)
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.errors import RegistryBlocked
from kiyot_py.registry.reference import parse_reference
from tests.registry.conftest import free_port
from tests.registry.fake import PASSWORD, TOKEN, USER, sha
from tests.support import images

# The test images are built for this machine; the client is told the platform, always.
HOST = Platform("linux", images.host_arch())


@dataclass
class Creds:
    username: str
    password: str
    server_address: str = ""


@pytest.fixture
async def client():
    c = RegistryClient(connect_timeout=5, read_timeout=10)
    yield c
    await c.close()


# -- real registry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "media_type"),
    [("busybox", MEDIA_TYPE_DOCKER_MANIFEST), ("busybox-oci", MEDIA_TYPE_OCI_MANIFEST)],
)
async def test_resolve_manifest_by_tag_and_digest(client, test_images, key, media_type):
    image = test_images[key]
    ref = parse_reference(image.ref)
    got = await client.resolve(ref, platform=HOST, auth=None, config=RegistriesConfig())
    assert image.media_type == media_type
    assert got.manifest_digest == image.manifest_digest
    assert got.platform_manifest_digest == image.manifest_digest
    assert got.config_digest == image.config_digest
    assert got.size == image.size
    assert got.config["os"] == "linux" and "rootfs" in got.config

    by_digest = await client.resolve(
        ref.with_digest(image.manifest_digest), platform=HOST, auth=None, config=RegistriesConfig()
    )
    assert (by_digest.manifest_digest, by_digest.config_digest, by_digest.size) == (
        got.manifest_digest, got.config_digest, got.size)


async def test_resolve_second_tag(client, test_images):
    image = test_images["busybox"]
    ref = parse_reference(image.ref)
    got = await client.resolve(parse_reference(f"{ref.name}:1.36"), platform=HOST, config=RegistriesConfig())
    assert got.config_digest == image.config_digest


async def test_resolve_index_picks_the_platform_asked_for(client, test_images):
    image = test_images["busybox-index"]
    ref = parse_reference(image.ref)
    got = await client.resolve(ref, platform=HOST, auth=None, config=RegistriesConfig())
    assert image.media_type == MEDIA_TYPE_OCI_INDEX
    assert got.manifest_digest == image.manifest_digest  # RepoDigests name the index
    assert got.platform_manifest_digest != got.manifest_digest
    assert got.config["architecture"] == HOST.architecture
    assert got.platform == HOST
    if HOST.architecture == "amd64":
        assert got.config_digest == image.config_digest
        assert got.size == image.size

    by_digest = await client.resolve(ref.with_digest(image.manifest_digest), platform=HOST, config=RegistriesConfig())
    assert by_digest.platform_manifest_digest == got.platform_manifest_digest
    assert by_digest.config_digest == got.config_digest

    other = images.other_arch()
    alien = await client.resolve(ref, config=RegistriesConfig(), platform=Platform("linux", other))
    assert alien.config["architecture"] == other
    platforms = getattr(image, "platforms", {}) or {}
    if other in platforms:
        assert (alien.platform_manifest_digest, alien.config_digest) == platforms[other]
    assert alien.config_digest != got.config_digest
    assert alien.manifest_digest == got.manifest_digest

    with pytest.raises(PlatformNotFound, match=r"no manifest for platform linux/s390x .*has: linux/amd64, linux/arm64"):
        await client.resolve(ref, config=RegistriesConfig(), platform=Platform("linux", "s390x"))


async def test_missing_tag_and_repository(client, test_images):
    ref = parse_reference(test_images["busybox"].ref)
    with pytest.raises(ImageNotFound) as info:
        await client.resolve(parse_reference(f"{ref.name}:no-such-tag"), platform=HOST, config=RegistriesConfig())
    msg = str(info.value)
    assert "MANIFEST_UNKNOWN: manifest unknown" in msg and "127.0.0.1:5000" in msg, msg

    with pytest.raises(ImageNotFound) as info:
        await client.resolve(
            parse_reference("127.0.0.1:5000/kiyot/no-such-repo:1"), platform=HOST, config=RegistriesConfig()
        )
    assert "UNKNOWN" in str(info.value), str(info.value)

    missing = ref.with_digest("sha256:" + "0" * 64)
    with pytest.raises(ImageNotFound):
        await client.resolve(missing, platform=HOST, config=RegistriesConfig())


async def test_mirror_config_maps_another_registry(client, test_images, registry):
    image = test_images["busybox"]
    repo = parse_reference(image.ref).repository
    config = RegistriesConfig.parse(
        f'[[registry]]\nprefix = "registry.k8s.io"\nlocation = "{registry}"\ninsecure = true\n'
    )
    got = await client.resolve(parse_reference(f"registry.k8s.io/{repo}:latest"), platform=HOST, config=config)
    assert got.manifest_digest == image.manifest_digest
    assert got.config_digest == image.config_digest
    assert got.endpoint == registry


async def test_mirrors_first_and_fall_back(client, test_images, registry):
    image = test_images["busybox-oci"]
    ref = parse_reference(image.ref)
    namespace, _, name = ref.repository.rpartition("/")
    dead = f"127.0.0.1:{free_port()}"
    config = RegistriesConfig.parse(
        f"""
        [[registry]]
        prefix = "mirrored.example/{namespace}"
        location = "{registry}/{namespace}"
        insecure = true
        [[registry.mirror]]
        location = "{dead}/x"
        [[registry.mirror]]
        location = "{registry}/nothing-here"
        [[registry.mirror]]
        location = "{registry}/{namespace}"
        """
    )
    got = await client.resolve(parse_reference(f"mirrored.example/{namespace}/{name}"), platform=HOST, config=config)
    assert got.config_digest == image.config_digest
    assert got.endpoint == f"{registry}/{namespace}"  # the third mirror, not the location

    # Everything fails: the location's error, mirrors' errors after it.
    with pytest.raises(ImageNotFound) as info:
        await client.resolve(parse_reference(f"mirrored.example/{namespace}/nope"), platform=HOST, config=config)
    assert "MANIFEST_UNKNOWN" in str(info.value) or "NAME_UNKNOWN" in str(info.value)
    assert "mirrors tried first" in str(info.value) and dead in str(info.value)


async def test_blocked(client):
    config = RegistriesConfig.parse('[[registry]]\nlocation = "127.0.0.1:5000"\nblocked = true\n')
    with pytest.raises(RegistryBlocked, match="blocked"):
        await client.resolve(parse_reference("127.0.0.1:5000/x"), platform=HOST, config=config)


async def test_unreachable_registry(client):
    port = free_port()
    with pytest.raises(RegistryError, match=f"cannot reach 127.0.0.1:{port}"):
        await client.resolve(parse_reference(f"127.0.0.1:{port}/x"), platform=HOST, config=RegistriesConfig())


# -- fake registry: auth, redirects, lies, cancellation ---------------------------------


async def test_bearer_token_flow(client, fake):
    ref = parse_reference(f"{fake.host}/bearer/app:latest")
    got = await client.resolve(ref, platform=HOST, auth=Creds(USER, PASSWORD), config=RegistriesConfig())
    assert got.manifest_digest == sha(fake.manifest)
    assert got.config_digest == sha(fake.config)
    assert got.size == len(fake.config) + len(fake.layer)
    token_calls = [r for r in fake.requests if r[1].startswith("/token")]
    assert len(token_calls) == 1  # one token serves the manifest and the config blob
    assert fake.requests[-1][2] == f"Bearer {TOKEN}"


async def test_bearer_wrong_password_keeps_secrets_out(client, fake):
    ref = parse_reference(f"{fake.host}/bearer/app:latest")
    with pytest.raises(RegistryError) as info:
        await client.resolve(ref, platform=HOST, auth=Creds(USER, "wrong-horse"), config=RegistriesConfig())
    msg = str(info.value)
    assert "token service" in msg and "incorrect username or password" in msg, msg
    assert "wrong-horse" not in msg and "d3JvbmctaG9yc2U" not in msg


async def test_basic_auth(client, fake):
    ref = parse_reference(f"{fake.host}/basic/app:latest")
    got = await client.resolve(ref, platform=HOST, auth=Creds(USER, PASSWORD), config=RegistriesConfig())
    assert got.config_digest == sha(fake.config)

    with pytest.raises(RegistryError, match="no credentials") as info:
        await client.resolve(ref, platform=HOST, auth=None, config=RegistriesConfig())
    with pytest.raises(RegistryError, match="401 UNAUTHORIZED") as info:
        await client.resolve(ref, platform=HOST, auth=Creds(USER, "nope-pw"), config=RegistriesConfig())
    assert "nope-pw" not in str(info.value)


async def test_blob_redirect_is_followed(client, fake):
    got = await client.resolve(parse_reference(f"{fake.host}/open/app"), platform=HOST, config=RegistriesConfig())
    assert got.config_digest == sha(fake.config)
    assert any(r[1].startswith("/storage/") for r in fake.requests)


async def test_digest_mismatch(client, fake):
    with pytest.raises(RegistryError, match="digest mismatch"):
        await client.resolve(parse_reference(f"{fake.host}/liar/app"), platform=HOST, config=RegistriesConfig())
    # Asking for a digest the content does not have fails the same way.
    wrong = parse_reference(f"{fake.host}/open/app@sha256:{'1' * 64}")
    with pytest.raises(ImageNotFound):
        await client.resolve(wrong, platform=HOST, config=RegistriesConfig())


async def test_cancellation_leaves_nothing_behind(fake):
    client = RegistryClient()
    ref = parse_reference(f"{fake.host}/slow/app")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.resolve(ref, platform=HOST, config=RegistriesConfig()), 0.3)
        # The client still works after a cancelled call …
        got = await client.resolve(parse_reference(f"{fake.host}/open/app"), platform=HOST, config=RegistriesConfig())
        assert got.config_digest == sha(fake.config)
        await client.close()
        await client.close()  # idempotent
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)], [str(w.message) for w in caught]


# -- pure helpers -------------------------------------------------------------------------


def test_parse_www_authenticate():
    got = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert got == [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                               "scope": "repository:library/busybox:pull,push"})]
    assert parse_www_authenticate('Basic realm="Registry Realm"') == [("basic", {"realm": "Registry Realm"})]


def test_select_platform_variants():
    index = {"manifests": [
        {"digest": "a", "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": "b", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "c", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "d", "platform": {"os": "windows", "architecture": "amd64"}},
    ]}
    assert select_platform(index, Platform("linux", "arm", "v7"))["digest"] == "b"
    assert select_platform(index, Platform("linux", "arm", "v6"))["digest"] == "a"
    assert select_platform(index, Platform("linux", "arm64", "v8"))["digest"] == "c"
    assert select_platform(index, Platform("linux", "arm64"))["digest"] == "c"  # v8 is arm64's default
    assert select_platform(index, Platform("linux", "aarch64"))["digest"] == "c"
    assert select_platform(index, Platform("linux", "amd64")) is None


async def test_multi_arch_index_in_the_fake(client, fake):
    ref = parse_reference(f"{fake.host}/multi/app:latest")
    for name, (manifest, config) in fake.platforms.items():
        got = await client.resolve(ref, platform=Platform.parse(name), config=RegistriesConfig())
        assert (got.platform_manifest_digest, got.config_digest) == (manifest, config)
        assert got.manifest_digest == sha(fake.index)
        assert str(got.platform) == name
    with pytest.raises(PlatformNotFound, match=r"linux/s390x .*has: linux/amd64, linux/arm64/v8"):
        await client.resolve(ref, platform=Platform("linux", "s390x"), config=RegistriesConfig())


async def test_slow_mirror_times_out_and_falls_back(fake):
    config = RegistriesConfig.parse(
        f"""
        [[registry]]
        prefix = "example.test/open"
        location = "{fake.host}/open"
        [[registry.mirror]]
        location = "{fake.host}/slow"
        """
    )
    async with RegistryClient(read_timeout=0.3) as client:
        got = await client.resolve(parse_reference("example.test/open/app"), platform=HOST, config=config)
        assert got.endpoint == f"{fake.host}/open"
        with pytest.raises(RegistryError, match=r"ServerTimeoutError|Timeout"):
            await client.resolve(parse_reference(f"{fake.host}/slow/app"), platform=HOST, config=RegistriesConfig())
