"""The HTTP side of cells/API.md: routes, bearer auth, body limit, JSON errors."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import API_VERSION, __version__, identity, log, tls
from .config import AgentConfig
from .containers import ContainerManager
from .errors import ApiError, invalid
from .events import EventHub
from .facts import CellFactsCache
from .images import ImageStore
from .notices import NoticeWatcher
from .pod import Pod
from .records import LIVE_STATES
from .stats import StatsSampler
from .streams import Streams
from .volumes import Volumes

_log = log.get("server")
HEARTBEAT = 5.0
LOG_POLL = 0.1  # between two looks at a log that had new lines within LOG_QUIET seconds
LOG_POLL_IDLE = 0.5  # at a quiet one: a hundred idle containers must cost next to nothing
LOG_QUIET = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CFG: web.AppKey[AgentConfig] = web.AppKey("cfg", AgentConfig)
MGR: web.AppKey[ContainerManager] = web.AppKey("mgr", ContainerManager)
IMAGES: web.AppKey[ImageStore] = web.AppKey("images", ImageStore)
POD: web.AppKey[Pod] = web.AppKey("pod", Pod)
HUB: web.AppKey[EventHub] = web.AppKey("hub", EventHub)
FACTS: web.AppKey[CellFactsCache] = web.AppKey("facts", CellFactsCache)
NOTICES: web.AppKey[NoticeWatcher] = web.AppKey("notices", NoticeWatcher)
VOLUMES: web.AppKey[Volumes] = web.AppKey("volumes", Volumes)
STATS: web.AppKey[StatsSampler] = web.AppKey("stats", StatsSampler)
TLS: web.AppKey[ssl.SSLContext] = web.AppKey("tls", ssl.SSLContext)
# What a cell that has no certificate from the node yet answers (see identity.py).
BEFORE_ENROLLMENT = frozenset({"/v1/health", "/v1/identity"})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        if e.status != 401:
            (_log.warning if e.status >= 500 else _log.info)(
                "request_failed", method=request.method, path=request.path, status=e.status, message=e.message)
        return _error(e.status, e.code, e.message)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", f"request body over {request.app[CFG].max_body} bytes")
    except web.HTTPNotFound:
        return _error(404, "not_found", f"no route {request.path}")
    except web.HTTPMethodNotAllowed:
        return _error(405, "invalid", f"method {request.method} not allowed on {request.path}")
    except web.HTTPException:
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # every other failure is a 500 with a message
        _log.exception("internal_error", path=request.path)
        return _error(500, "internal", f"{type(e).__name__}: {e}")


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Before anything else runs (no body is read, no route is resolved into an action).
    # The TLS handshake already required a certificate from the node's CA; only one that
    # names a node may act (another cell's, from the same CA, names none).
    transport = request.transport
    if tls.node_of(transport.get_extra_info("peercert") if transport is not None else None) is None:
        return _error(401, "unauthorized", "the client certificate does not name a node")
    if request.path not in BEFORE_ENROLLMENT and not identity.enrolled(request.app[CFG].tls_dir):
        return _error(503, "not_enrolled", "the cell has no certificate from the node yet (PUT /v1/identity)")
    return await handler(request)


async def read_json(request: web.Request) -> dict[str, Any]:
    limit = request.app[CFG].max_body
    if request.content_length is not None and request.content_length > limit:
        raise ApiError("too_large", f"request body over {limit} bytes")
    raw = await request.read()
    if len(raw) > limit:
        raise ApiError("too_large", f"request body over {limit} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise invalid(f"malformed JSON: {e}") from e
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


# --- handlers -----------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    cfg = request.app[CFG]
    return web.json_response({"version": __version__, "api": API_VERSION, "ready": True, "runtime": cfg.runtime,
                              "enrolled": identity.enrolled(cfg.tls_dir)})


async def put_identity(request: web.Request) -> web.Response:
    """The node's certificate for this cell's own key: kept, and served from the next
    handshake on (the live context loads it; connections open now keep theirs)."""
    body = await read_json(request)
    cert = body.get("certificate")
    if not isinstance(cert, str):
        raise invalid("certificate (PEM) is required")
    tls_dir = request.app[CFG].tls_dir
    try:
        name = identity.accept(tls_dir, cert.encode())
    except identity.IdentityRefused as e:
        raise invalid(f"certificate refused: {e}") from None
    if TLS in request.app:
        request.app[TLS].load_cert_chain(str(tls_dir / identity.CERT), str(tls_dir / identity.KEY))
    _log.info("enrolled", name=name)
    return web.json_response({"name": name})


async def facts(request: web.Request) -> web.Response:
    return web.json_response(await request.app[FACTS].get())


async def put_pod(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(request.app[POD].put(body))


async def put_volume(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(request.app[VOLUMES].put(request.match_info["name"], body))


async def read_volume_file(request: web.Request) -> web.Response:
    data = request.app[VOLUMES].read_file(request.match_info["name"])
    return web.json_response({"data": base64.b64encode(data).decode()})


async def delete_volume(request: web.Request) -> web.Response:
    request.app[VOLUMES].delete(request.match_info["name"])
    return web.json_response({})


async def pull(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await request.app[IMAGES].pull(body))


async def use_shared_image(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await request.app[IMAGES].use_shared(body))


async def remove_image(request: web.Request) -> web.Response:
    digest = request.match_info["digest"]
    await request.app[IMAGES].remove(digest, in_use=request.app[MGR].uses_image(digest))
    return web.json_response({})


async def usage(request: web.Request) -> web.Response:
    images, containers = await asyncio.gather(asyncio.to_thread(request.app[IMAGES].usage),
                                              asyncio.to_thread(request.app[MGR].usage))
    return web.json_response({"images": images, "containers": containers})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].view())


async def list_containers(request: web.Request) -> web.Response:
    return web.json_response(request.app[MGR].list())


async def create_container(request: web.Request) -> web.Response:
    body = await read_json(request)
    mgr = request.app[MGR]
    rec, created = await mgr.create(body)
    return web.json_response(mgr.view(rec), status=201 if created else 200)


async def get_container(request: web.Request) -> web.Response:
    mgr = request.app[MGR]
    return web.json_response(mgr.view(mgr.get(request.match_info["id"])))


async def start_container(request: web.Request) -> web.Response:
    await read_json(request)
    mgr = request.app[MGR]
    return web.json_response(mgr.view(await mgr.start(request.match_info["id"])))


async def stop_container(request: web.Request) -> web.Response:
    body = await read_json(request)
    mgr = request.app[MGR]
    return web.json_response(mgr.view(await mgr.stop(request.match_info["id"], body)))


async def delete_container(request: web.Request) -> web.Response:
    await request.app[MGR].delete(request.match_info["id"])
    return web.json_response({})


async def exec_container(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await request.app[MGR].exec(request.match_info["id"], body))


async def update_resources(request: web.Request) -> web.Response:
    body = await read_json(request)
    mgr = request.app[MGR]
    return web.json_response(mgr.view(await mgr.update_resources(request.match_info["id"], body)))


async def container_logs(request: web.Request) -> web.StreamResponse:
    mgr = request.app[MGR]
    cid = request.match_info["id"]
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise invalid("'offset' must be an integer") from None
    if offset < 0:
        raise invalid("'offset' must be >= 0")
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    size = mgr.log_size(cid)
    if offset > size:
        raise ApiError("range", f"offset {offset} is past the end of the log ({size} bytes)")
    start, data = await mgr.read_log(cid, offset)  # later than asked if rotated away
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Log-Offset": str(start)})
    await resp.prepare(request)
    pos = start
    loop = asyncio.get_running_loop()
    last_line = loop.time()
    while True:
        # Read the state *before* the bytes: once it says exited, conmon has written every line.
        rec = mgr.store.get(cid)
        finished = rec is None or rec.state not in LIVE_STATES
        while data:
            await resp.write(data)
            pos += len(data)
            last_line = loop.time()
            data = await _log_bytes_at(mgr, cid, pos)
        if not follow or finished:
            break
        # New lines show by the next look; an exit at once, so that a reader (the node,
        # before it reports the exit) never waits a whole look for the end of the log.
        await mgr.wait_changed(LOG_POLL if loop.time() - last_line < LOG_QUIET else LOG_POLL_IDLE)
        data = await _log_bytes_at(mgr, cid, pos)
    await resp.write_eof()
    return resp


async def _log_bytes_at(mgr: ContainerManager, cid: str, pos: int) -> bytes:
    at, data = await mgr.read_log(cid, pos)
    if at != pos:
        # This reader fell a whole segment behind: break the stream rather than skip
        # silently; the reader resumes from its offset and the header shows the gap.
        raise ConnectionAbortedError(f"log of {cid} rotated past offset {pos}")
    return data


async def events(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    mgr = request.app[MGR]
    # Subscribe and snapshot with no await in between: no change can fall in the gap.
    sub = hub.subscribe(stats=request.query.get("stats") == "1")
    snapshot: dict[str, Any] = {"type": "snapshot", "containers": mgr.list()}
    if NOTICES in request.app:
        snapshot["notices"] = list(request.app[NOTICES].notices.values())
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)
        await resp.write(json.dumps(snapshot).encode() + b"\n")
        while not sub.overflowed:
            try:
                ev = await asyncio.wait_for(sub.queue.get(), HEARTBEAT)
            except TimeoutError:
                ev = {"type": "heartbeat"}
            await resp.write(json.dumps(ev).encode() + b"\n")
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        hub.unsubscribe(sub)
    return resp


def build_app(cfg: AgentConfig, tls_context: ssl.SSLContext | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_mw, auth_mw], client_max_size=cfg.max_body)
    if tls_context is not None:
        app[TLS] = tls_context
    hub = EventHub()
    images = ImageStore(cfg)
    pod = Pod(cfg.pod_dir, cfg.catatonit_path)
    mgr = ContainerManager(cfg, images, pod, hub)
    app[CFG] = cfg
    app[HUB] = hub
    app[IMAGES] = images
    app[POD] = pod
    app[MGR] = mgr
    app[VOLUMES] = Volumes(cfg.volumes_dir)
    app[FACTS] = CellFactsCache(cfg.runtime_path, cfg.seccomp_profile)
    sampler = StatsSampler(cfg, mgr, hub)
    app[STATS] = sampler
    notices = NoticeWatcher(cfg.instance_metadata, hub) if cfg.instance_metadata else None
    if notices is not None:
        app[NOTICES] = notices

    async def on_startup(app: web.Application) -> None:
        for d in (cfg.state_dir, cfg.containers_dir, cfg.tmp_dir, cfg.runtime_root):
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        cfg.state_dir.chmod(0o700)  # images, logs and bundles are the cell's business only
        images.load()
        pod.load()
        await mgr.recover()
        sampler.start()
        if notices is not None:
            notices.start()

    async def on_cleanup(app: web.Application) -> None:
        if notices is not None:
            await notices.close()
        await sampler.close()
        await mgr.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_get("/v1/health", health)
    r.add_put("/v1/identity", put_identity)
    r.add_get("/v1/facts", facts)
    r.add_put("/v1/pod", put_pod)
    r.add_put("/v1/volumes/{name}", put_volume)
    r.add_get("/v1/volumes/{name}/file", read_volume_file)
    r.add_delete("/v1/volumes/{name}", delete_volume)
    r.add_post("/v1/images/pull", pull)
    r.add_post("/v1/images/shared", use_shared_image)
    r.add_delete("/v1/images/{digest}", remove_image)
    r.add_get("/v1/usage", usage)
    r.add_get("/v1/stats", stats)
    r.add_get("/v1/containers", list_containers)
    r.add_post("/v1/containers", create_container)
    r.add_get("/v1/containers/{id}", get_container)
    r.add_post("/v1/containers/{id}/start", start_container)
    r.add_post("/v1/containers/{id}/stop", stop_container)
    r.add_delete("/v1/containers/{id}", delete_container)
    r.add_get("/v1/containers/{id}/logs", container_logs)
    r.add_post("/v1/containers/{id}/exec", exec_container)
    r.add_post("/v1/containers/{id}/resources", update_resources)
    streams = Streams(mgr)  # WebSocket sessions
    r.add_get("/v1/containers/{id}/exec/stream", streams.exec)
    r.add_get("/v1/containers/{id}/attach", streams.attach)
    r.add_get("/v1/portforward", streams.portforward)
    r.add_get("/v1/events", events)
    return app
