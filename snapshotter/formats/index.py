"""A format-neutral, read-only index of one layer's filesystem.

Both the eStargz TOC reader and the RAFS reader produce a ``LayerIndex``; the FUSE daemon
serves any ``LayerIndex`` without knowing where it came from. The index already carries
the overlayfs presentation of the layer: an eStargz ``.wh.NAME`` entry appears here as a
character device 0/0 named ``NAME``, and an opaque marker appears as the xattr
``trusted.overlay.opaque = y`` on its directory. The marker files themselves are absent.

Inode numbers are assigned by the format reader from the format's own order (TOC order,
RAFS inode number), never from a per-process counter, so a restarted daemon hands the
kernel the same numbers. The root directory is always inode ``ROOT_INO`` (1).

Invariants (checked by ``LayerIndex.validate``):
  * every child inode exists and its ``parent`` names the directory it is listed in
    (hard links are one inode listed in several directories);
  * names are non-empty, contain no ``/`` or NUL, are not ``.`` or ``..``, and are at
    most 255 bytes in UTF-8 (surrogate escapes allowed for non-UTF-8 names);
  * a regular file's chunks are sorted, contiguous from 0 and sum to its size.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from snapshotter.errdefs import FormatError

ROOT_INO = 1
MAX_NAME_BYTES = 255


class NodeKind(enum.Enum):
    """The kind of a filesystem node, with its ``S_IF*`` type bits as value."""

    DIR = stat.S_IFDIR
    REG = stat.S_IFREG
    SYMLINK = stat.S_IFLNK
    CHAR = stat.S_IFCHR
    BLOCK = stat.S_IFBLK
    FIFO = stat.S_IFIFO


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently fetchable and verifiable piece of a regular file.

    ``file_offset``/``size``: where the chunk's uncompressed bytes sit in the file.
    ``blob_offset``/``blob_end``: the compressed byte range to fetch from the blob.
    ``inner_offset``: uncompressed bytes to skip after decompressing that range.
    ``digest``: ``sha256:<hex>`` (or ``blake3:<hex>``) of the chunk's uncompressed bytes,
    ``""`` when the format gives none (then only the whole-file digest can be checked).
    ``compression``: ``gzip``, ``zstd``, ``lz4_block`` or ``none``.
    ``blob``: which blob holds the chunk; ``""`` means the layer's own blob.
    """

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int
    digest: str
    compression: str
    blob: str = ""


@dataclass(slots=True)
class Node:
    """One inode of the layer. ``mode`` holds permission bits only (``& 0o7777``)."""

    ino: int
    kind: NodeKind
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    nlink: int = 1
    parent: int = ROOT_INO
    rdev_major: int = 0
    rdev_minor: int = 0
    link_target: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, int] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)
    digest: str = ""

    @property
    def st_mode(self) -> int:
        """Type bits plus permission bits, as ``stat(2)`` reports them."""
        return self.kind.value | (self.mode & 0o7777)


@dataclass(slots=True)
class LayerIndex:
    """The whole layer: inode table, root, and what to prefetch.

    ``prefetch_inos`` lists files to fetch at mount, in access order (from the eStargz
    landmark or the RAFS prefetch table). ``no_prefetch`` is True when the producer said
    explicitly that nothing should be prefetched. ``blob_size`` is the compressed size of
    the layer's own blob (0 when unknown).
    """

    nodes: dict[int, Node]
    format: str
    blob_size: int = 0
    prefetch_inos: list[int] = field(default_factory=list)
    prefetch_blob_end: int = 0
    no_prefetch: bool = False

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INO]

    def get(self, ino: int) -> Node:
        """Return inode ``ino``; raise ``KeyError`` if there is none."""
        return self.nodes[ino]

    def lookup(self, parent: int, name: str) -> Node | None:
        """The child ``name`` of directory ``parent``, or None."""
        ino = self.nodes[parent].children.get(name)
        return None if ino is None else self.nodes[ino]

    def resolve(self, path: str) -> Node | None:
        """The node at relative ``path`` (``"etc/passwd"``), or None; symlinks are not
        followed, and a path through a non-directory resolves to None."""
        node: Node | None = self.root
        for name in path.split("/"):
            if node is None or node.kind is not NodeKind.DIR:
                return None
            node = self.lookup(node.ino, name)
        return node

    def path_of(self, node: Node) -> str:
        """One path of ``node`` relative to the root (``""`` for the root; a hard-linked
        inode gets one of its names). Costs a scan of each ancestor's entries: meant for
        messages, not for a request path."""
        names: list[str] = []
        while node.ino != ROOT_INO and len(names) <= len(self.nodes):
            parent = self.nodes.get(node.parent)
            if parent is None:
                break
            names.append(next((name for name, ino in parent.children.items()
                               if ino == node.ino), f"#{node.ino}"))
            node = parent
        return "/".join(reversed(names))

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Yield ``(path, node)`` for every directory entry, depth first, root as ``""``.

        A hard-linked inode is yielded once per name.
        """
        stack: list[tuple[str, int]] = [("", ROOT_INO)]
        while stack:
            path, ino = stack.pop()
            node = self.nodes[ino]
            yield path, node
            if node.kind is NodeKind.DIR:
                for name, child in reversed(node.children.items()):
                    stack.append((f"{path}/{name}" if path else name, child))

    def total_data_bytes(self) -> int:
        """Sum of the uncompressed sizes of all regular files (each inode once)."""
        return sum(n.size for n in self.nodes.values() if n.kind is NodeKind.REG)

    def validate(self) -> None:
        """Check the invariants in the module docstring; raise FormatError if broken."""
        nodes = self.nodes
        root = nodes.get(ROOT_INO)
        if root is None or root.kind is not NodeKind.DIR:
            raise FormatError("layer index has no root directory")
        dir_kind, reg_kind = NodeKind.DIR, NodeKind.REG
        for node in nodes.values():
            children = node.children
            if children:
                for name, child in children.items():
                    check_name(name)
                    child_node = nodes.get(child)
                    if child_node is None:
                        raise FormatError(f"directory entry {name!r} names missing inode {child}")
                    if child_node.kind is dir_kind and child_node.parent != node.ino:
                        raise FormatError(f"directory {name!r} has inconsistent parent")
            if node.kind is reg_kind:
                check_chunks(node)


def check_name(name: str) -> None:
    """Raise FormatError unless ``name`` is a single, safe path component."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FormatError(f"invalid file name {name!r}")
    # (ASCII needs no encoding to count its bytes)
    if (len(name) > MAX_NAME_BYTES or not name.isascii()) and len(
        name.encode("utf-8", "surrogateescape")
    ) > MAX_NAME_BYTES:
        raise FormatError(f"file name longer than {MAX_NAME_BYTES} bytes: {name[:40]!r}...")


def check_chunks(node: Node) -> None:
    """Raise FormatError unless the chunks of ``node`` tile ``[0, size)`` in order."""
    pos = 0
    for chunk in node.chunks:
        if chunk.file_offset != pos or chunk.size < 0:
            raise FormatError(f"inode {node.ino}: chunk at {chunk.file_offset}, expected {pos}")
        if chunk.blob_offset < 0 or chunk.blob_end < chunk.blob_offset or chunk.inner_offset < 0:
            raise FormatError(f"inode {node.ino}: chunk with an invalid blob range")
        pos += chunk.size
    if pos != node.size:
        raise FormatError(f"inode {node.ino}: chunks cover {pos} bytes of {node.size}")
