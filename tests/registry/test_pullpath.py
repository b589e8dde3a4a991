"""The pull path: the node's content store served to cells over mutual TLS, by grant.

A cell gets what it was granted, by digest, and nothing else: no registry behind it, no
tag, no other cell's image, no answer at all without a cell's certificate. A canary
server on the host's loopback proves that no path a cell can name makes the node reach
another address (what the old forwarding pull path did, issue #12 point 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kiyot_py.pki import NodePKI, cell_of
from kiyot_py.registry import pullpath
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.pullpath import PullGrants, PullPath


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYER = b"layer bytes " * 1000
CONFIG = b'{"architecture":"amd64","os":"linux"}'
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"digest": sha(CONFIG), "size": len(CONFIG)},
    "layers": [{"digest": sha(LAYER), "size": len(LAYER)}],
}).encode()
OTHER = b"another pod's layer"


class Node:
    def __init__(self, tmp: Path) -> None:
        self.pki = NodePKI(tmp / "pki", "node-a")
        self.content = ContentStore(tmp / "content")
        for blob in (LAYER, CONFIG, MANIFEST, OTHER):
            self.content.put(sha(blob), blob)
        self.grants = PullGrants()
        self.tmp = tmp
        self.pull_path = PullPath(self.content, self.grants, self.pki.pull_path_context(["127.0.0.1"]), per_cell=2)

    def cell(self, cell_id: str) -> ssl.SSLContext:
        """The TLS client side of cell `cell_id`: its own certificate, the node's CA."""
        self.pki.issue_cell(cell_id).write(self.tmp / cell_id)
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        ctx.load_cert_chain(str(self.tmp / cell_id / "cell.crt"), str(self.tmp / cell_id / "cell.key"))
        return ctx

    def url(self, path: str) -> str:
        return f"https://{self.pull_path.address}{path}"


@pytest.fixture
async def node(tmp_path):
    n = Node(tmp_path)
    await n.pull_path.start("127.0.0.1", 0)
    yield n
    await n.pull_path.stop()


