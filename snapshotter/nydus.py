"""Nydus layers on Prepare: classification, the bootstrap check, the daemon's spec.

Classification (protocol-reference §5.2-5.3), ``classify(labels)``, by label *presence*
as nydus-snapshotter does (the values are not looked at):

* ``containerd.io/snapshot/nydus-bootstrap`` → ``BOOTSTRAP`` (checked first);
* ``containerd.io/snapshot/nydus-blob`` → ``BLOB``.

A layer without those labels is looked up in its image manifest (``detect``, used
after the eStargz sniff said no): a layer whose media type is
``application/vnd.oci.image.layer.nydus.blob.v1`` is a ``BLOB``; in an image that has
nydus blob layers, a tar layer holding ``image/image.boot`` (or the legacy ``image.boot``)
is the ``BOOTSTRAP``.

What each becomes (``NydusLayers.mount``):

* ``BLOB``: an empty remote snapshot, as nydus-snapshotter's skip handler makes it: no
  daemon, nothing downloaded. Its data is read by the bootstrap layer's daemon.
* ``BOOTSTRAP``: the layer blob (small) is fetched whole through the registry client and
  checked against its digest; the bootstrap is extracted from the tar (gzip, zstd or
  plain) and parsed with ``rafs.build_index``; every data blob it names must be a sha256
  hex id that the registry has (``sha256:<blob id>`` in the same repository) and hold
  every chunk range. The bootstrap is written next to the snapshot
  (``<root>/snapshots/<id>/image.boot``, ``bootstrap_path``) and the daemon is asked to
  serve the *whole image's* filesystem from it, fetching chunks by range from the data
  blobs. The bootstrap snapshot is the top of the image, so its FUSE mount is the first
  ``lowerdir`` and the (empty) blob snapshots below it add nothing: the overlay sees the
  image's root filesystem.

Fallback reasons (``RemoteLayerError.reason``), all before anything is mounted:
``no_source`` (no image reference / digest labels), ``bootstrap_too_large`` (the layer is
over ``remote.max_toc_bytes``), ``digest_mismatch`` (the layer blob does not hash to its
digest), ``limit_exceeded`` (a layer that inflates past its limit, too many tar headers,
a bootstrap over ``MAX_BOOTSTRAP_BYTES``, a bootstrap over a parsing budget),
``invalid_bootstrap`` (no bootstrap in the tar, a corrupt tar, a bootstrap the reader
refuses, a blob id that is not a sha256 hex, a chunk past its blob's end),
``blob_not_found`` / ``registry_auth`` / ``timeout`` / ``registry_error`` (the registry),
``daemon_error`` (the daemon could not serve it). The bootstrap layer is an ordinary tar
layer, so containerd can still pull it; data blob layers never fall back.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import io
import json
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from snapshotter import labels as L
from snapshotter.errdefs import (
    BlobNotFound,
    DaemonError,
    DigestMismatch,
    FormatError,
    LazysnapError,
    LimitExceeded,
    RegistryAuthError,
    RegistryError,
    RegistryTimeout,
    RemoteLayerError,
)
from snapshotter.formats import rafs
from snapshotter.formats.index import LayerIndex

if TYPE_CHECKING:  # the daemon imports this module for the helpers only
    from daemon_manager.manager import DaemonManager
    from snapshotter.config import Config
    from snapshotter.remote.registry import RegistryClient

log = logging.getLogger(__name__)

NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
BOOTSTRAP_FILE = "image/image.boot"
LEGACY_BOOTSTRAP_FILE = "image.boot"
BLOB_FORMAT = "nydus-blob"
SERVED_FORMATS = (rafs.RAFS_V5, rafs.RAFS_V6)
BOOTSTRAP_FILE_NAME = "image.boot"
_MANIFEST_CACHE = 32


class Kind(enum.Enum):
    """What a nydus image layer is."""

    BLOB = "blob"
    BOOTSTRAP = "bootstrap"


def classify(labels: Mapping[str, str]) -> Kind | None:
    """The nydus kind the labels give the layer, None for a layer they do not mark."""
    if L.NYDUS_BOOTSTRAP in labels:
        return Kind.BOOTSTRAP
    if L.NYDUS_BLOB in labels:
        return Kind.BLOB
    return None


def is_blob_snapshot(labels: Mapping[str, str]) -> bool:
    """True for a committed remote snapshot of a nydus data blob layer (no daemon)."""
    return labels.get(L.REMOTE_FORMAT) == BLOB_FORMAT


def is_nydus_snapshot(labels: Mapping[str, str]) -> bool:
    """True for a committed remote snapshot that ``NydusLayers`` made."""
    return labels.get(L.REMOTE_FORMAT) in (BLOB_FORMAT, *SERVED_FORMATS)


def bootstrap_path(mountpoint: str) -> Path:
    """Where a bootstrap snapshot's bootstrap lives: next to its ``fs`` directory."""
    return Path(mountpoint).parent / BOOTSTRAP_FILE_NAME


