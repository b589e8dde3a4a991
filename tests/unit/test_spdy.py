"""kiyot_py.streaming.spdy: frames and header compression, then sessions over loopback TCP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from kiyot_py.streaming import spdy
from kiyot_py.streaming.spdy import (
    DICTIONARY,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    Data,
    Framer,
    GoAway,
    Headers,
    Ping,
    RstStream,
    Session,
    Settings,
    SpdyError,
    SynReply,
    SynStream,
    WindowUpdate,
)

WAIT = 20.0  # generous bound on any single wait, so that a bug fails instead of hanging


def reader_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read_all(data: bytes, framer: Framer | None = None) -> list[spdy.Frame]:
    """Every frame in data, read as one connection's receiving side would."""
    framer = framer or Framer()
    reader = reader_of(data)
    frames = []
    while True:
        try:
            frames.append(await framer.read(reader))
        except asyncio.IncompleteReadError:
            return frames


def writer_of(writer: asyncio.StreamWriter) -> Callable[[bytes], Awaitable[None]]:
    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return write


# --- the dictionary and header compression


def test_dictionary_is_spdy3s() -> None:
    assert len(DICTIONARY) == 1423
    assert zlib.adler32(DICTIONARY) == 0xE3C6A7C2


def test_first_header_block_is_a_zlib_stream_with_the_dictionary_id() -> None:
    encoded = Framer().encode(SynStream(1, headers={"streamtype": ["stdout"]}))
    assert encoded[:4] == bytes.fromhex("80030001")
    assert encoded[18:24] == bytes.fromhex("78f9e3c6a7c2")  # after the 8-byte header and 10 bytes of fields


def test_several_values_of_a_name_are_joined_by_nul_on_the_wire() -> None:
    encoded = Framer().encode(SynReply(1, headers={"Accept": ["a", "b"], "port": ["80"]}))
    block = zlib.decompressobj(zdict=DICTIONARY).decompress(encoded[12:])
    assert block == (
        struct.pack(">I", 2)
        + struct.pack(">I", 6) + b"accept" + struct.pack(">I", 3) + b"a\0b"
        + struct.pack(">I", 4) + b"port" + struct.pack(">I", 2) + b"80"
    )  # fmt: skip


async def test_header_blocks_share_one_zlib_stream_per_direction() -> None:
    sender, receiver = Framer(), Framer()
    headers = {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]}
    blocks = [sender.encode(SynStream(n, headers=headers)) for n in (1, 3, 5, 7)]
    assert len(blocks[1]) < len(blocks[0])  # the second refers back to the first
    frames = await read_all(b"".join(blocks), receiver)
    assert frames == [SynStream(n, headers=headers) for n in (1, 3, 5, 7)]
    with pytest.raises(SpdyError):  # a later block alone is meaningless to a fresh decompressor
        await Framer().read(reader_of(blocks[2]))


# --- frames


