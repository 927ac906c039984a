"""Build a ``LayerIndex`` from eStargz TOC entries (the layer as the FUSE daemon shows it).

Rules (protocol-reference §3.4, §4.3, §4.4), applied in TOC order:

* Names are normalised by ``estargz_toc.clean_name``; an entry named like the root
  (``./``) must be a ``dir`` and sets the root's metadata.
* Missing parent directories are created implicitly (mode 0755, uid/gid 0, mtime 0).
  They count against ``max_entries`` like named entries, and a TOC may imply at most
  ``max_implicit_dirs`` more directories than it has entries: without that, entries
  with distinct deep names (``d<i>/a/a/.../f``) make a 4 KB blob whose 2 MB TOC builds
  a million directories (13 s and 2.6 GB). Real TOCs name their directories (tar
  writers emit them), so they imply none or a few.
* A payload must fit in its compressed range: ``innerOffset + size`` of a chunk is at
  most ``MAX_DEFLATE_RATIO`` times its compressed range (deflate's ceiling), so no offset
  or size can point past what the blob can hold.
* A later entry with an existing name replaces the earlier one, as tar extraction does:
  ``dir`` over ``dir`` updates the metadata and keeps the children; anything over a
  non-directory replaces it (hard links made earlier keep the old inode); a
  non-directory over a directory, or a path through a non-directory, is a FormatError.
* ``chunk`` entries belong to the ``reg`` entry before them; a ``chunk`` after anything
  else is a FormatError. Chunk sizes follow stargz: ``chunkSize`` 0 means "to the next
  chunk" (or to the end of the file for the last one).
* ``hardlink`` entries name an earlier entry (after normalisation) that is not a
  directory; they add a name to that inode. ``nlink`` counts names (directories: 2 plus
  subdirectories).
* ``.wh.NAME`` becomes a character device 0/0 (mode 0, owner/mtime of the whiteout entry)
  named NAME unless a real NAME exists in that directory at the end; ``.wh..wh..opq``
  sets ``trusted.overlay.opaque = y`` on its directory; other ``.wh..wh.*`` names are
  AUFS metadata and are dropped with everything under them; a whiteout name used as a
  directory is a FormatError.
* At the layer root ``stargz.index.json``, ``.prefetch.landmark`` and
  ``.no.prefetch.landmark`` are hidden (they must be regular files). The landmarks give
  the prefetch plan (see ``_TreeBuilder._plan_prefetch``); ``.no.prefetch.landmark``
  wins when both are present, as in stargz.
* Inode numbers: root is 1, then one number per created node in TOC order, so the same
  TOC always gives the same numbers. Nodes left without a name are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats.estargz_toc import DEFAULT_MAX_ENTRIES, TocEntry, parse_toc
from snapshotter.formats.index import ROOT_INO, Chunk, LayerIndex, Node, NodeKind, check_name
from snapshotter.formats.limits import MAX_IMPLICIT_DIRS

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT = ".wh."
_WHITEOUT_META = ".wh..wh."
_OPAQUE = ".wh..wh..opq"
_HIDDEN_AT_ROOT = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
DEFAULT_MAX_IMPLICIT_DIRS = MAX_IMPLICIT_DIRS
"""Directories a TOC may imply beyond the entries it names (see the module docstring)."""
MAX_DEFLATE_RATIO = 1032
"""Deflate's largest expansion: one compressed byte never inflates to more than this."""
_KINDS = {
    "reg": NodeKind.REG,
    "symlink": NodeKind.SYMLINK,
    "char": NodeKind.CHAR,
    "block": NodeKind.BLOCK,
    "fifo": NodeKind.FIFO,
}


def build_index(
    json_bytes: bytes,
    blob_size: int,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_implicit_dirs: int = DEFAULT_MAX_IMPLICIT_DIRS,
    data_end: int | None = None,
) -> LayerIndex:
    """Parse TOC JSON of a blob of ``blob_size`` bytes into a validated ``LayerIndex``.

    The result has format ``"estargz"``; every regular file's chunks carry their
    compressed range ``[blob_offset, blob_end)``, ``inner_offset``, size and digest
    (compression ``gzip``). A chunk without its own ``chunkDigest`` inherits the file's
    ``digest`` when it is the file's only chunk, else its digest is ``""``.

    The last payload's range runs to ``data_end``: ``blob_size`` by default, as stargz
    does (one gzip member is inflated, so the trailing TOC is fetched but not read);
    pass the footer's TOC offset to fetch only the payload.

    Raises FormatError for malformed JSON or entries (see ``estargz_toc.parse_toc``) and
    for the structural errors listed in the module docstring; LimitExceeded (a
    FormatError) when the TOC is over ``max_entries`` entries and implied directories or
    implies more than ``max_implicit_dirs`` directories beyond its entries.
    """
    entries = parse_toc(json_bytes, blob_size, max_entries=max_entries, data_end=data_end)
    return index_from_entries(entries, blob_size, max_entries=max_entries,
                              max_implicit_dirs=max_implicit_dirs)


