"""The streaming server: single-use URLs for Exec, Attach and PortForward, and the
connections that come for them (SPDY/3.1 or WebSocket), each relayed to its cell.

As the kubelet's own server (and containerd's): plain HTTP on a local address, a free
port by default; `/exec/TOKEN`, `/attach/TOKEN`, `/portforward/TOKEN`, GET or POST.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import urllib.parse
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import structlog

from kiyot_py.streaming import portforward, remotecommand
from kiyot_py.streaming.http import MAX_HEAD, HttpConnection, RequestHead
from kiyot_py.streaming.relay import AgentStream
from kiyot_py.streaming.requests import (
    KIND,
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    RequestCache,
    StreamRequest,
)

log = structlog.get_logger("kiyot.streaming")


class StreamBackend(Protocol):
    def exec(self, request: ExecRequest) -> AbstractAsyncContextManager[AgentStream]: ...
    def attach(self, request: AttachRequest) -> AbstractAsyncContextManager[AgentStream]: ...
    def port(self, sandbox_id: str, port: int) -> AbstractAsyncContextManager[AgentStream]: ...


class StreamingServer:
    def __init__(self, backend: StreamBackend, address: str = "127.0.0.1", port: int = 0) -> None:
        self._backend = backend
        self._address = address
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.requests = RequestCache()
        self.base_url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._address, self._port, limit=MAX_HEAD)
        port = self._server.sockets[0].getsockname()[1]
        host = self._address
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        self.base_url = f"http://{host}:{port}"
        log.info("streaming_serving", url=self.base_url)

    def url_for(self, request: StreamRequest) -> str:
        """A URL for `request`, good for one connection within a minute."""
        return f"{self.base_url}/{KIND[type(request)]}/{self.requests.put(request)}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        conn = HttpConnection(reader, writer)
        try:
            head = await conn.read_head()
            if head is not None:
                await self._serve(conn, head)
        except Exception:
            log.exception("streaming_session_failed")
        finally:
            self._sessions.discard(task)
            await conn.close()

    async def _serve(self, conn: HttpConnection, head: RequestHead) -> None:
        kind, _, token = head.path.strip("/").partition("/")
        if head.method not in ("GET", "POST"):
            await conn.answer(405, f"method {head.method} not allowed", [("Allow", "GET, POST")])
            return
        request = self.requests.take(token) if kind in KIND.values() and "/" not in token else None
        if request is None or KIND[type(request)] != kind:
            await conn.answer(404, "unknown or expired streaming URL")
            return
        websocket = head.has_token("connection", "upgrade") and head.has_token("upgrade", "websocket")
        log.info("streaming_session", kind=kind, transport="websocket" if websocket else "spdy")
        if isinstance(request, PortForwardRequest):
            ports = request.ports or _query_ports(head.query)
            if websocket and ports is None:
                await conn.answer(400, "query parameter 'port' must name ports within 1-65535")
                return
            open_port: portforward.OpenPort = functools.partial(self._backend.port, request.sandbox_id)
            if websocket:
                await portforward.serve_websocket(conn, head, open_port, ports or ())
            else:
                await portforward.serve_spdy(conn, head, open_port)
            return
        open_agent: remotecommand.OpenAgent = (
            functools.partial(self._backend.exec, request) if isinstance(request, ExecRequest)
            else functools.partial(self._backend.attach, request))
        serve = remotecommand.serve_websocket if websocket else remotecommand.serve_spdy
        await serve(conn, head, open_agent, stdin=request.stdin, stdout=request.stdout,
                    stderr=request.stderr, tty=request.tty)


def _query_ports(query: str) -> tuple[int, ...] | None:
    """The `port` parameters of a WebSocket port-forward (None when one is bad)."""
    ports = []
    for value in urllib.parse.parse_qs(query).get("port", []):
        for part in value.split(","):
            port = portforward.parse_port(part)
            if port is None:
                return None
            ports.append(port)
    return tuple(ports)
