"""Where to pull from: a subset of containers-registries.conf(5), version 2.

    [[registry]]
    prefix = "registry.k8s.io"          # defaults to location
    location = "127.0.0.1:5000"          # host[:port][/namespace…]
    insecure = true                      # plain HTTP (or HTTPS without verification)
    blocked = false
    # mirror-by-digest-only = false

    [[registry.mirror]]
    location = "mirror.local:5000/k8s"
    insecure = true
    # pull-from-mirror = "all" | "digest-only" | "tag-only"

The entry with the longest matching prefix wins (a prefix matches a name equal to it
or continuing with '/'; "*.example.com" matches any host under example.com). Its
mirrors are tried first, in order, then its location. The part of the repository the
prefix covered is replaced by the endpoint's namespace path, so with
prefix="docker.io/library" and location="mirror:5000/hub", docker.io/library/busybox is
fetched as mirror:5000/hub/busybox.

A registry on a loopback address (127.0.0.0/8, localhost, ::1) is insecure unless the
configuration says otherwise, as Docker treats it.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiyot_py.registry.errors import RegistriesConfigError, RegistryBlocked
from kiyot_py.registry.reference import Reference

__all__ = ["Endpoint", "Mirror", "RegistriesConfig", "RegistryEntry", "is_loopback"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

# host[:port] then optional namespace path; no scheme, no userinfo, no tag/digest.
_LOCATION_RE = re.compile(
    r"^(?P<host>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?)"
    r"(?P<path>(?:/[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*)*)$"
)
_WILDCARD_RE = re.compile(r"^\*\.[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?$")
_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}
_PULL_FROM_MIRROR = {"all", "digest-only", "tag-only"}
# Top-level keys of registries.conf that do not concern where to pull from by a full name.
_IGNORED_TOP = {
    "unqualified-search-registries",
    "short-name-mode",
    "credential-helpers",
    "aliases",
    "additional-layer-store-auth-helper",
}


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    name = (
        host[1 : host.find("]")] if host.startswith("[")
        else host.rsplit(":", 1)[0] if host.count(":") == 1
        else host
    )
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch a reference from: a mirror or the entry's location."""

    host: str  # host[:port] as configured ("docker.io" stands for Docker Hub)
    path_prefix: str = ""  # namespace on that host, e.g. "mirror" for 127.0.0.1:5000/mirror
    insecure: bool = False  # plain HTTP allowed, TLS not verified
    mirror: bool = False
    matched: str = ""  # leading part of the reference's repository that the prefix covered

    @property
    def api_host(self) -> str:
        """The host[:port] to connect to (Docker Hub's API lives on registry-1.docker.io)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    def repository(self, ref: Reference) -> str:
        """The repository path for `ref` on this endpoint."""
        rest = ref.repository
        if self.matched:
            if rest == self.matched:
                rest = ""
            elif rest.startswith(self.matched + "/"):
                rest = rest[len(self.matched) + 1 :]
        parts = [p for p in (self.path_prefix, rest) if p]
        return "/".join(parts)

    def __str__(self) -> str:
        return f"{self.host}/{self.path_prefix}" if self.path_prefix else self.host


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool | None = None
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str  # "" only for a wildcard prefix: the matched host itself
    insecure: bool | None = None
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    mirror_by_digest_only: bool = False

    @property
    def wildcard(self) -> bool:
        return self.prefix.startswith("*.")

    def match(self, name: str) -> str | None:
        """If the prefix covers `name` (registry/repository), the part of the name it covers."""
        if self.wildcard:
            host = name.partition("/")[0]
            hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host
            if hostname.endswith(self.prefix[1:]):
                return host
            return None
        if name == self.prefix or name.startswith(self.prefix + "/"):
            return self.prefix
        return None


def _split_location(location: str) -> tuple[str, str]:
    host, _, path = location.partition("/")
    return host, path


@dataclass
class RegistriesConfig:
    registries: list[RegistryEntry] = field(default_factory=list)
    source: str = "<defaults>"

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None) -> RegistriesConfig:
        """Read a registries.conf file; None gives the defaults (every registry as named)."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RegistriesConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> RegistriesConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RegistriesConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> RegistriesConfig:
        if "registries" in data:
            raise RegistriesConfigError(
                f"{source}: the V1 format ([registries.search] …) is not supported; use [[registry]] tables"
            )
        unknown = set(data) - _IGNORED_TOP - {"registry"}
        if unknown:
            raise RegistriesConfigError(f"{source}: unknown keys {sorted(unknown)}")
        raw = data.get("registry", [])
        if not isinstance(raw, list):
            raise RegistriesConfigError(f"{source}: 'registry' must be an array of tables ([[registry]])")
        entries: list[RegistryEntry] = []
        seen: set[str] = set()
        for i, item in enumerate(raw):
            where = f"{source}: [[registry]] #{i + 1}"
            entry = _entry(item, where)
            if entry.prefix in seen:
                raise RegistriesConfigError(f"{where}: prefix {entry.prefix!r} is defined twice")
            seen.add(entry.prefix)
            entries.append(entry)
        return cls(registries=entries, source=source)

    # -- lookups -------------------------------------------------------------------------

    def find(self, ref: Reference) -> tuple[RegistryEntry, str] | None:
        """The entry with the longest prefix matching `ref`, and the part of the name it covers."""
        best: tuple[RegistryEntry, str] | None = None
        for entry in self.registries:
            covered = entry.match(ref.name)
            if covered is None:
                continue
            if best is None or len(entry.prefix) > len(best[0].prefix):
                best = (entry, covered)
        return best

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """Where to fetch `ref` from, in order: mirrors first, then the location.

        Raises RegistryBlocked when the matching entry is blocked.
        """
        found = self.find(ref)
        if found is None:
            return [Endpoint(host=ref.registry, insecure=is_loopback(ref.registry))]
        entry, covered = found
        if entry.blocked:
            raise RegistryBlocked(
                f"pulling {ref} is blocked: registry {entry.prefix!r} is marked blocked in {self.source}"
            )
        # What of the repository the prefix covered (the prefix minus its host).
        matched = covered.partition("/")[2]
        by_digest = ref.digest is not None
        result: list[Endpoint] = []
        for m in entry.mirrors:
            if entry.mirror_by_digest_only and not by_digest:
                continue
            if m.pull_from_mirror == "digest-only" and not by_digest:
                continue
            if m.pull_from_mirror == "tag-only" and by_digest:
                continue
            host, path = _split_location(m.location)
            insecure = is_loopback(host) if m.insecure is None else m.insecure
            result.append(Endpoint(host, path, insecure, mirror=True, matched=matched))
        if entry.location:
            host, path = _split_location(entry.location)
        else:  # wildcard prefix: the host the reference names
            host, path = covered, ""
        insecure = is_loopback(host) if entry.insecure is None else entry.insecure
        result.append(Endpoint(host, path, insecure, mirror=False, matched=matched))
        return result


