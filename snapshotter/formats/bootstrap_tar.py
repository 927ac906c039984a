"""The bootstrap inside a nydus bootstrap layer: a bounded, streaming tar reader.

A bootstrap layer is a tar (gzip, zstd or plain) holding ``image/image.boot`` (or the
legacy ``image.boot``). ``extract_bootstrap`` is the one reader of it, used by the
snapshotter's check, by nydus detection, by a daemon that fetched the layer itself and
by ``lazysnap inspect``. It raises only FormatError (LimitExceeded over a bound).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import zstandard

from snapshotter.errdefs import FormatError, LimitExceeded

BOOTSTRAP_FILE = "image/image.boot"
LEGACY_BOOTSTRAP_FILE = "image.boot"

# # The layer blob is hostile input: whoever pushed the image chose every byte. It is read
# as a stream (gzip and zstd inflated piece by piece, never whole), and everything it
# declares is bounded before it costs anything: the inflated bytes (``_Inflated``), the
# number of tar headers, the size of PAX and GNU long-name headers, and the bootstrap's
# declared size, which must not exceed the caller's limit. Member names are only compared
# with the two bootstrap names, never used as paths.

MAX_BOOTSTRAP_BYTES = 256 << 20
"""Largest bootstrap lazysnap accepts, bare or in a layer (``rafs_opener`` uses it too).

Real bootstraps are a few MiB to a few hundred MiB: they grow with the number of files
and chunks (about 100-250 bytes per file including its first chunk, 80 per further
chunk), so 256 MiB covers images of more than a million files. The index built from a
bootstrap costs 4-10 times its size in memory (measured: 3.7x for v5, 9.8x for v6 with
small files), and a layer may inflate to the limit before it is refused: with 1 GiB (the
old limit) one image could push a daemon to ~10 GiB and seconds of inflating; 256 MiB
keeps the worst case near 2.5 GiB. The snapshotter's own limit
(``remote.max_toc_bytes``, 64 MiB by default) is usually lower still."""
TAR_OVERHEAD_BYTES = 16 << 20
"""What a bootstrap layer may hold besides the bootstrap: tar headers, the ``image``
directory, small side files. The inflated stream is refused past ``limit`` plus this."""
MAX_TAR_MEMBERS = 1024
"""Tar headers scanned at most (nydus writes two or three: ``image/``, the bootstrap)."""
MAX_TAR_HEADER_DATA = 64 << 10
"""Largest PAX extended header or GNU long name/link payload (real ones: < 1 KiB)."""
MAX_ZSTD_WINDOW = 1 << 27
"""zstd window accepted in a layer (libzstd's default limit; ``--long`` needs 2^27)."""
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_IO_CHUNK = 64 << 10
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular, old regular, contiguous
_HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, FIFOs: no data
_TYPE_NAMES = {b"1": "hard link", b"2": "symlink", b"3": "character device",
               b"4": "block device", b"5": "directory", b"6": "FIFO"}
_CODEC_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error, zstandard.ZstdError, EOFError, ValueError, OverflowError, MemoryError)


def _gunzip(src: BinaryIO) -> Iterator[bytes]:
    """Inflate concatenated gzip members (NUL padding between and after them allowed, as
    in ``gzip.decompress``), yielding pieces of at most ``_IO_CHUNK`` bytes.

    Raises FormatError for a truncated stream; zlib.error for corrupt data.
    """
    pending = b""  # input not yet given to an inflater
    inflater: Any = None
    src_done = False
    while True:
        if not pending and not src_done:
            pending = src.read(_IO_CHUNK)
            src_done = not pending
        if inflater is None:
            pending = pending.lstrip(b"\0")
            if not pending:
                if src_done:
                    return
                continue
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out = inflater.decompress(pending, _IO_CHUNK)
        if inflater.eof:
            pending, inflater = inflater.unused_data, None
        else:
            pending = inflater.unconsumed_tail
            if not out and not pending and src_done:
                raise FormatError("truncated gzip stream")
        if out:
            yield out


def _unzstd(src: BinaryIO) -> Iterator[bytes]:
    """Decompress zstd frames in pieces of at most ``_IO_CHUNK`` bytes (window at most
    ``MAX_ZSTD_WINDOW``). A stream cut inside a frame ends early (libzstd's reader does
    not report it); the tar reader then finds the tar truncated, and callers check the
    blob's digest anyway."""
    reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
        src, read_size=_IO_CHUNK, read_across_frames=True, closefd=False)
    while piece := reader.read(_IO_CHUNK):
        yield piece


def _plain(src: BinaryIO) -> Iterator[bytes]:
    while piece := src.read(_IO_CHUNK):
        yield piece


