"""Exec, attach and port-forward over the agent's WebSocket streams (cells/API.md "Streams"),
through the node's own client, against a real agent whose containers run under runc and
conmon. Every wait is bounded; nothing here asserts on elapsed time (figures are printed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from kiyot_py.agent_client import AgentClient, AgentError, AgentStream, AgentUnreachable
from tests.cells.conftest import free_port, needs_root, spec_of, wait_until

pytestmark = needs_root
WAIT = 60.0  # generous bound on any one session


@dataclass
class Outcome:
    """All the agent sent on a stream until it closed."""

    stdout: bytes = b""
    stderr: bytes = b""
    status: dict | None = None
    stdout_closed: bool = False  # `[1]` alone: the target closed its side (port-forward)
    statuses: int = 0
    after_status: list[int] = field(default_factory=list)

    def text(self) -> str:
        return self.stdout.decode(errors="replace")


async def drain(s: AgentStream, until: bytes | Callable[[bytes], bool] | None = None,
                outcome: Outcome | None = None, timeout: float = WAIT) -> Outcome:
    """Receive until the stream closes, or until stdout holds `until` (or satisfies it)."""
    done = until if callable(until) else (lambda stdout: until is not None and until in stdout)
    out = outcome or Outcome()

    async def run() -> None:
        while (m := await s.receive()) is not None:
            channel, data = m
            if out.status is not None:
                out.after_status.append(channel)
            if channel == 1:
                out.stdout += data
                out.stdout_closed |= not data
            elif channel == 2:
                out.stderr += data
            elif channel == 3:
                out.status = json.loads(data)
                out.statuses += 1
            if until is not None and done(out.stdout):
                return
    await asyncio.wait_for(run(), timeout)
    return out


@pytest.fixture
async def client(agent) -> AsyncIterator[AgentClient]:
    async with aiohttp.ClientSession() as session:
        yield AgentClient(session, f"https://127.0.0.1:{agent.port}", agent.client_context(), agent.server_name)


@pytest.fixture
def sleeper(agent, busybox) -> dict:
    """A running container to exec in."""
    return agent.run(busybox, ["sleep", "2000"])


def exec_files(agent, cid: str) -> list[str]:
    return sorted(p.name for p in (agent.state_dir / "containers" / cid).glob("exec-*"))


async def run_exec(client: AgentClient, cid: str, cmd: list[str], stdin: bytes | None = None, *,
                   tty: bool = False) -> Outcome:
    async with client.exec_stream(cid, cmd, tty=tty, stdin=stdin is not None, stdout=True, stderr=not tty) as s:
        if stdin is not None:
            await s.send(0, stdin)
            await s.close_stdin()
        return await drain(s)


# --- exec -----------------------------------------------------------------------------------

async def test_exec_output_exit_codes_and_arguments(agent, client, sleeper):
    cid = sleeper["id"]
    t0 = time.monotonic()
    out = await run_exec(client, cid, ["echo", "-n", "hello"])
    print(f"exec echo round trip: {(time.monotonic() - t0) * 1000:.1f} ms")
    assert (out.stdout, out.stderr, out.status) == (b"hello", b"", {"exit_code": 0})
    assert out.statuses == 1 and out.after_status == []
    assert (await run_exec(client, cid, ["sh", "-c", "exit 7"])).status == {"exit_code": 7}
    both = await run_exec(client, cid, ["sh", "-c", "echo out; echo err >&2; exit 1"])
    assert (both.stdout, both.stderr, both.status) == (b"out\n", b"err\n", {"exit_code": 1})
    # Arguments travel one per `cmd`, whatever they hold.
    odd = ["a b+c&d=e%f/?#\u00e9", "", "--x=1"]
    args = await run_exec(client, cid, ["sh", "-c", 'printf "%s|" "$@"', "sh", *odd])
    assert args.stdout.decode() == "".join(f"{a}|" for a in odd)
    # Stdin alone: nothing comes back but the status.
    async with client.exec_stream(cid, ["sh", "-c", "cat > /tmp/in"], tty=False, stdin=True, stdout=False,
                                  stderr=False) as s:
        await s.send(0, b"kept")
        await s.close_stdin()
        quiet = await drain(s)
    assert (quiet.stdout, quiet.status) == (b"", {"exit_code": 0})
    assert (await run_exec(client, cid, ["cat", "/tmp/in"])).stdout == b"kept"
    rounds = []
    for _ in range(5):
        t0 = time.monotonic()
        assert (await run_exec(client, cid, ["true"])).status == {"exit_code": 0}
        rounds.append((time.monotonic() - t0) * 1000)
    print(f"exec true round trip: median {sorted(rounds)[2]:.1f} ms")
    assert exec_files(agent, cid) == []


async def test_exec_pipes_a_mebibyte_through_cat(agent, client, busybox, sleeper):
    cid = sleeper["id"]
    data = os.urandom(1 << 20)
    t0 = time.monotonic()
    async with client.exec_stream(cid, ["cat"], tty=False, stdin=True, stdout=True, stderr=True) as s:
        async def feed() -> None:
            for at in range(0, len(data), 100_000):  # sizes the agent splits into its own messages
                await s.send(0, data[at:at + 100_000])
            await s.close_stdin()
        out, _ = await asyncio.gather(drain(s), feed())
    seconds = time.monotonic() - t0
    print(f"1 MiB through cat: {seconds * 1000:.0f} ms, {1 / seconds:.1f} MiB/s")
    assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert out.stderr == b"" and out.status == {"exit_code": 0}
    # A process of the container's user reopens its stdin (the pipe is its own).
    nobody = agent.run(busybox, ["sleep", "2000"], user="nobody")
    reopened = await run_exec(client, nobody["id"], ["sh", "-c", "id -u; cat /dev/stdin"], stdin=b"mine")
    assert (reopened.stdout, reopened.status) == (b"65534\nmine", {"exit_code": 0}), reopened


async def test_exec_with_a_tty_is_a_terminal_that_follows_resizes(agent, client, sleeper):
    cid = sleeper["id"]
    out = await run_exec(client, cid, ["busybox", "tty"], tty=True)
    assert out.text().startswith("/dev/pts/") and out.status == {"exit_code": 0}, out
    term = await run_exec(client, cid, ["sh", "-c", "echo $TERM"], tty=True)
    assert term.text() == "xterm\r\n"
    async with client.exec_stream(cid, ["sh"], tty=True, stdin=True, stdout=True, stderr=False) as s:
        # A size sent first is the console's before the process starts: its first look sees it.
        await s.resize(123, 40)
        await s.send(0, b"busybox stty size\n")
        out = await drain(s, until=b"40 123")
        await s.resize(0, 10)  # a size with a 0 is ignored
        await s.resize(80, 25)
        # Later ones reach the console as on any terminal: soon, not before the next line.
        for _ in range(100):
            await s.send(0, b"busybox stty size\n")
            with contextlib.suppress(TimeoutError):
                await drain(s, until=b"25 80", outcome=out, timeout=0.3)
                break
        await s.send(0, b"exit 3\n")
        out = await drain(s, outcome=out)
    assert "25 80" in out.text() and "10 0" not in out.text() and out.status == {"exit_code": 3}, out
    assert exec_files(agent, cid) == []


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


async def test_back_pressure_holds_both_ways(agent, client, sleeper):
    cid = sleeper["id"]
    before = rss(agent.serve_pid())
    # Output nobody reads: the agent reads no further than the socket takes.
    async with client.exec_stream(cid, ["cat", "/dev/zero"], tty=False, stdin=False, stdout=True, stderr=False) as s:
        await asyncio.sleep(2)  # cat could write gigabytes meanwhile
        assert rss(agent.serve_pid()) - before < 64 << 20
        channel, data = await asyncio.wait_for(s.receive(), WAIT)
        assert channel == 1 and data == bytes(len(data))
    # Closed while its output waits: cat is killed, runc reaped (it was blocked on our pipe).
    wait_until(lambda: exec_files(agent, cid) == [], what="the exec's files removed")
    # Input nobody reads: the node's sends stall once the buffers between are full.
    async with client.exec_stream(cid, ["sleep", "1000"], tty=False, stdin=True, stdout=True, stderr=False) as s:
        sent = 0

        async def feed() -> None:
            nonlocal sent
            while True:
                await s.send(0, bytes(1 << 16))
                sent += 1 << 16
        feeding = asyncio.create_task(feed())
        seen = []
        for _ in range(4):
            await asyncio.sleep(1)
            seen.append(sent)
        assert seen[-1] == seen[-2] and seen[-1] < 64 << 20, seen
        assert rss(agent.serve_pid()) - before < 64 << 20
        # The process ends (killed by its pid, here): its status comes, the backlog is dropped.
        pidfile = next((agent.state_dir / "containers" / cid).glob("exec-*.pid"))
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        out = await drain(s)
        feeding.cancel()
    assert out.status == {"exit_code": 137}
    wait_until(lambda: exec_files(agent, cid) == [], what="the exec's files removed")


async def test_a_dropped_connection_is_seen_while_stdin_waits(agent, client, sleeper):
    """No close frame can pass the data the agent holds back: the connection's end is what it sees."""
    cid = sleeper["id"]
    async with client.exec_stream(cid, ["sleep", "1000"], tty=False, stdin=True, stdout=True, stderr=False) as s:
        feeding = asyncio.create_task(s.send(0, bytes(64 << 20)))
        wait_until(lambda: len(exec_files(agent, cid)) == 2, what="the exec running")
        await asyncio.sleep(1)  # the buffers fill; the agent stops reading
        s.ws.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.ws._response.connection.transport.abort()  # a reset, as from a node that died
        with contextlib.suppress(AgentError):
            await feeding
    wait_until(lambda: exec_files(agent, cid) == [], what="the exec's files removed")
    ps = agent.ok("POST", f"/v1/containers/{cid}/exec", {"cmd": ["ps", "-o", "args"], "timeout": 10})
    assert "sleep 1000" not in base64.b64decode(ps["stdout"]).decode()


