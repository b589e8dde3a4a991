"""The node's side of the spawner (cells/kiyot_cell/spawner.py): a child process that forks
local cells' agents from one interpreter that has done their imports.

It talks to the spawner over a socket pair (the spawner's stdin): no path on disk that
another process could connect to. Requests go one at a time; a fork takes milliseconds."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

from .base import ProviderUnavailable

START_TIMEOUT = 30.0  # the spawner's own imports, on a loaded host
SPAWN_TIMEOUT = 10.0


class Spawner:
    def __init__(self, log_file: Path, log_level: str = "info") -> None:
        self._log_file = log_file
        self._log_level = log_level
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the spawner unless it runs; returns once it is ready."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        await self._close()
        ours, its = socket.socketpair()
        try:
            with open(self._log_file, "ab") as out:  # noqa: ASYNC230 - only opened (for the child)
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "kiyot_cell.cli", "spawner", "--log-level", self._log_level,
                    stdin=its.fileno(), stdout=out, stderr=out)
        finally:
            its.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            ready = json.loads(await asyncio.wait_for(self._reader.readline(), START_TIMEOUT) or b"{}")
        except (TimeoutError, ValueError):
            ready = {}
        if "ready" not in ready:
            await self._close()
            raise ProviderUnavailable(f"the cell spawner did not start (see {self._log_file})")

    async def spawn(self, argv: list[str], netns: Path, log: Path) -> int:
        """Fork a cell's pid 1 running `kiyot_cell.cli <argv>`; its pid as this host sees it.

        A spawner found dead is started again first. One that dies during a request is
        not asked twice: the cell may exist already; the caller's teardown finds it."""
        request = json.dumps({"argv": argv, "netns": str(netns), "log": str(log)}).encode() + b"\n"
        async with self._lock:
            await self._start()
            assert self._reader is not None and self._writer is not None
            try:
                self._writer.write(request)
                await self._writer.drain()
                answer = json.loads(await asyncio.wait_for(self._reader.readline(), SPAWN_TIMEOUT))
            except (OSError, TimeoutError, ValueError) as e:  # ValueError: no line, it died
                await self._close()  # out of step with it: the next request starts a new one
                raise ProviderUnavailable(f"the cell spawner did not answer ({type(e).__name__}; "
                                          f"see {self._log_file})") from None
            if "pid" not in answer:
                raise ProviderUnavailable(f"the cell spawner could not start the agent: {answer.get('error')}")
            return int(answer["pid"])

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        proc, self._proc = self._proc, None
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

