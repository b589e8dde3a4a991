"""SPDY/3.1 as the kubelet's streaming clients speak it (the moby/spdystream dialect).

Covers the frames (every SPDY/3 control frame but CREDENTIAL, and DATA), header compression
(one zlib stream per direction with the SPDY/3 dictionary) and a session of streams over one
connection: it accepts the peer's streams, opens its own, echoes PINGs and ends on EOF, GOAWAY,
close() or a malformed frame.

Left out, as in spdystream: flow control (SETTINGS and WINDOW_UPDATE are read and ignored; TCP is
the only back-pressure), server push, priorities (sent as given, ignored on receipt).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

VERSION = 3

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_UNSUPPORTED_VERSION = 4
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6
RST_FLOW_CONTROL_ERROR = 7
RST_STREAM_IN_USE = 8
RST_STREAM_ALREADY_CLOSED = 9
RST_FRAME_TOO_LARGE = 11

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

MAX_FRAME_LENGTH = 0xFFFFFF  # the 24-bit length field: no frame is 16 MiB or more
MAX_HEADER_BLOCK = 256 * 1024  # decompressed
MAX_DATA_CHUNK = 32 * 1024  # payload of the DATA frames Stream.write sends
RECEIVE_BUFFER_LIMIT = 1024 * 1024  # per stream; past it the session stops reading the socket
MAX_PENDING_STREAMS = 128  # opened by the peer, not yet accepted; more are refused
CLOSE_TIMEOUT = 5.0  # seconds close() tries to get its RST_STREAM and GOAWAY frames out

_SYN_STREAM, _SYN_REPLY, _RST_STREAM, _SETTINGS = 1, 2, 3, 4
_PING, _GOAWAY, _HEADERS, _WINDOW_UPDATE = 6, 7, 8, 9
_CONTROL_BIT = 0x80000000
_STREAM_ID_MASK = 0x7FFFFFFF


def _length_prefixed(words: tuple[bytes, ...]) -> bytes:
    return b"".join(struct.pack(">I", len(word)) + word for word in words)


# The SPDY/3 header-compression dictionary (SPDY/3 draft, section 2.6.10.1): length-prefixed
# header names and common values, then a run of status codes, reasons, dates and media types.
DICTIONARY: bytes = _length_prefixed((
    b"options", b"head", b"post", b"put", b"delete", b"trace", b"accept", b"accept-charset",
    b"accept-encoding", b"accept-language", b"accept-ranges", b"age", b"allow", b"authorization",
    b"cache-control", b"connection", b"content-base", b"content-encoding", b"content-language",
    b"content-length", b"content-location", b"content-md5", b"content-range", b"content-type",
    b"date", b"etag", b"expect", b"expires", b"from", b"host", b"if-match", b"if-modified-since",
    b"if-none-match", b"if-range", b"if-unmodified-since", b"last-modified", b"location",
    b"max-forwards", b"pragma", b"proxy-authenticate", b"proxy-authorization", b"range", b"referer",
    b"retry-after", b"server", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"user-agent",
    b"vary", b"via", b"warning", b"www-authenticate", b"method", b"get", b"status", b"200 OK",
    b"version", b"HTTP/1.1", b"url", b"public", b"set-cookie", b"keep-alive", b"origin",
)) + (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    b"401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    b"503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    b"Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


class ByteReader(Protocol):
    """Where frames come from: an asyncio.StreamReader, or WebSocket messages' bytes."""

    async def readexactly(self, n: int) -> bytes: ...


class SpdyError(Exception):
    """A malformed frame, bad header compression or an unknown control frame: the session ends."""


@dataclass(frozen=True, slots=True)
class SynStream:
    stream_id: int
    associated_id: int = 0
    priority: int = 0
    flags: int = 0
    headers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SynReply:
    stream_id: int
    flags: int = 0
    headers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Settings:
    flags: int = 0
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (flags, id, value)


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True, slots=True)
class Headers:
    stream_id: int
    flags: int = 0
    headers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    flags: int = 0
    data: bytes = b""


Frame = SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers | WindowUpdate | Data


def _unpack(fmt: str, data: bytes, offset: int = 0, *, exact: bool = False) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if len(data) - offset < size or (exact and len(data) - offset != size):
        raise SpdyError(f"frame field of {size} bytes in {len(data) - offset}")
    return struct.unpack_from(fmt, data, offset)


