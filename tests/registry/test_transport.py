"""The one http/https choice the client and the pull path share (kiyot_py.registry.transport)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from kiyot_py.registry.config import Endpoint
from kiyot_py.registry.transport import SchemeCache, request


@pytest.fixture
async def plain_http():
    """A plain-HTTP server: /tls answers like Go's TLS server does to plain HTTP, /bad is
    some other 400, /ok is 200."""
    async def tls(_):
        return web.Response(status=400, text="Client sent an HTTP request to an HTTPS server.\n")

    async def bad(_):
        return web.Response(status=400, text="a bad request, whole")

    async def ok(_):
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_route("*", "/tls", tls)
    app.router.add_route("*", "/bad", bad)
    app.router.add_route("*", "/ok", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def test_insecure_tries_http_then_https_and_remembers(plain_http):
    endpoint = Endpoint(plain_http, insecure=True)
    async with aiohttp.ClientSession() as session:
        schemes = SchemeCache()
        assert schemes.schemes(endpoint) == ["http", "https"]
        # An HTTPS-only answer moves on to https, which this server cannot speak.
        with pytest.raises(aiohttp.ClientConnectionError):
            await request(session, "GET", endpoint, "/tls", {}, schemes)
        assert schemes.schemes(endpoint) == ["http", "https"]
        # HEAD has no body to tell by: the 400 comes back, and nothing is remembered.
        async with await request(session, "HEAD", endpoint, "/tls", {}, schemes) as resp:
            assert resp.status == 400
        assert schemes.schemes(endpoint) == ["http", "https"]
        # Another 400 is the server's answer, with its whole body.
        async with await request(session, "GET", endpoint, "/bad", {}, schemes) as resp:
            assert resp.status == 400 and await resp.text() == "a bad request, whole"
        assert schemes.schemes(endpoint) == ["http"]
        async with await request(session, "GET", endpoint, "/ok", {}, schemes) as resp:
            assert await resp.text() == "fine"


async def test_secure_is_https_only(plain_http):
    endpoint = Endpoint(plain_http)
    assert SchemeCache().schemes(endpoint) == ["https"]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await request(session, "GET", endpoint, "/ok", {}, SchemeCache())
