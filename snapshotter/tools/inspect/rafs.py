"""``lazysnap inspect`` for nydus RAFS bootstraps, and the command that also serves eStargz.

``inspect_rafs(bootstrap)`` summarises a RAFS v5/v6 bootstrap (format, superblock fields,
blob table, counts); ``verify_blobs(index, blob_dir)`` reads every chunk of every regular
file from the blob files in a directory (``<blob_dir>/<blob id>``, the layout of nydus'
``localfs`` backend) and checks it against its digest.

``add_arguments`` + ``run`` are the ``inspect`` subcommand. The input may be an eStargz blob
(handed to ``snapshotter.tools.inspect.estargz.run_inspect``), a raw bootstrap (sniffed from
its first bytes with ``formats.detect``), or a nydus bootstrap layer: a tar, optionally
gzipped, holding ``image/image.boot`` (or the legacy ``image.boot``). ``run`` raises nothing
for bad input: it prints one line to stderr and returns 1 (malformed input, a digest
mismatch) or 2 (a file cannot be read, bad usage).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from typing import IO, Any, BinaryIO

from snapshotter.errdefs import DigestMismatch, FormatError, LimitExceeded
from snapshotter.formats import bootstrap_tar, chunkcodec, detect, erofs, estargz, rafs
from snapshotter.formats.index import LayerIndex, Node, NodeKind
from snapshotter.formats.rafs import v5 as rafs_v5
from snapshotter.formats.rafs import v6 as rafs_v6
from snapshotter.tools.inspect import estargz as estargz_inspect

BOOTSTRAP_NAMES = ("image/image.boot", "image.boot")  # preferred first
MAX_BOOTSTRAP_BYTES = bootstrap_tar.MAX_BOOTSTRAP_BYTES


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, bytes):
        return obj.hex()
    return obj


def _superblock(bootstrap: bytes, version: str) -> tuple[dict[str, Any], int, int, list[int]]:
    """(superblock dict, flags, chunk size, raw prefetch table) of either version."""
    if version == detect.RAFS_V5:
        sb5 = rafs_v5.parse_superblock(bootstrap)
        return (_jsonable(sb5), sb5.flags, sb5.block_size,
                rafs_v5.parse_prefetch_table(bootstrap, sb5))
    sb, ext = rafs_v6.parse_superblocks(bootstrap)
    devices = erofs.parse_device_table(bootstrap, sb)
    doc = {"erofs": _jsonable(sb), "rafs": _jsonable(ext), "devices": [
        {"blob_id": d.tag.decode("ascii", "replace"), "blocks": d.blocks,
         "mapped_blkaddr": d.mapped_blkaddr} for d in devices]}
    return doc, ext.flags, ext.chunk_size, rafs_v6.parse_prefetch_table(bootstrap, ext)


def _first_paths(index: LayerIndex) -> dict[int, str]:
    paths: dict[int, str] = {}
    for path, node in index.walk():
        paths.setdefault(node.ino, "/" + path)
    return paths


def _is_whiteout(node: Node) -> bool:
    return node.kind is NodeKind.CHAR and node.rdev_major == node.rdev_minor == 0


def inspect_rafs(bootstrap: bytes) -> dict[str, Any]:
    """Summarise a RAFS v5 or v6 bootstrap.

    Keys: ``format`` (``rafs-v5``/``rafs-v6``), ``version`` (5/6), ``bootstrap_size``,
    ``superblock`` (v5: its fields; v6: ``erofs``, ``rafs`` extended superblock and
    ``devices``), ``flags`` (names), ``compression``, ``digest``, ``chunk_size``,
    ``blobs`` (the blob table), ``inodes`` (by tree type), ``names``, ``hardlinked``
    (non-directories with more than one name), ``whiteouts``, ``opaque_dirs``,
    ``uncompressed_size``, ``chunks`` (chunk references), ``unique_chunks`` and
    ``prefetch`` (``table_entries`` and the ``files`` it selects).

    Raises FormatError if the bootstrap is malformed (see ``formats.rafs.build_index``).
    """
    version = detect.detect_fs_version(bootstrap)
    index = rafs.build_index(bootstrap)
    superblock, flags, chunk_size, prefetch_table = _superblock(bootstrap, version)
    blobs = rafs.parse_blob_table(bootstrap)
    nodes = list(index.nodes.values())
    regs = [n for n in nodes if n.kind is NodeKind.REG]
    paths = _first_paths(index)
    return {
        "format": version,
        "version": 5 if version == detect.RAFS_V5 else 6,
        "bootstrap_size": len(bootstrap),
        "superblock": superblock,
        "flags": rafs.flag_names(flags),
        "compression": sorted({b.compression for b in blobs}) if blobs
        else [rafs.compression_from_flags(flags)],
        "digest": sorted({b.digest for b in blobs}) if blobs
        else [rafs.digest_from_flags(flags)],
        "chunk_size": chunk_size,
        "blobs": [_jsonable(b) for b in blobs],
        "inodes": dict(sorted(Counter(estargz_inspect.TREE_TYPES[n.kind] for n in nodes).items())),
        "names": sum(len(n.children) for n in nodes) + 1,
        "hardlinked": sum(1 for n in nodes if n.kind is not NodeKind.DIR and n.nlink > 1),
        "whiteouts": sum(1 for n in nodes if _is_whiteout(n)),
        "opaque_dirs": sum(1 for n in nodes if rafs.OPAQUE_XATTR in n.xattrs),
        "uncompressed_size": index.total_data_bytes(),
        "chunks": sum(len(n.chunks) for n in regs),
        "unique_chunks": len({(c.blob, c.blob_offset, c.blob_end) for n in regs
                              for c in n.chunks}),
        "prefetch": {"table_entries": len(prefetch_table),
                     "files": [paths[ino] for ino in index.prefetch_inos]},
    }


def _read_range(f: BinaryIO, start: int, end: int, name: str) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise FormatError(f"blob {name} ends before byte {end}")
    return data


def verify_blobs(index: LayerIndex, blob_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify every chunk of every regular file (each inode once).

    Chunk bytes are at ``[blob_offset, blob_end)`` of ``<blob_dir>/<chunk.blob>``; they
    are decompressed and checked with ``chunkcodec.decode_chunk``. A chunk shared by
    several files is read once. Returns ``files``, ``chunks`` (references verified),
    ``unique_chunks``, ``bytes`` (uncompressed bytes of all files) and ``blobs`` (chunk
    references per blob id).

    Raises DigestMismatch (naming the file and chunk) when data does not match its
    digest; FormatError for a chunk without a blob id, a blob shorter than a chunk's
    range or corrupt compressed data; OSError when a blob file cannot be opened or read.
    """
    paths = _first_paths(index)
    verified: set[tuple[str, int, int, str, int, str]] = set()
    per_blob: Counter[str] = Counter()
    files = total = 0
    with contextlib.ExitStack() as stack:
        handles: dict[str, BinaryIO] = {}
        for node in sorted(index.nodes.values(), key=lambda n: n.ino):
            if node.kind is not NodeKind.REG:
                continue
            files += 1
            for chunk in node.chunks:
                if not chunk.blob:
                    raise FormatError(f"{paths.get(node.ino)}: chunk names no blob")
                key = (chunk.blob, chunk.blob_offset, chunk.blob_end, chunk.digest,
                       chunk.size, chunk.compression)
                if key not in verified:
                    if chunk.blob not in handles:
                        path = os.path.join(os.fspath(blob_dir), chunk.blob)
                        handles[chunk.blob] = stack.enter_context(open(path, "rb"))
                    data = _read_range(handles[chunk.blob], chunk.blob_offset, chunk.blob_end,
                                       chunk.blob)
                    try:
                        chunkcodec.decode_chunk(data, chunk)
                    except DigestMismatch as exc:
                        raise DigestMismatch(f"{paths.get(node.ino)}: chunk at file offset "
                                             f"{chunk.file_offset}: {exc}") from None
                    verified.add(key)
                per_blob[chunk.blob] += 1
            total += node.size
    return {"files": files, "chunks": sum(per_blob.values()), "unique_chunks": len(verified),
            "bytes": total, "blobs": dict(sorted(per_blob.items()))}


