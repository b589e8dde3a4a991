"""Refuse image layers that try to write outside their root, or that hold what a cell never unpacks.

The check reads exactly the stream umoci unpacks, the way umoci (Go's compress/gzip and
archive/tar) reads it, so that no entry can hide from one reader and reach the other:

- gzip is multistream: every member, one after the other, to the end of the blob (Go's
  gzip reader does the same); bytes after a member that do not start another one, or a
  member cut short, refuse the layer. zstd goes through the cell's `zstd` (all frames).
  An uncompressed layer is read as is; any other media type is refused (umoci would be).
- tar headers are parsed here, as Go parses them (numeric fields with leading NULs and
  spaces trimmed, base-256, the USTAR/STAR prefix, GNU long names, PAX records). ANY header
  error is a refusal, never an end of archive: a bad checksum, a truncated header, a zero
  block followed by a header, a malformed PAX record, and anything but NULs after the end
  blocks.
- the uncompressed stream's sha256 is returned (and checked against the config's diff_id
  when one is given): the caller knows umoci will unpack the very bytes checked here.

Refused entries (the layer fails; nothing is skipped): an absolute name, a `..` component,
a hard link whose target is absolute or climbs out, a symlink whose *relative* target climbs
above the root, a whiteout of `.`, `..` or nothing (`.wh.`, `.wh..`, `.wh...`), a char or
block device, a FIFO, a sparse file, and any entry type umoci does not unpack. Absolute
symlink targets are normal in images (`/bin/sh -> /bin/busybox`); umoci resolves them inside
the rootfs, so they are allowed.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 64 * 1024               # compressed bytes read at a time
OUT_MAX = 1024 * 1024           # decompressed bytes produced at a time (a gzip bomb stays small in memory)
MAX_SPECIAL = 1 << 20           # PAX and GNU long-name data, as Go's archive/tar bounds it
CHECK_TIMEOUT = 600.0           # seconds one layer's check may take (it holds the cell's pull lock)

# Entry types (the tar typeflag byte).
REG, AREG, CONT, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"\x00", b"7", b"1", b"2", b"3", b"4", b"5", b"6"
PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
HEADER_ONLY = {LNK, SYM, CHR, BLK, DIR, FIFO}  # their size field is ignored (no data follows)
UNPACKED = {REG, AREG, CONT, LNK, SYM, DIR}
REFUSED_KINDS = {CHR: "char device", BLK: "block device", FIFO: "FIFO", GNU_SPARSE: "sparse file"}

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_PAX_TIME = re.compile(rb"-?[0-9]+(\.[0-9]*)?")


class LayerRejected(Exception):
    pass


@dataclass
class Member:
    """One tar entry as Go's archive/tar (and so umoci) sees it."""

    name: str
    type: bytes
    linkname: str = ""
    size: int = 0
    offset: int = 0  # of its header in the uncompressed stream
    raw_names: tuple[str, ...] = ()  # the header's own name and prefix fields, whatever replaced them

    def isreg(self) -> bool:
        return self.type in (REG, AREG, CONT)

    def islnk(self) -> bool:
        return self.type == LNK

    def issym(self) -> bool:
        return self.type == SYM


def _climbs_out(path: str) -> bool:
    norm = posixpath.normpath(path)
    return norm == ".." or norm.startswith("../")


def check_member(m: Member) -> str | None:
    """Why this entry is refused, or None if it is fine."""
    name = m.name
    if m.type in REFUSED_KINDS:
        return f"{REFUSED_KINDS[m.type]} {name!r} (the cell unpacks no device nodes, FIFOs or sparse files)"
    if m.type not in UNPACKED:
        return f"entry {name!r} of unsupported type {m.type!r}"
    if name.startswith("/"):
        return f"absolute path {name!r}"
    if ".." in name.split("/"):
        return f"'..' in path {name!r}"
    for raw in m.raw_names:
        if ".." in raw.split("/"):
            return f"'..' in the header's name field {raw!r} of {name!r}"
    base = posixpath.basename(name.rstrip("/"))
    target = base[len(WHITEOUT):]
    if base.startswith(WHITEOUT) and base != OPAQUE and target in ("", ".", ".."):
        return f"whiteout {name!r} removes {repr(target) if target else 'nothing'}, not an entry of its directory"
    if m.islnk():
        target = m.linkname
        if target.startswith("/"):
            return f"hard link {name!r} -> absolute {target!r}"
        if ".." in target.split("/") or _climbs_out(target):
            return f"hard link {name!r} -> {target!r} leaves the root"
    elif m.issym():
        target = m.linkname
        # A relative target is relative to the link's own directory.
        if not target.startswith("/") and _climbs_out(
            posixpath.join(posixpath.dirname(posixpath.normpath(name)), target)
        ):
            return f"symlink {name!r} -> {target!r} climbs above the root"
    return None