async def get(session, node, path, ctx, method="GET"):
    async with session.request(method, node.url(path), ssl=ctx) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_a_cell_gets_what_it_was_granted_and_nothing_else(node):
    a, b = node.cell("cella"), node.cell("cellb")
    node.grants.grant("cella", node.content.manifest_blobs(sha(MANIFEST)))
    node.grants.grant("cellb", [sha(OTHER)])
    async with aiohttp.ClientSession() as s:
        assert (await get(s, node, "/v2/", a))[0] == 200
        status, body, headers = await get(s, node, f"/v2/any/name/manifests/{sha(MANIFEST)}", a)
        assert (status, body) == (200, MANIFEST)
        assert headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert headers["Docker-Content-Digest"] == sha(MANIFEST)
        for blob in (CONFIG, LAYER):
            status, body, headers = await get(s, node, f"/v2/x/blobs/{sha(blob)}", a)
            assert (status, body, headers["Docker-Content-Digest"]) == (200, blob, sha(blob))
        status, body, headers = await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", a, method="HEAD")
        assert (status, body, int(headers["Content-Length"])) == (200, b"", len(LAYER))
        # In the store, granted to another cell: not to this one (and the other way round).
        status, body, _ = await get(s, node, f"/v2/x/blobs/{sha(OTHER)}", a)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert (await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", b))[0] == 404
        assert (await get(s, node, f"/v2/x/blobs/{sha(OTHER)}", b))[0] == 200
        # Tags, other routes and writes are never served.
        assert (await get(s, node, "/v2/x/manifests/latest", a))[0] == 404
        assert (await get(s, node, "/v2/_catalog", a))[0] == 404
        assert (await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", a, method="DELETE"))[0] == 405
        assert (await get(s, node, "/v2/x/blobs/uploads/", a, method="POST"))[0] == 405
        # The cell is gone: so is what it was granted.
        node.grants.revoke("cella")
        assert (await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", a))[0] == 404


async def test_no_cell_certificate_no_answer(node, tmp_path):
    node.grants.grant("cella", [sha(LAYER)])
    bare = ssl.create_default_context(cafile=str(node.pki.ca_path))
    stranger = NodePKI(tmp_path / "elsewhere", "node-a")  # another CA's cell named the same
    stranger.issue_cell("cella").write(tmp_path / "stranger")
    forged = ssl.create_default_context(cafile=str(node.pki.ca_path))
    forged.load_cert_chain(str(tmp_path / "stranger" / "cell.crt"), str(tmp_path / "stranger" / "cell.key"))
    async with aiohttp.ClientSession() as s:
        for ctx in (bare, forged):
            with pytest.raises(aiohttp.ClientError):
                await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", ctx)
        # The node's own client certificate is from the CA but names no cell: 403.
        status, _, _ = await get(s, node, f"/v2/x/blobs/{sha(LAYER)}", node.pki.client_context())
        assert status == 403


async def test_nothing_a_cell_names_reaches_another_address(node):
    """What the old pull path forwarded (a registry key naming the host's loopback, a
    registry's redirect, a token realm) now meets a store that forwards nothing."""
    seen: list[str] = []

    async def canary(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="SECRET")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", canary)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    a = node.cell("cella")
    node.grants.grant("cella", [sha(LAYER)])
    try:
        async with aiohttp.ClientSession() as s:
            for path in (f"/v2/127.0.0.1_{port}/x/manifests/latest",
                         f"/v2/127.0.0.1_{port}/latest/meta-data/iam/security-credentials/node-role",
                         f"/v2/127.0.0.1:{port}/x/blobs/{sha(OTHER)}",
                         f"/v2/http://127.0.0.1:{port}/x/blobs/{sha(OTHER)}"):
                status, body, _ = await get(s, node, path, a)
                assert status == 404 and b"SECRET" not in body, path
            # Nothing asked for, not even what the cell was granted, went anywhere.
            assert (await get(s, node, f"/v2/127.0.0.1_{port}/x/blobs/{sha(LAYER)}", a))[0] == 200
        assert seen == []
        # The control: the canary answers whoever asks it directly.
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/probe") as resp:
            assert await resp.text() == "SECRET"
        assert seen == ["/probe"]
    finally:
        await runner.cleanup()


async def test_one_cell_cannot_hold_back_another(node, monkeypatch):
    """Each cell has slots of its own (2 here): cell A's stalled requests hold only its own;
    past the waiting bound A is told 429; cell B is served meanwhile."""
    monkeypatch.setattr(pullpath, "PER_CELL_WAITING", 1)
    release = asyncio.Event()
    answer = PullPath._answer

    async def stalled(self, request, kind, digest):
        if cell_of(request.transport.get_extra_info("peercert")) == "cella":
            await release.wait()
        return await answer(self, request, kind, digest)

    monkeypatch.setattr(PullPath, "_answer", stalled)
    a, b = node.cell("cella"), node.cell("cellb")
    node.grants.grant("cella", [sha(LAYER)])
    node.grants.grant("cellb", [sha(LAYER)])
    path = f"/v2/x/blobs/{sha(LAYER)}"
    async with aiohttp.ClientSession() as s:
        held = [asyncio.create_task(get(s, node, path, a)) for _ in range(3)]  # 2 in slots, 1 waiting
        await asyncio.sleep(0.3)
        assert (await get(s, node, path, a))[0] == 429
        assert (await asyncio.wait_for(get(s, node, path, b), 30))[0] == 200
        assert not any(t.done() for t in held)
        release.set()
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200, 200]


def test_the_pull_path_certificate_names_its_address_and_serves_only(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    pki = NodePKI(tmp_path / "pki", "node-a")
    pki.pull_path_context(["10.123.0.1", "node-a.example"])
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "pull-path.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.123.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["node-a.example"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]  # it cannot pass for the node towards a cell
    assert oct((tmp_path / "pki" / "pull-path.key").stat().st_mode & 0o777) == "0o600"
    assert cell_of({"subjectAltName": (("DNS", "c1.cells.kiyot"),)}) == "c1"
    assert cell_of({"subjectAltName": (("DNS", "a.b.cells.kiyot"), ("URI", "kiyot:node:n"))}) is None
    assert cell_of(None) is None
