"""The node's CA and the agent's TLS: who may talk to a cell, and which cell answers."""

from __future__ import annotations

import ssl
import stat

import aiohttp
import pytest
from aiohttp import web

from kiyot_cell import tls
from kiyot_py.pki import NodePKI


def test_the_ca_is_kept_with_its_keys_private_and_reused(tmp_path):
    pki = NodePKI(tmp_path / "pki", "node-a")
    for name in ("ca.key", "node.key"):
        assert stat.S_IMODE((tmp_path / "pki" / name).stat().st_mode) == 0o600
    again = NodePKI(tmp_path / "pki", "node-a")  # a restart: the same CA, so cells stay reachable
    assert again.ca_pem == pki.ca_pem
    identity = pki.issue_cell("c123")
    identity.write(tmp_path / "cell")
    assert stat.S_IMODE((tmp_path / "cell" / "cell.key").stat().st_mode) == 0o600
    assert identity.server_name == "c123.cells.kiyot"
    assert b"PRIVATE KEY" not in identity.cert_pem and b"PRIVATE KEY" in identity.key_pem


def _client(cert_dir=None, pki: NodePKI | None = None) -> ssl.SSLContext:
    """A client context trusting `pki`'s CA, presenting the given cell's key (or nothing)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    ctx.check_hostname = False
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "cell.crt"), str(cert_dir / "cell.key"))
    return ctx


@pytest.fixture
async def cell(tmp_path):
    """The agent's TLS and its check of the caller, answering with the node it names."""
    pki = NodePKI(tmp_path / "pki", "node-a")
    pki.issue_cell("c1").write(tmp_path / "c1")
    pki.issue_cell("c2").write(tmp_path / "c2")

    async def who(request: web.Request) -> web.Response:
        return web.json_response({"node": tls.node_of(request.transport.get_extra_info("peercert"))})

    app = web.Application()
    app.router.add_get("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(tmp_path / "c1"))
    await site.start()
    yield pki, f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/who"
    await runner.cleanup()


async def test_only_the_nodes_certificate_is_the_node(cell, tmp_path):
    pki, url = cell
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=pki.client_context(), server_hostname="c1.cells.kiyot") as resp:
            assert (await resp.json())["node"] == "node-a"
        # Another cell's certificate (same CA) is also its client identity towards the pull
        # path: it passes the handshake and names no node (the agent's middleware says 401).
        async with session.get(url, ssl=_client(tmp_path / "c2", pki), server_hostname="c1.cells.kiyot") as resp:
            assert (await resp.json())["node"] is None
        with pytest.raises(aiohttp.ClientError):  # no certificate at all: no handshake
            await session.get(url, ssl=_client(None, pki))
        stranger = NodePKI(tmp_path / "elsewhere", "node-a")  # same name, another CA
        stranger_ctx = stranger.client_context()
        stranger_ctx.load_verify_locations(cadata=pki.ca_pem.decode())  # it even trusts our cell
        with pytest.raises(aiohttp.ClientError):
            await session.get(url, ssl=stranger_ctx, server_hostname="c1.cells.kiyot")