FRAMES: list[spdy.Frame] = [
    SynStream(1, 0, 3, FLAG_FIN, {"streamtype": ["stdin"], "x-many": ["a", "b", ""]}),
    SynStream(3, 1, 0, FLAG_UNIDIRECTIONAL, {}),
    SynReply(1, 0, {"status": ["200"]}),
    SynReply(2, FLAG_FIN, {}),
    RstStream(5, spdy.RST_CANCEL),
    Settings(1, [(0, 7, 65536), (1, 4, 100)]),
    Settings(0, []),
    Ping(7),
    GoAway(9, spdy.GOAWAY_PROTOCOL_ERROR),
    Headers(3, FLAG_FIN, {"a": ["1"], "b": ["2", "3"]}),
    WindowUpdate(0, 1 << 20),
    Data(1, 0, b"hello"),
    Data(3, FLAG_FIN, b""),
    Data(0x7FFFFFFF, 0, os.urandom(100_000)),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
async def test_every_frame_type_round_trips(frame: spdy.Frame) -> None:
    assert await read_all(Framer().encode(frame)) == [frame]


async def test_a_run_of_frames_round_trips_through_one_framer_pair() -> None:
    sender, receiver = Framer(), Framer()
    assert await read_all(b"".join(map(sender.encode, FRAMES)), receiver) == FRAMES


KNOWN_FRAMES: list[tuple[str, spdy.Frame]] = [
    ("80 03 00 06 00 00 00 04 00 00 00 01", Ping(1)),
    ("80 03 00 03 00 00 00 08 00 00 00 01 00 00 00 05", RstStream(1, spdy.RST_CANCEL)),
    ("80 03 00 07 00 00 00 08 00 00 00 03 00 00 00 00", GoAway(3, spdy.GOAWAY_OK)),
    ("80 03 00 09 00 00 00 08 00 00 00 05 00 01 00 00", WindowUpdate(5, 65536)),
    ("80 03 00 04 01 00 00 0c 00 00 00 01 01 00 00 07 00 01 00 00", Settings(1, [(1, 7, 65536)])),
    ("00 00 00 01 01 00 00 03 61 62 63", Data(1, FLAG_FIN, b"abc")),
    ("00 00 00 05 00 00 00 00", Data(5, 0, b"")),
]


@pytest.mark.parametrize(("wire", "frame"), KNOWN_FRAMES, ids=[type(f).__name__ for _, f in KNOWN_FRAMES])
async def test_hand_built_frames_parse_and_encode(wire: str, frame: spdy.Frame) -> None:
    raw = bytes.fromhex(wire)
    assert await read_all(raw) == [frame]
    assert Framer().encode(frame) == raw


MALFORMED = {
    "unknown control type": "80 03 00 0a 00 00 00 04 00 00 00 01",
    "SPDY/2": "80 02 00 06 00 00 00 04 00 00 00 01",
    "bad control flags": "80 03 00 06 80 00 00 04 00 00 00 01",
    "PING too long": "80 03 00 06 00 00 00 08 00 00 00 01 00 00 00 00",
    "RST_STREAM too short": "80 03 00 03 00 00 00 04 00 00 00 01",
    "RST_STREAM stream 0": "80 03 00 03 00 00 00 08 00 00 00 00 00 00 00 05",
    "SETTINGS count mismatch": "80 03 00 04 00 00 00 04 00 00 00 02",
    "DATA stream 0": "00 00 00 00 00 00 00 01 61",
    "bad DATA flags": "00 00 00 01 02 00 00 01 61",
    "SYN_STREAM not zlib": "80 03 00 01 00 00 00 0e 00 00 00 01 00 00 00 00 00 00 de ad be ef",
    "SYN_REPLY without stream id": "80 03 00 02 00 00 00 02 00 00",
    "EOF inside the header": "80 03 00",
    "EOF inside the payload": "00 00 00 01 00 00 00 09 61",
    "HTTP instead of SPDY": b"GET / HTTP/1.1\r\n\r\n".hex(),
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_frames_raise_spdy_error(wire: str) -> None:
    with pytest.raises(SpdyError):
        await Framer().read(reader_of(bytes.fromhex(wire)))


async def test_garbage_header_fails_without_waiting_for_its_payload() -> None:
    reader = reader_of(b"\xde\xad\xbe\xef" * 2, eof=False)  # the connection stays open
    with pytest.raises(SpdyError):
        await asyncio.wait_for(Framer().read(reader), WAIT)


async def test_clean_eof_between_frames_is_incomplete_read() -> None:
    framer = Framer()
    reader = reader_of(framer.encode(Ping(1)))
    assert await framer.read(reader) == Ping(1)
    with pytest.raises(asyncio.IncompleteReadError):
        await framer.read(reader)


def header_frame(compressed_block: bytes) -> bytes:
    body = struct.pack(">I", 1) + compressed_block
    return struct.pack(">HHI", 0x8003, 2, len(body)) + body  # SYN_REPLY


async def test_header_block_bomb_raises_spdy_error() -> None:
    value = b"\0" * (16 * 1024 * 1024)
    block = struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", len(value)) + value
    deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)
    compressed = deflater.compress(block) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert len(compressed) < 100_000
    with pytest.raises(SpdyError, match="inflates"):
        await Framer().read(reader_of(header_frame(compressed)))


async def test_header_block_just_under_the_limit_is_read() -> None:
    value = b"v" * (spdy.MAX_HEADER_BLOCK - 13)  # count, name length, "a", value length: 13 bytes
    block = struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", len(value)) + value
    deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)
    frame = await Framer().read(reader_of(header_frame(deflater.compress(block) + deflater.flush(zlib.Z_SYNC_FLUSH))))
    assert frame == SynReply(1, 0, {"a": [value.decode()]})