def add_arguments(parser: argparse.ArgumentParser, *, file_optional: bool = False) -> None:
    """Add the ``inspect`` subcommand's arguments (eStargz and RAFS) to ``parser``; with
    ``file_optional`` FILE may be left out (the command then reads a registry)."""
    parser.add_argument("blob", metavar="FILE", nargs="?" if file_optional else None,
                        help="an eStargz layer blob, a RAFS bootstrap (image.boot), or a nydus "
                             "bootstrap layer tar(.gz) holding image/image.boot")
    parser.add_argument("--tree", action="store_true",
                        help="print only the tree, in the shape of `tree -a -J`")
    parser.add_argument("--blob-dir", metavar="DIR", default=None,
                        help="RAFS: verify every chunk against the blob files in DIR "
                             "(named by blob id)")
    parser.add_argument("--toc-digest", default=None,
                        help="eStargz: verify the TOC JSON against this sha256:<hex> digest")
    parser.add_argument("--max-toc-bytes", type=int, default=estargz.DEFAULT_MAX_TOC_BYTES,
                        help="eStargz: refuse TOC JSON larger than this (default %(default)s)")


def _is_estargz(path: str, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, size - estargz.FOOTER_MAX))
        tail = f.read()
    try:
        estargz.parse_footer(tail)
    except FormatError:
        return False
    return True


