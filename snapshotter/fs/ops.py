"""The pyfuse3 request handlers: a read-only filesystem over one or more ``LayerIndex``.

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

The filesystem is immutable: there is no per-lookup state, so ``forget`` has nothing to
release, and the open file handle of a regular file is its FUSE inode number.

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
layer digest); any write is EROFS; an unexpected exception is EIO with a traceback in the
log (pyfuse3 would otherwise stop serving the mount).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

import pyfuse3

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

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

LAYER_SHIFT = 32
LOCAL_MASK = (1 << LAYER_SHIFT) - 1
MAX_LAYER_ID = (1 << 31) - 1
BLOCK_SIZE = 4096
_READ_FAILURES = (RegistryError, FormatError, Unavailable)


class RangeReader(Protocol):
    """What the handlers need from a reader (``ChunkReader`` in production)."""

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of ``node`` (short at end of file)."""
        ...


class KernelNotifier(Protocol):
    """Tells the kernel to drop cached state (pyfuse3 notify calls in production)."""

    def entry_removed(self, parent_ino: int, name: bytes) -> None:
        """Forget the cached directory entry ``name`` of ``parent_ino``."""
        ...


class _NullNotifier:
    def entry_removed(self, parent_ino: int, name: bytes) -> None:
        pass


ReaddirReply = Callable[[Any, bytes, pyfuse3.EntryAttributes, int], bool]


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
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, _READ_FAILURES):
        return errno.EIO
    if isinstance(exc, NotFound | FileNotFoundError | LookupError):
        return errno.ENOENT
    return errno.EIO


