"""Local snapshots with containerd overlayfs semantics (the ``Snapshotter`` contract).

Layout under ``root``: ``metadata.db`` and ``snapshots/<id>/fs`` (+ ``work`` for active
snapshots), ``<id>`` being the record's numeric id. Ordering rules that keep disk and
metastore consistent across crashes:
  * a new directory is built as ``snapshots/new-*`` and renamed to ``<id>`` inside the
    transaction that inserts the record, so a failure leaves neither;
  * Remove deletes the record first, then renames the directory to ``rm-<id>`` and deletes
    it; Cleanup removes every directory no record names.
Slow file-system work (disk usage, recursive deletes) runs in a worker thread; metastore
calls run on the event loop, so one request's transaction never interleaves with another's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from snapshotter import labels as L
from snapshotter.config import SnapshotterConfig
from snapshotter.errdefs import FailedPrecondition, Internal, InvalidArgument
from snapshotter.metastore.store import MetaStore, Record
from snapshotter.model import Info, Kind, Mount, Usage
from snapshotter.osutil.mountutil import unmount_all
from snapshotter.snapshot import filters
from snapshotter.snapshot.mounts import snapshot_mounts

log = logging.getLogger(__name__)


def validate_labels(labels: Mapping[str, str]) -> None:
    """Raise InvalidArgument when a label breaks containerd's rules (4096-byte limit)."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        size = len(k.encode()) + len(v.encode())
        if size > L.MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label {k[:64]!r}: key and value are {size} bytes, over the"
                f" {L.MAX_LABEL_BYTES}-byte limit"
            )


def validate_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")


# Disk usage of a tree with at most this many entries is computed on the event loop
# (a few dozen lstat calls, well under a millisecond); a bigger tree goes to a worker
# thread, whose hand-off alone costs more than such a small walk.
INLINE_USAGE_ENTRIES = 64


class _TooManyEntries(Exception):
    pass


