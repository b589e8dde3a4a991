"""The pull path: a small read-only registry front the node offers its local cells.

A cell's loopback is its own, so it cannot reach a registry on the host's 127.0.0.1;
the node listens at the bridge gateway instead and forwards what a cell asks for to
the upstream endpoints from registries.conf (mirrors first), streaming every body
through without holding a blob in memory.

    GET|HEAD /v2/                                              → 200 {} (see below)
    GET|HEAD /v2/<registry-key>/<repository>/manifests/<tag|digest>
    GET|HEAD /v2/<registry-key>/<repository>/blobs/<digest>
    anything else                                              → 405 (not GET/HEAD) or 404

<registry-key> is the upstream host with ':' replaced by '_' ("127.0.0.1_5000",
"docker.io"), which keeps it a valid repository path component, so a cell pulls
`10.89.0.1:5380/127.0.0.1_5000/test/busybox@sha256:…` with TLS verification off.

Credentials: the request's Authorization header is forwarded as is. containers/image
(skopeo) only sends credentials when the /v2/ ping asked for them, so by default
(`basic_challenge=True`) /v2/ without an Authorization header answers 401 with a Basic
challenge; skopeo without credentials then sends empty ones ("Basic Og=="), which are
dropped here, and a request carrying Authorization gets 200 {}. When the upstream
answers with a Bearer challenge the node runs the token flow itself (the realm is
usually unreachable from a cell), with the cell's Basic credentials if it sent any, and
caches the token briefly per (upstream, repository, credentials).

Status, Content-Type, Content-Length, Docker-Content-Digest and friends are copied;
upstream redirects (blob storage) are followed here, so the cell never needs to reach
the storage itself. Upstream 404/5xx/unreachable on a mirror falls back to the next
endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re

import aiohttp
import structlog
from aiohttp import web

from kiyot_py.registry import transport
from kiyot_py.registry.client import fetch_token, parse_www_authenticate
from kiyot_py.registry.config import Endpoint, RegistriesConfig
from kiyot_py.registry.errors import RegistryBlocked, RegistryError
from kiyot_py.registry.reference import InvalidReference, Reference, parse_reference

__all__ = ["PullPath", "cell_reference", "registry_host", "registry_key"]

log = structlog.get_logger("kiyot.registry.pullpath")

_TAIL_RE = re.compile(r"^(?P<key>[^/]+)/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_KEY_RE = re.compile(r"^[a-z0-9]+(?:(?:[.]|-+)[a-z0-9]+)*(?:_[0-9]{1,5})?$")
_COPY_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Accept-Ranges",
    "Docker-Content-Digest",
    "Docker-Distribution-API-Version",
    "ETag",
    "Last-Modified",
    "WWW-Authenticate",
)
_FORWARD_HEADERS = ("Accept", "Authorization", "Range", "If-None-Match", "If-Range")
_CHUNK = 256 << 10
_TOKEN_TTL = 50.0  # seconds; registries hand out tokens good for 60 s or more


def _empty_basic(value: str | None) -> bool:
    """True for "Basic Og==" (':'), what skopeo sends for a Basic challenge without credentials."""
    if not value or not value.lower().startswith("basic "):
        return False
    try:
        return base64.b64decode(value[6:].strip(), validate=True) == b":"
    except ValueError:
        return False


def registry_key(host: str) -> str:
    """The path component that names an upstream registry host: ':' → '_', lowercased."""
    if host.startswith("[") or host.count(":") > 1:
        raise ValueError(f"registry host {host!r}: IPv6 literals are not supported on the pull path")
    key = host.lower().replace(":", "_")
    if not _KEY_RE.match(key):
        raise ValueError(f"registry host {host!r} cannot be named on the pull path")
    return key


def registry_host(key: str) -> str:
    """The inverse of registry_key (hostnames never contain '_')."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid registry key {key!r}")
    return key.replace("_", ":")


def cell_reference(pull_path: str, ref: Reference, digest: str | None = None) -> str:
    """What a cell pulls: `<pull_path>/<registry-key>/<repository>@<digest>` (or :tag)."""
    base = f"{pull_path.rstrip('/')}/{registry_key(ref.registry)}/{ref.repository}"
    digest = digest or ref.digest
    if digest:
        return f"{base}@{digest}"
    return f"{base}:{ref.tag or 'latest'}"