# --- the uncompressed stream ------------------------------------------------------------------

def _plain(f: Path) -> Iterator[bytes]:
    with open(f, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _gunzip(f: Path) -> Iterator[bytes]:
    """Every gzip member of the file, in order, to its very end (Go's multistream reader)."""
    members = 0
    d = zlib.decompressobj(wbits=31)
    in_member = False
    with open(f, "rb") as fh:
        while chunk := fh.read(CHUNK):
            buf, more = chunk, True
            while more:
                if buf:
                    in_member = True
                try:
                    out = d.decompress(buf, OUT_MAX)
                except zlib.error as e:
                    where = "not gzip" if members == 0 else f"bytes after gzip member {members} are not another member"
                    raise LayerRejected(f"{where}: {e}") from None
                if out:
                    yield out
                if d.eof:
                    members += 1
                    in_member = False
                    buf = d.unused_data
                    d = zlib.decompressobj(wbits=31)
                    more = bool(buf)
                else:  # all input taken, or output held back by the bound
                    buf = d.unconsumed_tail
                    more = bool(buf) or len(out) == OUT_MAX
    if in_member:
        raise LayerRejected(f"gzip member {members + 1} is cut short (no end of stream)")
    if members == 0:
        raise LayerRejected("empty layer: no gzip member")


def _unzstd(f: Path) -> Iterator[bytes]:
    zstd = shutil.which("zstd")
    if not zstd:
        raise LayerRejected("zstd-compressed layer and no zstd on this cell")
    p = subprocess.Popen([zstd, "-dcq", "--", str(f)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None  # both are PIPEs
    try:
        while chunk := p.stdout.read(CHUNK):
            yield chunk
        err = p.stderr.read(4096)
        if p.wait() != 0:
            raise LayerRejected(f"not zstd: {err.decode(errors='replace').strip() or f'zstd exited {p.returncode}'}")
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def decompressor(media_type: str) -> str:
    """"gzip", "zstd" or "tar": how umoci reads a layer of this media type (it goes by the
    type, never by sniffing the bytes)."""
    if "zstd" in media_type:
        return "zstd"
    if "gzip" in media_type:
        return "gzip"
    if media_type.endswith("tar"):
        return "tar"
    raise LayerRejected(f"unsupported layer media type {media_type!r}")


class _Stream:
    """The uncompressed bytes, read block by block, hashed as they pass, within a deadline."""

    def __init__(self, chunks: Iterator[bytes], deadline: float) -> None:
        self._chunks = chunks
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._deadline = deadline
        self.offset = 0  # bytes handed out so far

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            if time.monotonic() > self._deadline:
                raise LayerRejected(f"checking the layer took longer than {CHECK_TIMEOUT:.0f}s")
            chunk = next(self._chunks, None)
            if chunk is None:
                return
            self._hash.update(chunk)
            self._buf += chunk

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the stream."""
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            got = len(self.read(min(n - done, OUT_MAX)))
            if not got:
                break
            done += got
        return done

    def rest_is_zero(self) -> bool:
        while True:
            piece = self.read(OUT_MAX)
            if not piece:
                return True
            if piece.count(0) != len(piece):
                return False

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


# --- tar headers, as Go's archive/tar reads them ----------------------------------------------

class _HeaderError(Exception):
    pass


def _cstr(b: bytes) -> bytes:
    i = b.find(0)
    return b if i < 0 else b[:i]


def _octal(b: bytes) -> int:
    b = _cstr(b.strip(b" \x00"))
    if not b:
        return 0
    if not re.fullmatch(rb"[0-7]+", b):
        raise _HeaderError(f"bad octal field {b!r}")
    x = int(b, 8)
    if x >> 64:
        raise _HeaderError(f"octal field {b!r} overflows")
    return x - (1 << 64) if x >> 63 else x  # Go keeps the uint64 as an int64


def _numeric(b: bytes) -> int:
    if b and b[0] & 0x80:  # base-256, two's complement
        inv = 0xFF if b[0] & 0x40 else 0
        x = 0
        for i, byte in enumerate(b):
            c = (byte ^ inv) & (0x7F if i == 0 else 0xFF)
            if x >> 56:
                raise _HeaderError("base-256 field overflows")
            x = x << 8 | c
        if x >> 63:
            raise _HeaderError("base-256 field overflows")
        return ~x if inv else x
    return _octal(b)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _parse_header(blk: bytes) -> tuple[Member, bytes]:
    """(entry, the raw prefix Go prepended) from one 512-byte header block."""
    stored = _octal(blk[148:156])
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for c in blk[:148] + blk[156:] if c >= 0x80)
    if stored not in (unsigned, signed):
        raise _HeaderError(f"bad header checksum (stored {stored}, computed {unsigned})")
    magic, version, trailer = blk[257:263], blk[263:265], blk[508:512]
    if magic == b"ustar\x00":
        fmt = "star" if trailer == b"tar\x00" else "ustar"
    elif magic == b"ustar " and version == b" \x00":
        fmt = "gnu"
    else:
        fmt = "v7"
    typeflag = blk[156:157]
    name = _cstr(blk[0:100])
    linkname = _cstr(blk[157:257])
    size = _numeric(blk[124:136])
    for lo, hi in ((100, 108), (108, 116), (116, 124), (136, 148)):  # mode, uid, gid, mtime
        _numeric(blk[lo:hi])
    prefix = b""
    if fmt != "v7":
        _numeric(blk[329:337])  # devmajor, devminor
        _numeric(blk[337:345])
    if fmt == "star":
        prefix = _cstr(blk[345:476])
        _numeric(blk[476:488])  # atime, ctime
        _numeric(blk[488:500])
    elif fmt == "ustar":  # USTAR or PAX
        prefix = _cstr(blk[345:500])
    elif fmt == "gnu":  # atime and ctime there, not a prefix ...
        try:
            for lo, hi in ((345, 357), (357, 369)):
                if blk[lo] != 0:
                    _numeric(blk[lo:hi])
        except _HeaderError:  # ... unless they do not parse (files of Go before 1.8)
            candidate = _cstr(blk[345:500])
            if all(c < 0x80 for c in candidate):
                prefix = candidate
    if prefix:
        name = prefix + b"/" + name
    return Member(_text(name), typeflag, _text(linkname), size), prefix


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    s = data
    while s:
        n_str, sp, rest = s.partition(b" ")
        if not sp or not _DECIMAL.fullmatch(n_str):
            raise _HeaderError("malformed PAX record length")
        n = int(n_str)
        if n < 5 or n > len(s):
            raise _HeaderError(f"PAX record length {n} out of range")
        n -= len(n_str) + 1
        if n <= 0:
            raise _HeaderError("malformed PAX record")
        rec, nl, s = rest[:n - 1], rest[n - 1:n], rest[n:]
        if nl != b"\n":
            raise _HeaderError("PAX record does not end in a newline")
        key, eq, value = rec.partition(b"=")
        if not eq or not key:
            raise _HeaderError("PAX record without a key")
        if (key in (b"path", b"linkpath", b"uname", b"gname") and b"\x00" in value) or b"\x00" in key:
            raise _HeaderError(f"NUL in PAX record {_text(key)!r}")
        if key.startswith(b"GNU.sparse."):
            raise _HeaderError("GNU sparse PAX records (the cell unpacks no sparse files)")
        records[key] = value  # Go keeps the last of a repeated key
    return records


def _merge_pax(m: Member, pax: dict[bytes, bytes]) -> None:
    for key, value in pax.items():
        if not value:
            continue  # Go keeps the header's own field
        if key == b"path":
            m.name = _text(value)
        elif key == b"linkpath":
            m.linkname = _text(value)
        elif key in (b"size", b"uid", b"gid"):
            if not _DECIMAL.fullmatch(value):
                raise _HeaderError(f"PAX {_text(key)} {value!r} is not a number")
            if key == b"size":
                m.size = int(value)
        elif key in (b"atime", b"mtime", b"ctime") and not _PAX_TIME.fullmatch(value):
            raise _HeaderError(f"PAX {_text(key)} {value!r} is not a time")


def members(s: _Stream) -> Iterator[Member]:
    """Every entry of the archive, as Go's archive/tar yields them; LayerRejected on any
    header error. Ends only at two zero blocks (or one, or none, at the stream's end, as
    Go ends), and only when what follows them is NUL padding."""
    pax: dict[bytes, bytes] | None = None
    long_name: str | None = None
    long_link: str | None = None
    while True:
        at = s.offset
        blk = s.read(BLOCK)
        if len(blk) == 0 or blk == ZERO_BLOCK:
            if blk:
                second = s.read(BLOCK)
                if second and second != ZERO_BLOCK:
                    raise LayerRejected(f"a zero block and then a header at offset {at + BLOCK} "
                                        "(not an end of archive)")
            if pax is not None or long_name is not None or long_link is not None:
                raise LayerRejected(f"the archive ends at offset {at} right after an extended header")
            if not s.rest_is_zero():
                raise LayerRejected(f"data after the end of the archive (offset {at})")
            return
        if len(blk) < BLOCK:
            raise LayerRejected(f"truncated tar header at offset {at}")
        try:
            m, prefix = _parse_header(blk)
            m.offset = at
            m.raw_names = (_text(_cstr(blk[0:100])), _text(prefix))
            data_size = 0 if m.type in HEADER_ONLY else m.size
            if data_size < 0:
                raise _HeaderError(f"negative size {data_size}")
            if m.type in (PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK):
                if data_size > MAX_SPECIAL:
                    raise _HeaderError(f"extended header of {data_size} bytes (at most {MAX_SPECIAL})")
                data = s.read(data_size)
                if len(data) < data_size or s.skip(-data_size % BLOCK) < -data_size % BLOCK:
                    raise LayerRejected(f"the archive is cut short in the extended header at offset {at}")
                if m.type == PAX:
                    if pax is not None:
                        raise _HeaderError("two PAX headers for one entry")
                    pax = _parse_pax(data)
                elif m.type == GLOBAL_PAX:
                    glob = _parse_pax(data)
                    if pax is not None or long_name is not None or long_link is not None:
                        raise _HeaderError("a global PAX header between an extended header and its entry")
                    if {b"path", b"linkpath", b"size"} & set(glob):
                        raise _HeaderError("a global PAX header that sets path, linkpath or size")
                elif m.type == GNU_LONGNAME:
                    if long_name is not None:
                        raise _HeaderError("two GNU long names for one entry")
                    long_name = _text(_cstr(data))
                else:
                    if long_link is not None:
                        raise _HeaderError("two GNU long link names for one entry")
                    long_link = _text(_cstr(data))
                continue
            if pax is not None:
                _merge_pax(m, pax)
            if long_name is not None:
                m.name = long_name
            if long_link is not None:
                m.linkname = long_link
            pax = long_name = long_link = None
            if m.type == AREG and m.name.endswith("/"):
                m.type = DIR
            data_size = 0 if m.type in HEADER_ONLY else m.size
            if data_size < 0:
                raise _HeaderError(f"negative size {data_size}")
        except _HeaderError as e:
            raise LayerRejected(f"invalid tar header at offset {at}: {e}") from None
        yield m
        padded = data_size + (-data_size % BLOCK)
        if s.skip(padded) < padded:
            raise LayerRejected(f"the archive is cut short in the data of {m.name!r} (header at offset {at})")


def check_layer(blob: Path, media_type: str, diff_id: str | None = None) -> str:
    """The uncompressed layer's digest, once every entry passed; LayerRejected with a clear
    reason (naming the entry) otherwise. Reads the layer as a stream (no extraction). With
    `diff_id` (the image config's `rootfs.diff_ids[i]`), a different digest is refused."""
    kind = decompressor(media_type)
    chunks = {"gzip": _gunzip, "zstd": _unzstd, "tar": _plain}[kind](blob)
    try:
        s = _Stream(chunks, time.monotonic() + CHECK_TIMEOUT)
        for m in members(s):
            why = check_member(m)
            if why:
                raise LayerRejected(f"{why} (header at offset {m.offset})")
        got = s.digest()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if diff_id is not None and got != diff_id:
        raise LayerRejected(f"uncompressed digest {got} differs from the image config's diff_id {diff_id}")
    return got
