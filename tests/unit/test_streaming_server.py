"""The streaming server against a scripted cell: URLs and tokens, the WebSocket transports
(v5, v4 base64, port-forward channels) and the statuses clients read. SPDY sessions are
tested in test_streaming_spdy.py; the real path, through crictl, in tests/e2e."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import aiohttp
import pytest

from kiyot_py.errors import ResourceExhausted
from kiyot_py.streaming.relay import Outcome
from kiyot_py.streaming.requests import (
    ExecRequest,
    PortForwardRequest,
    RequestCache,
)
from kiyot_py.streaming.server import StreamingServer
from tests.support.scripted_agent import Backend

WAIT = 10.0  # bound on every wait: a bug fails, never hangs


@pytest.fixture
async def served():
    backend = Backend()
    server = StreamingServer(backend)
    await server.start()
    async with aiohttp.ClientSession() as http:
        yield server, backend, http
    await server.close()


def exec_request(**over) -> ExecRequest:
    fields = {"container_id": "c" * 64, "cmd": ("cat",), "tty": False, "stdin": True, "stdout": True,
              "stderr": True, **over}
    return ExecRequest(**fields)


def test_tokens_are_single_use_and_bounded():
    cache = RequestCache(limit=2)
    token = cache.put(exec_request())
    assert len(token) == 8
    assert cache.take(token) == exec_request()
    assert cache.take(token) is None
    cache.put(exec_request())
    cache.put(exec_request())
    with pytest.raises(ResourceExhausted):
        cache.put(exec_request())


def test_tokens_expire():
    cache = RequestCache(ttl=-1)
    token = cache.put(exec_request())
    assert cache.take(token) is None
    assert len(cache) == 0


async def test_urls_name_a_host_and_answer_once(served):
    server, _backend, http = served
    url = server.url_for(exec_request())
    assert url.startswith("http://127.0.0.1:") and "/exec/" in url
    async with http.ws_connect(url, protocols=("v5.channel.k8s.io",)) as ws:
        await asyncio.wait_for(ws.receive(), WAIT)
    async with http.get(url) as resp:  # used
        assert resp.status == 404
    async with http.get(url.replace("/exec/", "/attach/")) as resp:
        assert resp.status == 404
    async with http.put(server.url_for(exec_request())) as resp:
        assert resp.status == 405


async def test_spdy_upgrade_without_protocol_header_is_refused(served):
    server, _backend, http = served
    headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    async with http.post(server.url_for(exec_request()), headers=headers) as resp:
        assert resp.status == 400
    headers["X-Stream-Protocol-Version"] = "v9.channel.k8s.io"
    async with http.post(server.url_for(exec_request()), headers=headers) as resp:
        assert resp.status == 403
        assert "v4.channel.k8s.io" in resp.headers.getall("X-Accepted-Stream-Protocol-Versions")


async def test_websocket_v5_exec_pipes_stdin_and_reports_the_exit(served):
    server, backend, http = served
    backend.exit_code = 7
    async with http.ws_connect(server.url_for(exec_request()), protocols=("v5.channel.k8s.io",)) as ws:
        assert ws.protocol == "v5.channel.k8s.io"
        first = await asyncio.wait_for(ws.receive_bytes(), WAIT)
        assert first == b"\x01"  # an empty stdout message opens the session
        await ws.send_bytes(b"\x00hello")
        assert await asyncio.wait_for(ws.receive_bytes(), WAIT) == b"\x01hello"
        await ws.send_bytes(b"\x04" + json.dumps({"Width": 80, "Height": 24}).encode())
        await ws.send_bytes(b"\xff\x00")  # v5: close stdin
        status = await asyncio.wait_for(ws.receive_bytes(), WAIT)
        assert status[0] == 3
        body = json.loads(status[1:])
        assert body["status"] == "Failure" and body["reason"] == "NonZeroExitCode"
        assert body["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert backend.agents[0].closed


async def test_websocket_v4_base64_sends_text(served):
    server, _backend, http = served
    async with http.ws_connect(server.url_for(exec_request(stderr=False)),
                               protocols=("v4.base64.channel.k8s.io",)) as ws:
        assert await asyncio.wait_for(ws.receive_str(), WAIT) == "1"
        await ws.send_str("0" + base64.b64encode(b"abc").decode())
        assert await asyncio.wait_for(ws.receive_str(), WAIT) == "1" + base64.b64encode(b"abc").decode()


async def test_client_leaving_ends_the_session_in_the_cell(served):
    server, backend, http = served
    async with http.ws_connect(server.url_for(exec_request()), protocols=("v4.channel.k8s.io",)) as ws:
        await asyncio.wait_for(ws.receive_bytes(), WAIT)
    for _ in range(100):  # bounded: ~WAIT
        if backend.agents and backend.agents[0].closed:
            break
        await asyncio.sleep(WAIT / 100)
    assert backend.agents[0].closed


async def test_unknown_subprotocol_is_refused(served):
    server, _backend, http = served
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(server.url_for(exec_request()), protocols=("v9.channel.k8s.io",))
    assert caught.value.status == 403


async def test_websocket_port_forward_channels(served):
    server, _backend, http = served
    url = server.url_for(PortForwardRequest("s" * 64, (8080, 9090)))
    async with http.ws_connect(url, protocols=("v4.channel.k8s.io",)) as ws:
        seen = {}
        for _ in range(4):
            message = await asyncio.wait_for(ws.receive_bytes(), WAIT)
            seen[message[0]] = struct.unpack("<H", message[1:])[0]
        assert seen == {0: 8080, 1: 8080, 2: 9090, 3: 9090}
        await ws.send_bytes(b"\x02ping")
        assert await asyncio.wait_for(ws.receive_bytes(), WAIT) == b"\x02ping"


async def test_websocket_port_forward_without_ports_is_closed(served):
    server, backend, http = served
    async with http.ws_connect(server.url_for(PortForwardRequest("s" * 64)), protocols=("v4.channel.k8s.io",)) as ws:
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert backend.ports == []


def test_outcomes_as_clients_read_them():
    assert json.loads(Outcome(exit_code=0).v4_status()) == {"metadata": {}, "status": "Success"}
    failed = json.loads(Outcome(error="the cell is gone").v4_status())
    assert failed["reason"] == "InternalError" and failed["code"] == 500
    assert Outcome(exit_code=0).text() == b""
    assert b"exit status 3" in Outcome(exit_code=3).text()
    assert Outcome.of_status(b'{"exit_code": 5}') == Outcome(exit_code=5)
    assert Outcome.of_status(b"{}").ok
    assert Outcome.of_status(b"nonsense").error
