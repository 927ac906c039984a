"""The fuzz targets: one function per parser of untrusted bytes, ``fn(data: bytes) -> None``.

Each target feeds ``data`` to the real parser (the entry point production code calls)
and catches ``FormatError`` only (``DigestMismatch`` and ``LimitExceeded`` are
subclasses). Whatever else
escapes is a finding: an ``IndexError``/``OverflowError``/``struct.error``... from the
parser itself, or ``ContractViolation`` when a parser *returned* something its
docstring rules out (a chunk of the wrong size, a range outside the blob, a
``detect.sniff`` that raised). Time and memory bounds are enforced by the caller
(libFuzzer's ``-timeout``/``-rss_limit_mb`` in ``runner``, CPU time and tracemalloc in
``replay``), not here.

Some targets need parameters besides the parsed bytes (a blob size, a declared chunk
size); they take them from a fixed-size header at the start of ``data`` so that the
fuzzer mutates them too. ``toc_json_input`` and ``chunk_input`` build such inputs (the
seeds use them); the layouts are described there.

This module imports the ``snapshotter`` parsers at import time: the fuzzing worker
imports it inside ``atheris.instrument_imports()`` so that they get coverage feedback.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from snapshotter.errdefs import FormatError
from snapshotter.formats import chunkcodec, detect, erofs, estargz, rafs
from snapshotter.formats.bootstrap_tar import extract_bootstrap
from snapshotter.formats.index import Chunk, NodeKind
from snapshotter.fs import rafs_opener

__all__ = [
    "TARGETS",
    "ContractViolation",
    "Target",
    "chunk_input",
    "toc_json_input",
]

_T = TypeVar("_T")


class ContractViolation(AssertionError):
    """A parser returned normally but broke its documented postcondition."""


# --- helpers -------------------------------------------------------------------------


def drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion without an event loop.

    The in-memory fetcher never suspends, so neither does a coroutine that only awaits
    it: one ``send`` finishes it. Raises RuntimeError (a harness problem, reported as a
    finding) if the coroutine suspends anyway, e.g. because it started a thread.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        result: _T = stop.value
        return result
    coro.close()
    raise RuntimeError("harness: the coroutine suspended; the in-memory flow never should")


class MemoryBlob:
    """A ``BlobFetcher`` over bytes held in memory, checking the protocol's range rules.

    ``fetch`` raises ContractViolation for a range outside ``0 <= start < end <= size``:
    the caller of a fetcher must never ask for one (``registry/base.py``).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fetched = 0

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    async def size(self) -> int:
        return len(self.data)

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        size = len(self.data)
        for start, end in ranges:
            if not 0 <= start < end <= size:
                raise ContractViolation(f"fetch of range [{start}, {end}) of a {size}-byte blob")
        self.fetched += sum(end - start for start, end in ranges)
        return [self.data[start:end] for start, end in ranges]

    async def aclose(self) -> None:
        return None


# --- eStargz --------------------------------------------------------------------------


def estargz_footer(data: bytes) -> None:
    """``data`` is the tail of a blob (or the head of a bootstrap).

    Runs the format detection of ``formats/detect.py`` (``sniff`` must never raise and
    must agree with ``detect_fs_version``) and ``estargz.parse_footer`` followed by
    ``Footer.toc_range``.
    """
    sniffed = detect.sniff(data)  # documented: never raises
    try:
        detected: str | None = detect.detect_fs_version(data)
    except FormatError:
        detected = None
    if sniffed != detected:
        raise ContractViolation(f"sniff says {sniffed!r}, detect_fs_version {detected!r}")
    try:
        footer = estargz.parse_footer(data)
    except FormatError:
        return
    if footer.footer_size not in (estargz.ESTARGZ_FOOTER_SIZE, estargz.LEGACY_FOOTER_SIZE):
        raise ContractViolation(f"footer of {footer.footer_size} bytes")
    if not 0 <= footer.toc_offset < 1 << 63:
        raise ContractViolation(f"TOC offset {footer.toc_offset} outside int64")
    blob_size = footer.toc_offset + footer.footer_size + 1
    if footer.toc_range(blob_size) != (footer.toc_offset, footer.toc_offset + 1):
        raise ContractViolation("toc_range disagrees with the footer")
    with contextlib.suppress(FormatError):
        footer.toc_range(len(data))