def test_oversized_frames_cannot_be_encoded() -> None:
    with pytest.raises(SpdyError):
        Framer().encode(Data(1, 0, bytes(spdy.MAX_FRAME_LENGTH + 1)))
    with pytest.raises(SpdyError):
        Framer().encode(Headers(1, 0, {"a": ["v" * spdy.MAX_HEADER_BLOCK]}))


# --- sessions over loopback TCP


@dataclass
class Pair:
    client: Session
    server: Session
    client_run: asyncio.Task[None]
    server_run: asyncio.Task[None]


Ends = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def tcp_connection(socket_buffer: int | None = None) -> AsyncIterator[tuple[*Ends, *Ends]]:
    """(client reader, client writer, server reader, server writer) over 127.0.0.1; with
    socket_buffer, the server's receive and the client's send buffers are that small."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Ends] = loop.create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    listener = socket.socket()
    client_sock = socket.socket()
    if socket_buffer:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)  # accepted sockets inherit it
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(on_connect, sock=listener)
    client_sock.setblocking(False)
    await loop.sock_connect(client_sock, listener.getsockname())
    client_reader, client_writer = await asyncio.open_connection(sock=client_sock)
    server_reader, server_writer = await asyncio.wait_for(accepted, WAIT)
    try:
        yield client_reader, client_writer, server_reader, server_writer
    finally:
        for writer in (client_writer, server_writer):
            writer.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def session_pair(socket_buffer: int | None = None) -> AsyncIterator[Pair]:
    async with tcp_connection(socket_buffer) as (client_reader, client_writer, server_reader, server_writer):
        client = Session(client_reader, writer_of(client_writer), server=False)
        server = Session(server_reader, writer_of(server_writer), server=True)
        pair = Pair(client, server, asyncio.create_task(client.run()), asyncio.create_task(server.run()))
        try:
            yield pair
        finally:
            await pair.client.close()
            await pair.server.close()
            await asyncio.wait_for(asyncio.gather(pair.client_run, pair.server_run, return_exceptions=True), WAIT)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with session_pair() as p:
        yield p


async def read_to_end(stream: spdy.Stream) -> bytes:
    chunks = []
    while chunk := await asyncio.wait_for(stream.read(), WAIT):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_streams_are_accepted_in_order_with_their_headers(pair: Pair) -> None:
    kinds = ["error", "stdin", "stdout", "stderr"]
    opened = [await pair.client.open_stream({"streamType": kind, "port": "80"}) for kind in kinds]
    assert [s.id for s in opened] == [1, 3, 5, 7]
    for kind, mine in zip(kinds, opened, strict=True):
        theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
        assert theirs is not None
        assert (theirs.id, theirs.headers) == (mine.id, {"streamtype": kind, "port": "80"})


async def test_data_both_ways_then_fin(pair: Pair) -> None:
    mine = await pair.client.open_stream({"streamtype": "stdin"})
    await mine.write(b"hello ")
    await mine.write(b"world")
    await mine.close_write()
    await mine.close_write()  # idempotent
    theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
    assert theirs is not None
    assert await read_to_end(theirs) == b"hello world"
    assert theirs.remote_closed
    assert await theirs.read() == b""  # and again
    await theirs.write(b"back")
    await theirs.close_write()
    assert await read_to_end(mine) == b"back"
    with pytest.raises(ConnectionError):
        await mine.write(b"after FIN")


async def test_server_opens_even_streams(pair: Pair) -> None:
    mine = await pair.server.open_stream({"streamtype": "data"}, fin=True)
    theirs = await asyncio.wait_for(pair.client.accept(), WAIT)
    assert theirs is not None
    assert (mine.id, theirs.id, theirs.headers) == (2, 2, {"streamtype": "data"})
    assert await asyncio.wait_for(theirs.read(), WAIT) == b""
    await theirs.write(b"reply")
    assert await asyncio.wait_for(mine.read(), WAIT) == b"reply"


async def test_four_mib_through_one_stream_arrive_byte_exact(pair: Pair) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    mine = await pair.client.open_stream({"streamtype": "stdin"})
    theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
    assert theirs is not None

    async def send() -> None:
        await mine.write(payload)
        await mine.close_write()

    sending = asyncio.create_task(send())
    digest, largest = hashlib.sha256(), 0
    while chunk := await asyncio.wait_for(theirs.read(), WAIT):
        digest.update(chunk)
        largest = max(largest, len(chunk))
    await asyncio.wait_for(sending, WAIT)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert largest <= spdy.MAX_DATA_CHUNK


async def test_concurrent_writers_on_several_streams_do_not_mix(pair: Pair) -> None:
    payloads = {n: os.urandom(512 * 1024 + n) for n in range(5)}
    opened = [await pair.client.open_stream({"n": str(n)}) for n in payloads]

    async def send(stream: spdy.Stream, data: bytes) -> None:
        await stream.write(data)
        await stream.close_write()

    async def receive() -> dict[int, bytes]:
        accepted = [await asyncio.wait_for(pair.server.accept(), WAIT) for _ in payloads]
        bodies = await asyncio.gather(*(read_to_end(s) for s in accepted if s is not None))
        return {int(s.headers["n"]): body for s, body in zip(accepted, bodies, strict=True) if s is not None}

    *_, received = await asyncio.gather(*(send(s, payloads[n]) for n, s in enumerate(opened)), receive())
    assert received == payloads


async def test_pings_are_echoed_both_ways(pair: Pair) -> None:
    await asyncio.wait_for(pair.client.ping(), WAIT)
    await asyncio.wait_for(pair.server.ping(), WAIT)
    await asyncio.wait_for(pair.client.ping(), WAIT)


async def test_reset_reaches_the_other_sides_read(pair: Pair) -> None:
    mine = await pair.client.open_stream({"streamtype": "stdout"})
    theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
    assert theirs is not None
    await theirs.write(b"unread")
    await mine.reset()
    await mine.reset()  # idempotent
    assert await mine.read() == b""  # the unread data is dropped
    assert await asyncio.wait_for(theirs.read(), WAIT) == b""
    assert theirs.reset_by_peer and not mine.reset_by_peer
    with pytest.raises(ConnectionResetError):
        await theirs.write(b"more")
    with pytest.raises(ConnectionResetError):
        await mine.write(b"more")
    await pair.client.ping()  # the session goes on
    assert not pair.client.closed and not pair.server.closed


async def test_what_came_before_a_peers_reset_stays_readable(pair: Pair) -> None:
    mine = await pair.client.open_stream({"streamtype": "stdout"})
    theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
    assert theirs is not None
    await theirs.write(b"last words")
    await theirs.reset()
    await asyncio.wait_for(pair.client.ping(), WAIT)  # the RST has arrived by now
    assert mine.reset_by_peer
    assert await asyncio.wait_for(mine.read(), WAIT) == b"last words"
    assert await asyncio.wait_for(mine.read(), WAIT) == b""


async def test_close_resets_streams_sends_goaway_and_ends_both_loops(pair: Pair) -> None:
    mine = await pair.client.open_stream({"streamtype": "stdout"})
    theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
    assert theirs is not None
    await pair.server.close()
    await pair.server.close()  # idempotent
    assert pair.server.closed
    await asyncio.wait_for(pair.client_run, WAIT)  # ends at the GOAWAY, without an error
    await asyncio.wait_for(pair.server_run, WAIT)
    assert pair.client.closed
    assert mine.reset_by_peer  # the RST_STREAM came before the GOAWAY
    assert await mine.read() == b"" and await theirs.read() == b""
    assert await pair.client.accept() is None and await pair.server.accept() is None
    with pytest.raises(ConnectionError):
        await pair.client.open_stream({"streamtype": "stdin"})
    with pytest.raises(ConnectionError):
        await pair.client.ping()


async def test_a_stream_nobody_reads_pushes_back_on_the_sender() -> None:
    total = 32 * 1024 * 1024
    payload = os.urandom(total)
    async with session_pair(socket_buffer=64 * 1024) as pair:
        mine = await pair.client.open_stream({"streamtype": "stdin"})
        theirs = await asyncio.wait_for(pair.server.accept(), WAIT)
        assert theirs is not None
        sent = 0

        async def send() -> None:
            nonlocal sent
            for start in range(0, total, 64 * 1024):
                await mine.write(payload[start : start + 64 * 1024])
                sent = start + 64 * 1024
            await mine.close_write()

        sending = asyncio.create_task(send())

        async def stalled() -> None:
            seen, unchanged = -1, 0
            while unchanged < 10:
                await asyncio.sleep(0.05)
                seen, unchanged = sent, unchanged + 1 if sent == seen else 0

        await asyncio.wait_for(stalled(), WAIT)
        assert not sending.done()
        assert sent < 16 * 1024 * 1024
        digest = hashlib.sha256()
        while chunk := await asyncio.wait_for(theirs.read(), WAIT):
            digest.update(chunk)
        await asyncio.wait_for(sending, WAIT)
        assert digest.digest() == hashlib.sha256(payload).digest()


# --- a session against a hand-driven peer


@asynccontextmanager
async def raw_peer() -> AsyncIterator[tuple[Session, asyncio.Task[None], asyncio.StreamReader, asyncio.StreamWriter]]:
    """A server Session and the client side's raw reader and writer."""
    async with tcp_connection() as (client_reader, client_writer, server_reader, server_writer):
        server = Session(server_reader, writer_of(server_writer))
        running = asyncio.create_task(server.run())
        try:
            yield server, running, client_reader, client_writer
        finally:
            await server.close()
            await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), WAIT)


