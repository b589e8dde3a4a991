"""The node's agent client covers every route of cells/API.md and always sends the secret."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from aiohttp import web

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
from tests.contract import routes

TOKEN = "s3cret-token"
CID = "a" * 64


@pytest.fixture
async def fake_agent():
    """An aiohttp app answering every contract route with a canned body, recording calls."""
    calls: list[tuple[str, str, str | None]] = []
    record = {"id": CID, "state": "running"}

    def answer(method: str, path: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            calls.append((method, path, request.headers.get("Authorization")))
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
            if path == "/v1/containers" and method == "GET":
                return web.json_response([record])
            if path == "/v1/containers/{id}" and method == "DELETE":
                return web.json_response({})
            return web.json_response(record)
        return handler

    app = web.Application()
    for method, path in routes():
        app.router.add_route(method, path, answer(method, path))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as session:
        yield AgentClient(session, f"http://127.0.0.1:{port}", TOKEN), calls
    await runner.cleanup()


async def test_client_covers_every_route(fake_agent):
    client, calls = fake_agent
    await client.health()
    await client.facts()
    await client.put_pod({"sandbox_id": CID})
    await client.pull("r", "sha256:x", False, {"username": "u", "password": "p"})
    await client.remove_image("sha256:" + CID)
    await client.usage()
    await client.create_container({"id": CID})
    await client.start_container(CID)
    await client.stop_container(CID, 1, "SIGTERM")
    await client.delete_container(CID)
    assert b"".join([c async for _, c in client.logs(CID, 0, follow=False)]).endswith(b"hi\n")
    result = await client.exec_sync(CID, ["true"], 1)
    assert (result.exit_code, result.stdout, result.stderr) == (4, b"o", b"e")
    with pytest.raises(AgentError):  # the fake's stream ends; a real one never does
        async for event in client.events():
            assert event["type"] == "snapshot"
    # Two routes serve people and tests, not the node: it keeps its own records.
    assert {(m, p) for m, p, _ in calls} == set(routes()) - {("GET", "/v1/containers"),
                                                            ("GET", "/v1/containers/{id}")}
    assert {auth for _, _, auth in calls} == {f"Bearer {TOKEN}"}


async def test_unreachable_agent_is_status_zero():
    async with aiohttp.ClientSession() as session:
        client = AgentClient(session, "http://127.0.0.1:9", TOKEN)
        with pytest.raises(AgentError) as err:
            await client.health(timeout=2)
    assert isinstance(err.value, AgentUnreachable) and err.value.status == 0
    assert TOKEN not in str(err.value) and TOKEN not in repr(client)


@pytest.mark.parametrize("status, kind", [
    (400, AgentInvalid), (404, AgentNotFound), (409, AgentConflict), (416, AgentLogGone),
    (504, AgentTimeout), (500, AgentFailed), (422, AgentFailed),
])
async def test_agent_errors_are_typed_by_their_status(status, kind):
    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": "some_code", "message": "the agent's own words"}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(kind) as err:
                await AgentClient(session, f"http://127.0.0.1:{port}", TOKEN).start_container(CID)
    finally:
        await runner.cleanup()
    assert err.value.message == "the agent's own words" and err.value.code == "some_code"
    within = err.value.within("starting container x")
    assert type(within) is kind and str(within) == "starting container x: the agent's own words"