def disk_usage(path: str, max_entries: int | None = None) -> Usage:
    """Bytes (allocated blocks) and inodes below ``path``, hard links counted once.

    With ``max_entries``, raises ``_TooManyEntries`` as soon as the walk has seen more
    entries than that (see ``usage_of``)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    entries = 0

    def add(entry: str) -> None:
        nonlocal size, entries
        entries += 1
        if max_entries is not None and entries > max_entries:
            raise _TooManyEntries
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    add(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            add(os.path.join(dirpath, name))
    return Usage(size=size, inodes=len(seen))


async def usage_of(path: str) -> Usage:
    """``disk_usage(path)``: on the event loop for a small tree, else in a worker thread."""
    try:
        return disk_usage(path, INLINE_USAGE_ENTRIES)
    except _TooManyEntries:
        return await asyncio.to_thread(disk_usage, path)


def overlay_default_options() -> tuple[str, ...]:
    """``index=off`` when the kernel has the overlay index feature, as containerd does."""
    return ("index=off",) if os.path.exists("/sys/module/overlay/parameters/index") else ()


class LocalSnapshotter:
    """The overlayfs snapshotter over a MetaStore. See the ``Snapshotter`` Protocol."""

    def __init__(
        self,
        root: str | Path,
        store: MetaStore,
        config: SnapshotterConfig,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.root = Path(root)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._snapshots_prefix = str(self.snapshots_dir) + os.sep
        self.store = store
        self.config = config
        self.clock = clock
        self.overlay_options = overlay_default_options()

    # --- paths -----------------------------------------------------------------------------

    def dir_of(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid)

    def fs_of(self, sid: int) -> str:
        return f"{self._snapshots_prefix}{sid}/fs"  # str(self.dir_of(sid) / "fs"), faster

    def work_of(self, sid: int) -> str:
        return f"{self._snapshots_prefix}{sid}/work"

    # --- creation --------------------------------------------------------------------------

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        rec = self.create(key, parent, Kind.ACTIVE, labels)
        return self.mounts_of(rec)

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        rec = self.create(key, parent, Kind.VIEW, labels)
        return self.mounts_of(rec)

    def create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str]) -> Record:
        """Insert the record and build its directory in one transaction."""
        validate_key(key)
        validate_labels(labels)
        with self.store.write() as tx:
            rec = tx.create(key, parent, kind, labels, self.clock())
            parent_fs = self.fs_of(rec.parent_id) if rec.parent_id is not None else None
            self._build_dir(rec.id, kind, parent_fs)
        return rec

    def _build_dir(self, sid: int, kind: Kind, parent_fs: str | None) -> None:
        tmp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
        try:
            os.mkdir(os.path.join(tmp, "fs"), 0o755)
            os.chmod(os.path.join(tmp, "fs"), 0o755)
            if kind is Kind.ACTIVE:
                os.mkdir(os.path.join(tmp, "work"), 0o711)
            if parent_fs is not None:
                st = os.stat(parent_fs)
                os.lchown(os.path.join(tmp, "fs"), st.st_uid, st.st_gid)
            os.rename(tmp, self.dir_of(sid))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Internal(f"cannot create directory for snapshot {sid}: {e}") from e

    # --- mounts ----------------------------------------------------------------------------

    async def mounts(self, key: str) -> list[Mount]:
        return self.mounts_and_parents(key)[0]

    def mounts_and_parents(self, key: str) -> tuple[list[Mount], list[Record]]:
        """The mounts of active or view snapshot ``key`` and its parent chain (nearest
        first). NotFound, or FailedPrecondition when ``key`` is committed."""
        reader = self.store.reader()
        rec = reader.must_get(key)
        if rec.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed and has no mounts")
        parents = reader.parents(rec)
        return self._mounts(rec, parents), parents

    def mounts_of(self, rec: Record) -> list[Mount]:
        return self._mounts(rec, self.store.reader().parents(rec))

    def _mounts(self, rec: Record, parents: Sequence[Record]) -> list[Mount]:
        return snapshot_mounts(
            rec.kind, self.fs_of(rec.id), self.work_of(rec.id),
            [self.fs_of(p.id) for p in parents], self.overlay_options,
        )

    # --- commit / remove -------------------------------------------------------------------

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        validate_key(name, "name")
        validate_key(key)
        validate_labels(labels)
        rec = self.store.reader().must_get(key)
        usage = Usage()
        if rec.kind is Kind.ACTIVE:
            usage = await usage_of(self.fs_of(rec.id))
        self.commit_record(name, key, labels, usage)

    def commit_record(self, name: str, key: str, labels: Mapping[str, str], usage: Usage) -> Record:
        with self.store.write() as tx:
            return tx.commit(key, name, labels, usage.size, usage.inodes, self.clock())

    async def remove(self, key: str) -> None:
        validate_key(key)
        with self.store.write() as tx:
            rec = tx.remove(key)
        await self.on_removed(rec)
        if self.config.sync_remove:
            await asyncio.to_thread(self._delete_dir, rec.id)

    async def on_removed(self, rec: Record) -> None:
        """Hook for subclasses: the record is gone, the directory not yet."""

    def _delete_dir(self, sid: int) -> None:
        src = self.dir_of(sid)
        if not src.exists():
            return
        unmount_all(src)
        doomed = self.snapshots_dir / f"rm-{sid}"
        try:
            os.rename(src, doomed)
        except OSError as e:
            log.warning("cannot rename %s for removal: %s", src, e)
            return
        shutil.rmtree(doomed, ignore_errors=True)

    # --- queries ---------------------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        validate_key(key)
        return self.store.reader().must_get(key).info()

    async def update(self, info: Info, paths: Sequence[str]) -> Info:
        validate_key(info.name)
        validate_labels(info.labels)
        with self.store.write() as tx:
            rec = tx.update_labels(info.name, info.labels, paths, self.clock())
        return rec.info()

    async def list(self, filter_strs: Sequence[str]) -> list[Info]:
        flt = filters.parse_all(filter_strs)
        records = self.store.reader().records()
        return [
            r.info() for r in records
            if flt.match(filters.snapshot_adaptor(r.key, r.parent, r.kind.value, r.labels))
        ]

    async def usage(self, key: str) -> Usage:
        validate_key(key)
        rec = self.store.reader().must_get(key)
        if rec.kind is Kind.ACTIVE:
            return await usage_of(self.fs_of(rec.id))
        return Usage(rec.size, rec.inodes)

    # --- cleanup ---------------------------------------------------------------------------

    async def cleanup(self) -> None:
        live = {str(i) for i in self.store.reader().ids()}
        orphans = [
            p for p in self.snapshots_dir.iterdir()
            if p.name not in live and stat.S_ISDIR(p.lstat().st_mode)
        ]
        for path in orphans:
            log.info("cleanup: removing %s, which no snapshot record names", path)
            await asyncio.to_thread(self._remove_orphan, path)

    @staticmethod
    def _remove_orphan(path: Path) -> None:
        unmount_all(path)
        shutil.rmtree(path, ignore_errors=True)