async def test_protocol_details_against_a_hand_driven_client() -> None:
    client = Framer()
    async with raw_peer() as (server, running, reader, writer):

        async def send(*frames: spdy.Frame) -> None:
            writer.write(b"".join(map(client.encode, frames)))
            await writer.drain()

        async def receive() -> spdy.Frame:
            return await asyncio.wait_for(client.read(reader), WAIT)

        await send(Ping(1))
        assert await receive() == Ping(1)  # nothing unsolicited came before the echo
        await send(Ping(2))  # the server's parity: an "echo" of a ping it never sent, ignored
        await send(Settings(0, [(0, 7, 1024)]), WindowUpdate(0, 1024))  # ignored
        await send(SynStream(1, headers={"streamtype": ["stdout"]}))
        assert await receive() == SynReply(1)
        await send(Data(9, 0, b"x"))  # a stream never opened
        assert await receive() == RstStream(9, spdy.RST_INVALID_STREAM)
        await send(SynStream(2))  # the server's parity
        assert await receive() == RstStream(2, spdy.RST_PROTOCOL_ERROR)
        await send(SynStream(5, flags=FLAG_FIN | FLAG_UNIDIRECTIONAL))  # no SYN_REPLY for this one
        await send(SynStream(3))  # not rising
        assert await receive() == RstStream(3, spdy.RST_PROTOCOL_ERROR)
        await send(Headers(1, 0, {"extra": ["a", "b"]}), Data(1, FLAG_FIN, b"bye"))
        await send(Ping(3))
        assert await receive() == Ping(3)

        first = await asyncio.wait_for(server.accept(), WAIT)
        second = await asyncio.wait_for(server.accept(), WAIT)
        assert first is not None and second is not None
        assert first.headers == {"streamtype": "stdout", "extra": "a,b"}
        assert await read_to_end(first) == b"bye"
        assert second.id == 5 and second.remote_closed and second.local_closed
        assert await second.read() == b""
        await first.write(b"out")
        assert await receive() == Data(1, 0, b"out")

        await send(GoAway(5))
        await asyncio.wait_for(running, WAIT)  # the GOAWAY ends the session
        assert server.closed
        with pytest.raises(ConnectionError):
            await first.write(b"too late")


