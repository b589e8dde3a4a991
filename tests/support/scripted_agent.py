"""A scripted cell for the streaming server's tests: each session's agent stream echoes
its stdin on stdout and, at stdin's EOF, ends with the backend's exit code."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from kiyot_py.streaming.requests import AttachRequest, ExecRequest


class ScriptedAgent:
    """An agent stream that echoes stdin to stdout (upper-cased on stderr when asked) and,
    at stdin's EOF, ends with `exit_code`; resizes are kept."""

    def __init__(self, exit_code: int | None = 0, error: str = "") -> None:
        self._out: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.exit_code = exit_code
        self.error = error
        self.resizes: list[tuple[int, int]] = []
        self.closed = False

    async def send(self, channel: int, payload: bytes) -> None:
        await self._out.put((1, payload))

    async def close_stdin(self) -> None:
        status = {"error": "internal", "message": self.error} if self.error else (
            {"exit_code": self.exit_code} if self.exit_code is not None else {})
        await self._out.put((3, json.dumps(status).encode()))

    async def resize(self, width: int, height: int) -> None:
        self.resizes.append((width, height))

    async def receive(self) -> tuple[int, bytes] | None:
        return await self._out.get()


class Backend:
    def __init__(self) -> None:
        self.agents: list[ScriptedAgent] = []
        self.exit_code: int | None = 0
        self.ports: list[int] = []

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[ScriptedAgent]:
        agent = ScriptedAgent(self.exit_code)
        self.agents.append(agent)
        try:
            yield agent
        finally:
            agent.closed = True

    def exec(self, request: ExecRequest):
        return self._open()

    def attach(self, request: AttachRequest):
        return self._open()

    def port(self, sandbox_id: str, port: int):
        self.ports.append(port)
        return self._open()