def estargz_toc_member(data: bytes) -> None:
    """``data`` is the blob range ``[toc_offset, size - footer)``: ``estargz.extract_toc``."""
    with contextlib.suppress(FormatError):
        estargz.extract_toc(data)


_TOC_JSON_HEADER = struct.Struct("<QQ")
_INT63 = (1 << 63) - 1
_NO_DATA_END = (1 << 64) - 1


def toc_json_input(json_bytes: bytes, blob_size: int, data_end: int | None) -> bytes:
    """The ``estargz_toc_json`` input for TOC JSON of a blob of ``blob_size`` bytes.

    Layout: u64 LE ``blob_size`` (masked to 63 bits), u64 LE ``data_end`` (all ones:
    None, else taken modulo ``blob_size + 1``), then the JSON.
    """
    end = _NO_DATA_END if data_end is None else data_end
    return _TOC_JSON_HEADER.pack(blob_size, end) + json_bytes


def estargz_toc_json(data: bytes) -> None:
    """``estargz.build_index(json, blob_size, data_end=...)``; see ``toc_json_input``.

    Inputs shorter than the header are taken as JSON of a 1 MiB blob.
    """
    if len(data) < _TOC_JSON_HEADER.size:
        blob_size, data_end, body = 1 << 20, None, data
    else:
        raw_size, raw_end = _TOC_JSON_HEADER.unpack_from(data)
        blob_size = raw_size & _INT63
        data_end = None if raw_end == _NO_DATA_END else raw_end % (blob_size + 1)
        body = data[_TOC_JSON_HEADER.size :]
    with contextlib.suppress(FormatError):
        estargz.build_index(body, blob_size, data_end=data_end)


FLOW_FILES = 4
"""How many regular files (the first by inode number) ``estargz_flow`` reads."""
FLOW_CHUNKS = 2
"""How many chunks of each of those files ``estargz_flow`` reads."""


def estargz_flow(data: bytes) -> None:
    """``data`` is a whole blob in a registry: the daemon's path through it.

    ``estargz.open_layer`` over an in-memory fetcher (tail, TOC member, index, TOC
    unverified), then ``read_chunk(..., require_digest=False)`` of the first
    ``FLOW_CHUNKS`` chunks of the first ``FLOW_FILES`` regular files, each fetched by
    its range. A returned chunk must hold exactly ``chunk.size`` bytes.
    """
    blob = MemoryBlob(data)
    try:
        index, _toc = drive(estargz.open_layer(blob, None))
    except FormatError:
        return
    files = [n for _, n in sorted(index.nodes.items()) if n.kind is NodeKind.REG and n.chunks]
    for node in files[:FLOW_FILES]:
        for chunk in node.chunks[:FLOW_CHUNKS]:
            _flow_chunk(blob, chunk)


def _flow_chunk(blob: MemoryBlob, chunk: Chunk) -> None:
    if chunk.blob_end > chunk.blob_offset:
        (compressed,) = drive(blob.fetch([(chunk.blob_offset, chunk.blob_end)]))
    else:
        compressed = b""
    try:
        out = estargz.read_chunk(compressed, chunk, require_digest=False)
    except FormatError:
        return
    if len(out) != chunk.size:
        raise ContractViolation(f"read_chunk gave {len(out)} bytes for a {chunk.size}-byte chunk")


# --- nydus ----------------------------------------------------------------------------