async def test_garbage_ends_the_session_with_spdy_error_and_goaway() -> None:
    async with raw_peer() as (server, running, reader, writer):
        stream_frame = Framer().encode(SynStream(1, headers={"streamtype": ["stdout"]}))
        writer.write(stream_frame + b"\xde\xad\xbe\xef" * 4)  # the connection stays open
        with pytest.raises(SpdyError):
            await asyncio.wait_for(running, WAIT)
        assert server.closed
        stream = await server.accept()
        assert stream is not None and await stream.read() == b""
        assert await server.accept() is None
        client = Framer()
        received = [await asyncio.wait_for(client.read(reader), WAIT) for _ in range(3)]
        assert received == [SynReply(1), RstStream(1, spdy.RST_CANCEL), GoAway(1, spdy.GOAWAY_PROTOCOL_ERROR)]


async def test_eof_ends_the_session_but_buffered_data_stays_readable() -> None:
    client = Framer()
    async with raw_peer() as (server, running, _, writer):
        writer.write(client.encode(SynStream(1)) + client.encode(Data(1, 0, b"last words")))
        writer.write_eof()
        await asyncio.wait_for(running, WAIT)
        assert server.closed
        stream = await server.accept()
        assert stream is not None
        assert await read_to_end(stream) == b"last words"
        assert await server.accept() is None
        with pytest.raises(ConnectionError):
            await stream.write(b"too late")
