"""The seam between the code that needs blob bytes and the registry that has them.

The FUSE daemon, the chunk reader and the eStargz/RAFS mount logic only see a
``BlobFetcher`` for one blob; ``remote/registry.py`` provides the real one and tests
provide fakes (an in-memory blob, a local file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from snapshotter.registry.reference import Reference


class BlobFetcher(Protocol):
    """Reads byte ranges of one immutable blob.

    Ranges are half-open ``(start, end)`` pairs with ``0 <= start < end <= size``.
    ``fetch`` returns one ``bytes`` per requested range, in request order, each exactly
    ``end - start`` long. It may coalesce, split or parallelise requests as it sees fit.

    Raises: ``RegistryUnavailable`` / ``RegistryTimeout`` once its retry deadline passes,
    ``BlobNotFound`` when the blob is gone, ``RangeNotSatisfiable`` for a range past the
    end, ``RegistryAuthError`` when credentials are refused.
    """

    @property
    def digest(self) -> str:
        """The blob's digest, ``sha256:<hex>``."""
        ...

    async def size(self) -> int:
        """The blob's size in bytes (cached after the first call)."""
        ...

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Return the bytes of each range."""
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...


class BlobRanges(Protocol):
    """What a blob fetcher asks of the registry client that built it (``RegistryClient``
    implements it): sizes and byte ranges of blobs, by repository and digest. Errors as
    for ``BlobFetcher``."""

    async def blob_size(self, ref: Reference | str, digest: str) -> int: ...

    async def fetch_tail(self, ref: Reference | str, digest: str,
                         length: int) -> tuple[int, bytes] | None: ...

    async def fetch_ranges(self, ref: Reference | str, digest: str,
                           ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...