def rafs_bootstrap(data: bytes) -> None:
    """``data`` is a RAFS v5 or v6 bootstrap: ``rafs.build_index`` and ``parse_blob_table``
    (what the daemon's ``rafs_opener`` does with it)."""
    with contextlib.suppress(FormatError):
        rafs.build_index(data)
    with contextlib.suppress(FormatError):
        rafs.parse_blob_table(data)


def erofs_image(data: bytes) -> None:
    """``data`` is an EROFS image, decoded as a caller of many inodes must (``erofs.py``):
    superblock, device table, and a ``walk`` of the whole tree with one ``Budget``; for
    every name, its inode's xattrs (through one ``XattrCache``) and its symlink target,
    flat data or chunk table (indexes or block map, ``chunk_count`` entries), all charged
    to that budget."""
    try:
        sb = erofs.parse_superblock(data)
        erofs.parse_device_table(data, sb)
        budget = erofs.Budget.for_image(data)
        xattrs = erofs.XattrCache(budget)
        for entry in erofs.walk(data, sb, budget):
            inode = entry.inode
            erofs.parse_xattrs(data, sb, inode, xattrs)
            if inode.file_type == erofs.FT_SYMLINK:
                erofs.symlink_target(data, sb, inode, budget)
            elif inode.layout != erofs.LAYOUT_CHUNK_BASED:
                erofs.inode_data(data, sb, inode, budget)
            else:
                indexes, _bits = erofs.chunk_format(inode)
                count = erofs.chunk_count(inode, sb)
                if indexes:
                    erofs.parse_chunk_indexes(data, inode, count, budget)
                else:
                    erofs.parse_block_map(data, inode, count, budget)
    except FormatError:
        pass


_CHUNK_HEADER = struct.Struct("<BII")
_DIGEST_FLAG = 0x8
_DECODE_FLAG = 0x4
_MAX_INNER = (1 << 20) - 1


def chunk_input(compression: str, size: int, payload: bytes, *, digest: str | None = None,
                inner_offset: int = 0, decode: bool = False) -> bytes:
    """The ``chunkcodec`` input for ``payload`` declared to hold ``size`` bytes.

    Layout: a flags byte (bits 0-1: index into ``chunkcodec.COMPRESSIONS``; bit 2: call
    ``decode_chunk`` instead of ``decompress``; bit 3: a digest line follows the
    header), u32 LE size (taken modulo ``MAX_CHUNK_SIZE + 2``), u32 LE inner offset
    (low 20 bits), then the digest line (latin-1, ending with ``\\n``) if flagged, then
    the payload.
    """
    flags = chunkcodec.COMPRESSIONS.index(compression)
    flags |= _DECODE_FLAG if decode else 0
    flags |= _DIGEST_FLAG if digest is not None else 0
    head = _CHUNK_HEADER.pack(flags, size, inner_offset)
    line = b"" if digest is None else digest.encode("latin-1") + b"\n"
    return head + line + payload


def chunk_codec(data: bytes) -> None:
    """``chunkcodec.decompress`` or ``chunkcodec.decode_chunk`` (see ``chunk_input``);
    a result must be exactly the declared size."""
    if len(data) < _CHUNK_HEADER.size:
        return
    flags, raw_size, raw_inner = _CHUNK_HEADER.unpack_from(data)
    compression = chunkcodec.COMPRESSIONS[flags & 3]
    size = raw_size % (chunkcodec.MAX_CHUNK_SIZE + 2)
    inner = raw_inner & _MAX_INNER
    rest = data[_CHUNK_HEADER.size :]
    digest = ""
    if flags & _DIGEST_FLAG:
        line, _, rest = rest.partition(b"\n")
        digest = line.decode("latin-1")
    try:
        if flags & _DECODE_FLAG:
            chunk = Chunk(0, size, 0, len(rest), inner, digest, compression)
            out = chunkcodec.decode_chunk(rest, chunk)
        else:
            out = chunkcodec.decompress(rest, compression, size)
            chunkcodec.verify_digest(out, digest)
    except FormatError:
        return
    if len(out) != size:
        raise ContractViolation(f"{compression} chunk: {len(out)} bytes out, {size} declared")