def index_from_entries(
    entries: list[TocEntry],
    blob_size: int,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_implicit_dirs: int = DEFAULT_MAX_IMPLICIT_DIRS,
) -> LayerIndex:
    """``build_index`` for entries already decoded by ``parse_toc`` (same rules, errors)."""
    extras = _chunk_groups(entries)
    implicit = min(max_implicit_dirs + len(entries), max_entries) - len(entries)
    builder = _TreeBuilder(blob_size, max(implicit, 0))
    add = builder.add
    if not extras:  # no chunk entries at all (the usual case)
        for entry in entries:
            add(entry, _NO_CHUNKS)
    else:
        for i, entry in enumerate(entries):
            if entry.type != "chunk":
                add(entry, extras.get(i, _NO_CHUNKS))
    return builder.finish()


_NO_CHUNKS: list[TocEntry] = []  # the chunks of every entry without any: never mutated


def _chunk_groups(entries: list[TocEntry]) -> dict[int, list[TocEntry]]:
    """The ``chunk`` entries that follow each ``reg`` entry, keyed by its position.

    Raises FormatError for a ``chunk`` entry after anything but a ``reg`` entry (or its
    chunks), before the tree is touched.
    """
    groups: dict[int, list[TocEntry]] = {}
    head = -1  # position of the last entry that is not a chunk
    for i, entry in enumerate(entries):
        if entry.type != "chunk":
            head = i
        elif head >= 0 and entries[head].type == "reg":
            extra = groups.get(head)
            if extra is None:
                groups[head] = [entry]
            else:
                extra.append(entry)
        else:
            raise FormatError(f"TOC entry #{entry.index}: chunk does not follow a reg entry")
    return groups


def make_chunks(entry: TocEntry, extra: list[TocEntry]) -> list[Chunk]:
    """The chunks of regular file ``entry`` and its following ``chunk`` entries.

    Raises FormatError if they do not tile ``[0, size)`` in order, or a chunk has no
    payload offset or an empty compressed range.
    """
    if entry.size == 0:
        if extra:
            raise _chunk_error(entry, "empty file with chunk entries")
        return []
    parts = [entry, *extra]
    chunks: list[Chunk] = []
    pos = 0
    for i, part in enumerate(parts):
        if part.chunk_offset != pos:
            raise _chunk_error(entry, f"chunk at {part.chunk_offset}, expected {pos}")
        if part.chunk_size:
            size = part.chunk_size
        elif i + 1 < len(parts):
            size = parts[i + 1].chunk_offset - pos
        else:
            size = entry.size - pos
        if size <= 0 or pos + size > entry.size:
            raise _chunk_error(entry, f"chunk at {pos} has invalid size {size}")
        if not part.offset and not part.inner_offset:
            raise _chunk_error(entry, f"chunk at {pos} has no payload offset")
        if part.offset >= part.next_offset:
            raise _chunk_error(
                entry,
                f"chunk at {pos} has an empty compressed range "
                f"[{part.offset}, {part.next_offset}) (offsets out of order?)",
            )
        _check_fits(entry, pos, part.inner_offset + size, part.next_offset - part.offset)
        digest = part.chunk_digest or (entry.digest if len(parts) == 1 else "")
        chunks.append(_chunk(pos, size, part.offset, part.next_offset, part.inner_offset,
                             digest))
        pos += size
    if pos != entry.size:
        raise _chunk_error(entry, f"chunks cover {pos} of {entry.size} bytes")
    return chunks


_CHUNK_SLOTS = tuple(
    getattr(Chunk, name).__set__
    for name in ("file_offset", "size", "blob_offset", "blob_end", "inner_offset", "digest",
                 "compression", "blob")
)