def _stream_id(raw: int) -> int:
    stream_id = raw & _STREAM_ID_MASK
    if stream_id == 0:
        raise SpdyError("stream id 0")
    return stream_id


def _control(kind: int, flags: int, body: bytes) -> bytes:
    return struct.pack(">HHI", _CONTROL_BIT >> 16 | VERSION, kind, flags << 24 | len(body)) + body


def _encode_header_block(headers: dict[str, list[str]]) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        for text in (name.lower(), "\0".join(values)):
            raw = text.encode()
            parts += (struct.pack(">I", len(raw)), raw)
    return b"".join(parts)


def _decode_header_block(block: bytes) -> dict[str, list[str]]:
    (count,) = _unpack(">I", block)
    offset = 4
    headers: dict[str, list[str]] = {}
    for _ in range(count):
        name, offset = _string_at(block, offset)
        value, offset = _string_at(block, offset)
        headers.setdefault(name.lower(), []).extend(value.split("\0"))
    if offset != len(block):
        raise SpdyError("bytes after the last header")
    return headers


def _string_at(block: bytes, offset: int) -> tuple[str, int]:
    (length,) = _unpack(">I", block, offset)
    end = offset + 4 + length
    if end > len(block):
        raise SpdyError("header block ends inside a header")
    return block[offset + 4 : end].decode(errors="replace"), end


class Framer:
    """One per connection and direction pair: owns the zlib compressor (level 9, SPDY dictionary,
    a sync flush after each header block) and the decompressor, so frames with header blocks must
    be encoded in the order they are sent and read in the order they arrive."""

    def __init__(self) -> None:
        self._deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)
        self._inflater = zlib.decompressobj(zdict=DICTIONARY)

    def encode(self, frame: Frame) -> bytes:
        """The frame's bytes on the wire; SpdyError if a DATA payload or header block is too large."""
        match frame:
            case Data():
                if len(frame.data) > MAX_FRAME_LENGTH:
                    raise SpdyError(f"DATA payload of {len(frame.data)} bytes")
                return struct.pack(">II", frame.stream_id, frame.flags << 24 | len(frame.data)) + frame.data
            case SynStream():
                fields = struct.pack(">IIBx", frame.stream_id, frame.associated_id, (frame.priority & 7) << 5)
                return _control(_SYN_STREAM, frame.flags, fields + self._compress(frame.headers))
            case SynReply() | Headers():
                kind = _SYN_REPLY if isinstance(frame, SynReply) else _HEADERS
                block = self._compress(frame.headers)
                return _control(kind, frame.flags, struct.pack(">I", frame.stream_id) + block)
            case RstStream():
                return _control(_RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
            case Settings():
                entries = b"".join(struct.pack(">II", f << 24 | i, v) for f, i, v in frame.entries)
                return _control(_SETTINGS, frame.flags, struct.pack(">I", len(frame.entries)) + entries)
            case Ping():
                return _control(_PING, 0, struct.pack(">I", frame.ping_id))
            case GoAway():
                return _control(_GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id, frame.status))
            case WindowUpdate():
                return _control(_WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))

    async def read(self, reader: ByteReader) -> Frame:
        """The next frame; asyncio.IncompleteReadError at a clean EOF between frames, else SpdyError."""
        try:
            head = await reader.readexactly(8)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise SpdyError("connection ended inside a frame header") from e
            raise
        first, flags_and_length = struct.unpack(">II", head)
        flags, length = flags_and_length >> 24, flags_and_length & MAX_FRAME_LENGTH
        is_control = bool(first & _CONTROL_BIT)
        # Check what the header can tell before waiting for a payload that garbage never sends.
        if is_control and (first >> 16 & 0x7FFF != VERSION or flags & ~(FLAG_FIN | FLAG_UNIDIRECTIONAL)):
            raise SpdyError(f"bad control frame header {head.hex()}")
        if not is_control and (first == 0 or flags & ~FLAG_FIN):
            raise SpdyError(f"bad data frame header {head.hex()}")
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise SpdyError("connection ended inside a frame") from e
        if not is_control:
            return Data(first, flags, payload)
        return self._decode_control(first & 0xFFFF, flags, payload)

    def _decode_control(self, kind: int, flags: int, payload: bytes) -> Frame:
        if kind == _SYN_STREAM:
            stream_id, associated_id, priority = _unpack(">IIBx", payload)
            headers = self._decompress(payload[10:])
            return SynStream(_stream_id(stream_id), associated_id & _STREAM_ID_MASK, priority >> 5, flags, headers)
        if kind in (_SYN_REPLY, _HEADERS):
            (stream_id,) = _unpack(">I", payload)
            frame_type = SynReply if kind == _SYN_REPLY else Headers
            return frame_type(_stream_id(stream_id), flags, self._decompress(payload[4:]))
        if kind == _RST_STREAM:
            stream_id, status = _unpack(">II", payload, exact=True)
            return RstStream(_stream_id(stream_id), status)
        if kind == _SETTINGS:
            (count,) = _unpack(">I", payload)
            if len(payload) != 4 + 8 * count:
                raise SpdyError(f"SETTINGS of {count} entries in {len(payload)} bytes")
            pairs = [_unpack(">II", payload, 4 + 8 * n) for n in range(count)]
            return Settings(flags, [(flag_id >> 24, flag_id & 0xFFFFFF, value) for flag_id, value in pairs])
        if kind == _PING:
            return Ping(_unpack(">I", payload, exact=True)[0])
        if kind == _GOAWAY:
            last_good, status = _unpack(">II", payload, exact=True)
            return GoAway(last_good & _STREAM_ID_MASK, status)
        if kind == _WINDOW_UPDATE:
            stream_id, delta = _unpack(">II", payload, exact=True)
            return WindowUpdate(stream_id & _STREAM_ID_MASK, delta & 0x7FFFFFFF)
        raise SpdyError(f"unknown control frame type {kind}")

    def _compress(self, headers: dict[str, list[str]]) -> bytes:
        block = _encode_header_block(headers)
        if len(block) > MAX_HEADER_BLOCK:
            raise SpdyError(f"header block of {len(block)} bytes")
        return self._deflater.compress(block) + self._deflater.flush(zlib.Z_SYNC_FLUSH)

    def _decompress(self, compressed: bytes) -> dict[str, list[str]]:
        try:
            block = self._inflater.decompress(compressed, MAX_HEADER_BLOCK + 1)
        except zlib.error as e:
            raise SpdyError(f"bad header compression: {e}") from e
        if len(block) > MAX_HEADER_BLOCK:
            raise SpdyError(f"header block inflates past {MAX_HEADER_BLOCK} bytes")
        return _decode_header_block(block)


