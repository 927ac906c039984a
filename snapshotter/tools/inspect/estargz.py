"""``lazysnap inspect``: describe an eStargz blob and the tree a lazy mount would show.

``inspect_estargz_blob`` (bytes in memory) and ``inspect_fetcher`` (any ``BlobFetcher``:
a local file, or a registry blob through the registry client) return the same summary
dict; ``tree_json`` renders a ``LayerIndex`` in the shape ``tree -a -J`` prints for the
mounted layer, so the two can be compared directly in end-to-end tests.

``add_inspect_arguments`` + ``run_inspect`` are the CLI subcommand for a blob file.
They raise nothing for bad input: they print one line to stderr and return 1 (malformed
or mismatching blob) or 2 (the file cannot be read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any

from snapshotter.errdefs import FormatError
from snapshotter.formats.estargz import (
    DEFAULT_MAX_TOC_BYTES,
    FOOTER_MAX,
    Footer,
    extract_toc,
    fetch_toc,
    index_from_entries,
    parse_footer,
    parse_toc,
    toc_digest,
    verify_toc,
)
from snapshotter.formats.index import ROOT_INO, LayerIndex, NodeKind
from snapshotter.registry.base import BlobFetcher

TREE_TYPES = {  # NodeKind -> the type names of `tree -J` (RAFS inspection uses them too)
    NodeKind.DIR: "directory",
    NodeKind.REG: "file",
    NodeKind.SYMLINK: "link",
    NodeKind.CHAR: "char",
    NodeKind.BLOCK: "block",
    NodeKind.FIFO: "fifo",
}


def _name_key(name: str) -> bytes:
    # tree sorts with strcoll; under LC_ALL=C that is byte order.
    return name.encode("utf-8", "surrogateescape")


def tree_json(index: LayerIndex) -> list[dict[str, Any]]:
    """The layer as ``tree -a -J`` (tree 2.x) prints it, run in the mount with ``LC_ALL=C``.

    ``[{"type": "directory", "name": ".", "contents": [...]}, {"type": "report",
    "directories": N, "files": M}]``; entries are sorted by name (bytewise), non-empty
    directories carry ``contents`` (tree omits it for empty ones), symlinks ``target``;
    a hard-linked inode appears once per name. As in tree, the root is not counted and
    a symlink that resolves to a directory counts as a directory; only relative targets
    that stay inside the layer are resolved (an absolute target resolves against the
    host at mount time, which the index cannot know), others count as files.
    """
    top: dict[str, Any] = {"type": "directory", "name": "."}
    dirs = files = 0
    stack = [(index.root, top)]
    while stack:  # iterative: a TOC may nest deeper than Python's recursion limit
        node, item = stack.pop()
        if node.children:
            item["contents"] = contents = []
        for name in sorted(node.children, key=_name_key):
            child = index.get(node.children[name])
            entry: dict[str, Any] = {"type": TREE_TYPES[child.kind], "name": name}
            contents.append(entry)
            if child.kind is NodeKind.DIR:
                dirs += 1
                stack.append((child, entry))
                continue
            if child.kind is NodeKind.SYMLINK:
                entry["target"] = child.link_target.decode("utf-8", "surrogateescape")
                if _link_is_dir(index, node.ino, child.link_target):
                    dirs += 1
                    continue
            files += 1
    return [top, {"type": "report", "directories": dirs, "files": files}]


_MAX_LINK_HOPS = 40  # Linux's MAXSYMLINKS


def _link_is_dir(index: LayerIndex, cur: int, target: bytes) -> bool:
    """True if relative ``target``, resolved from directory ``cur``, is a directory."""
    if target.startswith(b"/"):
        return False  # resolved against the host's root at mount time: unknowable here
    pending = target.split(b"/")
    hops = 0
    while pending:
        comp = pending.pop(0)
        if comp == b".." and cur == ROOT_INO:
            return False  # leaves the layer
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            cur = index.get(cur).parent
            continue
        node = index.lookup(cur, comp.decode("utf-8", "surrogateescape"))
        if node is None:
            return False
        if node.kind is NodeKind.SYMLINK:
            hops += 1
            if hops > _MAX_LINK_HOPS or node.link_target.startswith(b"/"):
                return False
            pending[:0] = node.link_target.split(b"/")
        elif node.kind is NodeKind.DIR:
            cur = node.ino
        else:
            return False
    return True


def _first_paths(index: LayerIndex) -> dict[int, str]:
    paths: dict[int, str] = {}
    for path, node in index.walk():
        paths.setdefault(node.ino, path)
    return paths


def summarize(blob_size: int, footer: Footer, toc_json: bytes) -> dict[str, Any]:
    """The inspect summary of a blob whose footer and TOC JSON are already read.

    Raises FormatError if the TOC is malformed.
    """
    return _analyse(blob_size, footer, toc_json)[0]


def _analyse(blob_size: int, footer: Footer, toc_json: bytes) -> tuple[dict[str, Any],
                                                                         LayerIndex]:
    entries = parse_toc(toc_json, blob_size, data_end=footer.toc_offset)
    index = index_from_entries(entries, blob_size)
    paths = _first_paths(index)
    regs = [n for n in index.nodes.values() if n.kind is NodeKind.REG]
    if index.no_prefetch:
        prefetch: dict[str, Any] = {"mode": "none"}
    elif index.prefetch_blob_end or index.prefetch_inos:
        prefetch = {
            "mode": "landmark",
            "blob_end": index.prefetch_blob_end,
            "files": [paths[ino] for ino in index.prefetch_inos],
        }
    else:
        prefetch = {"mode": "unspecified"}
    summary = {
        "format": "estargz",
        "blob_size": blob_size,
        "footer": {"kind": footer.kind, "size": footer.footer_size},
        "toc_offset": footer.toc_offset,
        "toc_digest": toc_digest(toc_json),
        "toc_bytes": len(toc_json),
        "entries": dict(sorted(Counter(e.type for e in entries).items())),
        "inodes": dict(sorted(Counter(TREE_TYPES[n.kind] for n in index.nodes.values())
                              .items())),
        "uncompressed_size": index.total_data_bytes(),
        "chunks": sum(len(n.chunks) for n in regs),
        "prefetch": prefetch,
    }
    return summary, index


def inspect_estargz_blob(data: bytes, max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES) -> dict[str, Any]:
    """Summarise a whole eStargz blob held in memory (see ``summarize`` for the keys).

    Keys: ``format``, ``blob_size``, ``footer`` (``kind``, ``size``), ``toc_offset``,
    ``toc_digest``, ``toc_bytes``, ``entries`` (TOC entries by type), ``inodes`` (index
    nodes by tree type), ``uncompressed_size``, ``chunks``, ``prefetch`` (``mode`` =
    ``landmark``/``none``/``unspecified``, with ``blob_end`` and ``files`` for a
    landmark). Raises FormatError if the blob is not a readable eStargz blob.
    """
    footer = parse_footer(data[-FOOTER_MAX:])
    start, end = footer.toc_range(len(data))
    return summarize(len(data), footer, extract_toc(data[start:end], max_toc_bytes))


async def inspect_fetcher(
    fetcher: BlobFetcher,
    *,
    expected_toc_digest: str | None = None,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
    with_tree: bool = False,
) -> dict[str, Any]:
    """Summarise the blob behind ``fetcher``, fetching only its tail and TOC.

    With ``expected_toc_digest`` the TOC must match (DigestMismatch otherwise); with
    ``with_tree`` the result has a ``tree`` key holding ``tree_json`` of the index.
    Raises FormatError for a malformed blob; fetcher errors propagate unchanged.
    """
    blob_size, footer, toc_json = await fetch_toc(fetcher, max_toc_bytes)
    if expected_toc_digest is not None:
        verify_toc(toc_json, expected_toc_digest)
    result, index = _analyse(blob_size, footer, toc_json)
    if with_tree:
        result["tree"] = tree_json(index)
    return result


class FileBlobFetcher:
    """A ``BlobFetcher`` over a local file (for ``lazysnap inspect FILE``).

    Raises OSError (not a registry error) if the file cannot be read.
    """

    def __init__(self, path: str, digest: str = "") -> None:
        self._path = path
        self._digest = digest

    @property
    def digest(self) -> str:
        return self._digest

    async def size(self) -> int:
        with open(self._path, "rb") as f:
            return f.seek(0, 2)

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        with open(self._path, "rb") as f:
            for start, end in ranges:
                f.seek(start)
                data = f.read(end - start)
                if len(data) != end - start:
                    raise OSError(f"{self._path}: short read at {start}")
                out.append(data)
        return out

    async def aclose(self) -> None:
        return None


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` subcommand's arguments to ``parser``."""
    parser.add_argument("blob", help="path of an eStargz layer blob (.tar.gz)")
    parser.add_argument("--tree", action="store_true",
                        help="print only the tree, in the shape of `tree -a -J`")
    parser.add_argument("--toc-digest", default=None,
                        help="verify the TOC JSON against this sha256:<hex> digest")
    parser.add_argument("--max-toc-bytes", type=int, default=DEFAULT_MAX_TOC_BYTES,
                        help="refuse TOC JSON larger than this (default %(default)s)")


def run_inspect(args: argparse.Namespace, out: IO[str] | None = None,
                err: IO[str] | None = None) -> int:
    """Run ``lazysnap inspect`` with parsed ``args``; return the exit status.

    Prints the summary (or, with ``--tree``, the tree) as JSON on ``out``. Returns 0 on
    success, 1 if the blob is malformed or its TOC digest mismatches, 2 if the file
    cannot be read; the reason goes to ``err`` as one line.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    fetcher = FileBlobFetcher(args.blob)
    try:
        result = asyncio.run(inspect_fetcher(
            fetcher,
            expected_toc_digest=args.toc_digest,
            max_toc_bytes=args.max_toc_bytes,
            with_tree=args.tree,
        ))
    except FormatError as exc:
        print(f"lazysnap inspect: {args.blob}: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"lazysnap inspect: {exc}", file=err)
        return 2
    json.dump(result["tree"] if args.tree else result, out, indent=2, ensure_ascii=False)
    out.write("\n")
    return 0