@pytest.mark.parametrize("tty", [False, True])
async def test_a_node_that_goes_away_leaves_no_exec_behind(agent, client, sleeper, tty):
    cid = sleeper["id"]
    s = client.exec_stream(cid, ["sh", "-c", "echo started; exec sleep 1000"], tty=tty, stdin=tty, stdout=True,
                           stderr=False)
    async with s:
        await drain(s, until=b"started")
        wait_until(lambda: len(exec_files(agent, cid)) == 2, what="the exec's spec and pid file")
    # The agent kills the exec'd process, reaps runc and removes its files.
    wait_until(lambda: exec_files(agent, cid) == [], what="the exec's files removed")
    ps = agent.ok("POST", f"/v1/containers/{cid}/exec", {"cmd": ["ps", "-o", "args"], "timeout": 10})
    assert "sleep 1000" not in base64.b64decode(ps["stdout"]).decode()
    assert agent.record(cid)["state"] == "running"


# --- attach ---------------------------------------------------------------------------------

async def test_attach_writes_stdin_and_ends_when_the_container_exits(agent, client, busybox):
    rec = agent.run(busybox, ["sh"], stdin=True, stdin_once=True)
    async with client.attach_stream(rec["id"], tty=False, stdin=True, stdout=True, stderr=True) as s:
        await s.send(0, b"echo -n hello; echo -n oops >&2\n")
        out = await drain(s, until=b"hello")
        await s.close_stdin()  # sh reads its end of input and exits
        out = await drain(s, outcome=out)
    assert out.stdout == b"hello" and out.status == {} and out.statuses == 1
    assert out.stderr == b"oops"
    assert agent.wait_state(rec["id"], "exited")["exit_code"] == 0