def bootstrap_from_tar(path: str) -> bytes | None:
    """The bootstrap inside a nydus bootstrap layer (a tar, plain, gzip or zstd), or None
    if ``path`` is no such layer; read by the one bounded reader,
    ``formats.bootstrap_tar.extract_bootstrap``. LimitExceeded (a FormatError) for a
    layer over its bounds; OSError if the file cannot be opened or read."""
    with open(path, "rb") as f:
        try:
            return bootstrap_tar.extract_bootstrap(f, MAX_BOOTSTRAP_BYTES)
        except LimitExceeded:
            raise
        except FormatError:
            return None  # not a (well-formed) bootstrap layer: the caller says so


def _load(path: str) -> tuple[str, bytes]:
    """("estargz", b"") or ("rafs", bootstrap bytes); FormatError if neither."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(detect.MAX_SUPERBLOCK_SIZE)
    if detect.sniff(head) is not None:
        if size > MAX_BOOTSTRAP_BYTES:
            raise FormatError(f"bootstrap of {size} bytes is larger than {MAX_BOOTSTRAP_BYTES}")
        with open(path, "rb") as f:
            return "rafs", f.read()
    if _is_estargz(path, size):
        return "estargz", b""
    boot = bootstrap_from_tar(path)
    if boot is None:
        raise FormatError("not an eStargz blob, a RAFS bootstrap or a nydus bootstrap layer")
    return "rafs", boot


def _run_rafs(args: argparse.Namespace, boot: bytes, out: IO[str], err: IO[str]) -> None:
    if args.tree:
        index = rafs.build_index(boot)
        if args.blob_dir is not None:
            v = verify_blobs(index, args.blob_dir)
            print(f"verified {v['chunks']} chunks ({v['unique_chunks']} unique) of "
                  f"{v['files']} files", file=err)
        doc: Any = estargz_inspect.tree_json(index)
    else:
        doc = inspect_rafs(boot)
        if args.blob_dir is not None:
            doc["verified"] = verify_blobs(rafs.build_index(boot), args.blob_dir)
    json.dump(doc, out, indent=2, ensure_ascii=False)
    out.write("\n")


def run(args: argparse.Namespace, out: IO[str] | None = None,
        err: IO[str] | None = None) -> int:
    """Run ``lazysnap inspect`` with parsed ``args``; return the exit status.

    RAFS input prints ``inspect_rafs`` (with a ``verified`` key under ``--blob-dir``) or,
    with ``--tree``, the tree (and a verification line on ``err``). eStargz input goes
    to ``snapshotter.tools.inspect.estargz.run_inspect``. Returns 0, 1 (malformed input or a digest
    mismatch) or 2 (unreadable file; ``--blob-dir`` with an eStargz blob).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        kind, boot = _load(args.blob)
        if kind == "estargz":
            if args.blob_dir is not None:
                print("lazysnap inspect: --blob-dir applies to RAFS bootstraps only", file=err)
                return 2
            return estargz_inspect.run_inspect(args, out, err)
        _run_rafs(args, boot, out, err)
    except FormatError as exc:
        print(f"lazysnap inspect: {args.blob}: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"lazysnap inspect: {exc}", file=err)
        return 2
    return 0