def _error(status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


class PullPath:
    def __init__(
        self,
        config: RegistriesConfig,
        *,
        max_concurrent: int = 64,
        connect_timeout: float = 30.0,
        read_timeout: float = 300.0,
        basic_challenge: bool = True,
    ) -> None:
        self.config = config
        self.basic_challenge = basic_challenge
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._max_concurrent = max_concurrent
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._schemes = transport.SchemeCache()
        self.host: str | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """host:port the server listens on (after start)."""
        return f"{self.host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0 picks a free one; see .port)."""
        if self._runner is not None:
            raise RuntimeError("pull path already started")
        app = web.Application(client_max_size=1 << 16)
        app.router.add_route("*", "/v2/", self._root)
        app.router.add_route("*", "/v2", self._root)
        app.router.add_route("*", "/v2/{tail:.+}", self._forward)
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,  # bytes go through as the registry sent them
            trust_env=False,
            connector=aiohttp.TCPConnector(limit=self._max_concurrent),
        )
        self._slots = asyncio.Semaphore(self._max_concurrent)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._session.close()
            self._session = None
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio.Server here; the port is known only now
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.host = host
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("pull path listening", address=self.address)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    # -- handlers --------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the pull path is read-only: GET and HEAD only",
                          headers={"Allow": "GET, HEAD"})
        if self.basic_challenge and "Authorization" not in request.headers:
            # containers/image (skopeo) sends credentials only if the /v2/ ping asked for
            # them; without credentials it answers a Basic challenge with empty ones,
            # which are dropped before forwarding, so anonymous pulls still work.
            return _error(401, "UNAUTHORIZED", "authentication required (optional on the pull path)",
                          headers={"WWW-Authenticate": 'Basic realm="kiyot-pull-path"',
                                   "Docker-Distribution-API-Version": "registry/2.0"})
        # aiohttp leaves the body out of a HEAD answer and keeps its Content-Length.
        return web.Response(body=b"{}", content_type="application/json",
                            headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the pull path is read-only: GET and HEAD only",
                          headers={"Allow": "GET, HEAD"})
        m = _TAIL_RE.match(request.match_info["tail"])
        if not m:
            return _error(404, "NOT_FOUND",
                          "expected /v2/<registry-key>/<repository>/(manifests|blobs)/<reference>")
        key, repo, kind, reference = m["key"], m["repo"], m["kind"], m["ref"]
        try:
            host = registry_host(key)
            suffix = f"@{reference}" if ":" in reference else f":{reference}"
            ref = parse_reference(f"{host}/{repo}{suffix}")
        except (ValueError, InvalidReference) as exc:
            return _error(400, "NAME_INVALID", str(exc))
        if ref.registry != host or ref.repository != repo:
            return _error(400, "NAME_INVALID", f"{host}/{repo} is not a fully qualified repository name")
        if kind == "blobs" and ref.digest is None:
            return _error(400, "DIGEST_INVALID", "blobs are fetched by digest")
        try:
            endpoints = self.config.endpoints(ref)
        except RegistryBlocked as exc:
            return _error(403, "DENIED", str(exc))

        # A client may send several Accept lines (skopeo does): forward them all.
        headers = {h: ", ".join(request.headers.getall(h)) for h in _FORWARD_HEADERS if h in request.headers}
        headers["User-Agent"] = "kiyot-py-pullpath"
        if _empty_basic(headers.get("Authorization")):
            del headers["Authorization"]
        assert self._slots is not None
        async with self._slots:
            failures: list[str] = []
            for i, endpoint in enumerate(endpoints):
                last = i == len(endpoints) - 1
                path = f"/v2/{endpoint.repository(ref)}/{kind}/{reference}"
                try:
                    upstream = await self._attempt(request.method, endpoint, path, headers,
                                                   endpoint.repository(ref))
                except RegistryError as exc:  # the token service refused or failed
                    failures.append(str(exc))
                    if last:
                        return _error(401, "UNAUTHORIZED", "; ".join(failures))
                    continue
                except aiohttp.ClientError as exc:
                    failures.append(f"{endpoint}: {exc.__class__.__name__}: {exc}")
                    if last:
                        log.warning("pull path upstream unreachable", image=str(ref), errors=failures)
                        return _error(502, "UNAVAILABLE", f"upstream unreachable: {'; '.join(failures)}")
                    continue
                async with upstream:
                    if not last and (upstream.status in (401, 403, 404) or upstream.status >= 500):
                        failures.append(f"{endpoint}: {upstream.status}")
                        continue  # a mirror without it (or not for us): try the next
                    return await self._relay(request, upstream, head)
        raise AssertionError("unreachable")  # the loop returns at the last endpoint

    async def _attempt(self, method: str, endpoint: Endpoint, path: str, headers: dict[str, str],
                       repository: str) -> aiohttp.ClientResponse:
        """One upstream request; on a Bearer challenge the node fetches the token itself
        (with the cell's Basic credentials, if it sent any) and asks once more."""
        incoming = headers.get("Authorization", "")
        basic = incoming if incoming.lower().startswith("basic ") else None
        key = (endpoint.api_host, repository, hashlib.sha256(incoming.encode()).hexdigest())
        cached = self._tokens.get(key)
        loop = asyncio.get_running_loop()
        if cached is not None and cached[1] > loop.time():
            headers = {**headers, "Authorization": f"Bearer {cached[0]}"}
        resp = await self._open(method, endpoint, path, headers)
        if resp.status != 401:
            return resp
        bearer = None
        for value in resp.headers.getall("WWW-Authenticate", []):
            for scheme, params in parse_www_authenticate(value):
                if scheme == "bearer" and bearer is None:
                    bearer = params
        if bearer is None:
            return resp  # Basic (or nothing): the cell answers it itself
        resp.release()
        assert self._session is not None
        token = await fetch_token(self._session, bearer, repository, basic,
                                  verify_tls=not endpoint.insecure, where=f"{endpoint}/{repository}",
                                  user_agent="kiyot-py-pullpath")
        if len(self._tokens) > 1024:
            self._tokens.clear()
        self._tokens[key] = (token, loop.time() + _TOKEN_TTL)
        return await self._open(method, endpoint, path, {**headers, "Authorization": f"Bearer {token}"})

    async def _open(self, method: str, endpoint: Endpoint, path: str, headers: dict[str, str]
                    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        return await transport.request(self._session, method, endpoint, path, headers, self._schemes)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, head: bool
                     ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for h in _COPY_HEADERS:
            if h in upstream.headers:
                resp.headers[h] = upstream.headers[h]
        if "Content-Length" in upstream.headers:
            resp.content_length = int(upstream.headers["Content-Length"])
        await resp.prepare(request)
        if not head:
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await resp.write(chunk)
            except ConnectionResetError:
                log.debug("pull path client went away", url=str(upstream.url.with_query(None)))
                return resp
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Too late for a status: cut the connection so the cell sees a short body.
                log.warning("pull path upstream failed mid-body", url=str(upstream.url.with_query(None)),
                            error=exc.__class__.__name__)
                if request.transport is not None:
                    request.transport.close()
                return resp
        await resp.write_eof()
        return resp

