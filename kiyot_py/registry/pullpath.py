"""The pull path: the node's content store, served read-only to its cells over mutual TLS.

A cell fetches the images its pod runs from here, never from a registry: the node
fetched them at PullImage (with the pod's credentials, which stay on the node) and, at
CreateContainer, grants the cell the digests of the one image manifest it will run
(the manifest, its config, its layers). The server answers only what a cell was granted:

    GET|HEAD /v2/                               → 200 {} (the registry API's ping)
    GET|HEAD /v2/<name>/manifests/<digest>      → the manifest, if granted to this cell
    GET|HEAD /v2/<name>/blobs/<digest>          → the blob, if granted to this cell
    anything else                               → 404 (405 for a method other than GET/HEAD)

<name> is not looked at (a digest names the content); tags are never served. The cell
is known by the client certificate it presents (`<cell-id>.cells.kiyot`, signed by the
node's CA): no certificate, no answer. Nothing is forwarded anywhere, so nothing a cell
sends can make the node reach another address. Each cell has a few request slots of its
own (`per_cell`), so one pod cannot hold back another's pulls.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Iterable

import structlog
from aiohttp import web

from kiyot_py.pki import cell_of
from kiyot_py.registry.content import ContentStore

__all__ = ["PullGrants", "PullPath"]

log = structlog.get_logger("kiyot.registry.pullpath")

_ROUTE = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<digest>sha256:[0-9a-f]{64})$")
PER_CELL_SLOTS = 8  # concurrent requests per cell (skopeo fetches up to 6 layers at once)
PER_CELL_WAITING = 64  # requests past these wait; past this many waiting, 429
_CHUNK = 256 << 10


def _error(status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


class _CellSlots:
    def __init__(self, slots: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.waiting = 0


class PullGrants:
    """What each live cell may fetch: one set of digests per cell, gone with the cell.
    Kept in memory only: after a restart a cell is granted again at its next create."""

    def __init__(self) -> None:
        self._by_cell: dict[str, set[str]] = {}

    def grant(self, cell_id: str, digests: Iterable[str]) -> None:
        """Let `cell_id` fetch `digests` (what its pod's next container runs)."""
        self._by_cell.setdefault(cell_id, set()).update(digests)

    def revoke(self, cell_id: str) -> None:
        """The cell is gone: forget what it was granted."""
        self._by_cell.pop(cell_id, None)

    def of(self, cell_id: str) -> frozenset[str]:
        return frozenset(self._by_cell.get(cell_id, ()))

    def allows(self, cell_id: str, digest: str) -> bool:
        return digest in self._by_cell.get(cell_id, ())

    def cells(self) -> set[str]:
        return set(self._by_cell)


class PullPath:
    def __init__(self, content: ContentStore, grants: PullGrants, tls: ssl.SSLContext,
                 *, per_cell: int = PER_CELL_SLOTS) -> None:
        self._content = content
        self._grants = grants
        self._tls = tls
        self._per_cell = per_cell
        self._slots: dict[str, _CellSlots] = {}
        self._runner: web.AppRunner | None = None
        self.host: str | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """host:port the server listens on (after start)."""
        return f"{self.host}:{self.port}"

    # -- serving ---------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0 picks a free one; see .port)."""
        if self._runner is not None:
            raise RuntimeError("pull path already started")
        app = web.Application(client_max_size=1 << 16)
        app.router.add_route("*", "/v2/", self._root)
        app.router.add_route("*", "/v2", self._root)
        app.router.add_route("*", "/v2/{tail:.+}", self._serve)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=self._tls)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio.Server here; the port is known only now
        sockets = server.sockets if isinstance(server, asyncio.Server) else []
        self.host = host
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("pull path listening", address=self.address)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @staticmethod
    def _cell(request: web.Request) -> str | None:
        return cell_of(request.transport.get_extra_info("peercert") if request.transport else None)

    async def _root(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the pull path is read-only: GET and HEAD only",
                          headers={"Allow": "GET, HEAD"})
        if self._cell(request) is None:
            return _error(403, "DENIED", "the pull path serves cells only")
        # aiohttp leaves the body out of a HEAD answer and keeps its Content-Length.
        return web.Response(body=b"{}", content_type="application/json",
                            headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the pull path is read-only: GET and HEAD only",
                          headers={"Allow": "GET, HEAD"})
        cell = self._cell(request)
        if cell is None:
            return _error(403, "DENIED", "the pull path serves cells only")
        match = _ROUTE.match(request.match_info["tail"])
        if match is None:
            return _error(404, "NAME_UNKNOWN", "the pull path serves manifests and blobs by digest only")
        kind, digest = match["kind"], match["digest"]
        unknown = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
        if not self._grants.allows(cell, digest) or not self._content.has(digest):
            log.info("pull path refused", cell=cell, digest=digest)
            return _error(404, unknown, f"{digest} is not among what this cell may fetch")
        slots = self._slots_of(cell)
        if slots.waiting >= PER_CELL_WAITING:
            return _error(429, "TOOMANYREQUESTS", "too many requests from this cell at once")
        slots.waiting += 1
        entered = False
        try:
            async with slots.slots:
                slots.waiting -= 1
                entered = True
                return await self._answer(request, kind, digest)
        finally:
            if not entered:  # given up while waiting
                slots.waiting -= 1

    def _slots_of(self, cell: str) -> _CellSlots:
        slots = self._slots.get(cell)
        if slots is None:
            # Only granted cells get here, so the table follows the live cells: drop the gone.
            for gone in set(self._slots) - self._grants.cells():
                if not self._slots[gone].waiting and not self._slots[gone].slots.locked():
                    del self._slots[gone]
            slots = self._slots[cell] = _CellSlots(self._per_cell)
        return slots

    async def _answer(self, request: web.Request, kind: str, digest: str) -> web.StreamResponse:
        path = self._content.path(digest)
        headers = {"Docker-Content-Digest": digest, "Docker-Distribution-API-Version": "registry/2.0"}
        if kind == "manifests":
            body = path.read_bytes()  # a manifest is small (the node read it whole)
            media_type = json.loads(body).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
            return web.Response(body=body, headers={**headers, "Content-Type": media_type})
        return web.FileResponse(path, chunk_size=_CHUNK,
                                headers={**headers, "Content-Type": "application/octet-stream"})
