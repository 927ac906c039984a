"""The request handlers of the layer file system: a read-only tree over one or more
``LayerIndex``, served by ``snapshotter.fs.fuse.session``.

Two layouts (``LayerOperations(shared=...)``):

* dedicated: the FUSE root *is* the layer's root. FUSE inode = index inode (the root is
  inode 1 in both). Until the layer is added the root is an empty placeholder directory
  whose attributes the kernel may not cache (attr timeout 0).
* shared: the FUSE root is a synthetic read-only directory whose entries are named by the
  decimal ``layer_id`` of each layer added; each entry is that layer's root. FUSE inode
  of a layer's node = ``(layer_id << 32) | index_ino`` and the synthetic root is inode 1,
  so the numbers are the same after a daemon restart. ``1 <= layer_id < 2**31`` and index
  inodes must be below ``2**32``. Layers are added and removed at runtime; inodes of a
  removed layer answer ENOENT.

The filesystem is immutable: there is no per-lookup state (the kernel's FORGETs need no
answer) and no per-open state: files and directories are opened by the kernel alone (the
session answers OPEN/OPENDIR with ENOSYS), so READ and READDIR name the inode. Since the
kernel caches directory listings, a change of the root (a layer added or removed) is
announced through the ``KernelNotifier``.

Extended attributes: a dedicated mount whose layer has no xattr at all answers
``getxattr`` with ENOSYS, which makes the kernel answer every later one itself
(EOPNOTSUPP, which overlayfs takes as "not set") for the life of the mount. Overlayfs asks
a lower layer for its ``trusted.overlay.*`` attributes on every directory and regular file
it looks up, so this saves one request per entry a container or a walk touches.
``listxattr`` still answers (an empty list): tools list names before they get values,
and many treat EOPNOTSUPP from a listing as an error. Anywhere else (the placeholder
root, a layer with xattrs, shared mode, whose layers come and go) a missing attribute is
ENODATA as usual.

Errors are mapped to errno here and only here (``_errno_for``): an unknown inode or name is
ENOENT; registry, verification and format failures while reading are EIO (logged with the
layer digest); an access check for writing is EROFS (the session answers every writing
request EROFS); an unexpected exception is EIO with a traceback in the log.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    RegistryError,
    Unavailable,
)
from snapshotter.formats.index import ROOT_INO, LayerIndex, Node, NodeKind
from snapshotter.fs.fuse.wire import Attr, FuseError, StatFs
from snapshotter.fs.read.reader import CachedRange

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

LAYER_SHIFT = 32
LOCAL_MASK = (1 << LAYER_SHIFT) - 1
MAX_LAYER_ID = (1 << 31) - 1
BLOCK_SIZE = 4096
_READ_FAILURES = (RegistryError, FormatError, Unavailable)
ENOATTR = errno.ENODATA  # "no such attribute" on Linux


class RangeReader(Protocol):
    """What the handlers need from a reader (``ChunkReader`` in production)."""

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of ``node`` (short at end of file)."""
        ...

    def plan_cached(self, node: Node, offset: int, length: int) -> CachedRange | None:
        """Where the same bytes lie in the cache when they are all there, else None."""
        ...

    def whole_file_path(self, node: Node) -> str | None:
        """A local file with all of ``node``'s bytes, if there is one."""
        ...


class KernelNotifier(Protocol):
    """Tells the kernel to drop cached state (the FUSE session in production)."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Forget the cached directory entry ``name`` of ``parent``."""
        ...

    def invalidate_inode(self, ino: int) -> None:
        """Forget the cached attributes and listing of ``ino``."""
        ...


