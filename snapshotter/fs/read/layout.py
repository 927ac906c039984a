"""Where a layer's chunks sit: their order in each blob, spans of a file, batches.

``BlobLayout`` holds every chunk of a layer sorted by position in its blob, so that a miss
can be amplified with the chunks that follow it there (``following``). The functions are
the reader's arithmetic over chunk lists; none of them does I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from snapshotter.formats.index import Chunk


class BlobLayout:
    """Every chunk of a layer by blob, in blob order (``Chunk.blob``: ``""`` is the layer's
    own blob)."""

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks: dict[str, list[Chunk]] = {}
        for chunk in chunks:
            self._chunks.setdefault(chunk.blob, []).append(chunk)
        for blob_chunks in self._chunks.values():
            blob_chunks.sort(key=blob_position)
        self._starts = {blob: [c.blob_offset for c in blob_chunks]
                        for blob, blob_chunks in self._chunks.items()}

    def following(self, tail: Chunk, budget: int) -> Iterable[Chunk]:
        """The chunks after ``tail`` in its blob that end within ``budget`` compressed
        bytes of its end, skipping those that share its range, in blob order."""
        chunks = self._chunks.get(tail.blob, [])
        pos = bisect.bisect_right(self._starts.get(tail.blob, []), tail.blob_offset)
        limit = tail.blob_end + budget
        for chunk in chunks[pos:]:
            if chunk.blob_end > limit:
                return
            if chunk.blob_offset < tail.blob_end:
                continue  # shares the miss's range (another slice of the same member)
            yield chunk


def chunk_span(chunks: list[Chunk], offset: int, end: int) -> tuple[int, int]:
    """Indices of the first and last chunk overlapping ``[offset, end)`` (non-empty range)."""
    first = bisect.bisect_right(chunks, offset, key=file_offset) - 1
    last = bisect.bisect_left(chunks, end, key=file_offset) - 1
    return max(first, 0), last


def file_offset(chunk: Chunk) -> int:
    return chunk.file_offset


def blob_position(chunk: Chunk) -> tuple[int, int]:
    return chunk.blob_offset, chunk.inner_offset


def compressed_size(chunks: Iterable[Chunk]) -> int:
    """Compressed bytes of ``chunks``, each distinct range counted once."""
    return sum(e - s for s, e in {(c.blob_offset, c.blob_end) for c in chunks})
