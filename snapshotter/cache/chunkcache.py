"""An on-disk cache of verified, uncompressed chunks, shared by several daemon processes.

Layout: one file per chunk at ``<root>/<algo>/<first two hex digits>/<hex>``. A chunk with a
digest is keyed by that digest (``sha256:<hex>``), so identical chunks of different layers
are stored once. A chunk without a digest is keyed by its position instead (see
``chunk_key``), under the pseudo-algorithm ``pos``.

Contracts:
  * ``put`` stores only what the caller hands it; the caller verifies the bytes first (the
    cache never sees unverified data and never verifies anything itself).
  * Writes are atomic: the bytes go to a temporary file in the destination directory which
    is then renamed over the final name, so a reader sees either nothing or the whole chunk.
  * Several processes may use one directory at once. A file evicted by another process
    between "exists" and "open" is a miss, never an error; a file evicted after "open" is
    still readable through the open descriptor (POSIX unlink semantics).
  * Size limit with LRU eviction: a hit refreshes the file's mtime (throttled to once per
    ``touch_interval_s``); when this process's estimate of the total exceeds the limit it
    scans the directory (which also picks up other processes' writes), then removes the
    least recently used files until the total is at most ``low_watermark * limit``. The
    estimate is rebuilt from a scan at start.

All methods are synchronous and thread-safe; the async reader calls the slow ones (``put``)
from a worker thread. Failure modes: ``ValueError`` for a malformed key; ``OSError`` from
``put`` when the disk is full or unwritable (callers treat that as "not cached").
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from snapshotter.errdefs import FormatError
from snapshotter.formats.index import Chunk

_KEY_RE = re.compile(r"^([a-z0-9]{1,16}):([0-9a-f]{32,128})$")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0
POSITIONAL_ALGO = "pos"


def chunk_key(chunk: Chunk, blob_digest: str) -> str:
    """The cache key of ``chunk`` stored in the blob ``blob_digest``.

    A chunk with a digest is keyed by it; one without is keyed by ``pos:<sha256 hex>`` of
    (blob digest, blob offset, inner offset, size), which identifies the same bytes because
    blobs are immutable. Raises FormatError when the chunk's digest is not ``algo:hex``
    (the digest comes from a remote index and must not become a path).
    """
    if chunk.digest:
        if _KEY_RE.match(chunk.digest) is None:
            raise FormatError(f"malformed chunk digest {chunk.digest[:80]!r}")
        return chunk.digest
    ident = f"{blob_digest}\0{chunk.blob_offset}\0{chunk.inner_offset}\0{chunk.size}"
    return f"{POSITIONAL_ALGO}:{sha256(ident.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one ``ChunkCache`` object (this process only, except ``size_bytes``).

    ``size_bytes`` is the estimated total size of the directory, including other
    processes' files as of the last scan.
    """

    hits: int
    misses: int
    bytes_stored: int
    evictions: int
    size_bytes: int
    limit_bytes: int


class ChunkCache:
    """A content-addressed chunk store in ``root`` holding at most ``limit_bytes``.

    ``limit_bytes`` must be positive; a chunk larger than the limit is not stored.
    ``fsync`` makes ``put`` flush the data to disk before the rename (crash safety at the
    cost of latency; without it a crash may leave an empty file, which ``read`` detects by
    its length and discards).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        limit_bytes: int,
        *,
        fsync: bool = False,
        low_watermark: float = 0.9,
        touch_interval_s: float = 1.0,
    ) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"cache limit must be positive, got {limit_bytes}")
        if not 0.0 < low_watermark <= 1.0:
            raise ValueError(f"low_watermark must be in (0, 1], got {low_watermark}")
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._limit = limit_bytes
        self._fsync = fsync
        self._low = int(limit_bytes * low_watermark)
        self._touch_interval = touch_interval_s
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._stored = 0
        self._evictions = 0
        self._size = sum(size for _, size, _ in self._scan())

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``; raises ValueError for a malformed key."""
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"malformed cache key {key[:80]!r}")
        algo, hexd = m.groups()
        return self._root / algo / hexd[:2] / hexd

    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored right now (it may be evicted a moment later)."""
        return self.path_for(key).is_file()

    def get(self, key: str) -> bytes | None:
        """The whole chunk stored under ``key``, or None on a miss."""
        return self._read(key, 0, None)

    def read(self, key: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of the chunk under ``key``, or None on a miss.

        A file shorter than ``offset + length`` is damaged (a crash without fsync): it is
        removed and reported as a miss so the caller fetches and stores it again. Any
        other I/O error reading the cache is a miss too (never an exception).
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        return self._read(key, offset, length)

    def _read(self, key: str, offset: int, length: int | None) -> bytes | None:
        path = self.path_for(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # evicted (ENOENT) or unreadable: either way, fetch it again
            self._count(miss=True)
            return None
        try:
            st = os.fstat(fd)
            want = st.st_size - offset if length is None else length
            data = os.pread(fd, want, offset) if want > 0 else b""
            if len(data) != want:
                self._discard(path)
                self._count(miss=True)
                return None
            if time.time() - st.st_mtime >= self._touch_interval:
                # The LRU clock: refresh mtime on use (atime is unreliable under relatime).
                os.utime(fd)
        except OSError:
            self._count(miss=True)
            return None
        finally:
            os.close(fd)
        self._count(miss=False)
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` (already verified by the caller) under ``key``; atomic.

        Returns True when the chunk is stored (or was already), False when it is larger
        than the whole cache. Raises OSError when writing fails; no partial file remains.
        """
        path = self.path_for(key)
        if len(data) > self._limit:
            return False
        if path.is_file():
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            self._stored += len(data)
            self._size += len(data)
            if self._size > self._limit:
                self._evict_locked()
        return True

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                bytes_stored=self._stored,
                evictions=self._evictions,
                size_bytes=self._size,
                limit_bytes=self._limit,
            )

    def _count(self, *, miss: bool) -> None:
        with self._lock:
            if miss:
                self._misses += 1
            else:
                self._hits += 1

    def _discard(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            os.unlink(path)
            with self._lock:
                self._size = max(0, self._size - st.st_size)

    def _evict_locked(self) -> None:
        """Rescan (the truth across processes), then drop LRU files down to the watermark."""
        entries = self._scan()
        total = sum(size for _, size, _ in entries)
        if total > self._limit:
            entries.sort(key=lambda e: e[0])
            for _, size, path in entries:
                if total <= self._low:
                    break
                try:
                    os.unlink(path)
                    self._evictions += 1
                except FileNotFoundError:
                    pass  # another process evicted it first; it is gone either way
                total -= size
        self._size = total

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every stored chunk; removes stale temporary files."""
        out: list[tuple[float, int, Path]] = []
        now = time.time()
        for algo in _subdirs(self._root):
            for fan in _subdirs(algo):
                with contextlib.suppress(FileNotFoundError), os.scandir(fan) as it:
                    for entry in it:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if entry.name.startswith(_TMP_PREFIX):
                            if now - st.st_mtime > _STALE_TMP_S:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(entry.path)
                            continue
                        out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
