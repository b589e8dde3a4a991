"""Image references, parsed and normalised the way Docker and containerd do it.

The grammar is the distribution project's (github.com/distribution/reference):

    reference       := name [ ":" tag ] [ "@" digest ]
    name            := [domain "/"] remote-name
    domain          := host [":" port-number]
    host            := domain-name | IPv4address | "[" IPv6address "]"
    domain-name     := domain-component ["." domain-component]*
    domain-component:= /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    remote-name     := path-component ["/" path-component]*
    path-component  := alpha-numeric [separator alpha-numeric]*
    alpha-numeric   := /[a-z0-9]+/
    separator       := /[_.]|__|[-]+/
    tag             := /[\\w][\\w.-]{0,127}/
    digest          := algorithm ":" encoded

Normalisation: a first component that has no '.' or ':' and is not "localhost" is
part of the path on docker.io; a single-component name on docker.io lives under
"library/"; "index.docker.io" is "docker.io"; a reference with neither tag nor digest
gets the tag "latest".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_REGISTRY", "InvalidReference", "Reference", "parse_reference"]

DEFAULT_REGISTRY = "docker.io"
_LEGACY_REGISTRY = "index.docker.io"
_OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"
NAME_TOTAL_MAX = 255  # registry/repository, as the distribution project bounds it

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN_RE = re.compile(rf"^{_HOST}(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_ALGORITHM_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")
# Digest algorithms we can verify, with the length of their hex encoding.
_DIGEST_HEX_LEN = {"sha256": 64, "sha512": 128}


class InvalidReference(ValueError):
    """A malformed image reference; the message says what is wrong with it."""


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], lowercase hostnames kept as given ("docker.io" for Docker Hub)
    repository: str  # path on the registry, e.g. "library/busybox"
    tag: str | None = None
    digest: str | None = None  # "sha256:<64 hex>"

    @property
    def name(self) -> str:
        """The fully qualified name without tag or digest: "registry/repository"."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, validate_digest(digest))

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def validate_digest(digest: str) -> str:
    """Return the digest if it is well formed (and of an algorithm we verify), else raise."""
    algorithm, sep, encoded = digest.partition(":")
    if not sep or not algorithm or not encoded:
        raise InvalidReference(f"invalid digest {digest!r}: expected algorithm:hex")
    if not _ALGORITHM_RE.match(algorithm):
        raise InvalidReference(f"invalid digest {digest!r}: bad algorithm {algorithm!r}")
    want = _DIGEST_HEX_LEN.get(algorithm)
    if want is None:
        raise InvalidReference(
            f"invalid digest {digest!r}: unsupported algorithm {algorithm!r} "
            f"(supported: {', '.join(sorted(_DIGEST_HEX_LEN))})"
        )
    if len(encoded) != want or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidReference(
            f"invalid digest {digest!r}: {algorithm} needs {want} lowercase hex characters"
        )
    return digest


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's splitDockerDomain: is the first component a registry host or a path?"""
    first, sep, rest = name.partition("/")
    if (
        not sep
        or (
            "." not in first
            and ":" not in first
            and first != "localhost"
            and first.lower() == first  # an uppercase first component is a host
        )
    ):
        registry, repository = DEFAULT_REGISTRY, name
    else:
        registry, repository = first, rest
    if registry == _LEGACY_REGISTRY:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"{_OFFICIAL_NAMESPACE}/{repository}"
    return registry, repository


def parse_reference(s: str) -> Reference:
    """Parse and normalise an image reference; raise InvalidReference when malformed."""
    if not isinstance(s, str):
        raise InvalidReference(f"image reference must be a string, not {type(s).__name__}")
    if not s:
        raise InvalidReference("image reference is empty")
    if s != s.strip() or any(c.isspace() for c in s):
        raise InvalidReference(f"invalid reference {s!r}: contains whitespace")
    if len(s) > 4096:
        raise InvalidReference("invalid reference: longer than 4096 characters")

    remainder, at, after = s.partition("@")
    digest: str | None = None
    if at:
        if not after:
            raise InvalidReference(f"invalid reference {s!r}: '@' without a digest")
        validate_digest(after)
        digest = after

    # The tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
    tag: str | None = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not tag:
            raise InvalidReference(f"invalid reference {s!r}: ':' without a tag")
        if not _TAG_RE.match(tag):
            raise InvalidReference(
                f"invalid tag {tag!r} in {s!r}: a tag is up to 128 of [A-Za-z0-9_.-], "
                "not starting with '.' or '-'"
            )
    if not remainder:
        raise InvalidReference(f"invalid reference {s!r}: no repository name")
    if _HEX64_RE.match(remainder) and tag is None and digest is None:
        raise InvalidReference(
            f"invalid repository name {remainder!r}: cannot be a 64-byte hexadecimal string "
            "(an image id is not a reference)"
        )

    registry, repository = _split_domain(remainder)
    if not _DOMAIN_RE.match(registry):
        raise InvalidReference(f"invalid registry host {registry!r} in {s!r}")
    host_part = registry[: registry.index("]") + 1] if registry.startswith("[") else registry.partition(":")[0]
    if ":" in registry[len(host_part) :]:
        port = registry[len(host_part) + 1 :]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidReference(f"invalid port in registry {registry!r}")
    if not repository:
        raise InvalidReference(f"invalid reference {s!r}: no repository name")
    for component in repository.split("/"):
        if not component:
            raise InvalidReference(f"invalid repository {repository!r} in {s!r}: empty path component")
        if not _PATH_COMPONENT_RE.match(component):
            if component.lower() != component and _PATH_COMPONENT_RE.match(component.lower()):
                raise InvalidReference(f"invalid repository {repository!r} in {s!r}: must be lowercase")
            raise InvalidReference(
                f"invalid repository {repository!r} in {s!r}: path component {component!r} must be "
                "lowercase letters and digits, separated by '.', '_', '__' or '-'"
            )
    name = f"{registry}/{repository}"
    if len(name) > NAME_TOTAL_MAX:
        raise InvalidReference(
            f"invalid reference: repository name {name[:40]}… is longer than {NAME_TOTAL_MAX} characters"
        )

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
