"""Directory read-ahead: once a directory's small files start missing, fetch the rest.

A program that reads one small file of a directory often goes on to read more of them
(an interpreter importing its modules, a program loading its plugins or locale files),
one after another: each is a separate miss and costs a whole round trip to the registry,
however few bytes it carries. A small file is *latency-bound*: fetching it costs about a
round trip, whatever its size. ``DirectoryAhead`` notices the pattern and names the files
worth fetching ahead, so that the reader can fetch them in a few large requests instead.

Contract of ``missed(node)`` (called by the reader for each on-demand miss):
  * only small files count: a file whose compressed size is at most ``file_bytes``;
  * the ``misses``-th small miss in one directory (default the second) triggers it, once
    per directory for the life of the object; the first miss alone never does, so a
    program that reads one file of a big directory costs nothing extra;
  * the answer is the directory's other small regular files, nearest in the blob to the
    miss first, until their compressed sizes add up to ``budget_bytes``, returned in blob
    order (so the reader's batches are contiguous ranges). Files already fetched are the
    reader's business (it skips cached chunks);
  * never raises for a node of the index; a node whose parent is unknown gives ``[]``.

Nothing here does I/O: the reader owns the fetch (see ``snapshotter.fs.read.reader``).
"""

from __future__ import annotations

from collections.abc import Mapping

from snapshotter.formats.index import Node, NodeKind

DEFAULT_FILE_BYTES = 64 << 10
DEFAULT_MISSES = 2


def compressed_size(node: Node) -> int:
    """Compressed bytes of a regular file's chunks (distinct ranges counted once)."""
    return sum(end - start for start, end in {(c.blob_offset, c.blob_end) for c in node.chunks})


def _position(node: Node) -> tuple[str, int]:
    first = node.chunks[0]
    return first.blob, first.blob_offset


class DirectoryAhead:
    """Decides which files of a directory to fetch ahead (see the module docstring)."""

    def __init__(self, nodes: Mapping[int, Node], *, budget_bytes: int,
                 file_bytes: int = DEFAULT_FILE_BYTES, misses: int = DEFAULT_MISSES) -> None:
        if budget_bytes <= 0 or file_bytes <= 0 or misses < 1:
            raise ValueError("budget, file size and miss count must be positive")
        self._nodes = nodes
        self._budget = budget_bytes
        self._file_bytes = file_bytes
        self._misses_needed = misses
        self._misses: dict[int, int] = {}  # directory ino -> small misses so far
        self._done: set[int] = set()  # directories already fetched ahead

    def _small_size(self, node: Node) -> int | None:
        """The compressed size of a small regular file with data, else None."""
        if node.kind is not NodeKind.REG or not node.chunks:
            return None
        size = compressed_size(node)
        return size if size <= self._file_bytes else None

    def missed(self, node: Node) -> list[Node]:
        """Record an on-demand miss of ``node``; the files to fetch ahead now, or []."""
        parent = node.parent
        if parent in self._done or self._small_size(node) is None:
            return []
        count = self._misses.get(parent, 0) + 1
        if count < self._misses_needed:
            self._misses[parent] = count
            return []
        self._misses.pop(parent, None)
        self._done.add(parent)
        directory = self._nodes.get(parent)
        if directory is None:
            return []
        blob, offset = _position(node)
        candidates: list[tuple[Node, int]] = []
        for ino in directory.children.values():
            child = self._nodes.get(ino)
            size = None if child is None or child.ino == node.ino else self._small_size(child)
            if child is not None and size is not None:
                candidates.append((child, size))
        candidates.sort(key=lambda c: (_position(c[0])[0] != blob,
                                       abs(_position(c[0])[1] - offset)))
        chosen: list[Node] = []
        total = 0
        for child, size in candidates:
            if total + size > self._budget:
                break
            chosen.append(child)
            total += size
        chosen.sort(key=_position)
        return chosen
