"""The node's agent client covers every route of cells/API.md, always over mutual TLS with
the node's certificate, and reaches only the cell whose name it pins."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from aiohttp import web

from kiyot_cell import tls
from kiyot_py.agent_client import (
    AgentClient,
    AgentConflict,
    AgentError,
    AgentFailed,
    AgentInvalid,
    AgentLogGone,
    AgentNotFound,
    AgentTimeout,
    AgentUnreachable,
)
from kiyot_py.pki import NodePKI
from tests.contract import routes

CID = "a" * 64


@pytest.fixture
def pki(tmp_path) -> NodePKI:
    return NodePKI(tmp_path / "pki", "node-a")


async def serve_as_cell(app: web.Application, pki: NodePKI, tmp_path, cell_id: str = "c1"):
    """Serve `app` on loopback with a cell's identity and the agent's own TLS settings."""
    identity = pki.issue_cell(cell_id)
    identity.write(tmp_path / cell_id)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(tmp_path / cell_id))
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1], identity.server_name


@pytest.fixture
async def fake_agent(pki, tmp_path):
    """An aiohttp app answering every contract route with a canned body, recording calls
    and the node each came from (by its client certificate)."""
    calls: list[tuple[str, str, str | None]] = []
    record = {"id": CID, "state": "running"}

    def answer(method: str, path: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            calls.append((method, path, tls.node_of(request.transport.get_extra_info("peercert"))))
            if path.endswith(("/exec/stream", "/attach", "/portforward")):  # echoes one message, then `{}`
                ws = web.WebSocketResponse()
                await ws.prepare(request)
                got = await ws.receive_bytes()
                await ws.send_bytes(b"\x01" + got[1:])
                await ws.send_bytes(b"\x03" + json.dumps(dict(request.query)).encode())
                await ws.close()
                return ws
            if path.endswith("/logs"):
                return web.Response(body=b"2026-11-24T00:00:00Z stdout F hi\n")
            if path == "/v1/events":
                resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await resp.prepare(request)
                await resp.write(json.dumps({"type": "snapshot", "containers": [record]}).encode() + b"\n")
                return resp
            if path.endswith("/exec"):
                return web.json_response({"exit_code": 4, "stdout": base64.b64encode(b"o").decode(),
                                          "stderr": base64.b64encode(b"e").decode()})
            if path == "/v1/volumes/{name}/file":
                return web.json_response({"data": base64.b64encode(b"bye").decode()})
            if path == "/v1/containers" and method == "GET":
                return web.json_response([record])
            if path == "/v1/containers/{id}" and method == "DELETE":
                return web.json_response({})
            return web.json_response(record)
        return handler

    app = web.Application()
    for method, path in routes():
        app.router.add_route(method, path, answer(method, path))
    runner, port, name = await serve_as_cell(app, pki, tmp_path)
    async with aiohttp.ClientSession() as session:
        yield AgentClient(session, f"https://127.0.0.1:{port}", pki.client_context(), name), calls
    await runner.cleanup()


async def test_client_covers_every_route(fake_agent):
    client, calls = fake_agent
    await client.health()
    await client.facts()
    await client.put_pod({"sandbox_id": CID})
    await client.pull("r", "sha256:x")
    await client.use_shared_image("sha256:" + CID, "/var/lib/kiyot-py/shared-images/images/unpacked/" + CID, 1)
    await client.remove_image("sha256:" + CID)
    await client.put_volume("ab" * 16, {"kind": "empty"})
    assert await client.read_volume_file("ab" * 16) == b"bye"
    await client.delete_volume("ab" * 16)
    await client.usage()
    await client.create_container({"id": CID})
    await client.get_container(CID)
    await client.start_container(CID)
    await client.stop_container(CID, 1, "SIGTERM")
    await client.delete_container(CID)
    assert (await client.update_resources(CID, {"memory": {"limit": 1 << 26}}))["id"] == CID
    assert b"".join([c async for _, c in client.logs(CID, 0, follow=False)]).endswith(b"hi\n")
    result = await client.exec_sync(CID, ["true"], 1)
    assert (result.exit_code, result.stdout, result.stderr) == (4, b"o", b"e")
    with pytest.raises(AgentError):  # the fake's stream ends; a real one never does
        async for event in client.events():
            assert event["type"] == "snapshot"
    stdio = {"tty": "0", "stdin": "1", "stdout": "1", "stderr": "0"}
    for stream, query in ((client.exec_stream(CID, ["cat"], tty=False, stdin=True, stdout=True, stderr=False),
                           {"cmd": "cat", **stdio}),
                          (client.attach_stream(CID, tty=False, stdin=True, stdout=True, stderr=False), stdio),
                          (client.port_stream(8080), {"port": "8080"})):
        async with stream as s:
            await s.send(0, b"hi")
            assert [await s.receive(), await s.receive(), await s.receive()] == [
                (1, b"hi"), (3, json.dumps(query).encode()), None]
    # Two routes serve people and tests, not the node: it keeps its own records, and takes
    # stats as the event stream pushes them. Another is spoken before the channel is the
    # usual one, by kiyot_py/enrollment.py (tests/cells/test_enrollment.py).
    assert {(m, p) for m, p, _ in calls} == set(routes()) - {
        ("GET", "/v1/containers"), ("GET", "/v1/stats"), ("PUT", "/v1/identity")}
    assert {node for _, _, node in calls} == {"node-a"}  # every call with the node's certificate


async def test_unreachable_agent_is_status_zero(pki):
    async with aiohttp.ClientSession() as session:
        client = AgentClient(session, "https://127.0.0.1:9", pki.client_context(), "c1.cells.kiyot")
        with pytest.raises(AgentError) as err:
            await client.health(timeout=2)
        with pytest.raises(AgentUnreachable):
            async with client.port_stream(80):
                pass
    assert isinstance(err.value, AgentUnreachable) and err.value.status == 0


async def test_the_client_reaches_only_the_cell_it_names(pki, tmp_path):
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_get("/v1/health", health)
    runner, port, name = await serve_as_cell(app, pki, tmp_path, "c1")
    stranger = NodePKI(tmp_path / "other-node", "node-b")  # another CA altogether
    try:
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{port}"
            assert (await AgentClient(session, url, pki.client_context(), name).health())["ready"]
            with pytest.raises(AgentUnreachable, match=r"c2\.cells\.kiyot|hostname"):  # another cell's name
                await AgentClient(session, url, pki.client_context(), "c2.cells.kiyot").health()
            with pytest.raises(AgentUnreachable):  # a server this node's CA never signed
                await AgentClient(session, url, stranger.client_context(), name).health()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status, kind", [
    (400, AgentInvalid), (404, AgentNotFound), (409, AgentConflict), (416, AgentLogGone),
    (504, AgentTimeout), (500, AgentFailed), (422, AgentFailed),
])
async def test_agent_errors_are_typed_by_their_status(status, kind, pki, tmp_path):
    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": "some_code", "message": "the agent's own words"}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fail)
    runner, port, name = await serve_as_cell(app, pki, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(kind) as err:
                client = AgentClient(session, f"https://127.0.0.1:{port}", pki.client_context(), name)
                await client.start_container(CID)
    finally:
        await runner.cleanup()
    assert err.value.message == "the agent's own words" and err.value.code == "some_code"
    within = err.value.within("starting container x")
    assert type(within) is kind and str(within) == "starting container x: the agent's own words"


async def test_an_answer_too_big_is_refused_not_held(pki, tmp_path, monkeypatch):
    import kiyot_py.agent_client as agent_client

    monkeypatch.setattr(agent_client, "MAX_ANSWER", 1 << 20)

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(40):  # 2.5 MiB, streamed
            await resp.write(b"x" * 65536)
        return resp

    async def fits(request: web.Request) -> web.Response:
        return web.json_response({"exit_code": 0, "stdout": base64.b64encode(b"y" * 600_000).decode()})

    app = web.Application()
    app.router.add_get("/v1/health", huge)
    app.router.add_post("/v1/containers/{id}/exec", fits)
    runner, port, name = await serve_as_cell(app, pki, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            client = AgentClient(session, f"https://127.0.0.1:{port}", pki.client_context(), name)
            with pytest.raises(AgentFailed, match="answer over"):
                await client.health()
            assert (await client.exec_sync(CID, ["true"], 1)).stdout == b"y" * 600_000  # read whole
    finally:
        await runner.cleanup()
