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
    ``touch_interval_s`` per file and process); when this process's estimate of the total
    exceeds the limit it scans the directory (which also picks up other processes'
    writes), then removes the least recently used files until the total is at most
    ``low_watermark * limit``. The estimate is rebuilt from a scan at start.
  * Hot files stay open: the last ``open_files`` chunk files read are kept open (an LRU of
    descriptors), so a read is one ``pread`` and the kernel's read-ahead state of the
    file survives from one read to the next. A descriptor is closed when it leaves that
    LRU and no read is using it, when this process evicts or discards its file, and by
    ``close``. A file replaced or evicted by another process stays readable through the
    descriptor, like any file opened before that happened (its bytes are the same:
    files are named by their content); until the descriptor is closed its disk space is
    not freed, so the table is small (at most ``open_files`` chunks held per process).

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import BinaryIO, TypeVar

from snapshotter.errdefs import FormatError
from snapshotter.formats.index import Chunk

T = TypeVar("T")
_KEY_RE = re.compile(r"^([a-z0-9]{1,16}):([0-9a-f]{32,128})$")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0
POSITIONAL_ALGO = "pos"
DEFAULT_OPEN_FILES = 8


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


def _copy_whole(src: str, dst_fd: int, length: int) -> bool:
    """Append the file ``src`` (which must be exactly ``length`` bytes) to ``dst_fd``;
    False when it is missing or has another length."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != length:
            return False
        done = 0
        while done < length:
            n = os.copy_file_range(fd, dst_fd, length - done)
            if n == 0:
                return False
            done += n
        return True
    finally:
        os.close(fd)


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
    its length and discards). ``open_files`` (>= 0; 0 = open per read) is how many chunk
    files stay open between reads.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        limit_bytes: int,
        *,
        fsync: bool = False,
        low_watermark: float = 0.9,
        touch_interval_s: float = 1.0,
        open_files: int = DEFAULT_OPEN_FILES,
    ) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"cache limit must be positive, got {limit_bytes}")
        if not 0.0 < low_watermark <= 1.0:
            raise ValueError(f"low_watermark must be in (0, 1], got {low_watermark}")
        if open_files < 0:
            raise ValueError(f"open_files must be >= 0, got {open_files}")
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._root_str = os.fspath(self._root)
        self._max_open = open_files
        self._open: OrderedDict[str, _Handle] = OrderedDict()  # guarded by _lock
        self._limit = limit_bytes
        self._fsync = fsync
        self._low = int(limit_bytes * low_watermark)
        self._touch_interval = touch_interval_s
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._stored = 0
        self._evictions = 0
        # The bytes stored, from a scan of the whole cache made on first need (a store, a
        # discard, stats): not here, since every daemon opens the cache on the way to
        # serving its first layer, and a big cache takes long to scan.
        self._size: int | None = None

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``; raises ValueError for a malformed key."""
        return Path(self._path(key))

    def _path(self, key: str) -> str:
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"malformed cache key {key[:80]!r}")
        algo, hexd = m.groups()
        return f"{self._root_str}/{algo}/{hexd[:2]}/{hexd}"

    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored right now (it may be evicted a moment later)."""
        return os.path.isfile(self._path(key))

    def will_need(self, key: str, offset: int = 0, length: int = 0) -> bool:
        """Whether ``key`` is stored; if it is, the kernel is asked to start reading its
        file (``length`` bytes from ``offset``; 0: to the end) into the page cache now
        (``POSIX_FADV_WILLNEED``, asynchronous), so that a sequential reader finds it
        there. Errors only mean no hint."""
        path = self._path(key)
        handle = self._acquire(key, path)
        if handle is None:
            return False
        try:
            os.posix_fadvise(handle.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            self._release(handle)
        return True

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

    def read_into(self, key: str, offset: int, out: memoryview) -> bool:
        """Fill ``out`` with the bytes at ``offset`` of the chunk under ``key``; False on a
        miss (then ``out`` holds garbage). Same damage and error rules as ``read``; spares
        the caller a new bytes object per read (the FUSE session reuses one buffer). A
        miss is not counted here: the caller falls back to ``read``, which counts it."""
        if offset < 0:
            raise ValueError("negative offset")

        def fill(handle: _Handle) -> bool | None:
            want = len(out)
            got = os.preadv(handle.fd, [out], offset) if want > 0 else 0
            return True if got == want else None

        done = self._with_file(key, fill)
        if done is None:
            return False
        self._count(miss=False)
        return True

    def close(self) -> None:
        """Close the descriptors kept open (those in use are closed by their reader);
        the cache stays usable and opens files again as needed."""
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            for h in handles:
                self._drop_locked(h)

    def _read(self, key: str, offset: int, length: int | None) -> bytes | None:
        def read(handle: _Handle) -> bytes | None:
            want = handle.size - offset if length is None else length
            data = os.pread(handle.fd, want, offset) if want > 0 else b""
            return data if len(data) == want else None

        data = self._with_file(key, read)
        self._count(miss=data is None)
        return data

    def _with_file(self, key: str, use: Callable[[_Handle], T | None]) -> T | None:
        """``use(handle)`` on the open file of ``key``: None when the file is missing or
        unreadable (evicted: fetch again), or when ``use`` says it is damaged (None:
        short), which removes it. A good read refreshes the file's LRU clock."""
        path = self._path(key)
        handle = self._acquire(key, path)
        if handle is None:
            return None
        try:
            result = use(handle)
            if result is None:
                self._discard(path, handle)
                return None
            now = time.time()
            if now - handle.touched >= self._touch_interval:
                # The LRU clock: refresh mtime on use (atime is unreliable under relatime).
                os.utime(handle.fd)
                handle.touched = now
            return result
        except OSError:
            return None
        finally:
            self._release(handle)

    def _acquire(self, key: str, path: str) -> _Handle | None:
        """An open handle of ``key``'s file with one more user, or None when it cannot be
        opened. Opening happens outside the lock; a handle opened meanwhile by another
        thread wins and ours is closed."""
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:
                self._open.move_to_end(key)
                handle.users += 1
                return handle
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        fresh = _Handle(key=key, fd=fd, size=st.st_size, touched=st.st_mtime, users=1)
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:  # another thread opened it first
                handle.users += 1
                self._open.move_to_end(key)
            elif self._max_open > 0:
                self._open[key] = fresh
                while len(self._open) > self._max_open:
                    _, old = self._open.popitem(last=False)
                    self._drop_locked(old)
                return fresh
        if handle is not None:
            os.close(fd)
            return handle
        fresh.dropped = True  # not kept: closed when its read is done
        return fresh

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.users -= 1
            if handle.dropped and handle.users == 0:
                os.close(handle.fd)

    def _drop_locked(self, handle: _Handle) -> None:
        """Forget ``handle`` (already out of ``_open``); close it once nobody uses it."""
        if handle.dropped:
            return
        handle.dropped = True
        if handle.users == 0:
            os.close(handle.fd)

    def _forget_locked(self, key: str) -> None:
        handle = self._open.pop(key, None)
        if handle is not None:
            self._drop_locked(handle)

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` (already verified by the caller) under ``key``; atomic.

        Returns True when the chunk is stored (or was already), False when it is larger
        than the whole cache. Raises OSError when writing fails; no partial file remains.
        """
        def write(f: BinaryIO) -> bool:
            f.write(data)
            return True

        return self._store(key, len(data), write)

    def assemble(self, key: str, parts: Sequence[tuple[str, int]]) -> bool:
        """Store under ``key`` one file made of the stored chunks ``parts`` ((chunk key,
        length), in order), copied inside the kernel; atomic like ``put``.

        For big files read sequentially: one contiguous file keeps the kernel's read-ahead
        going from start to end, where a chain of chunk files restarts it at each chunk
        (and, with cold caches, looks up each file's inode). The chunk files stay; they
        are evicted like any other once no longer used. Returns True when the file is
        stored (or already was), False when a part is missing or not ``length`` bytes, or
        the whole is larger than the cache. Raises OSError when writing fails; no partial
        file remains.
        """
        def write(f: BinaryIO) -> bool:
            f.flush()
            return all(_copy_whole(self._path(part), f.fileno(), length)
                       for part, length in parts)

        return self._store(key, sum(length for _, length in parts), write)

    def _store(self, key: str, size: int, write: Callable[[BinaryIO], bool]) -> bool:
        """Write ``size`` bytes under ``key`` through ``write`` (False: give up, nothing
        stored) into a temporary file renamed into place; count them and evict if the
        cache is over its limit. See ``put`` for the contract."""
        path = self.path_for(key)
        if size > self._limit:
            return False
        if path.is_file():
            return True
        with self._lock:
            self._known_size_locked()  # before the new file exists, which it then adds
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
        try:
            with open(tmp, "wb") as f:
                if not write(f):
                    os.unlink(tmp)
                    return False
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            self._stored += size
            self._size = self._known_size_locked() + size
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
                size_bytes=self._known_size_locked(),
                limit_bytes=self._limit,
            )

    def _count(self, *, miss: bool) -> None:
        with self._lock:
            if miss:
                self._misses += 1
            else:
                self._hits += 1

    def _discard(self, path: str, handle: _Handle) -> None:
        with self._lock:
            if self._open.get(handle.key) is handle:
                self._forget_locked(handle.key)
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            os.unlink(path)
            with self._lock:
                self._size = max(0, self._known_size_locked() - st.st_size)

    def _known_size_locked(self) -> int:
        if self._size is None:
            self._size = sum(size for _, size, _ in self._scan())
        return self._size

    def _evict_locked(self) -> None:
        """Rescan (the truth across processes), then drop LRU files down to the watermark."""
        entries = self._scan()
        total = sum(size for _, size, _ in entries)
        if total > self._limit:
            entries.sort(key=lambda e: e[0])
            for _, size, path in entries:
                if total <= self._low:
                    break
                self._forget_locked(f"{path.parent.parent.name}:{path.name}")
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


@dataclass(slots=True, eq=False)
class _Handle:
    """An open chunk file: ``users`` reads in progress, ``touched`` the last mtime this
    process knows of (epoch seconds), ``dropped`` once it left the open-file LRU."""

    key: str
    fd: int
    size: int
    touched: float
    users: int = 0
    dropped: bool = False


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
