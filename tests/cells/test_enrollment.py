"""A cell that made its own key is enrolled only by the node, and only for the key its
console showed: until then it answers nothing but its health and its enrollment."""

from __future__ import annotations

import aiohttp
import pytest

from kiyot_cell import identity
from kiyot_py import enrollment
from kiyot_py.agent_client import AgentFailed, AgentUnreachable

from .conftest import Agent


async def _until_listening(agent: Agent) -> enrollment.Presented:
    import asyncio

    for _ in range(300):  # bounded: 30 s
        try:
            return await enrollment.presented("127.0.0.1", agent.port, agent.pki, agent.server_name)
        except AgentUnreachable:
            await asyncio.sleep(0.1)
    raise AssertionError(f"the agent never listened:\n{agent.log_file.read_text()[-2000:]}")


def _says(fingerprint: str):
    async def console() -> str:
        return fingerprint
    return console


async def test_enrollment_takes_the_console_key_only(tmp_path):
    agent = Agent(tmp_path)
    for name in ("cell.crt", "cell.key"):  # a far cell: nothing from the node but the CA
        (agent.tls_dir / name).unlink()
    key = identity.ensure_key(agent.tls_dir)
    identity.ensure_provisional(agent.tls_dir, key)
    console_says = identity.spki_fingerprint(key.public_key())
    agent.start(wait=False)
    try:
        seen = await _until_listening(agent)
        assert not seen.enrolled
        url = f"https://127.0.0.1:{agent.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/facts", ssl=agent.pki.enrollment_context()) as resp:
                assert resp.status == 503 and (await resp.json())["error"] == "not_enrolled"
            async with http.put(f"{url}/v1/identity", ssl=agent.pki.enrollment_context(),
                                json={"certificate": "junk"}) as resp:
                assert resp.status == 400

            with pytest.raises(AgentFailed, match="is not the one its console shows"):
                await enrollment.enroll(http, "127.0.0.1", agent.port, agent.pki, agent.cell_id, _says("0" * 64))
            assert not (await enrollment.presented("127.0.0.1", agent.port, agent.pki, agent.server_name)).enrolled

            await enrollment.enroll(http, "127.0.0.1", agent.port, agent.pki, agent.cell_id, _says(console_says))
            assert (await enrollment.presented("127.0.0.1", agent.port, agent.pki, agent.server_name)).enrolled
            # Again (a node that restarted after enrolling): nothing to do, nothing breaks.
            await enrollment.enroll(http, "127.0.0.1", agent.port, agent.pki, agent.cell_id, _says(console_says))
        # The usual channel now: the cell's name pinned, the node's CA trusted.
        assert agent.ok("GET", "/v1/health")["enrolled"] is True
        assert agent.ok("GET", "/v1/facts")["os"] == "linux"
        assert (agent.tls_dir / "cell.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    finally:
        agent.cleanup()
