"""Parsing and normalising image references (no network)."""

from __future__ import annotations

import dataclasses

import pytest

from kiyot_py.registry.reference import InvalidReference, Reference, parse_reference

D = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("given", "registry", "repository", "tag", "digest", "canonical"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "docker.io/library/busybox:1.36"),
        ("foo/bar", "docker.io", "foo/bar", "latest", None, "docker.io/foo/bar:latest"),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None,
         "docker.io/library/busybox:latest"),
        ("127.0.0.1:5000/x:1", "127.0.0.1:5000", "x", "1", None, "127.0.0.1:5000/x:1"),
        ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
        ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", None, "localhost:5000/a/b/c:latest"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None, "registry.k8s.io/pause:3.9"),
        (f"name@{D}", "docker.io", "library/name", None, D, f"docker.io/library/name@{D}"),
        (f"name:tag@{D}", "docker.io", "library/name", "tag", D, f"docker.io/library/name:tag@{D}"),
        (f"127.0.0.1:5000/test/busybox@{D}", "127.0.0.1:5000", "test/busybox", None, D,
         f"127.0.0.1:5000/test/busybox@{D}"),
        ("[::1]:5000/foo:v1", "[::1]:5000", "foo", "v1", None, "[::1]:5000/foo:v1"),
        ("quay.io/a_b/c__d-e--f.g:Tag_1.x-y", "quay.io", "a_b/c__d-e--f.g", "Tag_1.x-y", None,
         "quay.io/a_b/c__d-e--f.g:Tag_1.x-y"),
        ("Example.COM/foo", "Example.COM", "foo", "latest", None, "Example.COM/foo:latest"),
        ("a" * 64 + ":tag", "docker.io", "library/" + "a" * 64, "tag", None,
         f"docker.io/library/{'a' * 64}:tag"),
    ],
)
def test_parse_good(given, registry, repository, tag, digest, canonical):
    ref = parse_reference(given)
    assert ref == Reference(registry, repository, tag, digest)
    assert str(ref) == canonical
    assert ref.name == f"{registry}/{repository}"
    # Canonical form is a fixed point.
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("foo/Bar", "lowercase"),
        ("docker.io/Foo/bar", "lowercase"),
        ("foo bar", "whitespace"),
        (" busybox", "whitespace"),
        ("foo//bar", "empty path component"),
        ("foo/", "empty path component"),
        ("/foo", "empty path component"),
        ("foo/-bar", "path component"),
        ("foo/bar-", "path component"),
        ("foo/b@r", "digest"),
        ("foo/bar:", "without a tag"),
        ("foo/bar:-x", "invalid tag"),
        ("foo/bar:" + "a" * 129, "invalid tag"),
        ("foo/bar@", "without a digest"),
        ("foo/bar@sha256:abc", "64 lowercase hex"),
        ("foo/bar@sha256:" + "A" * 64, "64 lowercase hex"),
        ("foo/bar@md5:" + "a" * 32, "unsupported algorithm"),
        ("foo/bar@" + "a" * 64, "algorithm:hex"),
        ("a" * 64, "64-byte hexadecimal"),
        ("127.0.0.1:99999/x", "port"),
        ("-bad.host/x", "registry host"),
        ("host_name.io/x", "registry host"),
        ("docker.io/" + "a/" * 130 + "b", "longer than 255"),
        ("x" * 5000, "4096"),
        ("foo:bar:baz/qux", "registry host"),
    ],
)
def test_parse_bad(given, says):
    with pytest.raises(InvalidReference) as info:
        parse_reference(given)
    assert says in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_reference_is_frozen_and_hashable():
    ref = parse_reference("busybox")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "x"  # type: ignore[misc]
    assert len({ref, parse_reference("docker.io/library/busybox:latest")}) == 1


def test_with_digest_and_reference():
    ref = parse_reference("busybox:1.36")
    assert ref.reference == "1.36"
    pinned = ref.with_digest(D)
    assert pinned.reference == D and pinned.tag is None
    assert str(pinned) == f"docker.io/library/busybox@{D}"