async def test_attach_sees_output_and_detaches_leaving_it_running(agent, client, busybox):
    rec = agent.run(busybox, ["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done"])
    async with client.attach_stream(rec["id"], tty=False, stdin=False, stdout=True, stderr=False) as s:
        out = await drain(s, until=lambda stdout: stdout.count(b"\n") >= 3)
    lines = out.text().splitlines()
    numbers = [int(line.removeprefix("line")) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), lines  # a live run, in order
    # Detached, it runs on: a second attach sees it further on.
    async with client.attach_stream(rec["id"], tty=False, stdin=False, stdout=True, stderr=False) as s:
        later = await drain(s, until=b"\n")
    assert int(later.text().split()[0].removeprefix("line")) > numbers[-1]
    assert agent.record(rec["id"])["state"] == "running"


async def test_attach_to_a_tty_follows_resizes(agent, client, busybox):
    rec = agent.run(busybox, ["sh"], stdin=True, tty=True)
    async with client.attach_stream(rec["id"], tty=True, stdin=True, stdout=True, stderr=False) as s:
        await s.resize(100, 30)
        await s.send(0, b"busybox tty; busybox stty size\n")
        out = await drain(s, until=b"30 100")
        await s.send(0, b"exit 5\n")
        out = await drain(s, outcome=out)
    assert "/dev/pts/" in out.text() and out.status == {}, out
    assert agent.wait_state(rec["id"], "exited")["exit_code"] == 5


async def test_attach_refusals(agent, client, busybox):
    rec = agent.run(busybox, ["sleep", "2000"])
    async with client.attach_stream(rec["id"], tty=False, stdin=True, stdout=True, stderr=False) as s:
        out = await drain(s)
    assert out.status and out.status["error"] == "invalid" and "stdin" in out.status["message"]
    created = agent.create(busybox, ["sleep", "1"])
    async with client.attach_stream(created["id"], tty=False, stdin=False, stdout=True, stderr=False) as s:
        assert (await drain(s)).status["error"] == "conflict"
    assert agent.record(rec["id"])["state"] == "running"
    # The stdio a create asks for is booleans.
    bad = agent.call("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "x", "tty": "yes",
                                                "image_digest": agent.digest(busybox), "spec": spec_of(["sh"])})
    assert bad.status == 400 and "'tty'" in bad.json()["message"]


