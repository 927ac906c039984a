"""The FUSE daemon's reader of nydus layers: the whole image's filesystem from a bootstrap.

A RAFS layer spec (``format`` ``rafs-v5`` or ``rafs-v6``) names its bootstrap as a local
file (``LayerSpec.bootstrap``, written by the snapshotter next to the snapshot) and the
bootstrap's digest (``toc_digest``). The daemon reads it through ``FileBlob`` (a
``BlobFetcher`` over a local file) and hands it to ``open_layer``, which has the opener
signature of ``daemon.default_openers``: it reads the whole "blob", accepts either a bare
bootstrap or a bootstrap layer tar (gzip/zstd/plain, ``image/image.boot``; used when a
spec gives no file and the daemon fetched the layer from the registry), checks the
bootstrap's sha256 against the digest and builds the index with ``rafs.build_index``.

The index's chunks name their data blobs by id; the daemon then opens one registry
fetcher per blob (``sha256:<blob id>`` in the spec's repository) and reads chunks by
range through the chunk cache. ``blob_size`` of the index is the sum of the blobs'
compressed sizes from the bootstrap's blob table (the layer's "total bytes" in status).
Prefetch uses the bootstrap's prefetch table (``index.prefetch_inos``).

Failure modes of ``open_layer``: ``DigestMismatch`` (bootstrap digest), ``FormatError``
(not a bootstrap or a bootstrap layer, or one the reader refuses), the fetcher's errors.
``FileBlob`` raises ``RangeNotSatisfiable`` for ranges past the end and ``BlobNotFound``
when the file is missing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from snapshotter.daemonapi.enums import RAFS_FORMATS
from snapshotter.errdefs import (
    BlobNotFound,
    DigestMismatch,
    FailedPrecondition,
    LimitExceeded,
    RangeNotSatisfiable,
)
from snapshotter.formats import bootstrap_tar, detect, rafs
from snapshotter.formats.digests import sha256_digest
from snapshotter.formats.index import LayerIndex
from snapshotter.registry.base import BlobFetcher

FORMATS = RAFS_FORMATS  # what this module reads (the daemon imports it on first use)
# The largest bootstrap (and bootstrap layer) the daemon reads: the snapshotter's limit,
# 256 MiB (see ``bootstrap_tar.MAX_BOOTSTRAP_BYTES`` for why), not the old 1 GiB.
MAX_BOOTSTRAP_BYTES = bootstrap_tar.MAX_BOOTSTRAP_BYTES


class FileBlob:
    """A ``BlobFetcher`` over a local file that is not modified while open."""

    def __init__(self, path: str, digest: str) -> None:
        self.path = path
        self._digest = digest
        self._closed = False

    @property
    def digest(self) -> str:
        return self._digest

    async def size(self) -> int:
        self._check()
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            raise BlobNotFound(f"{self.path} does not exist") from None

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        size = await self.size()
        for start, end in ranges:
            if not 0 <= start <= end <= size:
                raise RangeNotSatisfiable(f"range [{start}, {end}) of {self.path} "
                                          f"({size} bytes)")
        return await asyncio.to_thread(self._read, list(ranges))

    def _read(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        with open(self.path, "rb") as f:
            return [os.pread(f.fileno(), end - start, start) for start, end in ranges]

    async def aclose(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"{self.path} is closed")


def _bootstrap_of(data: bytes) -> bytes:
    """``data`` if it is a bootstrap, else the bootstrap inside a bootstrap layer tar.

    The layer is read by ``bootstrap_tar.extract_bootstrap`` (the one bootstrap-layer reader):
    streamed, refused once it inflates past ``MAX_BOOTSTRAP_BYTES`` plus the tar's
    overhead; FormatError if it is no bootstrap layer.
    """
    if detect.sniff(data[: detect.MAX_SUPERBLOCK_SIZE]) is not None:
        return data
    return bootstrap_tar.extract_bootstrap(data, MAX_BOOTSTRAP_BYTES)


def _build(boot: bytes) -> LayerIndex:
    index = rafs.build_index(boot)
    index.blob_size = sum(b.compressed_size for b in rafs.parse_blob_table(boot))
    return index


async def open_layer(fetcher: BlobFetcher, expected_digest: str | None) -> tuple[LayerIndex,
                                                                                 bytes]:
    """Read, verify and index a bootstrap; return ``(index, bootstrap bytes)``.

    With ``expected_digest`` the bootstrap must hash to it (DigestMismatch otherwise).
    A blob over ``MAX_BOOTSTRAP_BYTES`` is refused (LimitExceeded, a FormatError) before
    it is fetched;
    extraction, hashing and indexing run in worker threads.
    """
    size = await fetcher.size()
    if size > MAX_BOOTSTRAP_BYTES:
        raise LimitExceeded(f"bootstrap of {size} bytes is over {MAX_BOOTSTRAP_BYTES}")
    (data,) = await fetcher.fetch([(0, size)]) if size else (b"",)
    boot = await asyncio.to_thread(_bootstrap_of, data)
    if expected_digest is not None \
            and await asyncio.to_thread(sha256_digest, boot) != expected_digest:
        raise DigestMismatch(f"bootstrap does not hash to {expected_digest}")
    index = await asyncio.to_thread(_build, boot)
    return index, boot
