"""registries.conf matching: prefixes, mirrors, namespace paths, blocked (no network)."""

from __future__ import annotations

import pytest

from kiyot_py.registry.config import Endpoint, RegistriesConfig, is_loopback
from kiyot_py.registry.errors import RegistriesConfigError, RegistryBlocked, RegistryError
from kiyot_py.registry.reference import parse_reference

D = "sha256:" + "ab" * 32


def where(cfg: RegistriesConfig, image: str) -> list[tuple[str, str, bool, bool]]:
    ref = parse_reference(image)
    return [(e.host, e.repository(ref), e.insecure, e.mirror) for e in cfg.endpoints(ref)]


def test_no_config_uses_the_named_registry():
    cfg = RegistriesConfig.load(None)
    assert where(cfg, "busybox") == [("docker.io", "library/busybox", False, False)]
    assert cfg.endpoints(parse_reference("busybox"))[0].api_host == "registry-1.docker.io"
    assert where(cfg, "quay.io/a/b:1") == [("quay.io", "a/b", False, False)]


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "localhost", "localhost:5000", "127.1.2.3:80", "[::1]:5000"])
def test_loopback_is_insecure_by_default(host):
    assert is_loopback(host)
    assert where(RegistriesConfig(), f"{host}/x") == [(host, "x", True, False)]


@pytest.mark.parametrize("host", ["10.0.0.1:5000", "example.com", "localhost.example.com", "[::2]:5000"])
def test_not_loopback(host):
    assert not is_loopback(host)


def test_prefix_with_location_replaces_the_host():
    cfg = RegistriesConfig.parse(
        """
        [[registry]]
        prefix = "registry.k8s.io"
        location = "127.0.0.1:5000"
        insecure = true
        """
    )
    assert where(cfg, "registry.k8s.io/pause:3.9") == [("127.0.0.1:5000", "pause", True, False)]
    # A different registry is untouched; a longer host with the same start does not match.
    assert where(cfg, "registry.k8s.io.evil.com/pause") == [("registry.k8s.io.evil.com", "pause", False, False)]


def test_prefix_defaults_to_location_and_explicit_secure_loopback():
    cfg = RegistriesConfig.parse('[[registry]]\nlocation = "localhost:5000"\ninsecure = false\n')
    assert cfg.registries[0].prefix == "localhost:5000"
    assert where(cfg, "localhost:5000/a") == [("localhost:5000", "a", False, False)]


def test_longest_prefix_wins_and_namespace_paths():
    cfg = RegistriesConfig.parse(
        """
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "mirror.local:5000/hub"

        [[registry]]
        prefix = "docker.io/library"
        location = "docker.io/library"
        [[registry.mirror]]
        location = "127.0.0.1:5000/official"
        [[registry.mirror]]
        location = "other.mirror/lib"
        insecure = true
        """
    )
    assert where(cfg, "busybox") == [
        ("127.0.0.1:5000", "official/busybox", True, True),
        ("other.mirror", "lib/busybox", True, True),
        ("docker.io", "library/busybox", False, False),
    ]
    assert where(cfg, "foo/bar") == [
        ("mirror.local:5000", "hub/foo/bar", False, True),
        ("docker.io", "foo/bar", False, False),
    ]
    # "docker.io/libraryx" is not under "docker.io/library".
    assert where(cfg, "libraryx/a")[0] == ("mirror.local:5000", "hub/libraryx/a", False, True)


def test_location_with_namespace_and_repository_prefix():
    cfg = RegistriesConfig.parse(
        """
        [[registry]]
        prefix = "example.com/team/app"
        location = "127.0.0.1:5000/mirror/app-copy"
        """
    )
    assert where(cfg, "example.com/team/app:1") == [("127.0.0.1:5000", "mirror/app-copy", True, False)]
    assert where(cfg, "example.com/team/app/sub") == [("127.0.0.1:5000", "mirror/app-copy/sub", True, False)]
    assert where(cfg, "example.com/team/other") == [("example.com", "team/other", False, False)]


