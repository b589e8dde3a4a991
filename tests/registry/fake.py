"""A tiny in-memory registry with Basic and Bearer auth, redirects and misbehaviours.

Only for what the real docker-registry cannot show: the token flow, Basic auth, blob
redirects, a lying Docker-Content-Digest and a registry that never answers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

from aiohttp import web

USER, PASSWORD, TOKEN = "alice", "s3cret-pw", "tok-123"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """Repositories: "bearer/app" (token flow, Basic to the token service), "basic/app"
    (Basic), "open/app" (anonymous; blobs redirect to /storage), "liar/app" (a wrong
    Docker-Content-Digest), "slow/app" (never answers), "multi/app" (anonymous: an OCI
    index of a linux/amd64 and a linux/arm64/v8 manifest, see `platforms`)."""

    def __init__(self) -> None:
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]},
                                  "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        self.layer = b"not really a layer" * 100
        self.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "size": len(self.config), "digest": sha(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "size": len(self.layer), "digest": sha(self.layer)}],
        }).encode()
        self.blobs = {sha(self.config): self.config, sha(self.layer): self.layer}
        # "multi/app": platform → (manifest digest, config digest); manifests by digest.
        self.platforms: dict[str, tuple[str, str]] = {}
        self.platform_manifests: dict[str, bytes] = {}
        entries = []
        for arch, variant in (("amd64", ""), ("arm64", "v8")):
            config = json.dumps({"architecture": arch, "os": "linux", **({"variant": variant} if variant else {}),
                                 "config": {"Cmd": [f"/bin/{arch}"], "User": "1000"},
                                 "rootfs": {"type": "layers", "diff_ids": []}}).encode()
            layer = f"a {arch} layer".encode() * 50
            manifest = json.dumps({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "size": len(config), "digest": sha(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "size": len(layer), "digest": sha(layer)}],
            }).encode()
            self.blobs[sha(config)] = config
            self.blobs[sha(layer)] = layer
            self.platform_manifests[sha(manifest)] = manifest
            self.platforms["/".join(p for p in ("linux", arch, variant) if p)] = (sha(manifest), sha(config))
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": len(manifest),
                            "digest": sha(manifest),
                            "platform": {"os": "linux", "architecture": arch,
                                         **({"variant": variant} if variant else {})}})
        self.index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                 "manifests": entries}).encode()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_get("/storage/{digest}", self.storage)
        app.router.add_route("*", "/v2/{kind}/app/manifests/{ref}", self.manifests)
        app.router.add_route("*", "/v2/{kind}/app/blobs/{digest}", self.blob)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _basic_ok(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return request.headers.get("Authorization") == expected

    def _denied(self, request: web.Request) -> web.Response | None:
        kind = request.match_info["kind"]
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        if kind == "bearer" and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = (f'Bearer realm="http://{self.host}/token",service="fake",'
                         f'scope="repository:bearer/app:pull"')
            return web.Response(status=401, text=body, content_type="application/json",
                                headers={"WWW-Authenticate": challenge})
        if kind == "basic" and not self._basic_ok(request):
            return web.Response(status=401, text=body, content_type="application/json",
                                headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return None

    async def token(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, str(request.rel_url), request.headers.get("Authorization")))
        if not self._basic_ok(request):
            return web.json_response({"details": "incorrect username or password"}, status=401)
        if request.query.get("service") != "fake" or request.query.get("scope") != "repository:bearer/app:pull":
            return web.json_response({"details": "bad scope"}, status=400)
        return web.json_response({"token": TOKEN})

    async def manifests(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["kind"] == "slow":
            await asyncio.sleep(3600)
        denied = self._denied(request)
        if denied is not None:
            return denied
        ref = request.match_info["ref"]
        if request.match_info["kind"] == "multi":
            return self._multi(ref)
        if ref not in ("latest", sha(self.manifest)):
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                     status=404)
        digest = sha(self.manifest)
        if request.match_info["kind"] == "liar":
            digest = sha(b"something else")
        return web.Response(body=self.manifest, headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": digest})

    def _multi(self, ref: str) -> web.Response:
        if ref in ("latest", sha(self.index)):
            body, media_type = self.index, "application/vnd.oci.image.index.v1+json"
        elif ref in self.platform_manifests:
            body, media_type = self.platform_manifests[ref], "application/vnd.oci.image.manifest.v1+json"
        else:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                     status=404)
        return web.Response(body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": sha(body)})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]},
                                     status=404)
        if request.match_info["kind"] == "open":
            raise web.HTTPTemporaryRedirect(f"/storage/{digest}")
        return web.Response(body=self.blobs[digest], headers={
            "Content-Type": "application/octet-stream", "Docker-Content-Digest": digest})

    async def storage(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        data = self.blobs[request.match_info["digest"]]
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})