def _layer_pieces(src: BinaryIO) -> Iterator[bytes]:
    """The layer as a plain tar, in pieces: gzip and zstd sniffed by magic, else as is."""
    start = src.tell()
    head = src.read(len(ZSTD_MAGIC))
    src.seek(start)
    if head.startswith(GZIP_MAGIC):
        return _gunzip(src)
    if head == ZSTD_MAGIC:
        return _unzstd(src)
    return _plain(src)


class _Inflated:
    """Reads the inflated layer; LimitExceeded once more than ``cap`` bytes came out.

    Codec errors become FormatError. At most one piece (``_IO_CHUNK``) is held beyond
    what the caller asked for.
    """

    def __init__(self, src: BinaryIO, cap: int) -> None:
        self._pieces = _layer_pieces(src)
        self._cap = cap
        self._total = 0
        self._piece = b""
        self._pos = 0

    def _next(self) -> bool:
        """Load the next piece; False at the end of the stream."""
        try:
            piece = next(self._pieces, None)
        except _CODEC_ERRORS as exc:
            raise FormatError(f"corrupt compressed layer: {exc}") from None
        if piece is None:
            return False
        self._total += len(piece)
        if self._total > self._cap:
            raise LimitExceeded(f"the layer inflates to more than {self._cap} bytes")
        self._piece, self._pos = piece, 0
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        while n > 0:
            if self._pos >= len(self._piece) and not self._next():
                break
            part = self._piece[self._pos : self._pos + n]
            self._pos += len(part)
            n -= len(part)
            parts.append(part)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard up to ``n`` bytes; return how many there were."""
        done = 0
        while done < n:
            if self._pos >= len(self._piece) and not self._next():
                break
            step = min(n - done, len(self._piece) - self._pos)
            self._pos += step
            done += step
        return done


def _tar_number(field: bytes, what: str) -> int:
    """A numeric header field: octal text (NUL/space padded) or GNU base-256."""
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:  # 0xff: negative
            raise FormatError(f"tar header: invalid {what}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text and not all(0x30 <= c <= 0x37 for c in text):
        raise FormatError(f"tar header: invalid {what} {text[:16]!r}")
    return int(text, 8) if text else 0


def _check_header(block: bytes) -> None:
    """FormatError unless the header's checksum matches (unsigned or signed sum)."""
    want = _tar_number(block[148:156], "checksum")
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    signed = 256 + sum(b - 256 if b > 127 else b for b in block[:148] + block[156:])
    if want not in (unsigned, signed):
        raise FormatError("the layer is not a readable tar: bad header checksum")


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The ``"<len> <key>=<value>\\n"`` records of a PAX extended header (FormatError if bad)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding some writers leave
            if data[pos:].strip(b"\0"):
                raise FormatError("tar PAX header: data after NUL padding")
            break
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise FormatError("tar PAX header: malformed record length")
        end = pos + int(digits)
        if not space + 2 < end <= len(data) or data[end - 1] != 0x0A:
            raise FormatError("tar PAX header: record runs past the header")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise FormatError("tar PAX header: record without a key")
        out[key] = value
        pos = end
    return out


def _normalize(name: bytes) -> bytes:
    """``name`` without empty and ``.`` components (``./image/image.boot``, ``/image.boot``)."""
    return b"/".join(p for p in name.split(b"/") if p not in (b"", b"."))


def _special_payload(tar: _Inflated, size: int, kind: str) -> bytes:
    """The payload of a PAX or GNU long-name header (at most ``MAX_TAR_HEADER_DATA``)."""
    if size > MAX_TAR_HEADER_DATA:
        raise LimitExceeded(f"tar {kind} header of {size} bytes (at most {MAX_TAR_HEADER_DATA})")
    data = tar.read(size)
    if len(data) != size or tar.skip(-size % _BLOCK) != -size % _BLOCK:
        raise FormatError(f"tar {kind} header is truncated")
    return data