def nydus_bootstrap_tar(data: bytes) -> None:
    """``data`` is a nydus bootstrap layer blob (tar; gzip, zstd or plain):
    ``bootstrap_tar.extract_bootstrap`` with the daemon's limit (``rafs_opener``)."""
    try:
        boot = extract_bootstrap(data, rafs_opener.MAX_BOOTSTRAP_BYTES)
    except FormatError:
        return
    if len(boot) > rafs_opener.MAX_BOOTSTRAP_BYTES:
        raise ContractViolation(f"bootstrap of {len(boot)} bytes over the limit")


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A fuzz target: its function, libFuzzer's ``-max_len`` and dictionary words."""

    name: str
    fn: Callable[[bytes], None]
    max_len: int
    words: tuple[bytes, ...] = ()


_TOC_WORDS = (
    b'"version"', b'"entries"', b'"name"', b'"type"', b'"size"', b'"modtime"',
    b'"linkName"', b'"mode"', b'"uid"', b'"gid"', b'"userName"', b'"groupName"',
    b'"offset"', b'"innerOffset"', b'"devMajor"', b'"devMinor"', b'"xattrs"', b'"digest"',
    b'"chunkOffset"', b'"chunkSize"', b'"chunkDigest"', b'"dir"', b'"reg"', b'"symlink"',
    b'"hardlink"', b'"char"', b'"block"', b'"fifo"', b'"chunk"', b".wh.", b".wh..wh..opq",
    b".wh..wh.plnk", b".prefetch.landmark", b".no.prefetch.landmark", b"stargz.index.json",
    b'"sha256:', b"null", b"true", b"1e999", b"-1", b"9223372036854775807",
    b"18446744073709551616", b"\\ud800", b"\\u0000", b"../", b"./", b"//",
    b"2006-01-02T15:04:05.999999999Z", b"+23:59", b"[[[[", b"{}",
)
_FOOTER_WORDS = (b"STARGZ", b"SG\x16\x00", b"STARGZEXTERNALTOC", b"GnUlInUx", b"\x1f\x8b\x08\x04",
                 b"\x01\x00\x00\xff\xff", b"SFAR", b"\x00\x05\x00\x00", b"\xe2\xe1\xf5\xe0")
_TAR_WORDS = (b"ustar\x00", b"ustar  \x00", b"image/image.boot", b"image.boot", b"./image/",
              b"path=", b"size=", b"linkpath=", b"GNU.sparse", b"\x28\xb5\x2f\xfd", b"\x1f\x8b")
_RAFS_WORDS = (b"SFAR", b"\x00\x05\x00\x00", b"\xe2\xe1\xf5\xe0", b"\xff\xff\xff\xff",
               b".wh.", b".wh..wh..opq", b"trusted.overlay.opaque", b"user.", b"security.")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("estargz_footer", estargz_footer, 2048, _FOOTER_WORDS),
        Target("estargz_toc_member", estargz_toc_member, 32 << 10, (b"\x1f\x8b\x08",)),
        Target("estargz_toc_json", estargz_toc_json, 64 << 10, _TOC_WORDS),
        Target("estargz_flow", estargz_flow, 64 << 10, _FOOTER_WORDS[:6]),
        Target("rafs", rafs_bootstrap, 128 << 10, _RAFS_WORDS),
        Target("erofs", erofs_image, 128 << 10, _RAFS_WORDS[2:]),
        Target("chunkcodec", chunk_codec, 64 << 10, (b"sha256:", b"blake3:", b"\n")),
        Target("nydus_bootstrap_tar", nydus_bootstrap_tar, 128 << 10, _TAR_WORDS),
    )
}
"""Every target by name, in the order the campaign runs them."""