class Stream:
    """One stream of a session: bytes each way, and the headers its opener sent."""

    def __init__(self, session: Session, stream_id: int, headers: dict[str, list[str]]) -> None:
        self.id = stream_id
        self.headers: dict[str, str] = {}  # lowercase names, several values joined with ","
        self.reset_by_peer = False
        self._session = session
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._has_room = asyncio.Event()
        self._local_closed = False
        self._remote_closed = False
        self._reset = False
        self._merge_headers(headers)

    @property
    def remote_closed(self) -> bool:
        """The peer sent FIN, or the stream was reset, or the session ended."""
        return self._remote_closed

    @property
    def local_closed(self) -> bool:
        """This side sent FIN (close_write) or the stream was opened unidirectional."""
        return self._local_closed

    async def read(self) -> bytes:
        """The next chunk the peer sent; b"" after its FIN, a reset or the end of the session."""
        while not self._chunks:
            if self._remote_closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._has_room.set()
        return chunk

    async def write(self, data: bytes) -> None:
        """Send data in DATA frames of at most MAX_DATA_CHUNK bytes, each awaiting the transport."""
        view = memoryview(data)
        for start in range(0, len(view), MAX_DATA_CHUNK):
            if self._reset:
                raise ConnectionResetError(f"SPDY stream {self.id} was reset")
            if self._local_closed:
                raise BrokenPipeError(f"SPDY stream {self.id} is closed for writing")
            await self._session._send(Data(self.id, 0, bytes(view[start : start + MAX_DATA_CHUNK])))

    async def close_write(self) -> None:
        """Send FIN (an empty DATA frame); a no-op once sent, reset or the session ended."""
        if self._local_closed or self._reset or self._session.closed:
            return
        self._local_closed = True
        await self._session._send(Data(self.id, FLAG_FIN))
        self._forget_if_done()

    async def reset(self, status: int = RST_CANCEL) -> None:
        """Send RST_STREAM and drop unread data; read() returns b"" from now on. Never raises."""
        if self._reset:
            return
        still_open = not (self._local_closed and self._remote_closed)
        self._mark_reset(by_peer=False)
        if still_open:
            with contextlib.suppress(OSError):
                await self._session._send(RstStream(self.id, status))

    async def _receive(self, data: bytes) -> None:
        """Buffer the peer's data; while the buffer is full, wait (so the session stops reading)."""
        while self._buffered and self._buffered + len(data) > RECEIVE_BUFFER_LIMIT and not self._remote_closed:
            self._has_room.clear()
            await self._has_room.wait()
        if not self._remote_closed:
            self._chunks.append(data)
            self._buffered += len(data)
            self._readable.set()

    def _finish_remote(self) -> None:
        self._remote_closed = True
        self._readable.set()
        self._has_room.set()
        self._forget_if_done()

    def _mark_reset(self, *, by_peer: bool) -> None:
        self._reset = True
        self.reset_by_peer = by_peer
        if not by_peer:
            # A peer's reset keeps what it sent before it readable, as spdystream's streams
            # do (it delivers each frame before it reads the next): a server that resets its
            # streams right after writing them loses nothing its client had not read yet.
            self._chunks.clear()
            self._buffered = 0
        self._finish_remote()

    def _merge_headers(self, headers: dict[str, list[str]]) -> None:
        for name, values in headers.items():
            joined = ",".join(values)
            self.headers[name] = f"{self.headers[name]},{joined}" if name in self.headers else joined

    def _forget_if_done(self) -> None:
        if self._reset or (self._local_closed and self._remote_closed):
            self._session._streams.pop(self.id, None)