def _scan_tar(tar: _Inflated, limit: int) -> dict[bytes, bytes]:
    """The regular files named like a bootstrap (normalized name → bytes; the last of a
    name wins, as when the tar is unpacked). See ``extract_bootstrap`` for the errors."""
    wanted = (BOOTSTRAP_FILE.encode(), LEGACY_BOOTSTRAP_FILE.encode())
    found: dict[bytes, bytes] = {}
    pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    headers = 0
    while True:
        block = tar.read(_BLOCK)
        if not block.strip(b"\0"):
            return found  # an end-of-archive block, or the end of the stream
        headers += 1
        if headers > MAX_TAR_MEMBERS:
            raise LimitExceeded(f"the layer holds more than {MAX_TAR_MEMBERS} tar headers")
        if len(block) < _BLOCK:
            raise FormatError("the layer is not a readable tar: truncated header")
        _check_header(block)
        size = _tar_number(block[124:136], "size")
        kind = block[156:157]
        if kind in (b"x", b"g"):  # PAX: "x" describes the next member, "g" is ignored
            records = _pax_records(_special_payload(tar, size, "PAX"))
            if kind == b"x":
                pax = records
            continue
        if kind in (b"L", b"K"):  # GNU long name / long link target of the next member
            payload = _special_payload(tar, size, "GNU long name")
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0]
            continue
        if kind == b"S":
            raise FormatError("GNU sparse tar members are not supported in a bootstrap layer")
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0" and prefix:
            name = prefix + b"/" + name
        name = pax.get(b"path", long_name if long_name is not None else name)
        if b"size" in pax:
            if not pax[b"size"].isdigit() or len(pax[b"size"]) > 20:
                raise FormatError("tar PAX header: invalid size")
            size = int(pax[b"size"])
        sparse = any(k.startswith(b"GNU.sparse.") for k in pax)
        pax, long_name = {}, None
        if kind == b"\0" and name.endswith(b"/"):
            kind = b"5"  # old tars mark a directory by a trailing slash only
        if b"\0" in name:
            raise FormatError(f"tar member name {name[:80]!r} holds a NUL byte")
        # header-only types carry no data whatever their size field says
        remaining = 0 if kind in _HEADER_ONLY else size + (-size % _BLOCK)
        norm = _normalize(name)
        if norm in wanted:
            if kind not in _REGULAR or sparse:
                raise FormatError(f"{norm.decode()} in the layer is a "
                                  f"{_TYPE_NAMES.get(kind, 'special file')}, not a regular file")
            if size > limit:
                raise LimitExceeded(f"bootstrap of {size} bytes is over {limit}")
            data = tar.read(size)
            if len(data) != size:
                raise FormatError("the bootstrap is truncated in the tar")
            found[norm] = data
            remaining -= size
        if tar.skip(remaining) != remaining:
            raise FormatError("the layer is not a readable tar: a member is truncated")


def extract_bootstrap(blob: bytes | bytearray | memoryview | BinaryIO, limit: int) -> bytes:
    """The bootstrap file held by a bootstrap layer (a tar, gzip, zstd or plain).

    ``blob`` is the layer's bytes or a seekable binary file positioned at its start.
    ``image/image.boot`` wins over the legacy ``image.boot`` (leading ``./`` and ``/`` are
    ignored; the last entry of a name wins, as when the tar is unpacked). This is the one
    reader of bootstrap layers: the snapshotter's check, the daemon's opener and nydus
    detection all call it.

    Bounds: the layer is inflated as a stream and refused once it inflates past
    ``limit + TAR_OVERHEAD_BYTES`` (a gzip or zstd bomb costs that much work, never that
    much memory); at most ``MAX_TAR_MEMBERS`` headers are read; PAX and GNU long-name
    headers are at most ``MAX_TAR_HEADER_DATA`` bytes; the bootstrap's declared size is
    checked against ``limit`` before it is read. Memory is at most twice the bootstrap(s)
    found (while one is joined from its pieces) plus a 64 KiB piece; nothing is allocated
    from a declared size. Reading stops at the end-of-archive block (what follows it is
    never inflated). Raises LimitExceeded (a FormatError) when one of the limits is passed;
    FormatError when the data is not a readable tar (bad checksum, truncation, corrupt
    compression), a member with a bootstrap name is not a regular file (link, symlink,
    directory, device, sparse), or neither name is there.
    """
    src: BinaryIO = io.BytesIO(blob) if isinstance(blob, (bytes, bytearray, memoryview)) \
        else blob
    tar = _Inflated(src, limit + TAR_OVERHEAD_BYTES)
    found = _scan_tar(tar, limit)
    data = found.get(BOOTSTRAP_FILE.encode(), found.get(LEGACY_BOOTSTRAP_FILE.encode()))
    if data is None:
        raise FormatError(f"the layer holds no {BOOTSTRAP_FILE} (nor {LEGACY_BOOTSTRAP_FILE})")
    return data


def untar_layer(blob: bytes, limit: int = MAX_BOOTSTRAP_BYTES + TAR_OVERHEAD_BYTES) -> bytes:
    """A layer blob as a plain tar: gzip and zstd are sniffed by magic, else as is.

    Inflated as a stream; raises FormatError for corrupt compressed data and
    LimitExceeded once the output passes ``limit`` bytes (a compression bomb is never
    inflated in full).
    """
    tar = _Inflated(io.BytesIO(blob), limit)
    parts: list[bytes] = []
    while piece := tar.read(_IO_CHUNK):
        parts.append(piece)
    return b"".join(parts)




