"""The node's host ports, against real sockets on loopback (a cell stands in as 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kiyot_py.hostports import HostPort, HostPortError, HostPorts


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_tcp_is_spliced_both_ways_with_half_close():
    async def upper(reader, writer):
        data = await reader.read()  # until the client's half-close reaches us
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(upper, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    ports = HostPorts()
    host_port = free_port()
    await ports.open("sb", "127.0.0.1", [HostPort("tcp", "127.0.0.1", host_port, target_port)])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"HELLO"
        writer.close()
    finally:
        await ports.close("sb")
        target.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", host_port)


async def test_udp_replies_reach_each_client():
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(b"echo:" + data, addr)

    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    target_port = echo.get_extra_info("sockname")[1]
    ports = HostPorts()
    host_port = free_port(socket.SOCK_DGRAM)
    await ports.open("sb", "127.0.0.1", [HostPort("udp", "", host_port, target_port)])
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for i, c in enumerate(clients):
            c.settimeout(10)
            c.sendto(f"ping{i}".encode(), ("127.0.0.1", host_port))
        answers = [await asyncio.to_thread(c.recv, 100) for c in clients]
        assert answers == [b"echo:ping0", b"echo:ping1"]
    finally:
        for c in clients:
            c.close()
        await ports.close("sb")
        echo.close()


async def test_a_taken_port_fails_and_opens_nothing():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    free = free_port()
    ports = HostPorts()
    try:
        with pytest.raises(HostPortError) as err:
            await ports.open("sb", "127.0.0.1", [HostPort("tcp", "127.0.0.1", free, 80),
                                                 HostPort("tcp", "127.0.0.1", busy, 80)])
        assert str(busy) in str(err.value)
        # All or nothing: the first port was let go again.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", free))
    finally:
        taken.close()
        await ports.close_all()