class Session:
    """A SPDY session over one connection. Call run() (the read loop) in a task of its own.

    `write` sends bytes and awaits the transport's drain; for a socket, writer.write(data) then
    await writer.drain(). It is a callable so that the session can also run inside WebSocket
    binary messages. The session sends nothing of its own accord (no SETTINGS on start).

    Back-pressure is TCP's alone: while one stream's receive buffer is full the read loop waits,
    for every stream of the session, until that stream is read."""

    def __init__(
        self, reader: ByteReader, write: Callable[[bytes], Awaitable[None]], *, server: bool = True
    ) -> None:
        self.closed = False
        self._reader = reader
        self._write = write
        self._framer = Framer()
        self._write_lock = asyncio.Lock()  # held across encode and write: frames whole, zlib in order
        self._streams: dict[int, Stream] = {}  # not yet closed both ways nor reset
        self._pending: asyncio.Queue[Stream | None] = asyncio.Queue()  # None once the session ended
        self._next_stream_id = 2 if server else 1
        self._next_ping_id = 2 if server else 1
        self._last_peer_stream_id = 0
        self._unanswered_pings: dict[int, asyncio.Event] = {}
        self._read_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Read frames until EOF, GOAWAY or close(); a malformed frame sends GOAWAY and raises SpdyError."""
        if self.closed:
            return
        self._read_task = asyncio.create_task(self._read_frames())
        try:
            await self._read_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # else close() stopped the read loop
        finally:
            self._shut_down()

    async def accept(self) -> Stream | None:
        """The next stream the peer opened, in order; None once the session is over."""
        stream = await self._pending.get()
        if stream is None:
            self._pending.put_nowait(None)  # for later callers too
        return stream

    async def open_stream(self, headers: dict[str, str], *, fin: bool = False) -> Stream:
        """Open a stream with a SYN_STREAM (odd ids for a client, even for a server); no wait for SYN_REPLY."""
        header_lists = {name.lower(): [value] for name, value in headers.items()}
        async with self._write_lock:
            if self.closed:
                raise ConnectionError("SPDY session closed")
            stream_id = self._next_stream_id
            if stream_id > _STREAM_ID_MASK:
                raise SpdyError("stream ids exhausted")
            self._next_stream_id += 2
            stream = Stream(self, stream_id, header_lists)
            stream._local_closed = fin
            self._streams[stream_id] = stream
            syn_stream = SynStream(stream_id, flags=FLAG_FIN if fin else 0, headers=header_lists)
            await self._write(self._framer.encode(syn_stream))
        return stream

    async def ping(self) -> None:
        """Send a PING and wait for its echo (bound the wait yourself); ConnectionError if the session ends."""
        ping_id = self._next_ping_id
        self._next_ping_id = ping_id + 2 if ping_id + 2 <= _STREAM_ID_MASK else 2 - ping_id % 2
        answered = self._unanswered_pings[ping_id] = asyncio.Event()
        try:
            await self._send(Ping(ping_id))
            await answered.wait()
            if ping_id in self._unanswered_pings:
                raise ConnectionError("SPDY session ended before the PING was answered")
        finally:
            self._unanswered_pings.pop(ping_id, None)

    async def close(self, status: int = GOAWAY_OK) -> None:
        """RST_STREAM (CANCEL) every open stream, send GOAWAY and stop the read loop.

        Idempotent, and a no-op once the session ended; never raises on a dead connection."""
        if self.closed:
            return
        still_open = list(self._streams.values())
        frames: list[Frame] = [RstStream(stream.id, RST_CANCEL) for stream in still_open]
        frames.append(GoAway(self._last_peer_stream_id, status))
        for stream in still_open:
            stream._mark_reset(by_peer=False)
        self._shut_down()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT), self._write_lock:
                await self._write(b"".join(self._framer.encode(frame) for frame in frames))

    async def _send(self, frame: Frame) -> None:
        async with self._write_lock:
            if self.closed:
                raise ConnectionError("SPDY session closed")
            await self._write(self._framer.encode(frame))

    async def _read_frames(self) -> None:
        try:
            while not isinstance(frame := await self._framer.read(self._reader), GoAway):
                await self._handle(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the peer went away
        except SpdyError:
            await self.close(GOAWAY_PROTOCOL_ERROR)
            raise

    async def _handle(self, frame: Frame) -> None:
        match frame:
            case Data():
                await self._on_data(frame)
            case SynStream():
                await self._on_syn_stream(frame)
            case SynReply() | Headers():
                if stream := self._streams.get(frame.stream_id):
                    stream._merge_headers(frame.headers)
                    if frame.flags & FLAG_FIN:
                        stream._finish_remote()
            case RstStream():
                if stream := self._streams.get(frame.stream_id):
                    stream._mark_reset(by_peer=True)
            case Ping():
                if frame.ping_id % 2 != self._next_ping_id % 2:
                    await self._send(frame)  # the peer's: echo it
                elif answered := self._unanswered_pings.pop(frame.ping_id, None):
                    answered.set()
            case Settings() | WindowUpdate():
                pass  # no flow control, as in spdystream

    async def _on_data(self, frame: Data) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            if not self._was_opened(frame.stream_id):
                await self._send(RstStream(frame.stream_id, RST_INVALID_STREAM))
            return  # else a stream closed or reset already: drop what was in flight
        if frame.data:
            await stream._receive(frame.data)
        if frame.flags & FLAG_FIN:
            stream._finish_remote()

    async def _on_syn_stream(self, frame: SynStream) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == self._next_stream_id % 2 or stream_id <= self._last_peer_stream_id:
            await self._send(RstStream(stream_id, RST_PROTOCOL_ERROR))
            return
        self._last_peer_stream_id = stream_id
        if self._pending.qsize() >= MAX_PENDING_STREAMS:
            await self._send(RstStream(stream_id, RST_REFUSED_STREAM))
            return
        stream = Stream(self, stream_id, frame.headers)
        self._streams[stream_id] = stream
        if frame.flags & FLAG_UNIDIRECTIONAL:
            stream._local_closed = True
        else:
            await self._send(SynReply(stream_id))  # before anyone can write on the stream
        if frame.flags & FLAG_FIN:
            stream._finish_remote()
        self._pending.put_nowait(stream)

    def _was_opened(self, stream_id: int) -> bool:
        if stream_id % 2 == self._next_stream_id % 2:
            return stream_id < self._next_stream_id
        return stream_id <= self._last_peer_stream_id

    def _shut_down(self) -> None:
        """No more frames either way: end every stream's reads, accept() and ping() waits."""
        if self.closed:
            return
        self.closed = True
        for stream in list(self._streams.values()):
            stream._finish_remote()
        self._streams.clear()
        self._pending.put_nowait(None)
        for answered in self._unanswered_pings.values():
            answered.set()