# --- the bootstrap inside a bootstrap layer ------------------------------------------------
#
# The layer blob is hostile input: whoever pushed the image chose every byte. It is read
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


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_digests(index: LayerIndex) -> list[str]:
    """The registry digests of the data blobs the index's chunks read, sorted.

    Raises FormatError for a blob id that is not 64 lowercase hex digits (it must name
    ``sha256:<id>`` in the registry).
    """
    ids = {c.blob for n in index.nodes.values() for c in n.chunks}
    for blob in ids:
        if len(blob) != 64 or any(ch not in "0123456789abcdef" for ch in blob):
            raise FormatError(f"blob id {blob[:80]!r} is not a sha256 hex digest")
    return sorted(f"sha256:{b}" for b in ids)


def _blob_ends(index: LayerIndex) -> dict[str, int]:
    ends: dict[str, int] = {}
    for node in index.nodes.values():
        for c in node.chunks:
            ends[c.blob] = max(ends.get(c.blob, 0), c.blob_end)
    return ends


class NydusLayers:
    """Mounts nydus layers for ``LazyLayers`` (see the module docstring).

    ``daemonless`` holds the snapshot ids of blob layers (served by nobody, always
    available).
    """

    def __init__(self, config: Config, manager: DaemonManager, client: RegistryClient) -> None:
        self.config = config
        self.manager = manager
        self.client = client
        self.daemonless: set[int] = set()
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def mount(self, sid: int, mountpoint: str, labels: Mapping[str, str],
                    kind: Kind) -> str:
        """Serve the layer; return its format (``nydus-blob``, ``rafs-v5``, ``rafs-v6``).

        Raises RemoteLayerError as described in the module docstring.
        """
        if kind is Kind.BLOB:
            self.daemonless.add(sid)
            return BLOB_FORMAT
        source = L.layer_source(labels)
        if source is None:
            raise RemoteLayerError("no_source", "the labels name no image reference and digest")
        ref, digest = source
        timeout = self.config.remote.mount_timeout
        try:
            boot, index = await asyncio.wait_for(self._check(ref, digest), timeout)
        except TimeoutError:
            raise RemoteLayerError("timeout", f"bootstrap check took over {timeout:.0f}s") \
                from None
        except LazysnapError as e:
            raise classify_error(e) from e
        path = bootstrap_path(mountpoint)
        await asyncio.to_thread(_write_file, path, boot)
        spec = self.spec(sid, ref, digest, index.format, str(path), sha256_digest(boot))
        try:
            await self.manager.mount(sid, mountpoint, spec)
        except (DaemonError, OSError) as e:
            path.unlink(missing_ok=True)
            raise RemoteLayerError("daemon_error", str(e)) from e
        return index.format

    async def _check(self, ref: str, digest: str) -> tuple[bytes, LayerIndex]:
        """Fetch and check the bootstrap layer; (bootstrap bytes, its index)."""
        limit = self.config.remote.max_toc_bytes
        fetcher = self.client.open_blob(ref, digest)
        size = await fetcher.size()
        if size > limit:
            raise RemoteLayerError("bootstrap_too_large",
                                   f"bootstrap layer of {size} bytes is over {limit}")
        (blob,) = await fetcher.fetch([(0, size)]) if size else (b"",)
        if sha256_digest(blob) != digest:
            raise DigestMismatch(f"bootstrap layer does not hash to {digest}")
        boot = await asyncio.to_thread(extract_bootstrap, blob, min(limit, MAX_BOOTSTRAP_BYTES))
        index = await asyncio.to_thread(rafs.build_index, boot)
        ends = _blob_ends(index)
        for blob_digest in blob_digests(index):
            blob_size = await self.client.open_blob(ref, blob_digest).size()
            end = ends.get(blob_digest.removeprefix("sha256:"), 0)
            if end > blob_size:
                raise FormatError(f"a chunk ends at {end}, past the end of blob "
                                  f"{blob_digest} ({blob_size} bytes)")
        return boot, index

    def spec(self, sid: int, ref: str, digest: str, fmt: str, bootstrap: str,
             boot_digest: str) -> dict[str, Any]:
        """The daemon's LayerSpec for a bootstrap layer (``toc_digest``: the bootstrap's)."""
        return {
            "layer_id": sid, "ref": ref, "digest": digest, "toc_digest": boot_digest,
            "skip_verify": False, "format": fmt, "bootstrap": bootstrap,
            **self.config.layer_fetch_settings(),
        }

    def restore_spec(self, sid: int, mountpoint: str,
                     labels: Mapping[str, str]) -> dict[str, Any] | None:
        """The spec to serve a recorded nydus snapshot again, None when it needs no daemon
        (a blob layer) or cannot be served (logged)."""
        if is_blob_snapshot(labels):
            self.daemonless.add(sid)
            return None
        source = L.layer_source(labels)
        path = bootstrap_path(mountpoint)
        try:
            boot = path.read_bytes()
        except OSError as exc:
            log.error("remote snapshot %d: cannot read its bootstrap: %s", sid, exc)
            return None
        if source is None:
            log.error("remote snapshot %d has no source labels; cannot serve it", sid)
            return None
        fmt = labels.get(L.REMOTE_FORMAT, "rafs-v6")
        return self.spec(sid, source[0], source[1], fmt, str(path), sha256_digest(boot))

    async def detect(self, labels: Mapping[str, str]) -> Kind | None:
        """The nydus kind of a layer without nydus labels, from its image manifest.

        None when the layer is not nydus or the manifest cannot be had (never raises
        but for cancellation): this runs only to rescue a layer already refused.
        """
        source = L.layer_source(labels)
        if source is None:
            return None
        try:
            async with asyncio.timeout(self.config.remote.mount_timeout):
                return await self._detect(*source)
        except TimeoutError:
            log.debug("layer %s: nydus detection timed out", source[1])
            return None

    async def _detect(self, ref: str, digest: str) -> Kind | None:
        try:
            layers = await self._manifest_layers(ref)
            desc = next((d for d in layers if d.get("digest") == digest), None)
            if desc is None:
                return None
            if desc.get("mediaType") == NYDUS_BLOB_MEDIA_TYPE:
                return Kind.BLOB
            if not any(d.get("mediaType") == NYDUS_BLOB_MEDIA_TYPE for d in layers):
                return None
            limit = self.config.remote.max_toc_bytes
            if int(desc.get("size", 0)) > limit:
                return None
            fetcher = self.client.open_blob(ref, digest)
            size = await fetcher.size()
            (blob,) = await fetcher.fetch([(0, size)]) if size else (b"",)
            await asyncio.to_thread(extract_bootstrap, blob, min(limit, MAX_BOOTSTRAP_BYTES))
            return Kind.BOOTSTRAP
        except (LazysnapError, ValueError, TypeError) as exc:
            log.debug("layer %s: no nydus layer (%s)", digest, exc)
            return None

    async def _manifest_layers(self, ref: str) -> list[dict[str, Any]]:
        cached = self._manifests.get(ref)
        if cached is None:
            _, _, body = await self.client.get_manifest(ref)
            cached = json.loads(body)
            if not isinstance(cached, dict):
                raise FormatError("the manifest is not a JSON object")
            self._manifests[ref] = cached
            while len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        layers = cached.get("layers")
        return [d for d in layers if isinstance(d, dict)] if isinstance(layers, list) else []


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def classify_error(
    err: LazysnapError, format_reason: str = "invalid_bootstrap"
) -> RemoteLayerError:
    """The fallback reason for an error met while checking a layer.

    ``format_reason`` names a malformed layer index (``invalid_bootstrap`` for nydus,
    ``invalid_toc`` for eStargz); an index over a parsing budget is ``limit_exceeded``;
    the other reasons are the same for every format.
    """
    if isinstance(err, RemoteLayerError):
        return err
    table: tuple[tuple[type[LazysnapError], str], ...] = (
        (DigestMismatch, "digest_mismatch"),
        (LimitExceeded, "limit_exceeded"),
        (FormatError, format_reason),
        (BlobNotFound, "blob_not_found"),
        (RegistryAuthError, "registry_auth"),
        (RegistryTimeout, "timeout"),
        (RegistryError, "registry_error"),
    )
    reason = next((r for kind, r in table if isinstance(err, kind)), "invalid_source")
    return RemoteLayerError(reason, str(err))
