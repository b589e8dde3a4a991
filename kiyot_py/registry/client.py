"""The node's registry client: resolve a reference, and fetch the image into the content store.

`resolve` finds the digest the reference points at (for RepoDigests), the platform
manifest the cells will run, the config blob (the image id and its JSON) and the size;
`pull` does the same and writes that manifest, the config and every layer into the
node's content store (ContentStore), from the endpoint that resolved it, so that the
cells fetch them from the node and never see a registry or its credentials.

Credentials are sent only to the host they were given for (`Credentials.host`, from the
CRI's `server_address`, else the image's own registry): a mirror on another host gets
none, as in containerd.

One `aiohttp.ClientSession` per `RegistryClient`, made on first use and closed by
`close()`. Callers bound the time with `asyncio.wait_for`; every response is read
inside `async with`, so a cancellation releases its connection and leaves nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp
import structlog

from kiyot_py.platforms import Platform
from kiyot_py.registry import transport
from kiyot_py.registry.config import DOCKER_HUB, DOCKER_HUB_API, Endpoint, RegistriesConfig
from kiyot_py.registry.content import ContentError, ContentStore
from kiyot_py.registry.errors import ImageNotFound, PlatformNotFound, RegistryBlocked, RegistryError
from kiyot_py.registry.reference import InvalidReference, Reference, validate_digest

__all__ = [
    "MEDIA_TYPE_DOCKER_LIST",
    "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_OCI_INDEX",
    "MEDIA_TYPE_OCI_MANIFEST",
    "Credentials",
    "ImageNotFound",
    "PlatformNotFound",
    "RegistryBlocked",
    "RegistryClient",
    "RegistryError",
    "ResolvedImage",
]

log = structlog.get_logger("kiyot.registry")

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEX_TYPES = {MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST}
_MANIFEST_TYPES = {MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST}
_SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}
ACCEPT_MANIFESTS = ", ".join(
    [MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST]
)

MAX_MANIFEST_BYTES = 4 << 20  # as containerd bounds a manifest
MAX_CONFIG_BYTES = 16 << 20
MAX_ERROR_BYTES = 64 << 10
MAX_TOKEN_BYTES = 1 << 20

class Credentials(Protocol):
    """Anything with a username, a password and the host they are for (kiyot_py.model.Credentials)."""

    username: str
    password: str
    server_address: str


# Names Docker Hub goes by in a server address (what `docker login` wrote, what kubelets send).
_DOCKER_HUB_NAMES = {DOCKER_HUB, DOCKER_HUB_API, "index.docker.io", "registry.hub.docker.com"}


def credentials_host(server_address: str, registry: str) -> str:
    """The registry host credentials are for: `server_address`'s host ("https://host/v1/",
    "host:port", "host/path"), or the image's `registry` when none is named."""
    host = registry
    if server_address:
        rest = server_address.split("://", 1)[1] if "://" in server_address else server_address
        host = rest.split("/", 1)[0].rpartition("@")[2]
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_NAMES else host


def auth_for(endpoint: Endpoint, ref: Reference, auth: Credentials | None) -> Credentials | None:
    """`auth` if it was given for this endpoint's host, else None."""
    if auth is None:
        return None
    wanted = credentials_host(auth.server_address, ref.registry)
    return auth if credentials_host("", endpoint.host) == wanted else None


@dataclass
class ResolvedImage:
    manifest_digest: str  # what the tag/digest points at (the index for an index): RepoDigests
    platform_manifest_digest: str  # the image manifest for the platform, what cells pull
    config_digest: str  # the image id
    config: dict[str, Any] = field(repr=False)
    size: int  # config size + the layers' (compressed) sizes
    endpoint: str = ""  # where it was resolved (mirror or location)
    # What the config says it is built for (None: it names no architecture).
    platform: Platform | None = None


