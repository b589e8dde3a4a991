"""The relay between a client's channels (SPDY streams or WebSocket channels) and the
agent's stream for the same session, and the final status the client is told.

The agent's channels (cells/API.md): 0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize.
Every copy awaits the other side before it reads more, so a slow reader slows its writer
end to end and nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

STDIN, STDOUT, STDERR, STATUS, RESIZE = 0, 1, 2, 3, 4


class AgentStream(Protocol):
    async def send(self, channel: int, payload: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def resize(self, width: int, height: int) -> None: ...
    async def receive(self) -> tuple[int, bytes] | None: ...


@dataclass(frozen=True)
class Outcome:
    """How a session ended: an exit code (exec), or an error; neither is success."""

    exit_code: int | None = None
    error: str = ""

    @classmethod
    def of_status(cls, payload: bytes) -> Outcome:
        try:
            status = json.loads(payload)
        except ValueError:
            return cls(error=f"the cell sent a malformed status: {payload[:200]!r}")
        if not isinstance(status, dict):
            return cls(error=f"the cell sent a malformed status: {payload[:200]!r}")
        if status.get("error"):
            return cls(error=str(status.get("message") or status["error"]))
        code = status.get("exit_code")
        return cls(exit_code=code if isinstance(code, int) else None)

    @property
    def ok(self) -> bool:
        return not self.error and not self.exit_code

    def v4_status(self) -> bytes:
        """The status object that v4 and v5 clients read from the error channel."""
        if self.error:
            body = {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {self.error}",
                    "reason": "InternalError", "details": {"causes": [{"message": self.error}]}, "code": 500}
        elif self.exit_code:
            body = {"metadata": {}, "status": "Failure",
                    "message": f"command terminated with non-zero exit code: exit status {self.exit_code}",
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": str(self.exit_code)}]}}
        else:
            body = {"metadata": {}, "status": "Success"}
        return json.dumps(body).encode()

    def text(self) -> bytes:
        """What v1 to v3 clients read from the error channel: nothing on success."""
        if self.error:
            return self.error.encode()
        if self.exit_code:
            return f"command terminated with non-zero exit code: exit status {self.exit_code}".encode()
        return b""


CLIENT_GONE = Outcome(error="the client went away")


class CommandClient(Protocol):
    """A client's side of an exec or attach session, whatever its transport."""

    gone: asyncio.Event  # set when the client's connection ends

    async def read_stdin(self) -> bytes: ...  # b"" at the client's EOF
    async def next_resize(self) -> tuple[int, int] | None: ...  # None: no more
    async def write(self, channel: int, data: bytes) -> None: ...


async def relay_command(client: CommandClient, agent: AgentStream, *, stdin: bool, tty: bool) -> Outcome:
    """Copy stdin and resizes to the agent and its output back, until the agent's status
    (or the client leaving, which ends the session in the cell)."""

    async def pump_resizes() -> None:
        while (size := await client.next_resize()) is not None:
            await agent.resize(*size)

    async def pump_output() -> Outcome:
        while (message := await agent.receive()) is not None:
            channel, payload = message
            if channel in (STDOUT, STDERR):
                await client.write(channel, payload)
            elif channel == STATUS:
                return Outcome.of_status(payload)
        return Outcome(error="the cell ended the stream without a status")

    helpers = [_copy_in(client.read_stdin, agent)] if stdin else []
    if tty:
        helpers.append(pump_resizes())
    return await _until_status(pump_output(), helpers, client.gone)


class ByteClient(Protocol):
    """A client's side of one forwarded connection."""

    async def read(self) -> bytes: ...  # b"" at the client's EOF
    async def write(self, data: bytes) -> None: ...
    async def close_write(self) -> None: ...


async def relay_port(client: ByteClient, agent: AgentStream, gone: asyncio.Event) -> Outcome:
    """Copy one forwarded connection both ways, half-closes included, until the agent's
    status: the connection in the cell is over."""

    async def pump_down() -> Outcome:
        while (message := await agent.receive()) is not None:
            channel, payload = message
            if channel == STDOUT:
                await (client.write(payload) if payload else client.close_write())
            elif channel == STATUS:
                return Outcome.of_status(payload)
        return Outcome(error="the cell ended the stream without a status")

    return await _until_status(pump_down(), [_copy_in(client.read, agent)], gone)


async def _copy_in(read: Callable[[], Awaitable[bytes]], agent: AgentStream) -> None:
    """The client's bytes to the agent's stdin channel, then its end."""
    while data := await read():
        await agent.send(STDIN, data)
    await agent.close_stdin()


async def _until_status(main: Coroutine[Any, Any, Outcome], helpers: list[Coroutine[Any, Any, None]],
                        gone: asyncio.Event) -> Outcome:
    """Run `main` with its helpers until it has the outcome or the client is gone; then
    cancel whatever still runs."""
    tasks = [asyncio.create_task(h) for h in helpers]
    output = asyncio.create_task(main)
    left = asyncio.create_task(gone.wait())
    try:
        await asyncio.wait({output, left}, return_when=asyncio.FIRST_COMPLETED)
        if not output.done():
            return CLIENT_GONE
        return output.result()
    except Exception as exc:  # a broken connection on either side ends the session
        return Outcome(error=f"the stream broke: {type(exc).__name__}: {exc}")
    finally:
        everything = [*tasks, output, left]
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
