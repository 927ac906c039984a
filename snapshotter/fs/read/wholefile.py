"""Big files kept whole in the cache, once read to their end (for one reader).

A file of at least ``min_bytes`` (and two chunks or more, contiguous from 0) whose last
byte was read has its chunks copied into one cache entry keyed by its chunk list
(``ChunkCache.assemble``, in a worker thread); later reads are served from that one file,
which the kernel then reads ahead as one stream (and FUSE passthrough can hand over).
``min_bytes`` 0 disables it. Nothing here fetches: a chunk missing when the copy runs
leaves the file as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.errdefs import FormatError
from snapshotter.formats.index import Chunk, Node

WHOLE_FILE_MIN_BYTES = 8 << 20
"""The default smallest file kept whole (``[remote] whole_file_bytes``)."""
WHOLE_FILE_AHEAD = 32 << 20
"""How far ahead of a sequential reader of a whole file the kernel is asked to read."""
_TRACKED = 1024  # files whose read-ahead position is remembered


class WholeFiles:
    """The whole-file copies of one reader's layer (see the module docstring).

    ``key_of`` gives a chunk's cache key (FormatError for a chunk without one).
    """

    def __init__(self, cache: ChunkCache, min_bytes: int, key_of: Callable[[Chunk], str],
                 log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        self._cache = cache
        self._min = min_bytes
        self._key_of = key_of
        self._log = log
        self._stored: dict[int, str | None] = {}  # ino -> stored whole-file key, or None
        self._assembling: set[int] = set()
        self._hinted: dict[int, int] = {}  # ino -> how far its whole file was hinted

    def stored(self, node: Node) -> str | None:
        """The cache key of ``node``'s assembled file when it is known to be stored (one
        existence check per big file), else None."""
        if node.size < self._min or not self._min:
            return None  # every read of a small file asks: nothing to look up or keep
        if node.ino in self._stored:
            return self._stored[node.ino]
        key = self.key(node)
        self._stored[node.ino] = key if key is not None and self._cache.contains(key) else None
        return self._stored[node.ino]

    def forget(self, node: Node) -> None:
        """``node``'s copy was evicted: serve it from its chunks again."""
        self._stored[node.ino] = None

    def path(self, node: Node) -> str | None:
        """The cache file of ``node``'s assembled copy, None if there is none."""
        key = self.stored(node)
        return None if key is None else str(self._cache.path_for(key))

    def ahead(self, node: Node, key: str, offset: int, end: int) -> None:
        """For a sequential reader of an assembled file: keep the kernel reading the file
        ``WHOLE_FILE_AHEAD`` bytes ahead of it (the daemon answers one request at a time,
        so each read should find its pages there)."""
        hinted = self._hinted.get(node.ino, -1)
        if offset == 0 or hinted < 0:
            hinted = offset
        if end + WHOLE_FILE_AHEAD // 2 > hinted and hinted < node.size:
            self._cache.will_need(key, hinted, WHOLE_FILE_AHEAD)
            hinted += WHOLE_FILE_AHEAD
        self._hinted[node.ino] = hinted
        while len(self._hinted) > _TRACKED:
            self._hinted.pop(next(iter(self._hinted)))

    def key(self, node: Node) -> str | None:
        """``file:<sha256 of the chunk keys and sizes>`` for a file that may be assembled
        (big, two chunks or more, chunks contiguous from 0 to its size), else None."""
        if not self._min or node.size < self._min or len(node.chunks) < 2:
            return None
        h = hashlib.sha256()
        pos = 0
        try:
            for chunk in node.chunks:
                if chunk.file_offset != pos:
                    return None
                h.update(f"{self._key_of(chunk)} {chunk.size}\n".encode())
                pos += chunk.size
        except FormatError:
            return None
        return f"file:{h.hexdigest()}" if pos == node.size else None

    def claim(self, node: Node) -> str | None:
        """The key to assemble ``node`` under, when it should be (big, not stored, not
        being assembled); it is then marked as being assembled until ``assemble`` ends."""
        if self._stored.get(node.ino) is not None or node.ino in self._assembling:
            return None
        key = self.key(node)
        if key is not None:
            self._assembling.add(node.ino)
        return key

    async def assemble(self, node: Node, key: str) -> None:
        """Copy ``node``'s cached chunks into one entry ``key`` (claimed with ``claim``).
        A chunk missing or failing leaves things as they were (logged)."""
        try:
            parts = [(self._key_of(c), c.size) for c in node.chunks]
            if await asyncio.to_thread(self._cache.assemble, key, parts):
                self._stored[node.ino] = key
        except (OSError, FormatError) as exc:
            self._log.warning("whole-file copy of inode %d not stored: %s", node.ino, exc)
        finally:
            self._assembling.discard(node.ino)