def _bool(item: dict[str, Any], key: str, where: str) -> bool | None:
    value = item.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise RegistriesConfigError(f"{where}: {key!r} must be true or false, not {value!r}")


def _location(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RegistriesConfigError(f"{where}: {key!r} must be a non-empty string")
    if "://" in value:
        raise RegistriesConfigError(
            f"{where}: {key} {value!r} must be host[:port][/namespace] without a scheme "
            "(set insecure = true for plain HTTP)"
        )
    value = value.rstrip("/")
    if "@" in value:
        raise RegistriesConfigError(f"{where}: {key} {value!r}: credentials or digests do not belong here")
    if not _LOCATION_RE.match(value):
        raise RegistriesConfigError(
            f"{where}: {key} {value!r} is not host[:port][/namespace…] (lowercase path components)"
        )
    return value


def _entry(item: Any, where: str) -> RegistryEntry:
    if not isinstance(item, dict):
        raise RegistriesConfigError(f"{where}: must be a table")
    unknown = set(item) - _REGISTRY_KEYS
    if unknown:
        raise RegistriesConfigError(f"{where}: unknown keys {sorted(unknown)}")
    prefix_raw = item.get("prefix")
    location_raw = item.get("location")
    if prefix_raw is not None and isinstance(prefix_raw, str) and _WILDCARD_RE.match(prefix_raw):
        prefix = prefix_raw
        if location_raw:
            raise RegistriesConfigError(f"{where}: a wildcard prefix {prefix!r} cannot have a location")
        location = ""
    else:
        if location_raw is None and prefix_raw is None:
            raise RegistriesConfigError(f"{where}: needs a location (or a prefix)")
        location = _location(location_raw, "location", where) if location_raw is not None else ""
        prefix = _location(prefix_raw, "prefix", where) if prefix_raw is not None else location
        if not location:
            location = prefix
    mirrors_raw = item.get("mirror", [])
    if not isinstance(mirrors_raw, list):
        raise RegistriesConfigError(f"{where}: 'mirror' must be an array of tables ([[registry.mirror]])")
    mirrors = []
    for j, m in enumerate(mirrors_raw):
        mwhere = f"{where} mirror #{j + 1}"
        if not isinstance(m, dict):
            raise RegistriesConfigError(f"{mwhere}: must be a table")
        unknown = set(m) - _MIRROR_KEYS
        if unknown:
            raise RegistriesConfigError(f"{mwhere}: unknown keys {sorted(unknown)}")
        pull_from = m.get("pull-from-mirror", "all")
        if pull_from not in _PULL_FROM_MIRROR:
            raise RegistriesConfigError(
                f"{mwhere}: pull-from-mirror must be one of {sorted(_PULL_FROM_MIRROR)}, not {pull_from!r}"
            )
        mirrors.append(
            Mirror(
                location=_location(m.get("location"), "location", mwhere),
                insecure=_bool(m, "insecure", mwhere),
                pull_from_mirror=pull_from,
            )
        )
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=_bool(item, "insecure", where),
        blocked=bool(_bool(item, "blocked", where)),
        mirrors=tuple(mirrors),
        mirror_by_digest_only=bool(_bool(item, "mirror-by-digest-only", where)),
    )