def _fuse_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let only FUSEError out of a handler; log what is mapped to EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = _errno_for(exc)
            if code == errno.EIO:
                log.error("%s failed: %s", fn.__name__, exc, exc_info=True)
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class LayerOperations(pyfuse3.Operations):
    """The request handlers; see the module docstring for layouts and error mapping.

    ``readdir_reply`` is ``pyfuse3.readdir_reply``; tests pass a fake to call ``readdir``
    without a mount. ``on_init`` is called (on the event loop, from pyfuse3's ``init``)
    while the kernel's INIT request is handled, before the reply is sent.
    """

    def __init__(
        self,
        *,
        shared: bool,
        timeouts: FuseTimeouts | None = None,
        notifier: KernelNotifier | None = None,
        readdir_reply: ReaddirReply = pyfuse3.readdir_reply,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_init = on_init
        self._shared = shared
        self._timeouts = timeouts or FuseTimeouts()
        self._notifier = notifier or _NullNotifier()
        self._reply = readdir_reply
        self._layers: dict[int, MountedLayer] = {}
        self._dirs: dict[int, list[tuple[bytes, int, Node]]] = {}
        self._next_dir_fh = 1
        self._root = Node(ino=ROOT_INO, kind=NodeKind.DIR, mode=0o555, nlink=2)
        self._root.mtime_ns = time.time_ns()

    def init(self) -> None:
        """pyfuse3's hook for the FUSE INIT request: runs ``on_init``."""
        if self._on_init is not None:
            self._on_init()

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
        self._root.nlink = 2 + len(self._layers) if self._shared else 2

    def remove_layer(self, layer_id: int) -> MountedLayer:
        """Stop serving a layer and return it; raises NotFound for an unknown id."""
        layer = self._layers.pop(layer_id, None)
        if layer is None:
            raise NotFound(f"layer {layer_id} is not mounted")
        if self._shared:
            self._root.nlink = 2 + len(self._layers)
            self._notifier.entry_removed(ROOT_INO, str(layer_id).encode())
        return layer

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
            raise pyfuse3.FUSEError(errno.ENOENT)
        return layer, node

    def _attrs(self, fuse_ino: int, node: Node, synthetic: bool = False) -> pyfuse3.EntryAttributes:
        # A new EntryAttributes is all zeros except st_mode, st_nlink and st_blksize (4096 =
        # BLOCK_SIZE) and the timeouts: generation and st_rdev need no store of their own.
        a = pyfuse3.EntryAttributes()
        a.st_ino = fuse_ino
        # The synthetic root changes (nlink, placeholder → layer root): never cache it.
        a.entry_timeout = 0 if synthetic else self._timeouts.entry_s
        a.attr_timeout = 0 if synthetic else self._timeouts.attr_s
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

    def _node_attrs(self, fuse_ino: int) -> pyfuse3.EntryAttributes:
        layer, node = self._resolve(fuse_ino)
        return self._attrs(fuse_ino, node, synthetic=layer is None)

    # --- metadata ---------------------------------------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        layer, parent = self._resolve(parent_inode)
        if parent.kind is not NodeKind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._node_attrs(parent_inode)
        if layer is None:
            if name == b"..":
                return self._node_attrs(ROOT_INO)
            child_layer = self._layers.get(_layer_id_of(name)) if self._shared else None
            if child_layer is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._node_attrs(self._fuse_ino(child_layer, ROOT_INO))
        if name == b"..":
            if parent.ino == ROOT_INO:
                return self._node_attrs(ROOT_INO if self._shared else parent_inode)
            return self._node_attrs(self._fuse_ino(layer, parent.parent))
        child = parent.children.get(_name(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._node_attrs(self._fuse_ino(layer, child))

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._node_attrs(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to release: inodes are static and carry no lookup state."""

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._resolve(inode)
        if node.kind is not NodeKind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.link_target

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """The value, ENODATA when it is not set, ENOSYS when no node of this dedicated
        mount has any (see the module docstring)."""
        layer, node = self._resolve(inode)
        if layer is not None and not self._shared and not layer.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = node.xattrs.get(_name(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        _, node = self._resolve(inode)
        return [_raw(k) for k in node.xattrs]

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Existence and read-only checks; permission bits are checked by the kernel
        (the mount always uses ``default_permissions``)."""
        self._resolve(inode)
        if mode & os.W_OK:
            raise _erofs()
        return True

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        data = sum(layer.total_data_bytes for layer in self._layers.values())
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = (data + BLOCK_SIZE - 1) // BLOCK_SIZE
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 1 + sum(len(layer.index.nodes) for layer in self._layers.values())
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- directories ------------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the directory's entries in a stable order (index order; layer ids in
        increasing order for the synthetic root); readdir offsets index this snapshot."""
        layer, node = self._resolve(inode)
        if node.kind is not NodeKind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries: list[tuple[bytes, int, Node]] = []
        if layer is None:
            for layer_id in sorted(self._layers):
                child_layer = self._layers[layer_id]
                fuse_ino = self._fuse_ino(child_layer, ROOT_INO)
                entries.append((str(layer_id).encode(), fuse_ino, child_layer.index.root))
        else:
            nodes = layer.index.nodes
            for name, ino in node.children.items():
                entries.append((_raw(name), self._fuse_ino(layer, ino), nodes[ino]))
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = entries
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for pos in range(start_id, len(entries)):
            name, fuse_ino, node = entries[pos]
            if not self._reply(token, name, self._attrs(fuse_ino, node), pos + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files ------------------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Read-only opens of regular files; the handle is the inode, page cache kept."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise _erofs()
        _, node = self._resolve(inode)
        if node.kind is NodeKind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            layer, node = self._resolve(fh)
        except pyfuse3.FUSEError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        if layer is None or node.kind is not NodeKind.REG:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            return await layer.reader.read(node, off, size)
        except _READ_FAILURES as exc:
            log.warning(
                "[layer %s] read of inode %d [%d, +%d) failed: %s: %s",
                layer.digest, node.ino, off, size, type(exc).__name__, exc,
            )
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            log.error("[layer %s] read of inode %d failed", layer.digest, node.ino, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def release(self, fh: int) -> None:
        pass

    # --- everything that would write: EROFS -------------------------------------------------

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise _erofs()

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _erofs()

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()


def _layer_id_of(name: bytes) -> int:
    """The layer id a synthetic-root entry name stands for, or -1 if it is not one."""
    if not name.isdigit() or (len(name) > 1 and name.startswith(b"0")) or len(name) > 10:
        return -1
    return int(name)
