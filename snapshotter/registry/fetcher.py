"""RegistryBlobFetcher: the :class:`~snapshotter.registry.base.BlobFetcher` over a RegistryClient.

Built by :meth:`snapshotter.registry.registry.RegistryClient.open_blob`; it shares the
client's connections, retry policy, redirect cache and counters, and does not own them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from snapshotter.errdefs import FailedPrecondition, RangeNotSatisfiable
from snapshotter.registry.base import BlobRanges
from snapshotter.registry.ranges import check_ranges
from snapshotter.registry.reference import Reference

if TYPE_CHECKING:
    from snapshotter.registry.base import BlobFetcher


class RegistryBlobFetcher:
    """:class:`snapshotter.registry.base.BlobFetcher` for one blob of one repository.

    Validates ranges against the blob size (fetched once with :meth:`size`, then cached):
    a range ending past the size raises RangeNotSatisfiable without a request, malformed
    ranges InvalidArgument; empty ranges give ``b""``. After ``aclose()`` (idempotent),
    ``size``/``fetch`` raise FailedPrecondition.
    """

    def __init__(
        self, client: BlobRanges, ref: Reference, digest: str, size: int | None = None
    ) -> None:
        self._client = client
        self._ref = ref
        self._digest = digest
        self._size = size
        self._size_lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RegistryBlobFetcher({self._ref.host}/{self._ref.repository}@{self._digest})"

    @property
    def digest(self) -> str:
        """The blob's digest, ``sha256:<hex>``."""
        return self._digest

    @property
    def reference(self) -> Reference:
        """The reference whose repository holds the blob."""
        return self._ref

    async def size(self) -> int:
        """The blob's size in bytes, asked of the registry once."""
        self._check_open()
        async with self._size_lock:
            if self._size is None:
                self._size = await self._client.blob_size(self._ref, self._digest)
            return self._size

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each half-open range, in request order."""
        self._check_open()
        requested = list(ranges)
        check_ranges(requested)
        size = await self.size()
        for start, end in requested:
            if end > size:
                raise RangeNotSatisfiable(
                    f"range [{start}, {end}) lies past the end of blob {self._digest} "
                    f"({size} bytes)"
                )
        return await self._client.fetch_ranges(self._ref, self._digest, requested)

    async def tail(self, length: int) -> bytes:
        """The last ``min(length, size)`` bytes of the blob; when the size is not known
        yet, one suffix-range request answers both (the size is then cached)."""
        self._check_open()
        if self._size is None:
            async with self._size_lock:
                if self._size is None:
                    got = await self._client.fetch_tail(self._ref, self._digest, length)
                    if got is not None:
                        self._size, data = got
                        return data
        size = await self.size()
        if size == 0:
            return b""
        (data,) = await self.fetch([(max(0, size - length), size)])
        return data

    async def aclose(self) -> None:
        """Mark the fetcher closed; idempotent. The client stays open."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"blob fetcher for {self._digest} is closed")


async def read_tail(fetcher: BlobFetcher, length: int) -> tuple[int, bytes]:
    """``(blob size, last min(length, size) bytes)`` of any fetcher: one suffix-range
    request for a registry blob whose size is not known yet, else size + one range."""
    if isinstance(fetcher, RegistryBlobFetcher):
        data = await fetcher.tail(length)
        return await fetcher.size(), data
    size = await fetcher.size()
    if size <= 0:
        return size, b""
    (data,) = await fetcher.fetch([(max(0, size - length), size)])
    return size, data
