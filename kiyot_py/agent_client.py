"""The node's side of the cell agent's HTTP contract (cells/API.md)."""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from kiyot_py import errors


class AgentError(errors.KiyotError):
    """The agent answered with an error, or could not be reached (status 0).

    Raised as one of the typed subclasses below, so that callers never read HTTP codes."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def within(self, what: str) -> AgentError:
        """The same error, its message prefixed with what the node was doing."""
        return type(self)(f"{what}: {self.message}", status=self.status, code=self.code)


class AgentUnreachable(AgentError, errors.Unavailable):
    """No answer: the cell is booting, gone, or the network between is broken."""


class AgentFailed(AgentError, errors.Unavailable):
    """The agent answered with a failure of its own (500, a failed pull)."""


class AgentInvalid(AgentError, errors.InvalidArgument):
    pass


class AgentNotFound(AgentError, errors.NotFound):
    pass


class AgentConflict(AgentError, errors.FailedPrecondition):
    """The container is in the wrong state for the request."""


class AgentTimeout(AgentError, errors.DeadlineExceeded):
    pass


class AgentLogGone(AgentError, errors.NotFound):
    """The log range asked for is no longer in the cell."""


# The largest answer read from an agent: exec-sync's is the largest (stdout and stderr,
# up to 8 MiB each, in base64: under 22 MiB); a cell cannot make the node hold more.
MAX_ANSWER = 32 * 1024 * 1024

_BY_STATUS: dict[int, type[AgentError]] = {
    400: AgentInvalid, 413: AgentInvalid, 404: AgentNotFound, 409: AgentConflict,
    416: AgentLogGone, 504: AgentTimeout,
}


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


STREAM_CHUNK = 32 * 1024  # the most payload in one stream message, either way
# A stream's dead agent is noticed by TCP keepalive (about 30 s), which the cell's kernel
# answers whatever the agent reads: WebSocket pings would wait behind the data a
# back-pressured reader has not taken yet, and fail a live session.
STREAM_KEEPALIVE = {socket.TCP_KEEPIDLE: 15, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 3}


class AgentStream:
    """One exec, attach or port-forward session (cells/API.md "Streams"), open inside
    `async with`: binary messages of a channel byte, then the payload. The agent's last
    message is the status on channel 3; `receive` gives None once the socket is closed."""

    def __init__(self, connect: Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]], what: str) -> None:
        self._connect = connect
        self._what = what
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> AgentStream:
        self._ws = await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise RuntimeError("an AgentStream is used inside `async with`")
        return self._ws

    async def send(self, channel: int, payload: bytes) -> None:
        """`payload` in messages of at most STREAM_CHUNK; none for an empty one (an empty
        stdin message is the end of stdin: `close_stdin`)."""
        for at in range(0, len(payload), STREAM_CHUNK):
            await self._send(bytes([channel]) + payload[at:at + STREAM_CHUNK])

    async def close_stdin(self) -> None:
        await self._send(b"\x00")

    async def resize(self, width: int, height: int) -> None:
        await self._send(b"\x04" + json.dumps({"width": width, "height": height}).encode())

    async def receive(self) -> tuple[int, bytes] | None:
        while True:
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY and msg.data:
                return msg.data[0], msg.data[1:]
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def _send(self, message: bytes) -> None:
        try:
            await self.ws.send_bytes(message)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise AgentUnreachable(f"{self._what}: {exc}") from exc


class AgentClient:
    """One client per cell, over mutual TLS: the node's certificate, the cell's name pinned."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, tls: ssl.SSLContext,
                 server_name: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._ssl = tls
        self._server_name = server_name

    def __repr__(self) -> str:
        return f"AgentClient({self._base})"

    async def _call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = 30.0
    ) -> Any:
        try:
            async with self._session.request(
                method,
                self._base + path,
                json=body,
                ssl=self._ssl, server_hostname=self._server_name,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                received = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    received += chunk
                    if len(received) > MAX_ANSWER:
                        raise AgentFailed(f"cell agent {self._base}: {method} {path}: answer over {MAX_ANSWER} bytes",
                                          status=resp.status)
                data = bytes(received)
                if resp.status >= 400:
                    raise _error(resp.status, data)
                return json.loads(data) if data else {}
        except aiohttp.ClientError as exc:
            raise AgentUnreachable(f"cell agent {self._base}: {exc}") from exc
        except TimeoutError as exc:
            raise AgentUnreachable(f"cell agent {self._base}: timed out") from exc

    async def health(self, timeout: float = 2.0) -> dict:
        return await self._call("GET", "/v1/health", timeout=timeout)

    async def facts(self) -> dict:
        return await self._call("GET", "/v1/facts")

    async def put_pod(self, pod: dict) -> dict:
        return await self._call("PUT", "/v1/pod", pod)

    async def pull(self, digest: str, ref: str = "", sources: list[dict] | None = None) -> dict:
        """Have the cell fetch manifest `digest`: from the node's pull path (`ref` names it
        there), or (a cell that pulls for itself) from `sources`, registries in order."""
        body: dict[str, Any] = {"digest": digest}
        if sources is not None:
            body["sources"] = sources
        else:
            body["ref"] = ref
        return await self._call("POST", "/v1/images/pull", body, timeout=None)

    async def put_volume(self, name: str, body: dict) -> dict:
        return await self._call("PUT", f"/v1/volumes/{name}", body)

    async def read_volume_file(self, name: str, timeout: float = 5.0) -> bytes:
        answer = await self._call("GET", f"/v1/volumes/{name}/file", timeout=timeout)
        return base64.b64decode(answer.get("data") or "")

    async def delete_volume(self, name: str) -> None:
        await self._call("DELETE", f"/v1/volumes/{name}")

    async def use_shared_image(self, digest: str, path: str, size: int) -> dict:
        """Have a cell on the node's disk take the node's unpack of manifest `digest`."""
        return await self._call("POST", "/v1/images/shared", {"digest": digest, "path": path, "size": size})

    async def remove_image(self, digest: str) -> None:
        await self._call("DELETE", f"/v1/images/{digest}")

    async def usage(self, timeout: float = 5.0) -> dict:
        return await self._call("GET", "/v1/usage", timeout=timeout)

    async def create_container(self, body: dict) -> dict:
        return await self._call("POST", "/v1/containers", body, timeout=None)

    async def get_container(self, container_id: str) -> dict:
        return await self._call("GET", f"/v1/containers/{container_id}")

    async def start_container(self, container_id: str) -> dict:
        return await self._call("POST", f"/v1/containers/{container_id}/start")

    async def stop_container(self, container_id: str, timeout: int, signal: str) -> dict:
        return await self._call(
            "POST",
            f"/v1/containers/{container_id}/stop",
            {"timeout": timeout, "signal": signal},
            timeout=timeout + 30,
        )

    async def delete_container(self, container_id: str) -> None:
        await self._call("DELETE", f"/v1/containers/{container_id}")

    async def update_resources(self, container_id: str, body: dict) -> dict:
        """New limits (an OCI linux.resources' cpu, memory, pids) for a live container;
        the record with the limits now in force."""
        return await self._call("POST", f"/v1/containers/{container_id}/resources", body, timeout=60)

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        data = await self._call(
            "POST",
            f"/v1/containers/{container_id}/exec",
            {"cmd": cmd, "timeout": timeout},
            timeout=None if timeout == 0 else timeout + 30,
        )
        return ExecResult(
            exit_code=int(data["exit_code"]),
            stdout=base64.b64decode(data.get("stdout", "")),
            stderr=base64.b64decode(data.get("stderr", "")),
        )

    async def logs(self, container_id: str, offset: int, follow: bool) -> AsyncIterator[tuple[int, bytes]]:
        """The container's CRI-format log from logical `offset`, as (offset of the chunk,
        chunk); with follow, until it ends. The first chunk starts later than `offset` only
        when the cell rotated those bytes away."""
        url = f"{self._base}/v1/containers/{container_id}/logs"
        params = {"offset": str(offset), "follow": "1" if follow else "0"}
        try:
            async with self._session.get(
                url, params=params, ssl=self._ssl, server_hostname=self._server_name,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            ) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.read())
                at = int(resp.headers.get("X-Log-Offset", offset))
                async for chunk in resp.content.iter_any():
                    yield at, chunk
                    at += len(chunk)
        except aiohttp.ClientError as exc:
            raise AgentUnreachable(f"cell agent {self._base}: {exc}") from exc

    async def events(self, heartbeat_timeout: float = 15.0) -> AsyncIterator[dict]:
        """The agent's event stream, its `stats` events included (an agent that has none
        sends none); raises AgentError when it breaks or goes silent."""
        try:
            async with self._session.get(
                f"{self._base}/v1/events", params={"stats": "1"}, ssl=self._ssl, server_hostname=self._server_name,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                              sock_read=heartbeat_timeout),
            ) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.read())
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AgentUnreachable(f"cell agent {self._base}: events: {exc}") from exc
        raise AgentUnreachable(f"cell agent {self._base}: event stream ended")

    def exec_stream(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool, stdout: bool,
                    stderr: bool) -> AgentStream:
        return self._stream(f"/v1/containers/{container_id}/exec/stream",
                            [("cmd", arg) for arg in cmd] + _stdio(tty, stdin, stdout, stderr))

    def attach_stream(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> AgentStream:
        return self._stream(f"/v1/containers/{container_id}/attach", _stdio(tty, stdin, stdout, stderr))

    def port_stream(self, port: int) -> AgentStream:
        return self._stream("/v1/portforward", [("port", str(port))])

    def _stream(self, path: str, params: list[tuple[str, str]]) -> AgentStream:
        what = f"cell agent {self._base}: {path}"

        async def connect() -> aiohttp.ClientWebSocketResponse:
            try:
                ws = await self._session.ws_connect(
                    self._base + path, params=params, ssl=self._ssl, server_hostname=self._server_name,
                    # aiohttp takes only messages shorter than max_msg_size: a channel byte and a chunk.
                    max_msg_size=2 + STREAM_CHUNK)
            except aiohttp.WSServerHandshakeError as exc:  # refused before the upgrade (401, 503)
                raise _BY_STATUS.get(exc.status, AgentFailed)(f"{what}: {exc.message}", status=exc.status) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AgentUnreachable(f"{what}: {exc}") from exc
            sock = ws.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, value in STREAM_KEEPALIVE.items():
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
            return ws
        return AgentStream(connect, what)


def _stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> list[tuple[str, str]]:
    flags = {"tty": tty, "stdin": stdin, "stdout": stdout, "stderr": stderr}
    return [(name, "1" if on else "0") for name, on in flags.items()]


def _error(status: int, data: bytes) -> AgentError:
    try:
        body = json.loads(data)
        code, message = body.get("error", ""), body.get("message", "") or str(body)
    except (ValueError, AttributeError):
        code, message = "", data.decode(errors="replace")[:500]
    return agent_error(status, code, message)


def agent_error(status: int, code: str, message: str) -> AgentError:
    """The typed error for an agent's answer (also for the agent's image store run on the node)."""
    return _BY_STATUS.get(status, AgentFailed)(message, status=status, code=code)