# --- port-forward ---------------------------------------------------------------------------

@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP server on the cell's loopback (these agents share the host's): it echoes
    what it reads until the end, then says `bye` and closes."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def forward(client: AgentClient, port: int, data: bytes) -> Outcome:
    async with client.port_stream(port) as s:
        async def feed() -> None:
            await s.send(0, data)
            await s.close_stdin()
        out, _ = await asyncio.gather(drain(s), feed())
    return out


async def test_port_forward_both_ways_with_half_close(client, agent, echo_port):
    out = await forward(client, echo_port, b"ping")
    assert (out.stdout, out.stdout_closed, out.status) == (b"pingbye", True, {})
    big = os.urandom(4 << 20)
    t0 = time.monotonic()
    out = await forward(client, echo_port, big)
    seconds = time.monotonic() - t0
    print(f"port-forward 4 MiB echoed: {4 / seconds:.1f} MiB/s each way")
    assert out.stdout == big + b"bye" and out.status == {}


async def test_twenty_concurrent_forwards_all_get_their_answers(client, agent, echo_port):
    payloads = [secrets.token_bytes(1000 + i) for i in range(20)]
    outs = await asyncio.gather(*(forward(client, echo_port, p) for p in payloads))
    assert [o.stdout for o in outs] == [p + b"bye" for p in payloads]
    assert all(o.status == {} for o in outs)


async def test_a_refused_port_is_unreachable(client, agent):
    async with client.port_stream(free_port()) as s:
        out = await drain(s)
    assert out.status and out.status["error"] == "unreachable", out


# --- bad input ------------------------------------------------------------------------------

async def raw_status(agent, path: str, params: list[tuple[str, str]]) -> dict | None:
    """The status of a session opened with the query as given (the client sends only good ones)."""
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"https://127.0.0.1:{agent.port}{path}", params=params, ssl=agent.client_context(),
            server_hostname=agent.server_name) as ws:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data[0] == 3, msg
        closed = await asyncio.wait_for(ws.receive(), WAIT)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        return json.loads(msg.data[1:])


async def test_bad_requests_are_refused_in_band(agent, client, sleeper, tmp_path):
    cid = sleeper["id"]
    flags = [("stdin", "0"), ("stdout", "1")]
    exec_path = f"/v1/containers/{cid}/exec/stream"
    for path, params, code in [
        (exec_path, [("cmd", "true"), ("tty", "1"), ("stderr", "1"), *flags], "invalid"),
        (exec_path, flags, "invalid"),  # no command
        (exec_path, [("cmd", "true"), ("tty", "yes"), *flags], "invalid"),
        (exec_path, [("cmd", "true"), ("stdout", "0")], "invalid"),  # no stream at all
        (f"/v1/containers/{'f' * 64}/exec/stream", [("cmd", "true"), *flags], "not_found"),
        ("/v1/containers/nope/attach", flags, "invalid"),
        (f"/v1/containers/{'f' * 64}/attach", flags, "not_found"),
        ("/v1/portforward", [("port", "0")], "invalid"),
        ("/v1/portforward", [("port", "70000")], "invalid"),
        ("/v1/portforward", [("port", "x")], "invalid"),
        ("/v1/portforward", [], "invalid"),
    ]:
        status = await raw_status(agent, path, params)
        assert status and status["error"] == code and status["message"], (path, params, status)
    # A message that is not binary ends the session too.
    async with client.exec_stream(cid, ["sleep", "1000"], tty=False, stdin=True, stdout=True, stderr=True) as s:
        await s.ws.send_str("hello")
        out = await drain(s)
    assert out.status and out.status["error"] == "invalid"
    wait_until(lambda: exec_files(agent, cid) == [], what="the exec's files removed")
    # Not the node: no TLS session without a certificate, 401 for another cell's.
    async with aiohttp.ClientSession() as session:
        anonymous = AgentClient(session, f"https://127.0.0.1:{agent.port}", agent.client_context("none"),
                                agent.server_name)
        with pytest.raises(AgentUnreachable):
            async with anonymous.port_stream(80):
                pass
        agent.pki.issue_cell("c-other").write(tmp_path / "other-cell")
        other_cell = agent.client_context(str(tmp_path / "other-cell"))
        other = AgentClient(session, f"https://127.0.0.1:{agent.port}", other_cell, agent.server_name)
        with pytest.raises(AgentError) as refused:
            async with other.exec_stream(cid, ["true"], tty=False, stdin=False, stdout=True, stderr=False):
                pass
        assert refused.value.status == 401
