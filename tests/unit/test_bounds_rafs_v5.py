"""Hostile RAFS v5 bootstraps: every one is a FormatError, with bounded memory.

Each case patches a small bootstrap written by ``write_v5`` as its description says: an
inode table declaring 2^32 entries, a root with 2^32 - 1 children, a directory whose
child range points back at its ancestors, a file declaring 2^32 - 1 chunks, an xattr
table of 2^64 - 1 bytes, chunk records with absurd sizes or blob indexes, a tree deeper
than ``MAX_DEPTH``, and 10,000 hard links (which must stay linear). Memory is checked with
``tracemalloc`` (peak under 64 MiB); no test measures time.
"""

from __future__ import annotations

import struct

import pytest

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats import rafs
from snapshotter.formats.rafs import v5 as rafs_v5
from snapshotter.tools.convert.tree import Spec
from tests.memory import PEAK, peak_under
from tests.unit.test_rafs_writer import write_v5

SAMPLE = [
    Spec("a", "dir", 0o755),
    Spec("a/b", "dir", 0o755),
    Spec("a/b/c", "dir", 0o755),
    Spec("a/b/c/file", "reg", data=b"x" * 10_000),
    Spec("link", "symlink", 0o777, target=b"a/b"),
]




def _records(boot: bytes) -> dict[bytes, rafs_v5.Inode]:
    """The inode records by name (root: ``b""``), found through the inode table."""
    sb = rafs_v5.parse_superblock(boot)
    out: dict[bytes, rafs_v5.Inode] = {}
    for i in range(sb.inode_table_entries):
        (value,) = struct.unpack_from("<I", boot, sb.inode_table_offset + 4 * i)
        inode = rafs_v5.parse_inode(boot, value << 3)
        name = boot[inode.name_offset : inode.name_offset + inode.name_size]
        out[b"" if inode.ino == 1 else name] = inode
    return out


def _patch(boot: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(boot)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


@pytest.fixture(scope="module")
def boot() -> bytes:
    return write_v5(SAMPLE).bootstrap


def _refused(boot: bytes, match: str, limit: int = PEAK,
             error: type[FormatError] = FormatError) -> None:
    with peak_under(limit), pytest.raises(error, match=match):
        rafs.build_index(boot)


def test_sample_parses(boot: bytes) -> None:
    assert rafs.build_index(boot).resolve("a/b/c/file") is not None


@pytest.mark.parametrize(("field", "fmt"), [(56, "<I"), (60, "<I"), (64, "<I"), (68, "<I")],
                         ids=["inode-table", "prefetch-table", "blob-table", "ext-blob-table"])
def test_table_declaring_2_pow_32_entries_is_refused_before_it_is_read(
        boot: bytes, field: int, fmt: str) -> None:
    _refused(_patch(boot, field, fmt, 0xFFFF_FFFF), "outside|inodes but|inside the superblock",
             4 << 20)


def test_root_with_a_huge_child_count_is_refused(boot: bytes) -> None:
    root = _records(boot)[b""]
    _refused(_patch(boot, root.offset + 96, "<I", 0xFFFF_FFFF), "outside the inode table",
             4 << 20)


@pytest.mark.parametrize("target", [b"", b"a", b"b"])
def test_directory_whose_children_point_back_at_an_ancestor_is_refused(
        boot: bytes, target: bytes) -> None:
    """a/b/c's child range is replaced by the range of the root, a, or b (a cycle)."""
    records = _records(boot)
    c, ancestor = records[b"c"], records[target]
    bad = _patch(boot, c.offset + 92, "<II", ancestor.child_index, ancestor.child_count)
    _refused(bad, "reached twice", 4 << 20)


def test_directory_listing_the_root_is_refused(boot: bytes) -> None:
    c = _records(boot)[b"c"]
    _refused(_patch(boot, c.offset + 92, "<II", 1, 1), "reached twice", 4 << 20)


def test_file_declaring_2_pow_32_chunks_is_refused_before_reading_them(boot: bytes) -> None:
    f = _records(boot)[b"file"]
    chunk = rafs_v5.parse_superblock(boot).block_size
    bad = _patch(_patch(boot, f.offset + 64, "<Q", 0xFFFF_FFFF * chunk),
                 f.offset + 96, "<I", 0xFFFF_FFFF)
    _refused(bad, "chunk infos", 4 << 20)


def test_xattr_table_of_2_pow_64_bytes_is_refused(boot: bytes) -> None:
    f = _records(boot)[b"file"]
    bad = _patch(boot, f.offset + 80, "<Q", rafs_v5.INODE_FLAG_XATTR)
    bad = _patch(bad, f.xattr_offset, "<Q", (1 << 64) - 1)
    _refused(bad, "xattrs", 4 << 20)


def test_symlink_target_over_the_limit_is_refused(boot: bytes) -> None:
    link = _records(boot)[b"link"]
    _refused(_patch(boot, link.offset + 102, "<H", 0xFFFF), "symlink target", 4 << 20)


@pytest.mark.parametrize(("offset", "value", "match"), [
    (44, rafs.MAX_CHUNK_SIZE + 1, "holds"),  # uncompressed size
    (40, rafs.MAX_COMPRESSED_CHUNK + 1, "absurd"),  # compressed size
    (32, 7, "names blob 7"),  # blob index past the blob table
])
def test_chunk_records_with_absurd_sizes_or_blobs(boot: bytes, offset: int, value: int,
                                                  match: str) -> None:
    f = _records(boot)[b"file"]
    first_chunk = f.xattr_offset
    _refused(_patch(boot, first_chunk + offset, "<I", value), match, 4 << 20)


def test_tree_deeper_than_max_depth_is_refused_iteratively() -> None:
    specs = [Spec("/".join(["d"] * i), "dir", 0o755) for i in range(1, rafs.MAX_DEPTH + 2)]
    boot = write_v5(specs).bootstrap
    _refused(boot, "deeper than", error=LimitExceeded)
    assert len(rafs.build_index(write_v5(specs[:-1]).bootstrap).nodes) == rafs.MAX_DEPTH + 1


def test_ten_thousand_hard_links_stay_linear() -> None:
    specs = [Spec("f", "reg", data=b"x" * 5000)]
    specs += [Spec(f"h{i:05d}", "hardlink", link="f") for i in range(10_000)]
    boot = write_v5(specs).bootstrap
    with peak_under():
        index = rafs.build_index(boot)
    node = index.resolve("h00042")
    assert node is not None and node.nlink == 10_001
    assert len({index.root.children[n] for n in index.root.children}) == 1


def test_every_table_entry_naming_one_record_is_refused(boot: bytes) -> None:
    """All inode-table entries pointing at the file's record: one name, listed twice."""
    records = _records(boot)
    sb = rafs_v5.parse_superblock(boot)
    bad = bytearray(boot)
    value = records[b"file"].offset >> 3
    for i in range(1, sb.inode_table_entries):
        struct.pack_into("<I", bad, sb.inode_table_offset + 4 * i, value)
    _refused(bytes(bad), "twice|overlap", 4 << 20)
