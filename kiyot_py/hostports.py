"""Host ports: a pod's `host_port` on the node forwards to its `container_port` in the cell.

CNI's portmap plugin does this for containerd with iptables DNAT; a cell may be a VM
somewhere else, and DNAT of the node's loopback would need `route_localnet` on the cells'
bridge (which lets a cell send to every loopback service of the node). So the node listens
itself, like docker-proxy: TCP connections are spliced to the cell, UDP datagrams are
relayed per client. Listening also claims the port: a second pod asking for a port already
taken (by a pod or by anything else on the node) gets a clear error at RunPodSandbox.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import structlog

log = structlog.get_logger("kiyot.hostports")

UDP_IDLE = 90.0  # seconds a client's UDP relay lives without traffic (docker-proxy's value)
CONNECT_TIMEOUT = 10.0


class HostPortError(RuntimeError):
    """A host port cannot be opened (taken, or not ours to open)."""


@dataclass(frozen=True)
class HostPort:
    protocol: str  # "tcp" | "udp"
    host_ip: str  # "" = every address of the node
    host_port: int
    container_port: int

    def __str__(self) -> str:
        where = f"{self.host_ip}:" if self.host_ip else ""
        return f"{where}{self.host_port}/{self.protocol} -> {self.container_port}"


class HostPorts:
    """The node's listeners, per sandbox."""

    def __init__(self) -> None:
        self._open: dict[str, list[_Listener]] = {}

    async def open(self, sandbox_id: str, target_ip: str, ports: list[HostPort]) -> None:
        """Listen on every port for the sandbox, or on none of them (an error names the port)."""
        if sandbox_id in self._open:
            return
        listeners: list[_Listener] = []
        try:
            for port in ports:
                listener = _TcpListener(port, target_ip) if port.protocol == "tcp" else _UdpListener(port, target_ip)
                try:
                    await listener.start()
                except OSError as exc:
                    raise HostPortError(f"host port {port}: {exc.strerror or exc}") from None
                listeners.append(listener)
        except BaseException:
            for listener in listeners:
                await listener.close()
            raise
        self._open[sandbox_id] = listeners
        if ports:
            log.info("host ports open", sandbox=sandbox_id, ports=[str(p) for p in ports])

    async def close(self, sandbox_id: str) -> None:
        for listener in self._open.pop(sandbox_id, []):
            await listener.close()

    async def close_all(self) -> None:
        for sandbox_id in list(self._open):
            await self.close(sandbox_id)


def _bind_host(host_ip: str) -> str | None:
    return host_ip or None  # None: every address, IPv4 and IPv6


class _TcpListener:
    def __init__(self, port: HostPort, target_ip: str) -> None:
        self._port = port
        self._target = target_ip
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, _bind_host(self._port.host_ip), self._port.host_port, reuse_address=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self._target, self._port.container_port), CONNECT_TIMEOUT)
            except (TimeoutError, OSError) as exc:
                log.debug("host port: cell refused", port=str(self._port), error=str(exc))
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on (an HTTP/1.0 client waits for it)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class _UdpListener:
    def __init__(self, port: HostPort, target_ip: str) -> None:
        self._port = port
        self._target = target_ip
        self._transport: asyncio.DatagramTransport | None = None
        self._relays: dict[tuple, _UdpRelay] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self._port.host_ip or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and not self._port.host_ip:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
            sock.bind((host, self._port.host_port))
        except OSError:
            sock.close()
            raise
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _UdpFront(self), sock=sock)

    def from_client(self, data: bytes, client: tuple) -> None:
        relay = self._relays.get(client)
        if relay is None:
            relay = _UdpRelay(self, client)
            self._relays[client] = relay
            asyncio.get_running_loop().create_task(relay.connect())
        relay.send(data)

    def to_client(self, data: bytes, client: tuple) -> None:
        if self._transport is not None:
            self._transport.sendto(data, client)

    def forget(self, client: tuple) -> None:
        self._relays.pop(client, None)

    async def close(self) -> None:
        for relay in list(self._relays.values()):
            relay.close()
        if self._transport is not None:
            self._transport.close()


class _UdpFront(asyncio.DatagramProtocol):
    def __init__(self, listener: _UdpListener) -> None:
        self._listener = listener

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._listener.from_client(data, addr)


class _UdpRelay(asyncio.DatagramProtocol):
    """One client's flow to the cell: a connected socket of its own, so replies find it."""

    def __init__(self, listener: _UdpListener, client: tuple) -> None:
        self._listener = listener
        self._client = client
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: list[bytes] = []
        self._idle: asyncio.TimerHandle | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self, remote_addr=(self._listener._target, self._listener._port.container_port))
        except OSError:
            self.close()
            return
        for data in self._pending:
            self._transport.sendto(data)
        self._pending.clear()
        self._touch()

    def send(self, data: bytes) -> None:
        if self._transport is None:
            self._pending.append(data)
        else:
            self._transport.sendto(data)
            self._touch()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._listener.to_client(data, self._client)
        self._touch()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(UDP_IDLE, self.close)

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is not None:
            self._transport.close()
        self._listener.forget(self._client)


_Listener = _TcpListener | _UdpListener
