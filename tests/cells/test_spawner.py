"""The spawner that forks local cells' agents: its command-line rewrite, the requests it
refuses, and the node's client against a real spawner process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cells"))

from kiyot_cell import spawner
from kiyot_py.providers.base import ProviderUnavailable
from kiyot_py.providers.local_spawner import Spawner


def test_a_forked_process_reads_as_the_command_line_it_was_given():
    argv = [sys.executable, "-m", "kiyot_cell.cli", "supervise", "--state-dir", "/var/lib/x/cells/c1/agent"]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            keep = spawner.set_command_line(argv)
            os.write(write, Path("/proc/self/cmdline").read_bytes())
            del keep
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        seen = pipe.read()
    os.waitpid(child, 0)
    assert seen.split(b"\0")[:-1] == [a.encode() for a in argv]  # as exec leaves it: NUL after each


@pytest.mark.parametrize("request_line", [
    b'{"argv": ["serve", "--listen", "x"], "netns": "/run/netns/a", "log": "/tmp/l"}',  # only supervise
    b'{"argv": ["supervise"], "log": "/tmp/l"}',  # no netns
    b'{"argv": "supervise", "netns": "/run/netns/a", "log": "/tmp/l"}',  # argv not a list
    b'[1, 2]',
    b"x" * (spawner.REQUEST_LIMIT + 1),
])
def test_the_spawner_refuses_a_request_that_is_not_a_cells_supervise(request_line):
    with pytest.raises((spawner.SpawnError, ValueError)):
        spawner._parse_request(request_line)


async def test_the_client_gets_the_spawners_reason_and_the_spawner_stays_in_step(tmp_path):
    client = Spawner(tmp_path / "spawner.log")
    await client.start()
    try:
        for _ in range(2):  # the second answer is the second request's: still in step
            with pytest.raises(ProviderUnavailable, match="no-such-netns"):
                await client.spawn(["supervise", "--listen", "127.0.0.1:1"], tmp_path / "no-such-netns",
                                   tmp_path / "agent.log")
        assert client._proc is not None and client._proc.returncode is None
    finally:
        await client.close()