def _chunk(file_offset: int, size: int, blob_offset: int, blob_end: int, inner_offset: int,
           digest: str) -> Chunk:
    """``Chunk(file_offset, size, blob_offset, blob_end, inner_offset, digest, "gzip")``.

    Sets the slots directly: a frozen dataclass's ``__init__`` calls
    ``object.__setattr__`` per field, which makes it about 1.6 times slower.
    """
    chunk: Chunk = object.__new__(Chunk)
    s_file, s_size, s_blob_offset, s_blob_end, s_inner, s_digest, s_comp, s_blob = _CHUNK_SLOTS
    s_file(chunk, file_offset)
    s_size(chunk, size)
    s_blob_offset(chunk, blob_offset)
    s_blob_end(chunk, blob_end)
    s_inner(chunk, inner_offset)
    s_digest(chunk, digest)
    s_comp(chunk, "gzip")
    s_blob(chunk, "")
    return chunk


def _check_fits(entry: TocEntry, pos: int, needed: int, compressed: int) -> None:
    """Raise FormatError unless ``needed`` uncompressed bytes (inner offset plus chunk
    size) can come out of ``compressed`` bytes of deflate data."""
    if needed > compressed * MAX_DEFLATE_RATIO:
        raise _chunk_error(
            entry,
            f"chunk at {pos} needs {needed} uncompressed bytes from a compressed range of "
            f"{compressed} bytes (deflate inflates at most {MAX_DEFLATE_RATIO}x)")


def _chunk_error(entry: TocEntry, message: str) -> FormatError:
    return FormatError(f"regular file {entry.name!r} (TOC entry #{entry.index}): {message}")


def _fail(entry: TocEntry, message: str) -> FormatError:
    return FormatError(f"TOC entry #{entry.index} ({entry.name!r}): {message}")


def _is_meta(name: str) -> bool:
    """True for AUFS metadata (``.wh..wh.*`` other than a final opaque marker)."""
    parts = name.split("/")
    if any(p.startswith(_WHITEOUT_META) for p in parts[:-1]):
        return True
    return parts[-1].startswith(_WHITEOUT_META) and parts[-1] != _OPAQUE


