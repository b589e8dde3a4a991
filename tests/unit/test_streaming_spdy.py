"""SPDY sessions of the streaming server (exec, attach, port-forward) against a scripted
cell, with a client made of the project's own SPDY module, as client-go drives them."""

from __future__ import annotations

import asyncio
import json

import pytest

from kiyot_py.streaming.requests import ExecRequest, PortForwardRequest
from kiyot_py.streaming.server import StreamingServer
from tests.support.scripted_agent import Backend
from tests.support.spdy_client import read_all, upgrade

WAIT = 10.0


@pytest.fixture
async def served():
    backend = Backend()
    server = StreamingServer(backend)
    await server.start()
    yield server, backend
    await server.close()


def exec_request(**over) -> ExecRequest:
    fields = {"container_id": "c" * 64, "cmd": ("cat",), "tty": False, "stdin": True, "stdout": True,
              "stderr": True, **over}
    return ExecRequest(**fields)


@pytest.mark.parametrize(("exit_code", "reason"), [(0, None), (7, "NonZeroExitCode")])
async def test_v4_exec_pipes_stdin_and_reports_its_status(served, exit_code, reason):
    server, backend = served
    backend.exit_code = exit_code
    status, headers, client = await upgrade(server.url_for(exec_request()),
                                            ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"])
    assert status == 101 and headers["x-stream-protocol-version"] == ["v4.channel.k8s.io"]
    assert client is not None
    try:
        streams = {}
        for kind in ("error", "stdin", "stdout", "stderr"):
            streams[kind] = await client.session.open_stream({"streamtype": kind})
        await streams["error"].close_write()
        await streams["stdin"].write(b"x" * 100_000)
        await streams["stdin"].close_write()
        out = await read_all(streams["stdout"])
        assert len(out) == 100_000 and out == b"x" * 100_000
        report = json.loads(await read_all(streams["error"]))
        if reason is None:
            assert report == {"metadata": {}, "status": "Success"}
        else:
            assert report["reason"] == reason
            assert report["details"]["causes"] == [{"reason": "ExitCode", "message": str(exit_code)}]
    finally:
        await client.close()


async def test_v4_tty_resizes_reach_the_cell(served):
    server, backend = served
    request = exec_request(tty=True, stderr=False)
    _status, _headers, client = await upgrade(server.url_for(request), ["v4.channel.k8s.io"])
    assert client is not None
    try:
        streams = {kind: await client.session.open_stream({"streamtype": kind})
                   for kind in ("error", "stdin", "stdout", "resize")}
        await streams["resize"].write(b'{"Width":123,"Height":40}\n{"Width":0,"Height":0}\n')
        await streams["resize"].write(b'{"Width":80,"Height":24}\n')
        await streams["stdin"].write(b"hi")
        assert await asyncio.wait_for(streams["stdout"].read(), WAIT) == b"hi"
        for _ in range(100):  # bounded: the resizes travel beside stdin
            if len(backend.agents[0].resizes) == 2:
                break
            await asyncio.sleep(0.05)
        assert backend.agents[0].resizes == [(123, 40), (80, 24)]  # the zero size is dropped
    finally:
        await client.close()


async def test_v1_to_v3_clients_read_errors_as_text(served):
    server, backend = served
    backend.exit_code = 3
    _status, headers, client = await upgrade(server.url_for(exec_request(stderr=False)), ["v2.channel.k8s.io"])
    assert headers["x-stream-protocol-version"] == ["v2.channel.k8s.io"]
    assert client is not None
    try:
        streams = {kind: await client.session.open_stream({"streamtype": kind})
                   for kind in ("error", "stdin", "stdout")}
        await streams["stdin"].close_write()
        assert b"exit status 3" in await read_all(streams["error"])
    finally:
        await client.close()


async def test_a_client_that_never_opens_its_streams_is_let_go(served, monkeypatch):
    from kiyot_py.streaming import remotecommand
    monkeypatch.setattr(remotecommand, "STREAM_WAIT", 0.5)
    server, backend = served
    _status, _headers, client = await upgrade(server.url_for(exec_request()), ["v4.channel.k8s.io"])
    assert client is not None
    await client.session.open_stream({"streamtype": "error"})
    await asyncio.wait_for(client.running, WAIT)  # the server ended the session
    assert backend.agents == []  # and never reached the cell


async def test_port_forward_pairs_streams_by_request_id(served):
    server, backend = served
    status, headers, client = await upgrade(server.url_for(PortForwardRequest("s" * 64)), ["portforward.k8s.io"])
    assert status == 101 and headers["x-stream-protocol-version"] == ["portforward.k8s.io"]
    assert client is not None
    try:
        pairs = []
        for rid in range(3):
            error = await client.session.open_stream({"streamtype": "error", "port": "8080", "requestid": str(rid)})
            await error.close_write()
            data = await client.session.open_stream({"streamtype": "data", "port": "8080", "requestid": str(rid)})
            pairs.append((error, data))
        for rid, (_error, data) in enumerate(pairs):
            await data.write(f"request {rid}".encode())
        for rid, (error, data) in enumerate(pairs):
            assert await asyncio.wait_for(data.read(), WAIT) == f"request {rid}".encode()
            await data.close_write()  # the client is done: the scripted cell ends the connection
            assert await read_all(data) == b""
            assert await read_all(error) == b""
        assert backend.ports == [8080, 8080, 8080]
        bad = await client.session.open_stream({"streamtype": "data", "port": "0", "requestid": "9"})
        assert await read_all(bad) == b""  # refused
    finally:
        await client.close()


async def test_port_forward_needs_its_protocol(served):
    server, _backend = served
    status, headers, _client = await upgrade(server.url_for(PortForwardRequest("s" * 64)), ["v4.channel.k8s.io"])
    assert status == 403
    assert headers["x-accepted-stream-protocol-versions"] == ["portforward.k8s.io"]