class NullNotifier:
    """Notifies nothing (no session, or one going away)."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pass

    def invalidate_inode(self, ino: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class FuseTimeouts:
    """How long the kernel may cache entries and attributes, in seconds."""

    entry_s: float = 3600.0
    attr_s: float = 3600.0


@dataclass(slots=True)
class MountedLayer:
    """One layer as served: its id, blob digest (for logs), index and reader."""

    layer_id: int
    digest: str
    index: LayerIndex
    reader: RangeReader
    total_data_bytes: int = field(init=False)
    has_xattrs: bool = field(init=False)

    def __post_init__(self) -> None:
        self.total_data_bytes = self.index.total_data_bytes()
        self.has_xattrs = any(node.xattrs for node in self.index.nodes.values())


def _errno_for(exc: BaseException) -> int:
    """The errno for an exception raised while handling a request (the one mapping)."""
    if isinstance(exc, FuseError):
        return exc.errno
    if isinstance(exc, _READ_FAILURES):
        return errno.EIO
    if isinstance(exc, NotFound | FileNotFoundError | LookupError):
        return errno.ENOENT
    return errno.EIO


def _fuse_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Let only FuseError out of a handler; log what is mapped to EIO."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FuseError:
            raise
        except Exception as exc:
            code = _errno_for(exc)
            if code == errno.EIO:
                log.error("%s failed: %s", fn.__name__, exc, exc_info=True)
            raise FuseError(code) from exc

    return wrapper


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


DirEntries = list[tuple[bytes, int, Node]]
_LISTINGS_KEPT = 64  # directory listings kept between READDIR calls (most recent first out)


class LayerOperations:
    """The request handlers; see the module docstring for layouts and error mapping.

    Metadata handlers are synchronous; ``read`` is a coroutine. All raise ``FuseError``.
    """

    def __init__(
        self,
        *,
        shared: bool,
        timeouts: FuseTimeouts | None = None,
        notifier: KernelNotifier | None = None,
    ) -> None:
        self._shared = shared
        self._timeouts = timeouts or FuseTimeouts()
        self.notifier: KernelNotifier = notifier or NullNotifier()
        self._layers: dict[int, MountedLayer] = {}
        self._listings: OrderedDict[int, DirEntries] = OrderedDict()
        self._root = Node(ino=ROOT_INO, kind=NodeKind.DIR, mode=0o555, nlink=2)
        self._root.mtime_ns = time.time_ns()

    # --- layer table ------------------------------------------------------------------------

    @property
    def layers(self) -> Mapping[int, MountedLayer]:
        return self._layers

    def add_layer(self, layer: MountedLayer) -> None:
        """Start serving ``layer``.

        Raises AlreadyExists for a layer id in use, FailedPrecondition for a second layer
        in dedicated mode, InvalidArgument for an id or inode outside the shared layout.
        """
        if layer.layer_id in self._layers:
            raise AlreadyExists(f"layer {layer.layer_id} is already mounted")
        if not self._shared and self._layers:
            raise FailedPrecondition("a dedicated daemon serves exactly one layer")
        if self._shared:
            if not 1 <= layer.layer_id <= MAX_LAYER_ID:
                raise InvalidArgument(f"layer id {layer.layer_id} outside [1, {MAX_LAYER_ID}]")
            if max(layer.index.nodes) > LOCAL_MASK:
                raise InvalidArgument("layer index has inode numbers above 2**32")
        self._layers[layer.layer_id] = layer
        self._root_changed()

    def remove_layer(self, layer_id: int) -> MountedLayer:
        """Stop serving a layer and return it; raises NotFound for an unknown id."""
        layer = self._layers.pop(layer_id, None)
        if layer is None:
            raise NotFound(f"layer {layer_id} is not mounted")
        self._listings.clear()
        if self._shared:
            self.notifier.invalidate_entry(ROOT_INO, str(layer_id).encode())
        self._root_changed()
        return layer

    def _root_changed(self) -> None:
        """The root's entries changed (a layer came or went, or the placeholder became the
        layer's root): new nlink and mtime, and the kernel's cached listing dropped."""
        self._root.nlink = 2 + len(self._layers) if self._shared else 2
        self._root.mtime_ns = time.time_ns()
        self._listings.pop(ROOT_INO, None)
        self.notifier.invalidate_inode(ROOT_INO)

    # --- inode mapping ----------------------------------------------------------------------

    def _fuse_ino(self, layer: MountedLayer, ino: int) -> int:
        return (layer.layer_id << LAYER_SHIFT) | ino if self._shared else ino

    def _resolve(self, fuse_ino: int) -> tuple[MountedLayer | None, Node]:
        """The layer (None for the synthetic/placeholder root) and node of a FUSE inode."""
        if self._shared:
            if fuse_ino == ROOT_INO:
                return None, self._root
            layer = self._layers.get(fuse_ino >> LAYER_SHIFT)
            local = fuse_ino & LOCAL_MASK
        else:
            layer = next(iter(self._layers.values()), None)
            if layer is None and fuse_ino == ROOT_INO:
                return None, self._root
            local = fuse_ino
        node = None if layer is None else layer.index.nodes.get(local)
        if node is None:
            raise FuseError(errno.ENOENT)
        return layer, node

    def _attrs(self, fuse_ino: int, node: Node, synthetic: bool = False) -> Attr:
        a = Attr()
        a.st_ino = fuse_ino
        # The synthetic root changes (nlink, placeholder → layer root): never cache it.
        if not synthetic:
            a.entry_timeout = self._timeouts.entry_s
            a.attr_timeout = self._timeouts.attr_s
        a.st_mode = node.st_mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        kind = node.kind
        if kind is NodeKind.CHAR or kind is NodeKind.BLOCK:
            a.st_rdev = os.makedev(node.rdev_major, node.rdev_minor)
        size = node.size
        if kind is NodeKind.SYMLINK and size == 0:
            size = len(node.link_target)
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        mtime = node.mtime_ns
        a.st_atime_ns = mtime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = mtime
        return a

    def _node_attrs(self, fuse_ino: int) -> Attr:
        layer, node = self._resolve(fuse_ino)
        return self._attrs(fuse_ino, node, synthetic=layer is None)

    # --- metadata ---------------------------------------------------------------------------

    @_fuse_errors
    def lookup(self, parent: int, name: bytes) -> Attr:
        layer, parent_node = self._resolve(parent)
        if parent_node.kind is not NodeKind.DIR:
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self._node_attrs(parent)
        if layer is None:
            if name == b"..":
                return self._node_attrs(ROOT_INO)
            child_layer = self._layers.get(_layer_id_of(name)) if self._shared else None
            if child_layer is None:
                raise FuseError(errno.ENOENT)
            return self._node_attrs(self._fuse_ino(child_layer, ROOT_INO))
        if name == b"..":
            if parent_node.ino == ROOT_INO:
                return self._node_attrs(ROOT_INO if self._shared else parent)
            return self._node_attrs(self._fuse_ino(layer, parent_node.parent))
        child = parent_node.children.get(_name(name))
        if child is None:
            raise FuseError(errno.ENOENT)
        return self._node_attrs(self._fuse_ino(layer, child))

    @_fuse_errors
    def getattr(self, ino: int) -> Attr:
        return self._node_attrs(ino)

    @_fuse_errors
    def readlink(self, ino: int) -> bytes:
        _, node = self._resolve(ino)
        if node.kind is not NodeKind.SYMLINK:
            raise FuseError(errno.EINVAL)
        return node.link_target

    @_fuse_errors
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value, ENODATA when it is not set, ENOSYS when no node of this dedicated
        mount has any (see the module docstring)."""
        layer, node = self._resolve(ino)
        if layer is not None and not self._shared and not layer.has_xattrs:
            raise FuseError(errno.ENOSYS)
        value = node.xattrs.get(_name(name))
        if value is None:
            raise FuseError(ENOATTR)
        return value

    @_fuse_errors
    def listxattr(self, ino: int) -> Sequence[bytes]:
        _, node = self._resolve(ino)
        return [_raw(k) for k in node.xattrs]

    @_fuse_errors
    def access(self, ino: int, mask: int) -> None:
        """Existence and read-only checks; permission bits are checked by the kernel
        (the mount always uses ``default_permissions``)."""
        self._resolve(ino)
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)

    @_fuse_errors
    def statfs(self) -> StatFs:
        data = sum(layer.total_data_bytes for layer in self._layers.values())
        return StatFs(
            blocks=(data + BLOCK_SIZE - 1) // BLOCK_SIZE,
            files=1 + sum(len(layer.index.nodes) for layer in self._layers.values()),
            bsize=BLOCK_SIZE,
            namelen=255,
        )

    # --- directories ------------------------------------------------------------------------

    def _listing(self, ino: int) -> DirEntries:
        """The entries of directory ``ino`` in a stable order (index order; layer ids in
        increasing order for the synthetic root). Positions index this list."""
        entries = self._listings.get(ino)
        if entries is not None:
            self._listings.move_to_end(ino)
            return entries
        layer, node = self._resolve(ino)
        if node.kind is not NodeKind.DIR:
            raise FuseError(errno.ENOTDIR)
        entries = []
        if layer is None:
            if self._shared:
                for layer_id in sorted(self._layers):
                    child_layer = self._layers[layer_id]
                    entries.append((str(layer_id).encode(),
                                    self._fuse_ino(child_layer, ROOT_INO),
                                    child_layer.index.root))
        else:
            nodes = layer.index.nodes
            for name, child in node.children.items():
                entries.append((_raw(name), self._fuse_ino(layer, child), nodes[child]))
        self._listings[ino] = entries
        if len(self._listings) > _LISTINGS_KEPT:
            self._listings.popitem(last=False)
        return entries

    @_fuse_errors
    def readdir(self, ino: int, offset: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries from position ``offset`` with their attributes and next positions.
        ``.`` and ``..`` are not listed."""
        entries = self._listing(ino)
        return self._entries_from(entries, offset)

    def _entries_from(self, entries: DirEntries, offset: int
                      ) -> Iterator[tuple[bytes, Attr, int]]:
        for pos in range(offset, len(entries)):
            name, fuse_ino, node = entries[pos]
            yield name, self._attrs(fuse_ino, node), pos + 1

    # --- files ------------------------------------------------------------------------------

    def _regular(self, ino: int) -> tuple[MountedLayer, Node] | None:
        """The layer and node of regular file ``ino``, or None (unknown or not a file)."""
        try:
            layer, node = self._resolve(ino)
        except FuseError:
            return None
        if layer is None or node.kind is not NodeKind.REG:
            return None
        return layer, node

    def passthrough_file(self, ino: int) -> str | None:
        """A local file with all the bytes of regular file ``ino`` (its assembled copy
        in the chunk cache), which the kernel may read directly; else None."""
        found = self._regular(ino)
        return None if found is None else found[0].reader.whole_file_path(found[1])

    def read_plan(self, ino: int, offset: int, size: int) -> CachedRange | None:
        """Where the bytes of a READ lie in the chunk cache when they are all there (see
        ``ChunkReader.plan_cached``), else None: then ``read`` must be awaited (it also
        reports every error)."""
        found = self._regular(ino)
        if found is None:
            return None
        try:
            return found[0].reader.plan_cached(found[1], offset, size)
        except Exception:  # the slow path reports it
            return None

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes of regular file ``ino``; ENOENT for an unknown inode, EISDIR/EINVAL for
        other kinds, EIO when the data cannot be fetched or verified."""
        layer, node = self._resolve(ino)
        if layer is None or node.kind is not NodeKind.REG:
            raise FuseError(errno.EISDIR if node.kind is NodeKind.DIR else errno.EINVAL)
        try:
            if not log.isEnabledFor(logging.DEBUG):
                return await layer.reader.read(node, offset, size)
            started = time.monotonic()
            data = await layer.reader.read(node, offset, size)
            # Only reads whose bytes were not all cached come here (``read_plan``).
            log.debug("[layer %s] read of /%s [%d, +%d) waited %.1f ms for the registry",
                      layer.digest, layer.index.path_of(node), offset, size,
                      (time.monotonic() - started) * 1000)
            return data
        except _READ_FAILURES as exc:
            log.warning(
                "[layer %s] read of inode %d [%d, +%d) failed: %s: %s",
                layer.digest, node.ino, offset, size, type(exc).__name__, exc,
            )
            raise FuseError(errno.EIO) from exc
        except Exception as exc:
            log.error("[layer %s] read of inode %d failed", layer.digest, node.ino, exc_info=True)
            raise FuseError(errno.EIO) from exc


def _layer_id_of(name: bytes) -> int:
    """The layer id a synthetic-root entry name stands for, or -1 if it is not one."""
    if not name.isdigit() or (len(name) > 1 and name.startswith(b"0")) or len(name) > 10:
        return -1
    return int(name)