@dataclass(slots=True)
class _TreeBuilder:
    """The tree under construction. ``dirs`` caches directory inodes by path: the parent
    of each entry (a prefix of its name, so the cache is no bigger than the TOC) and
    every named directory; implicit directories between them are found by walking
    ``children`` from the root, so no prefix string is kept per implied directory."""

    blob_size: int
    implicit_allowed: int
    implicit_left: int = 0
    nodes: dict[int, Node] = field(default_factory=dict)
    dirs: dict[str, int] = field(default_factory=dict)
    next_ino: int = ROOT_INO + 1
    opaque: dict[int, None] = field(default_factory=dict)
    whiteouts: dict[tuple[int, str], int] = field(default_factory=dict)
    regs: list[int] = field(default_factory=list)
    landmark: TocEntry | None = None
    no_prefetch: bool = False

    def __post_init__(self) -> None:
        self.implicit_left = self.implicit_allowed
        self.nodes[ROOT_INO] = Node(ROOT_INO, NodeKind.DIR, 0o755, parent=ROOT_INO)
        self.dirs[""] = ROOT_INO

    def _new(self, kind: NodeKind, entry: TocEntry | None, parent: int) -> Node:
        node = Node(self.next_ino, kind, 0o755 if entry is None else entry.mode, parent=parent)
        if entry is not None:
            node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
            node.xattrs = dict(entry.xattrs)
        self.nodes[node.ino] = node
        self.next_ino += 1
        return node

    def add(self, entry: TocEntry, chunks: list[TocEntry]) -> None:
        """Apply one TOC entry (with its chunk entries) to the tree."""
        name = entry.name
        if not name:
            if entry.type != "dir":
                raise _fail(entry, "the layer root must be a directory")
            self._set_dir_meta(self.nodes[ROOT_INO], entry)
            return
        parent_path, _, base = name.rpartition("/")
        if not parent_path and base in _HIDDEN_AT_ROOT:
            self._hidden(entry, base)
            return
        whiteout = _WHITEOUT in name  # else no component starts with it: skip those checks
        if whiteout:
            if _is_meta(name):
                return
            if any(p.startswith(_WHITEOUT) for p in parent_path.split("/")):
                raise _fail(entry, "a whiteout name is used as a directory")
        parent = self.dirs.get(parent_path)
        if parent is None:
            parent = self._ensure_dir(parent_path, entry)
        kind = entry.type
        if whiteout and base.startswith(_WHITEOUT):
            if base == _OPAQUE:
                self.opaque[parent] = None
            else:
                self._whiteout(entry, parent, base[len(_WHITEOUT) :])
        elif kind == "reg":  # the usual entry: its inode and _link, inline
            size = entry.size
            offset = entry.offset
            if (
                size
                and not chunks
                and not entry.chunk_offset
                and (not entry.chunk_size or entry.chunk_size == size)
                and (offset or entry.inner_offset)
                and offset < entry.next_offset
                and entry.inner_offset + size
                <= (entry.next_offset - offset) * MAX_DEFLATE_RATIO
            ):  # one chunk that make_chunks would accept: skip its checks and loop
                file_chunks = [_chunk(0, size, offset, entry.next_offset, entry.inner_offset,
                                      entry.chunk_digest or entry.digest)]
            else:
                file_chunks = make_chunks(entry, chunks)
            ino = self.next_ino
            nodes = self.nodes
            nodes[ino] = Node(ino, NodeKind.REG, entry.mode, entry.uid, entry.gid,
                              entry.mtime_ns, size, 1, parent, 0, 0, b"",
                              dict(entry.xattrs) if entry.xattrs else {}, {}, file_chunks,
                              entry.digest)
            self.next_ino = ino + 1
            self.regs.append(ino)
            children = nodes[parent].children
            old = children.get(base)
            if old is not None and nodes[old].kind is NodeKind.DIR:
                raise _fail(entry, f"a non-directory replaces directory {base!r}")
            children[base] = ino
        elif kind == "dir":
            self._add_dir(entry, parent, parent_path, base)
        elif kind == "hardlink":
            self._link(parent, base, self._hardlink_target(entry), entry)
        else:
            self._link(parent, base, self._add_file(entry, parent), entry)

    def _add_file(self, entry: TocEntry, parent: int) -> int:
        """Create the inode of a symlink, device or FIFO entry; return its number.

        (``add`` creates regular files itself.) Builds the ``Node`` in one call with all
        the fields the entry gives it.
        """
        ino = self.next_ino
        kind = _KINDS[entry.type]
        xattrs = dict(entry.xattrs) if entry.xattrs else {}
        if kind is NodeKind.SYMLINK:
            target = entry.symlink_target
            node = Node(ino, kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, len(target),
                        1, parent, 0, 0, target, xattrs, {}, [], "")
        elif kind is NodeKind.CHAR or kind is NodeKind.BLOCK:
            node = Node(ino, kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, 0, 1,
                        parent, entry.dev_major, entry.dev_minor, b"", xattrs, {}, [], "")
        else:
            node = Node(ino, kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, 0, 1,
                        parent, 0, 0, b"", xattrs, {}, [], "")
        self.nodes[ino] = node
        self.next_ino = ino + 1
        return ino

    def _hidden(self, entry: TocEntry, base: str) -> None:
        if entry.type != "reg":
            raise _fail(entry, f"{base} must be a regular file")
        if base == PREFETCH_LANDMARK:
            self.landmark = entry
        elif base == NO_PREFETCH_LANDMARK:
            self.no_prefetch = True

    def _ensure_dir(self, path: str, entry: TocEntry) -> int:
        """The inode of directory ``path``, creating missing directories on the way.

        Raises FormatError when a component is not a directory, LimitExceeded when the
        TOC implies more directories than allowed."""
        found = self.dirs.get(path)
        if found is not None:
            return found
        nodes = self.nodes
        cur = ROOT_INO
        for depth, comp in enumerate(path.split("/"), 1):
            child = nodes[cur].children.get(comp)
            if child is None:
                if self.implicit_left <= 0:
                    raise LimitExceeded(
                        f"TOC entry #{entry.index} ({entry.name[:80]!r}): the TOC implies "
                        f"more directories than it may ({self.implicit_allowed}: the "
                        f"implied-directory and entry limits)")
                self.implicit_left -= 1
                node = self._new(NodeKind.DIR, None, cur)
                nodes[cur].children[comp] = child = node.ino
            elif nodes[child].kind is not NodeKind.DIR:
                prefix = "/".join(path.split("/")[:depth])
                raise _fail(entry, f"parent {prefix!r} is not a directory")
            cur = child
        self.dirs[path] = cur
        return cur

    def _find_dir(self, path: str) -> int | None:
        """The inode of existing directory ``path`` (None if there is none); no creation."""
        found = self.dirs.get(path)
        if found is not None or not path:
            return found
        nodes = self.nodes
        cur = ROOT_INO
        for comp in path.split("/"):
            child = nodes[cur].children.get(comp)
            if child is None or nodes[child].kind is not NodeKind.DIR:
                return None
            cur = child
        return cur

    def _add_dir(self, entry: TocEntry, parent: int, parent_path: str, base: str) -> None:
        path = entry.name
        existing = self.dirs.get(path)
        if existing is None:
            child = self.nodes[parent].children.get(base)
            if child is not None and self.nodes[child].kind is NodeKind.DIR:
                existing = self.dirs[path] = child
        if existing is not None:
            self._set_dir_meta(self.nodes[existing], entry)
            return
        node = self._new(NodeKind.DIR, entry, parent)
        self._link(parent, base, node.ino, entry)
        self.dirs[path] = node.ino

    @staticmethod
    def _set_dir_meta(node: Node, entry: TocEntry) -> None:
        node.mode, node.uid, node.gid = entry.mode, entry.uid, entry.gid
        node.mtime_ns, node.xattrs = entry.mtime_ns, dict(entry.xattrs)

    def _link(self, parent: int, name: str, ino: int, entry: TocEntry) -> None:
        children = self.nodes[parent].children
        old = children.get(name)
        if old is not None and self.nodes[old].kind is NodeKind.DIR:
            raise _fail(entry, f"a non-directory replaces directory {name!r}")
        children[name] = ino

    def _hardlink_target(self, entry: TocEntry) -> int:
        parent_path, _, base = entry.link_name.rpartition("/")
        parent = self._find_dir(parent_path)
        target = None if parent is None else self.nodes[parent].children.get(base)
        if target is None or not entry.link_name:
            raise _fail(entry, f"hardlink target {entry.link_name!r} does not exist")
        if self.nodes[target].kind is NodeKind.DIR:
            raise _fail(entry, f"hardlink target {entry.link_name!r} is a directory")
        return target

    def _whiteout(self, entry: TocEntry, parent: int, name: str) -> None:
        try:
            check_name(name)
        except FormatError:
            raise _fail(entry, f"whiteout for an invalid name {name!r}") from None
        node = self._new(NodeKind.CHAR, entry, parent)
        node.mode, node.xattrs = 0, {}
        self.whiteouts[(parent, name)] = node.ino

    def finish(self) -> LayerIndex:
        """Resolve whiteouts and opaque markers, count links, plan prefetch, validate."""
        for (parent, name), ino in self.whiteouts.items():
            self.nodes[parent].children.setdefault(name, ino)
        for ino in self.opaque:
            self.nodes[ino].xattrs[OPAQUE_XATTR] = b"y"
        self._count_links()
        index = LayerIndex(self.nodes, "estargz", blob_size=self.blob_size)
        if self.no_prefetch:
            index.no_prefetch = True
        elif self.landmark is not None:
            self._plan_prefetch(index, self.landmark)
        index.validate()
        return index

    def _plan_prefetch(self, index: LayerIndex, landmark: TocEntry) -> None:
        """Prefetch the files whose data precede the landmark in the blob.

        "Precede" compares ``(offset, innerOffset)``, so payloads that share the
        landmark's gzip member (written with a minimum chunk size) count. The range is
        ``[0, landmark offset)`` as in stargz, extended to the end of the landmark's
        member when it shares one, since that member holds prioritised data too.
        """
        mark = (landmark.offset, landmark.inner_offset)
        index.prefetch_blob_end = landmark.next_offset if landmark.inner_offset else landmark.offset
        index.prefetch_inos = [
            ino
            for ino in self.regs
            if ino in self.nodes
            and self.nodes[ino].chunks
            and (self.nodes[ino].chunks[0].blob_offset, self.nodes[ino].chunks[0].inner_offset)
            < mark
        ]

    def _count_links(self) -> None:
        """Set every ``nlink`` from the directory entries; drop nodes without a name."""
        nodes = self.nodes
        links = dict.fromkeys(nodes, 0)
        links[ROOT_INO] = 1
        dir_kind = NodeKind.DIR
        for node in nodes.values():
            if node.kind is dir_kind:
                subdirs = 0
                for child in node.children.values():
                    links[child] += 1
                    if nodes[child].kind is dir_kind:
                        subdirs += 1
                node.nlink = 2 + subdirs
        for ino, count in links.items():
            if count == 0:
                del nodes[ino]
            elif nodes[ino].kind is not dir_kind:
                nodes[ino].nlink = count