def test_wildcard_prefix_and_mirror_modes():
    cfg = RegistriesConfig.parse(
        """
        [[registry]]
        prefix = "*.corp.example"
        mirror-by-digest-only = false
        [[registry.mirror]]
        location = "cache.local/corp"
        pull-from-mirror = "digest-only"
        [[registry.mirror]]
        location = "tags.local/corp"
        pull-from-mirror = "tag-only"
        """
    )
    assert where(cfg, "reg.corp.example:5000/a/b") == [
        ("tags.local", "corp/a/b", False, True),
        ("reg.corp.example:5000", "a/b", False, False),
    ]
    assert where(cfg, f"reg.corp.example/a@{D}") == [
        ("cache.local", "corp/a", False, True),
        ("reg.corp.example", "a", False, False),
    ]
    assert where(cfg, "corp.example/a") == [("corp.example", "a", False, False)]


def test_mirror_by_digest_only():
    cfg = RegistriesConfig.parse(
        """
        [[registry]]
        location = "quay.io"
        mirror-by-digest-only = true
        [[registry.mirror]]
        location = "m.local"
        """
    )
    assert [e.host for e in cfg.endpoints(parse_reference("quay.io/a:1"))] == ["quay.io"]
    assert [e.host for e in cfg.endpoints(parse_reference(f"quay.io/a@{D}"))] == ["m.local", "quay.io"]


def test_blocked_is_a_clear_error(tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nprefix = "docker.io/evil"\nlocation = "docker.io/evil"\nblocked = true\n')
    cfg = RegistriesConfig.load(conf)
    with pytest.raises(RegistryBlocked) as info:
        cfg.endpoints(parse_reference("evil/thing"))
    assert isinstance(info.value, RegistryError)
    assert "blocked" in str(info.value) and "docker.io/evil/thing" in str(info.value)
    assert str(conf) in str(info.value)
    assert where(cfg, "good/thing") == [("docker.io", "good/thing", False, False)]


def test_unqualified_search_and_aliases_are_ignored():
    cfg = RegistriesConfig.parse('unqualified-search-registries = ["docker.io"]\n[aliases]\nx = "docker.io/y"\n')
    assert cfg.registries == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[registry", "not valid TOML"),
        ('[[registry]]\nlocation = "http://x.io"\n', "without a scheme"),
        ('[[registry]]\nlocation = "user:pw@x.io"\n', "credentials"),
        ('[[registry]]\nlocation = "x.io/Upper"\n', "not host[:port]"),
        ('[[registry]]\ninsecure = true\n', "needs a location"),
        ('[[registry]]\nlocation = "x.io"\ninsecure = "yes"\n', "true or false"),
        ('[[registry]]\nlocation = "x.io"\nmirrors = []\n', "unknown keys"),
        ('[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\nlocation = "m.io"\nfoo = 1\n', "unknown keys"),
        ('[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\ninsecure = true\n', "non-empty string"),
        ('[[registry]]\nlocation = "x.io"\n[[registry]]\nlocation = "x.io"\n', "defined twice"),
        ('[[registry]]\nprefix = "*.x.io"\nlocation = "y.io"\n', "wildcard"),
        ('[registries.search]\nregistries = ["docker.io"]\n', "V1 format"),
        ('registry = 3\n', "array of tables"),
        ('mystery = 3\n', "unknown keys"),
    ],
)
def test_bad_config(text, says):
    with pytest.raises(RegistriesConfigError) as info:
        RegistriesConfig.parse(text, source="test.conf")
    assert says in str(info.value) and "test.conf" in str(info.value), str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(RegistriesConfigError, match="cannot read"):
        RegistriesConfig.load(tmp_path / "nope.conf")


def test_endpoint_str():
    assert str(Endpoint("127.0.0.1:5000", "mirror")) == "127.0.0.1:5000/mirror"
    assert str(Endpoint("quay.io")) == "quay.io"
