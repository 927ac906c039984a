"""Remote snapshots: the remote-snapshot flow of protocol-reference §1.8 on local storage.

``RemoteSnapshotter`` is the local overlayfs snapshotter plus one decision: on a Prepare
that carries ``containerd.io/snapshot.ref`` (containerd's unpacker is about to pull a
layer), ask the ``RemoteFS`` to mount the layer lazily on the new snapshot's ``fs``. If it
can, commit the snapshot under the target name with the remote marker labels and answer
ALREADY_EXISTS, so containerd skips the download. If it cannot, log the reason, count it
and return the ordinary mounts so containerd pulls the layer (the fallback).

The seam to the lazy file systems is ``RemoteFS``: ``mount``, ``check``, ``unmount`` and
``restore``. The overlay logic is not copied: directories, records and mounts all come
from ``LocalSnapshotter``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.errdefs import AlreadyExists, LazysnapError, RemoteLayerError, Unavailable
from snapshotter.metastore.store import MetaStore, Record
from snapshotter.model import Kind, Mount, Usage
from snapshotter.snapshot.local import LocalSnapshotter, validate_key, validate_labels

log = logging.getLogger("lazysnap.remote")


class RemoteFS(Protocol):
    """Mounts remote layers. Implemented by ``snapshotter.lazy.layers.LazyLayers``."""

    async def mount(self, sid: int, mountpoint: str, labels: Mapping[str, str]) -> str:
        """Serve the layer the labels name at ``mountpoint``; return its format name.

        Raises RemoteLayerError (with a ``reason``) when the layer cannot be served
        remotely; nothing is left mounted or running then.
        """
        ...

    def check(self, sid: int) -> None:
        """Raise Unavailable when the layer of snapshot ``sid`` is not being served."""
        ...

    async def unmount(self, sid: int) -> None:
        """Stop serving snapshot ``sid``'s layer; a layer not served is fine."""
        ...

    async def restore(self, remote: dict[int, tuple[str, Mapping[str, str]]]) -> None:
        """At start-up: serve again every remote snapshot (id -> (mountpoint, labels))."""
        ...


# Observer for every remote decision: (format or "", fallback reason or "").
DecisionObserver = Callable[[str, str], None]


def _no_observer(fmt: str, reason: str) -> None:
    pass


class RemoteSnapshotter(LocalSnapshotter):
    """LocalSnapshotter with the remote-snapshot decision on Prepare."""

    def __init__(
        self,
        config: Config,
        store: MetaStore,
        remotefs: RemoteFS,
        observe: DecisionObserver = _no_observer,
    ) -> None:
        super().__init__(config.root, store, config.snapshotter)
        self.remotefs = remotefs
        self.enabled = config.remote.enabled
        self.observe = observe

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        target = labels.get(L.TARGET_REF, "")
        if not self.enabled or not target:
            return await super().prepare(key, parent, labels)
        validate_key(key)
        validate_labels(labels)
        existing = self.store.reader().get(target)
        if existing is not None and existing.kind is Kind.COMMITTED:
            # Another Prepare already made this layer: containerd will Stat and reuse it.
            raise AlreadyExists(f"target snapshot {target!r}: already exists")
        rec = self.create(key, parent, Kind.ACTIVE, labels)
        digest = (L.layer_source(labels) or ("", ""))[1]
        try:
            fmt = await self.remotefs.mount(rec.id, self.fs_of(rec.id), labels)
        except RemoteLayerError as e:
            log.info("remote decision: layer %s target %s: pull (fallback, reason=%s): %s",
                     digest or "?", target, e.reason, e)
            self.observe("", e.reason)
            return self.mounts_of(rec)
        await self._commit_remote(rec, key, target, labels, fmt)
        log.info("remote decision: layer %s target %s: remote (%s)", digest, target, fmt)
        self.observe(fmt, "")
        raise AlreadyExists(f"target snapshot {target!r}: already exists")

    async def _commit_remote(
        self, rec: Record, key: str, target: str, labels: Mapping[str, str], fmt: str
    ) -> None:
        committed = {**labels, L.REMOTE: L.REMOTE_VALUE, L.REMOTE_FORMAT: fmt}
        try:
            self.commit_record(target, key, committed, Usage())
        except BaseException as e:
            # Someone committed the target first (AlreadyExists: same outcome for
            # containerd) or the store failed: either way undo our half.
            await self.remotefs.unmount(rec.id)
            with contextlib.suppress(LazysnapError):
                await super().remove(key)
            if isinstance(e, AlreadyExists):
                return
            raise

    async def mounts(self, key: str) -> list[Mount]:
        mounts, parents = self.mounts_and_parents(key)
        for parent in parents:
            if L.is_remote(parent.labels):
                try:
                    self.remotefs.check(parent.id)
                except Unavailable as e:
                    raise Unavailable(f"layer {parent.key!r} unavailable: {e}") from e
        return mounts

    async def on_removed(self, rec: Record) -> None:
        if L.is_remote(rec.labels):
            await self.remotefs.unmount(rec.id)

    async def restore(self) -> None:
        """Serve again every remote snapshot recorded in the metastore."""
        with self.store.read() as tx:
            remote = {
                r.id: (self.fs_of(r.id), dict(r.labels))
                for r in tx.records() if L.is_remote(r.labels)
            }
        for mountpoint, _ in remote.values():
            Path(mountpoint).mkdir(parents=True, exist_ok=True)
        await self.remotefs.restore(dict(remote))