def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _registry_error_text(body: bytes) -> str:
    """The registry's own words from an error body ({"errors":[{"code","message"}]})."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list) and errors:
            parts = []
            for e in errors[:5]:
                if isinstance(e, dict):
                    code = str(e.get("code", "")).strip()
                    msg = str(e.get("message", "")).strip()
                    parts.append(": ".join(p for p in (code, msg) if p) or json.dumps(e)[:200])
            if parts:
                return "; ".join(parts)
        for key in ("error", "message", "details"):
            if isinstance(doc.get(key), str):
                return doc[key][:300]
    text = body.decode("utf-8", "replace").strip()
    text = re.sub(r"\s+", " ", text)
    return text[:300]


_CHALLENGE_PARAM = re.compile(r'\s*([a-zA-Z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_www_authenticate(header: str) -> list[tuple[str, dict[str, str]]]:
    """'Bearer realm="…",service="…", Basic realm="…"' → [(scheme, params)]."""
    result: list[tuple[str, dict[str, str]]] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = re.match(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)", header[pos:])
        if not m:
            break
        scheme = m.group(1).lower()
        pos += m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            pm = _CHALLENGE_PARAM.match(header, pos)
            if not pm:
                break
            # a bare word followed by a space (not '=') starts the next challenge: the regex
            # requires '=' so it will not match one.
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value or "")
            pos = pm.end()
        result.append((scheme, params))
    return result


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str, where: str) -> bytes:
    length = resp.content_length
    if length is not None and length > limit:
        raise RegistryError(f"{where}: {what} is {length} bytes, more than the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(64 << 10):
        total += len(chunk)
        if total > limit:
            raise RegistryError(f"{where}: {what} is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Repo:
    """Requests to one repository on one endpoint, with the auth it has earned."""

    def __init__(
        self, client: RegistryClient, endpoint: Endpoint, repository: str, auth: Credentials | None
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.repository = repository
        self.auth = auth
        self.authorization: str | None = None  # never logged, never in a message
        self.where = f"{endpoint.host}/{repository}"

    async def get(self, kind: str, reference: str, *, accept: str | None, limit: int, what: str
                  ) -> tuple[int, Any, bytes, str]:
        """GET /v2/<repo>/<kind>/<reference> read whole (up to `limit`)."""
        async with self.open(kind, reference, accept=accept) as resp:
            ok = resp.status == 200
            body = await _read_limited(resp, limit if ok else MAX_ERROR_BYTES, what if ok else "error", self.where)
            return resp.status, resp.headers, body, str(resp.url)

    @asynccontextmanager
    async def open(self, kind: str, reference: str, *, accept: str | None
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET /v2/<repo>/<kind>/<reference>, authenticating on a 401 challenge once; the
        answer is released when the block ends."""
        path = f"/v2/{self.repository}/{kind}/{reference}"
        for attempt in range(2):
            headers = {"User-Agent": self.client.user_agent}
            if accept:
                headers["Accept"] = accept
            if self.authorization:
                headers["Authorization"] = self.authorization
            resp = await self._send(path, headers)
            try:
                challenges: list[tuple[str, dict[str, str]]] = []
                if resp.status == 401 and attempt == 0:
                    for h in resp.headers.getall("WWW-Authenticate", []):
                        challenges.extend(parse_www_authenticate(h))
                if not challenges:
                    yield resp
                    return
                body = await _read_limited(resp, MAX_ERROR_BYTES, "error", self.where)
            finally:
                resp.release()
            await self._authorize(challenges, body)
        raise AssertionError("unreachable")

    async def _send(self, path: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        try:
            return await transport.request(self.client._get_session(), "GET", self.endpoint, path,
                                           headers, self.client._schemes)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise RegistryError(
                f"{self.where}: cannot reach {self.endpoint.api_host}: {exc.__class__.__name__}: {exc}"
            ) from None
        except aiohttp.ClientError as exc:
            raise RegistryError(f"{self.where}: request failed: {exc.__class__.__name__}: {exc}") from None

    async def _authorize(self, challenges: list[tuple[str, dict[str, str]]], body: bytes) -> None:
        by_scheme = dict(challenges)
        if "bearer" in by_scheme:
            self.authorization = f"Bearer {await self._token(by_scheme['bearer'])}"
            return
        if "basic" in by_scheme:
            if self.auth is None:
                raise RegistryError(
                    f"{self.where}: 401 authentication required (Basic) and no credentials were given: "
                    f"{_registry_error_text(body)}"
                )
            self.authorization = basic_authorization(self.auth.username, self.auth.password)
            return
        schemes = ", ".join(sorted(by_scheme)) or "none"
        raise RegistryError(f"{self.where}: 401 with unsupported authentication scheme(s): {schemes}")

    async def _token(self, params: dict[str, str]) -> str:
        basic = None
        if self.auth is not None:
            basic = basic_authorization(self.auth.username, self.auth.password)
        return await fetch_token(
            self.client._get_session(), params, self.repository, basic,
            verify_tls=not self.endpoint.insecure, where=self.where, user_agent=self.client.user_agent,
        )


def basic_authorization(username: str, password: str) -> str:
    """The Authorization header value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


async def fetch_token(
    session: aiohttp.ClientSession,
    challenge: dict[str, str],
    repository: str,
    basic: str | None,
    *,
    verify_tls: bool = True,
    where: str = "",
    user_agent: str = "kiyot-py",
) -> str:
    """The Bearer token flow: GET realm?service=…&scope=… (with Basic credentials if any).

    `challenge` holds the WWW-Authenticate Bearer parameters; without a scope in it the
    scope asked for is repository:<repository>:pull. Errors never carry the credentials.
    """
    realm = challenge.get("realm", "")
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RegistryError(f"{where}: bearer challenge has no usable realm")
    query: list[tuple[str, str]] = []
    if challenge.get("service"):
        query.append(("service", challenge["service"]))
    query.append(("scope", challenge.get("scope") or f"repository:{repository}:pull"))
    url = realm + ("&" if parts.query else "?") + urlencode(query)
    headers = {"User-Agent": user_agent}
    if basic:
        headers["Authorization"] = basic
    token_host = parts.netloc.rpartition("@")[2]
    try:
        async with session.get(url, headers=headers, ssl=verify_tls) as resp:
            body = await _read_limited(resp, MAX_TOKEN_BYTES, "token response", token_host)
            status = resp.status
    except aiohttp.ClientError as exc:
        raise RegistryError(
            f"{where}: token service {token_host} unreachable: {exc.__class__.__name__}"
        ) from None
    if status != 200:
        raise RegistryError(
            f"{where}: token service {token_host} refused ({status}): {_registry_error_text(body)}"
        )
    try:
        doc = json.loads(body)
        token = doc.get("token") or doc.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"{where}: token service {token_host} returned no token")
    return token


def _check(status: int, body: bytes, where: str, what: str) -> None:
    if status == 200:
        return
    text = _registry_error_text(body) or "(no message)"
    message = f"{where}: {what}: {status} {text}"
    if status == 404:
        raise ImageNotFound(message)
    raise RegistryError(message)


def _verify(body: bytes, expected: str | None, header: str | None, where: str, what: str) -> str:
    """The digest of `body`, checked against the requested digest and the registry's header."""
    algorithm = (expected or "sha256").split(":", 1)[0]
    actual = _digest_of(body, algorithm)
    if expected is not None and actual != expected:
        raise RegistryError(f"{where}: {what} digest mismatch: asked for {expected}, got {actual}")
    if expected is None and header:
        header = header.strip()
        if header.split(":", 1)[0] == algorithm and header != actual:
            raise RegistryError(
                f"{where}: {what} digest mismatch: Docker-Content-Digest {header}, content {actual}"
            )
    return actual


def _json_object(body: bytes, where: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(f"{where}: {what} is not JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: {what} is not a JSON object")
    return doc


def _parse_manifest(body: bytes, content_type: str, where: str) -> tuple[str, dict[str, Any]]:
    doc = _json_object(body, where, "manifest")
    media_type = doc.get("mediaType") or content_type.split(";", 1)[0].strip()
    if not media_type or media_type in ("application/json", "application/octet-stream", "text/plain"):
        # An OCI document may omit mediaType; tell index from manifest by shape.
        if "manifests" in doc:
            media_type = MEDIA_TYPE_OCI_INDEX
        elif "config" in doc and "layers" in doc:
            media_type = MEDIA_TYPE_OCI_MANIFEST
    if media_type in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise RegistryError(f"{where}: Docker schema 1 manifests are not supported")
    if media_type not in _INDEX_TYPES and media_type not in _MANIFEST_TYPES:
        raise RegistryError(f"{where}: unsupported manifest media type {media_type!r}")
    return media_type, doc


def _descriptor(d: Any, where: str) -> tuple[str, int]:
    if not isinstance(d, dict):
        raise RegistryError(f"{where}: malformed descriptor")
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str):
        raise RegistryError(f"{where}: malformed descriptor: no digest")
    try:
        validate_digest(digest)
    except InvalidReference as exc:
        raise RegistryError(f"{where}: malformed descriptor: {exc}") from None
    if not isinstance(size, int) or size < 0:
        raise RegistryError(f"{where}: malformed descriptor size for {digest}")
    return digest, size


def select_platform(index: dict[str, Any], platform: Platform) -> dict[str, Any] | None:
    """The best manifest descriptor of an index for `platform`, as containerd picks: the
    same os and architecture, an exact variant first, then one that names none."""
    candidates = []
    for d in index.get("manifests") or []:
        if not isinstance(d, dict):
            continue
        p = d.get("platform") or {}
        if not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
            continue
        raw_variant = p.get("variant")
        offered = Platform(p["os"], p["architecture"], raw_variant if isinstance(raw_variant, str) else "")
        if (offered.os, offered.architecture) != (platform.os, platform.architecture):
            continue
        if raw_variant and platform.variant and offered.variant != platform.variant:
            continue
        candidates.append((0 if offered.variant == platform.variant else 1, d))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def _offered(index: dict[str, Any]) -> str:
    return ", ".join(sorted(
        "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if isinstance(x, str) and x)
        for d in index.get("manifests") or [] if isinstance(d, dict)
        for p in [d.get("platform") or {}]
    )) or "none"


class RegistryClient:
    def __init__(
        self,
        *,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        user_agent: str = "kiyot-py",
    ) -> None:
        self.user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._schemes = transport.SchemeCache()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=64),
                # Credentials only ever go in explicit headers; aiohttp drops them on a
                # redirect to another origin.
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def resolve(
        self,
        ref: Reference,
        *,
        platform: Platform,
        auth: Credentials | None = None,
        config: RegistriesConfig | None = None,
        store: ContentStore | None = None,
    ) -> ResolvedImage:
        """Resolve `ref` at its registry (mirrors first) for `platform` (the cell's, never
        this machine's); see ResolvedImage. An index without a manifest for `platform`
        raises ImageNotFound; a single manifest is taken as it is (see ResolvedImage.platform).
        With a `store`, the platform manifest, the config and every layer are fetched into it
        from the endpoint that resolved the reference (a mirror that resolves but cannot
        serve a layer fails over to the next endpoint)."""
        config = config if config is not None else RegistriesConfig()
        endpoints = config.endpoints(ref)  # RegistryBlocked is a RegistryError
        failures: list[str] = []
        for i, endpoint in enumerate(endpoints):
            last = i == len(endpoints) - 1
            try:
                try:
                    resolved = await self._resolve_at(endpoint, ref, auth_for(endpoint, ref, auth), platform, store)
                except aiohttp.ClientError as exc:  # a body cut short, a read timeout, …
                    raise RegistryError(
                        f"{endpoint}/{endpoint.repository(ref)}: {exc.__class__.__name__}: {exc}"
                    ) from None
            except RegistryError as exc:
                if last:
                    if failures:
                        msg = f"{exc} (mirrors tried first: {'; '.join(failures)})"
                        raise exc.__class__(msg) from None
                    raise
                log.info("mirror failed, trying the next endpoint", endpoint=str(endpoint),
                         image=str(ref), error=str(exc))
                failures.append(str(exc))
                continue
            log.debug("resolved", image=str(ref), endpoint=str(endpoint),
                      digest=resolved.manifest_digest, id=resolved.config_digest)
            return resolved
        raise RegistryError(f"{ref}: no endpoint to try")  # endpoints() never returns []

    async def _resolve_at(
        self, endpoint: Endpoint, ref: Reference, auth: Credentials | None, platform: Platform,
        store: ContentStore | None,
    ) -> ResolvedImage:
        repo = _Repo(self, endpoint, endpoint.repository(ref), auth)
        where = repo.where
        reference = ref.digest or ref.tag or "latest"
        status, headers, body, _ = await repo.get(
            "manifests", reference, accept=ACCEPT_MANIFESTS, limit=MAX_MANIFEST_BYTES, what="manifest"
        )
        _check(status, body, where, f"manifest {reference}")
        top_digest = _verify(body, ref.digest, headers.get("Docker-Content-Digest"), where, "manifest")
        media_type, doc = _parse_manifest(body, headers.get("Content-Type", ""), where)

        platform_digest, platform_type, manifest, manifest_body = top_digest, media_type, doc, body
        if media_type in _INDEX_TYPES:
            chosen = select_platform(doc, platform)
            if chosen is None:
                raise PlatformNotFound(
                    f"{where}: no manifest for platform {platform} in {reference} (has: {_offered(doc)})"
                )
            want, _ = _descriptor(chosen, where)
            status, headers, body, _ = await repo.get(
                "manifests", want, accept=ACCEPT_MANIFESTS, limit=MAX_MANIFEST_BYTES, what="manifest"
            )
            _check(status, body, where, f"platform manifest {want}")
            platform_digest = _verify(body, want, None, where, "platform manifest")
            platform_type, manifest = _parse_manifest(body, headers.get("Content-Type", ""), where)
            manifest_body = body
            if platform_type not in _MANIFEST_TYPES:
                raise RegistryError(f"{where}: {want} is a nested index; not supported")

        config_digest, _ = _descriptor(manifest.get("config"), where)
        layers_raw = manifest.get("layers")
        if not isinstance(layers_raw, list):
            raise RegistryError(f"{where}: manifest has no layers list")
        layers = [_descriptor(layer, where) for layer in layers_raw]

        status, headers, body, _ = await repo.get(
            "blobs", config_digest, accept=None, limit=MAX_CONFIG_BYTES, what="config blob"
        )
        if status == 404:
            raise ImageNotFound(f"{where}: config blob {config_digest}: 404 {_registry_error_text(body)}")
        _check(status, body, where, f"config blob {config_digest}")
        _verify(body, config_digest, None, where, "config blob")
        config = _json_object(body, where, f"config blob {config_digest}")

        if store is not None:
            for digest, size in layers:
                await self._fetch_blob(repo, store, digest, size)
            # The manifest last: its presence says every blob it names is here.
            store.put(config_digest, body)
            store.put(platform_digest, manifest_body)

        return ResolvedImage(
            manifest_digest=top_digest,
            platform_manifest_digest=platform_digest,
            config_digest=config_digest,
            config=config,
            size=len(body) + sum(size for _, size in layers),
            endpoint=str(endpoint),
            platform=Platform.from_image_config(config),
        )

    async def _fetch_blob(self, repo: _Repo, store: ContentStore, digest: str, size: int) -> None:
        if store.has(digest):
            return
        async with repo.open("blobs", digest, accept=None) as resp:
            if resp.status != 200:
                body = await _read_limited(resp, MAX_ERROR_BYTES, "error", repo.where)
                _check(resp.status, body, repo.where, f"layer {digest}")
            try:
                await store.put_stream(digest, size, resp.content.iter_chunked(256 << 10))
            except ContentError as exc:
                raise RegistryError(f"{repo.where}: layer {digest}: {exc}") from None
