"""eStargz reader: footer, TOC extraction and verification, index rules, chunk reads.

Blobs come from the test writer (``tests.estargz_writer``) or, for interoperability, a
small blob converted by stargz-snapshotter's ``ctr-remote image convert --estargz``
embedded at the end of this file. Rules come from protocol-reference §3.4 and §4.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import stat
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from snapshotter.errdefs import DigestMismatch, FormatError
from snapshotter.formats import estargz as E
from snapshotter.formats.index import ROOT_INO, Chunk, LayerIndex, Node, NodeKind
from snapshotter.tools.inspect.estargz import (
    add_inspect_arguments,
    inspect_estargz_blob,
    inspect_fetcher,
    run_inspect,
    tree_json,
)
from tests import estargz_writer as W

# --- helpers -------------------------------------------------------------------------

BLOB = 1 << 20


def toc(*entries: dict[str, Any], version: Any = 1) -> bytes:
    return json.dumps({"version": version, "entries": list(entries)}).encode()


def index_of(*entries: dict[str, Any], blob_size: int = BLOB) -> LayerIndex:
    return E.build_index(toc(*entries), blob_size)


def reg(name: str, size: int = 0, offset: int = 0, **kw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": "reg", "size": size, **kw}
    if offset:
        entry["offset"] = offset
    return entry


def path_map(index: LayerIndex) -> dict[str, Node]:
    return {path: node for path, node in index.walk()}


def read_file(blob: bytes, node: Node) -> bytes:
    return b"".join(E.read_chunk(blob[c.blob_offset : c.blob_end], c) for c in node.chunks)


def open_blob(blob: bytes) -> tuple[E.Footer, bytes, LayerIndex]:
    footer = E.parse_footer(blob[-E.FOOTER_MAX :])
    start, end = footer.toc_range(len(blob))
    toc_json = E.extract_toc(blob[start:end])
    return footer, toc_json, E.build_index(toc_json, len(blob))


class MemoryFetcher:
    """A BlobFetcher over bytes that records the ranges asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: list[tuple[int, int]] = []

    @property
    def digest(self) -> str:
        return W.sha256(self.data)

    async def size(self) -> int:
        return len(self.data)

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.requests += ranges
        return [self.data[a:b] for a, b in ranges]

    async def aclose(self) -> None:
        return None


SAMPLE = [
    W.directory("etc", mode=0o750, uid=1, gid=2, mtime=1_600_000_000),
    W.reg("etc/hosts", b"127.0.0.1 localhost\n", uid=1000, gid=1000, uname="u", gname="g"),
    W.reg("etc/big", bytes(range(256)) * 40),
    W.reg("etc/empty"),
    W.symlink("etc/abs", "/etc/hosts"),
    W.symlink("etc/up", "../../../x"),
    W.hardlink("etc/hard", "etc/hosts"),
    W.char_device("dev/null", 1, 3, mode=0o666),
    W.block_device("dev/sda", 8, 0, mode=0o660),
    W.fifo("dev/fifo"),
    W.reg("xa", b"x", xattrs={"user.foo": b"bar", "security.capability": b"\x01\x00\xff"}),
]


# --- footer --------------------------------------------------------------------------


def test_estargz_footer_is_parsed_from_a_written_blob() -> None:
    out = W.build_estargz(SAMPLE)
    footer = E.parse_footer(out.blob[-51:])
    assert footer == E.Footer(footer.toc_offset, 51, "estargz")
    assert out.blob[footer.toc_offset : footer.toc_offset + 2] == b"\x1f\x8b"
    assert footer.toc_range(len(out.blob)) == (footer.toc_offset, len(out.blob) - 51)


def test_footer_tail_may_be_longer_than_51_bytes() -> None:
    out = W.build_estargz(SAMPLE)
    assert E.parse_footer(out.blob[-200:]) == E.parse_footer(out.blob[-51:])


@pytest.mark.parametrize("mtime", [0, 1_234_567_890])
def test_legacy_footer_is_parsed_as_a_gzip_header(mtime: int) -> None:
    footer = E.parse_footer(b"junk" + W.legacy_footer(0x1234, mtime=mtime))
    assert footer == E.Footer(0x1234, 47, "stargz-legacy")


def test_legacy_blob_opens_end_to_end() -> None:
    out = W.build_estargz(SAMPLE, legacy=True)
    footer, toc_json, index = open_blob(out.blob)
    assert footer.kind == "stargz-legacy" and toc_json == out.toc_json
    assert read_file(out.blob, path_map(index)["etc/big"]) == bytes(range(256)) * 40


@pytest.mark.parametrize("cut", [1, 4, 10, 50, 51])
def test_truncated_footer_is_a_format_error(cut: int) -> None:
    footer = W.estargz_footer(100)
    with pytest.raises(FormatError, match="no eStargz"):
        E.parse_footer(footer[:-cut])


def test_footer_with_bad_crc_is_not_a_footer() -> None:
    footer = bytearray(W.estargz_footer(100))
    footer[-5] = 1  # CRC of the empty member must be 0
    with pytest.raises(FormatError, match="no eStargz"):
        E.parse_footer(bytes(footer))


@pytest.mark.parametrize("payload", [b"000000000000zz00", b"+000000000000001", b" 00000000000001f"])
def test_footer_offset_must_be_16_hex_digits(payload: bytes) -> None:
    footer = W.estargz_footer(0).replace(b"0" * 16, payload)
    with pytest.raises(FormatError, match="hex"):
        E.parse_footer(footer)


def test_footer_offset_beyond_int64_is_rejected() -> None:
    footer = W.estargz_footer(0).replace(b"0" * 16, b"ffffffffffffffff")
    with pytest.raises(FormatError, match="int64"):
        E.parse_footer(footer)


def test_toc_offset_outside_the_blob_is_rejected() -> None:
    with pytest.raises(FormatError, match="outside"):
        E.Footer(1000, 51, "estargz").toc_range(1000)


def test_external_toc_footer_is_recognised_as_unsupported() -> None:
    sub = b"STARGZEXTERNALTOC"
    extra = b"SG" + struct.pack("<H", len(sub)) + sub
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra))
    footer = header + extra + b"\x01\x00\x00\xff\xff" + bytes(8)
    assert len(footer) == 46
    with pytest.raises(FormatError, match="external TOC is not supported"):
        E.parse_footer(b"xxxxx" + footer)


def test_zstd_chunked_footer_is_recognised_as_unsupported() -> None:
    payload = struct.pack("<QQQQ", 1234, 100, 300, 1) + b"GnUlInUx"
    frame = b"\x50\x2a\x4d\x18" + struct.pack("<I", len(payload)) + payload
    with pytest.raises(FormatError, match="zstd:chunked layers are not supported"):
        E.parse_footer(frame[-51:])


def test_plain_gzip_is_not_estargz() -> None:
    with pytest.raises(FormatError):
        E.parse_footer(gzip.compress(b"hello" * 100)[-51:])


# --- TOC extraction and digest ----------------------------------------------------------


def _member(*infos: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def _info(name: str, data: bytes, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    return info, data


def test_extract_toc_returns_the_json_and_its_digest_matches() -> None:
    out = W.build_estargz(SAMPLE)
    footer = E.parse_footer(out.blob[-51:])
    toc_json = E.extract_toc(out.blob[footer.toc_offset : -51])
    assert toc_json == out.toc_json
    assert E.toc_digest(toc_json) == out.toc_digest == W.sha256(out.toc_json)
    E.verify_toc(toc_json, out.toc_digest)


def test_extract_toc_reads_one_member_only() -> None:
    member = _member(_info("stargz.index.json", b"{}"))
    assert E.extract_toc(member + gzip.compress(b"more") + b"trailing junk") == b"{}"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_extract_toc_accepts_tar_formats(fmt: int) -> None:
    assert E.extract_toc(_member(_info("stargz.index.json", b"[1]"), fmt=fmt)) == b"[1]"


def test_extract_toc_honours_a_pax_path() -> None:
    info, data = _info("x" * 10, b"{}", pax_headers={"path": "stargz.index.json", "mtime": "1.5"})
    assert E.extract_toc(_member((info, data))) == b"{}"


def test_extract_toc_requires_the_toc_name() -> None:
    with pytest.raises(FormatError, match=r"not 'stargz\.index\.json'"):
        E.extract_toc(_member(_info("etc/passwd", b"{}")))


def test_extract_toc_requires_a_regular_file() -> None:
    with pytest.raises(FormatError, match="regular file"):
        E.extract_toc(_member(_info("stargz.index.json", b"", type=tarfile.SYMTYPE)))


def test_extract_toc_refuses_json_over_the_limit() -> None:
    member = _member(_info("stargz.index.json", b" " * 5000))
    assert len(E.extract_toc(member, max_toc_bytes=5000)) == 5000
    with pytest.raises(FormatError, match="more than the limit"):
        E.extract_toc(member, max_toc_bytes=4999)


def test_extract_toc_bounds_inflation_of_a_gzip_bomb() -> None:
    bomb = gzip.compress(bytes(50 << 20))
    with pytest.raises(FormatError, match="more than"):
        E.extract_toc(bomb, max_toc_bytes=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "notgzip", "empty", "zeros"])
def test_extract_toc_rejects_damaged_members(damage: str) -> None:
    member = bytearray(_member(_info("stargz.index.json", b'{"version": 1}' * 50)))
    if damage == "truncate":
        member = member[: len(member) // 2]
    elif damage == "flip":
        member[len(member) // 2] ^= 0xFF
    elif damage == "notgzip":
        member = bytearray(b"PK\x03\x04" + bytes(100))
    elif damage == "empty":
        member = bytearray()
    else:
        member = bytearray(gzip.compress(bytes(2048)))
    with pytest.raises(FormatError):
        E.extract_toc(bytes(member))


def test_extract_toc_rejects_a_bad_tar_checksum() -> None:
    raw = bytearray(tarfile.TarInfo("stargz.index.json").tobuf())
    raw[0] = ord("S")
    with pytest.raises(FormatError, match="checksum"):
        E.extract_toc(gzip.compress(bytes(raw)))


def test_verify_toc_mismatch_raises_digest_mismatch() -> None:
    with pytest.raises(DigestMismatch):
        E.verify_toc(b"{}", W.sha256(b"[]"))
    with pytest.raises(DigestMismatch):
        E.verify_toc(b"{}", "not-a-digest-\u00e9")


# --- build_index: entries and metadata ------------------------------------------------


def test_written_blob_indexes_every_kind_with_its_metadata() -> None:
    out = W.build_estargz(SAMPLE)
    _, _, index = open_blob(out.blob)
    nodes = path_map(index)
    assert index.format == "estargz" and index.blob_size == len(out.blob)
    assert nodes[""].ino == ROOT_INO and nodes[""].mode == 0o755
    etc = nodes["etc"]
    assert (etc.kind, etc.mode, etc.uid, etc.gid) == (NodeKind.DIR, 0o750, 1, 2)
    assert etc.mtime_ns == 1_600_000_000 * 10**9
    hosts = nodes["etc/hosts"]
    assert (hosts.kind, hosts.uid, hosts.gid, hosts.size) == (NodeKind.REG, 1000, 1000, 20)
    assert hosts.digest == W.sha256(b"127.0.0.1 localhost\n")
    assert read_file(out.blob, hosts) == b"127.0.0.1 localhost\n"
    assert nodes["etc/empty"].size == 0 and nodes["etc/empty"].chunks == []
    assert nodes["etc/abs"].link_target == b"/etc/hosts" and nodes["etc/abs"].size == 10
    assert nodes["etc/up"].link_target == b"../../../x"
    assert nodes["etc/abs"].st_mode == stat.S_IFLNK | 0o777
    null = nodes["dev/null"]
    assert (null.kind, null.rdev_major, null.rdev_minor, null.mode) == (NodeKind.CHAR, 1, 3, 0o666)
    assert (nodes["dev/sda"].kind, nodes["dev/sda"].rdev_major) == (NodeKind.BLOCK, 8)
    assert nodes["dev/fifo"].kind is NodeKind.FIFO
    assert nodes["dev"].mode == 0o755  # implicit directory
    assert nodes["xa"].xattrs == {"user.foo": b"bar", "security.capability": b"\x01\x00\xff"}


def test_writer_output_is_a_valid_tar_gz() -> None:
    out = W.build_estargz(SAMPLE, chunk_size=1000, prioritized=["etc/hosts"])
    members = {info.name: (info, data) for info, data in W.read_as_tar(out.blob)}
    assert members["etc/big"][1] == bytes(range(256)) * 40
    assert members["etc/hard"][0].islnk() and members["etc/hard"][0].linkname == "etc/hosts"
    assert members["dev/null"][0].ischr() and members["dev/null"][0].devmajor == 1
    assert members["xa"][0].pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert members[".prefetch.landmark"][1] == b"\x0f"
    assert members["stargz.index.json"][1] == out.toc_json


def test_mode_is_masked_to_permission_bits() -> None:
    index = index_of({"name": "d", "type": "dir", "mode": 0o40755 | 0o7000})
    assert path_map(index)["d"].mode == 0o7755


@pytest.mark.parametrize(("text", "ns"), [
    ("1970-01-01T00:00:01Z", 10**9),
    ("1970-01-01T09:00:01+09:00", 10**9),
    ("1969-12-31T23:59:59-00:00", -(10**9)),
    ("2020-01-01T00:00:00.123456789Z", 1577836800 * 10**9 + 123456789),
    ("2020-01-01t00:00:00.5z", 1577836800 * 10**9 + 500_000_000),
    ("", 0),
])
def test_modtime_is_rfc3339(text: str, ns: int) -> None:
    index = index_of(reg("f", modtime=text))
    assert path_map(index)["f"].mtime_ns == ns


@pytest.mark.parametrize("text", ["2020-01-01", "2020-01-01 00:00:00Z", "2020-02-30T00:00:00Z",
                                  "2020-01-01T00:00:60Z", "2020-01-01T00:00:00+24:00",
                                  "2020-01-01T00:00:00+01:60", "yesterday"])
def test_bad_modtime_is_a_format_error(text: str) -> None:
    with pytest.raises(FormatError, match="modtime"):
        index_of(reg("f", modtime=text))


def test_unknown_keys_are_ignored_and_null_means_absent() -> None:
    index = index_of(reg("f", NumLink=5, future={"x": 1}, uid=None, xattrs=None))
    assert path_map(index)["f"].nlink == 1
    assert E.build_index(b'{"version": 1, "extra": true}', 10).root.children == {}


def test_empty_toc_gives_an_empty_root() -> None:
    for doc in (b'{"version": 1}', b'{"version": 1, "entries": null}', toc()):
        index = E.build_index(doc, 100)
        assert list(index.nodes) == [ROOT_INO] and index.root.mode == 0o755


@pytest.mark.parametrize(("doc", "match"), [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "not an object"),
    (b'{"version": NaN}', "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"version": 2, "entries": []}', "version"),
    (b'{"version": "1", "entries": []}', "version"),
    (b'{"version": true, "entries": []}', "version"),
    (b'{"entries": []}', "version"),
    (b'{"version": 1, "entries": {}}', "not a list"),
    (b'{"version": 1, "entries": [1]}', "not an object"),
])
def test_malformed_toc_documents(doc: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        E.build_index(doc, BLOB)


@pytest.mark.parametrize(("entry", "match"), [
    ({"name": "f", "type": "socket"}, "unknown type"),
    ({"name": 3, "type": "reg"}, "'name' must be a string"),
    ({"name": "f", "type": "reg", "size": "3"}, "'size' must be an integer"),
    ({"name": "f", "type": "reg", "size": 1.0}, "'size' must be an integer"),
    ({"name": "f", "type": "reg", "size": True}, "'size' must be an integer"),
    ({"name": "f", "type": "reg", "size": -1}, "out of range"),
    ({"name": "f", "type": "reg", "uid": 1 << 32}, "out of range"),
    ({"name": "f", "type": "reg", "size": 1 << 63}, "out of range"),
    ({"name": "f", "type": "reg", "size": 1, "offset": BLOB}, "past the end of the data"),
    ({"name": "f", "type": "reg", "size": 1}, "no payload offset"),
    ({"name": "f", "type": "reg", "digest": "md5:00"}, "not a sha256"),
    ({"name": "f", "type": "reg", "xattrs": {"user.a": "!!"}}, "base64"),
    ({"name": "f", "type": "reg", "xattrs": {"user.a": 1}}, "base64"),
    ({"name": "f", "type": "reg", "xattrs": []}, "must be an object"),
    ({"name": "f", "type": "reg", "xattrs": {"": "eA=="}}, "invalid xattr name"),
    ({"name": "f", "type": "symlink"}, "symlink target"),
    ({"name": "f", "type": "symlink", "linkName": "a\u0000b"}, "symlink target"),
    ({"name": "f", "type": "hardlink"}, "hardlink without linkName"),
    ({"name": "a\u0000b", "type": "reg"}, "NUL"),
    ({"name": "x" * 256, "type": "reg"}, "over 255 bytes"),
    ({"name": "d/" + "\u00e9" * 128, "type": "reg"}, "over 255 bytes"),
    ({"name": "../etc/passwd", "type": "reg"}, "escapes the layer root"),
    ({"name": "a/../../b", "type": "reg"}, "escapes the layer root"),
    ({"name": "", "type": "reg"}, "root must be a directory"),
    ({"name": "./", "type": "symlink", "linkName": "x"}, "root must be a directory"),
])
def test_malformed_entries_name_the_problem(entry: dict[str, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        index_of(entry)


def test_json_object_count_is_bounded_while_decoding() -> None:
    doc = b'{"version": 1, "entries": [], "x": [' + b",".join([b"{}"] * 100) + b"]}"
    with pytest.raises(FormatError, match="more than 21 JSON objects"):
        E.build_index(doc, BLOB, max_entries=10)


def test_too_many_entries_is_refused() -> None:
    doc = toc(*(reg(f"f{i}") for i in range(11)))
    assert len(E.build_index(doc, BLOB, max_entries=11).root.children) == 11
    with pytest.raises(FormatError, match="over the limit 10"):
        E.build_index(doc, BLOB, max_entries=10)


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "path"), [
    ("./bin/", "bin"),
    ("/abs/x", "abs/x"),
    ("//abs//y/./", "abs/y"),
    ("a/../b", "b"),
    ("a/b/..", "a"),
    ("with space/and tab\t", "with space/and tab\t"),
    ("\u00fcn\u00efc\u00f8d\u00e9/\U0001f600", "\u00fcn\u00efc\u00f8d\u00e9/\U0001f600"),
    ("x" * 255, "x" * 255),
    ("\u00e9" * 127, "\u00e9" * 127),
])
def test_names_are_normalised_into_the_layer(raw: str, path: str) -> None:
    nodes = path_map(index_of({"name": raw, "type": "dir"}))
    assert path in nodes and nodes[path].kind is NodeKind.DIR


def test_lone_surrogates_become_replacement_characters() -> None:
    index = E.build_index(b'{"version":1,"entries":[{"name":"a\\ud800","type":"reg"}]}', 10)
    assert "a\ufffd" in index.root.children


def test_root_entry_sets_root_metadata() -> None:
    index = index_of({"name": "./", "type": "dir", "mode": 0o700, "uid": 5,
                      "xattrs": {"user.r": "eQ=="}})
    assert (index.root.mode, index.root.uid, index.root.xattrs) == (0o700, 5, {"user.r": b"y"})


def test_five_thousand_entries_in_one_directory() -> None:
    entries = [W.reg(f"d/file-{i:05d}", b"" if i % 2 else b"%d" % i) for i in range(5000)]
    out = W.build_estargz(entries)
    _, _, index = open_blob(out.blob)
    d = index.lookup(ROOT_INO, "d")
    assert d is not None and len(d.children) == 5000
    assert list(d.children) == [f"file-{i:05d}" for i in range(5000)]
    node = index.get(d.children["file-04998"])
    assert read_file(out.blob, node) == b"4998"


def test_odd_names_survive_a_written_blob() -> None:
    names = ["with space", "\u00fcnicode \u2603", "x" * 255, "-dash", "#hash", "new\nline"]
    out = W.build_estargz([W.reg(f"d/{n}", n.encode()) for n in names])
    _, _, index = open_blob(out.blob)
    nodes = path_map(index)
    for name in names:
        assert read_file(out.blob, nodes[f"d/{name}"]) == name.encode()


# --- duplicates and conflicts ---------------------------------------------------------


def test_later_entry_replaces_an_earlier_file() -> None:
    out = W.build_estargz([W.reg("f", b"old"), W.symlink("f", "x"), W.reg("f", b"new")])
    _, _, index = open_blob(out.blob)
    node = index.lookup(ROOT_INO, "f")
    assert node is not None and read_file(out.blob, node) == b"new"
    assert list(index.root.children) == ["f"] and len(index.nodes) == 2


def test_directory_entry_over_directory_updates_metadata_and_keeps_children() -> None:
    index = index_of({"name": "d/f", "type": "reg"}, {"name": "d", "type": "dir", "mode": 0o700})
    d = path_map(index)["d"]
    assert d.mode == 0o700 and "f" in d.children


def test_directory_replaces_a_file() -> None:
    index = index_of(reg("x"), {"name": "x", "type": "dir"}, reg("x/y"))
    assert path_map(index)["x/y"].kind is NodeKind.REG


def test_file_over_directory_is_a_conflict() -> None:
    with pytest.raises(FormatError, match="replaces directory"):
        index_of({"name": "d", "type": "dir"}, reg("d"))


def test_path_through_a_file_is_a_conflict() -> None:
    with pytest.raises(FormatError, match="not a directory"):
        index_of(reg("f"), reg("f/g"))


def test_inode_numbers_follow_toc_order_and_are_stable() -> None:
    doc = toc(reg("b"), reg("a/x"), {"name": "a", "type": "dir"}, reg("c"))
    first, second = E.build_index(doc, BLOB), E.build_index(doc, BLOB)
    inos = {p: n.ino for p, n in first.walk()}
    assert inos == {"": 1, "b": 2, "a": 3, "a/x": 4, "c": 5}
    assert inos == {p: n.ino for p, n in second.walk()}


# --- hard links ------------------------------------------------------------------------


def test_hardlinks_share_one_inode_with_the_right_nlink() -> None:
    out = W.build_estargz([W.reg("a", b"data"), W.hardlink("d/b", "a"), W.hardlink("c", "./d/b")])
    _, _, index = open_blob(out.blob)
    nodes = path_map(index)
    assert nodes["a"].ino == nodes["d/b"].ino == nodes["c"].ino
    assert nodes["a"].nlink == 3
    assert read_file(out.blob, nodes["c"]) == b"data"


def test_hardlink_keeps_the_old_inode_when_the_name_is_replaced() -> None:
    index = index_of(reg("a", mode=0o600), {"name": "b", "type": "hardlink", "linkName": "a"},
                     reg("a", mode=0o644))
    nodes = path_map(index)
    assert nodes["a"].ino != nodes["b"].ino
    assert (nodes["a"].nlink, nodes["b"].nlink, nodes["b"].mode) == (1, 1, 0o600)


def test_hardlink_to_a_missing_target_is_an_error() -> None:
    with pytest.raises(FormatError, match="does not exist"):
        index_of({"name": "b", "type": "hardlink", "linkName": "a"}, reg("a"))


def test_hardlink_to_a_directory_is_an_error() -> None:
    with pytest.raises(FormatError, match="is a directory"):
        index_of({"name": "d", "type": "dir"}, {"name": "b", "type": "hardlink", "linkName": "d"})


def test_directory_nlink_counts_subdirectories() -> None:
    index = index_of(reg("a/b/f"), {"name": "a/c", "type": "dir"})
    nodes = path_map(index)
    assert (nodes[""].nlink, nodes["a"].nlink, nodes["a/b"].nlink) == (3, 4, 2)


# --- whiteouts, opaque, hidden files, prefetch ----------------------------------------


def test_whiteout_becomes_a_char_device_0_0() -> None:
    index = index_of(reg("d/.wh.gone", uid=3, modtime="1970-01-01T00:00:02Z"))
    node = path_map(index)["d/gone"]
    assert (node.kind, node.rdev_major, node.rdev_minor, node.mode) == (NodeKind.CHAR, 0, 0, 0)
    assert (node.uid, node.mtime_ns) == (3, 2 * 10**9)
    assert ".wh.gone" not in path_map(index)["d"].children


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_real_entry_hides_its_whiteout(whiteout_first: bool) -> None:
    entries = [reg(".wh.x"), reg("x", size=0)]
    index = index_of(*(entries if whiteout_first else entries[::-1]))
    assert list(index.root.children) == ["x"] and len(index.nodes) == 2
    assert path_map(index)["x"].kind is NodeKind.REG


def test_opaque_marker_sets_the_overlay_xattr() -> None:
    out = W.build_estargz([W.directory("d", xattrs={"user.k": b"v"}), W.opaque("d"),
                           W.reg("d/kept", b"k"), W.opaque("")])
    _, _, index = open_blob(out.blob)
    d = path_map(index)["d"]
    assert d.xattrs == {"user.k": b"v", "trusted.overlay.opaque": b"y"}
    assert list(d.children) == ["kept"]
    assert index.root.xattrs == {"trusted.overlay.opaque": b"y"}


def test_aufs_metadata_is_dropped_and_whiteout_dirs_are_rejected() -> None:
    index = index_of(reg(".wh..wh.plnk/1234.5"), {"name": ".wh..wh.aufs", "type": "dir"}, reg("k"))
    assert list(index.root.children) == ["k"]
    with pytest.raises(FormatError, match="whiteout name is used as a directory"):
        index_of(reg(".wh.d/f"))
    with pytest.raises(FormatError, match="whiteout for an invalid name"):
        index_of(reg("d/.wh."))


def test_toc_entry_and_landmarks_are_hidden_only_at_the_root() -> None:
    index = index_of(reg("stargz.index.json"), reg(".no.prefetch.landmark", 1, 10),
                     reg(".prefetch.landmark", 1, 20), reg("sub/.prefetch.landmark"),
                     reg("sub/stargz.index.json"))
    assert list(index.root.children) == ["sub"]
    assert set(path_map(index)["sub"].children) == {".prefetch.landmark", "stargz.index.json"}
    with pytest.raises(FormatError, match="must be a regular file"):
        index_of({"name": ".prefetch.landmark", "type": "dir"})


def test_prefetch_landmark_lists_prioritised_files() -> None:
    entries = [W.reg("a", b"a" * 100), W.reg("p/one", b"1"), W.reg("p/two", b"2" * 3000),
               W.reg("p/empty"), W.reg("z", b"z")]
    out = W.build_estargz(entries, chunk_size=1000, prioritized=["p/two", "p/one", "p/empty"])
    _, toc_json, index = open_blob(out.blob)
    landmark = next(e for e in json.loads(toc_json)["entries"]
                    if e["name"] == ".prefetch.landmark")
    nodes = path_map(index)
    assert index.prefetch_blob_end == landmark["offset"]
    assert index.prefetch_inos == [nodes["p/two"].ino, nodes["p/one"].ino]
    assert not index.no_prefetch and ".prefetch.landmark" not in index.root.children


def test_prefetch_covers_files_sharing_the_landmark_member() -> None:
    entries = [W.reg("p", b"p" * 10), W.reg("q", b"q" * 10), W.reg("z", b"z")]
    out = W.build_estargz(entries, prioritized=["p", "q"], min_chunk_size=10_000)
    _, toc_json, index = open_blob(out.blob)
    landmark = next(e for e in json.loads(toc_json)["entries"]
                    if e["name"] == ".prefetch.landmark")
    assert landmark.get("innerOffset")  # the landmark shares a member with p and q
    nodes = path_map(index)
    assert index.prefetch_inos == [nodes["p"].ino, nodes["q"].ino]
    assert index.prefetch_blob_end >= nodes["q"].chunks[0].blob_end


def test_no_prefetch_landmark() -> None:
    _, _, index = open_blob(W.build_estargz(SAMPLE).blob)
    assert index.no_prefetch and index.prefetch_inos == [] and index.prefetch_blob_end == 0
    _, _, index = open_blob(W.build_estargz(SAMPLE, landmark=False).blob)
    assert not index.no_prefetch and index.prefetch_inos == []


def test_no_prefetch_wins_over_prefetch() -> None:
    index = index_of(reg(".prefetch.landmark", 1, 10), reg(".no.prefetch.landmark", 1, 20))
    assert index.no_prefetch and index.prefetch_inos == []


# --- chunks and nextOffset --------------------------------------------------------------


def test_chunks_tile_the_file_and_end_at_the_next_member() -> None:
    data = bytes(range(256)) * 50  # 12800 bytes
    out = W.build_estargz([W.reg("a", data), W.reg("b", b"tail")], chunk_size=4096)
    _, toc_json, index = open_blob(out.blob)
    nodes = path_map(index)
    chunks = nodes["a"].chunks
    assert [(c.file_offset, c.size) for c in chunks] == [(0, 4096), (4096, 4096),
                                                         (8192, 4096), (12288, 512)]
    offsets = [e["offset"] for e in json.loads(toc_json)["entries"] if "offset" in e]
    for c in chunks:
        assert c.inner_offset == 0 and c.compression == "gzip" and c.digest.startswith("sha256:")
        assert c.blob_end == min(o for o in offsets if o > c.blob_offset)
    last = nodes["b"].chunks[0]
    assert last.blob_end == len(out.blob)  # the final data entry runs to the blob end
    assert read_file(out.blob, nodes["a"]) == data
    assert read_file(out.blob, nodes["b"]) == b"tail"


def test_explicit_last_chunk_size_is_accepted() -> None:
    def explicit(doc: dict[str, Any]) -> None:
        for e in doc["entries"]:
            if e.get("type") in ("reg", "chunk") and e.get("offset"):
                e["chunkSize"] = 1000 if e.get("chunkOffset", 0) < 2000 else 500
    out = W.build_estargz([W.reg("a", b"q" * 2500)], chunk_size=1000, toc_modifier=explicit)
    _, _, index = open_blob(out.blob)
    assert [c.size for c in path_map(index)["a"].chunks] == [1000, 1000, 500]


def test_shared_members_use_inner_offset() -> None:
    files = [W.reg(f"f{i}", bytes([i]) * (100 + i)) for i in range(8)]
    out = W.build_estargz(files, min_chunk_size=3000)
    _, _, index = open_blob(out.blob)
    nodes = path_map(index)
    chunks = [nodes[f"f{i}"].chunks[0] for i in range(8)]
    assert any(c.inner_offset for c in chunks)
    assert len({c.blob_offset for c in chunks}) < 8
    for c in chunks:
        assert c.blob_offset < c.blob_end
    for i in range(8):
        assert read_file(out.blob, nodes[f"f{i}"]) == bytes([i]) * (100 + i)


def test_chunk_digest_falls_back_to_the_file_digest_for_single_chunks() -> None:
    def strip(doc: dict[str, Any]) -> None:
        for e in doc["entries"]:
            e.pop("chunkDigest", None)
    out = W.build_estargz([W.reg("one", b"1"), W.reg("two", b"22" * 600)], chunk_size=1000,
                          toc_modifier=strip)
    _, _, index = open_blob(out.blob)
    nodes = path_map(index)
    assert nodes["one"].chunks[0].digest == W.sha256(b"1")
    assert [c.digest for c in nodes["two"].chunks] == ["", ""]
    with pytest.raises(FormatError, match="no digest"):
        read_file(out.blob, nodes["two"])
    c = nodes["two"].chunks[0]
    data = E.read_chunk(out.blob[c.blob_offset : c.blob_end], c, require_digest=False)
    assert data == b"2" * 1000


@pytest.mark.parametrize(("entries", "match"), [
    ([reg("a", 10, 100, chunkSize=4), {"name": "a", "type": "chunk", "offset": 200,
                                        "chunkOffset": 5}], "chunk at 5, expected 4"),
    ([reg("a", 10, 100, chunkSize=4)], "chunks cover 4 of 10"),
    ([reg("a", 10, 100, chunkSize=11)], "invalid size"),
    ([reg("a", 10, 100, chunkOffset=1)], "chunk at 1, expected 0"),
    ([{"name": "a", "type": "chunk", "offset": 10}], "does not follow a reg"),
    ([reg("a", 0), {"name": "a", "type": "chunk", "offset": 10}], "empty file with chunk"),
    ([{"name": "d", "type": "dir"}, {"name": "d", "type": "chunk"}], "does not follow a reg"),
    ([reg("a", 1, 300), reg("b", 1, 200)], "empty compressed range"),
    ([reg("a", 1, 300), reg("b", 1, 300)], "empty compressed range"),
])
def test_chunk_errors(entries: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        index_of(*entries)


def test_chunk_without_explicit_size_runs_to_the_next_chunk() -> None:
    index = index_of(reg("a", 10, 100), {"name": "a", "type": "chunk", "offset": 200,
                                         "chunkOffset": 6})
    assert [(c.size, c.blob_offset, c.blob_end) for c in path_map(index)["a"].chunks] == [
        (6, 100, 200), (4, 200, BLOB)]


# --- read_chunk ------------------------------------------------------------------------


def _single_chunk(data: bytes) -> tuple[bytes, Chunk]:
    member = gzip.compress(b"H" * 7 + data)
    return member, Chunk(0, len(data), 0, len(member), 7, W.sha256(data), "gzip")


def test_read_chunk_skips_inner_offset_and_verifies() -> None:
    member, chunk = _single_chunk(b"payload")
    assert E.read_chunk(member + b"next member bytes", chunk) == b"payload"


def test_read_chunk_digest_mismatch() -> None:
    member, _ = _single_chunk(b"payload")
    bad = Chunk(0, 7, 0, len(member), 7, W.sha256(b"other"), "gzip")
    with pytest.raises(DigestMismatch):
        E.read_chunk(member, bad)


def test_read_chunk_detects_a_tampered_blob() -> None:
    out = W.build_estargz([W.reg("a", b"abc" * 1000)])
    _, _, index = open_blob(out.blob)
    c = path_map(index)["a"].chunks[0]
    evil = bytearray(out.blob)
    evil[c.blob_offset + 20 : c.blob_offset + 40] = gzip.compress(b"X" * 3000)[10:30]
    with pytest.raises(FormatError):  # corrupt deflate data or a digest mismatch
        E.read_chunk(bytes(evil[c.blob_offset : c.blob_end]), c)
    swapped = gzip.compress(b"abd" * 1000)
    with pytest.raises(DigestMismatch):
        E.read_chunk(swapped, c)


@pytest.mark.parametrize("damage", ["short", "garbage", "truncated", "other-compression"])
def test_read_chunk_malformed_input(damage: str) -> None:
    member, chunk = _single_chunk(b"payload")
    if damage == "short":
        member = gzip.compress(b"H" * 7 + b"pay")
    elif damage == "garbage":
        member = b"\x00" * 30
    elif damage == "truncated":
        member = member[:12]
    else:
        chunk = Chunk(0, 7, 0, 10, 7, chunk.digest, "zstd")
    with pytest.raises(FormatError):
        E.read_chunk(member, chunk)


def test_read_chunk_rejects_negative_geometry() -> None:
    member, chunk = _single_chunk(b"payload")
    with pytest.raises(FormatError, match="negative"):
        E.read_chunk(member, Chunk(0, 7, 0, len(member), -1, chunk.digest, "gzip"))


def test_read_chunk_of_size_zero() -> None:
    assert E.read_chunk(b"", Chunk(0, 0, 0, 0, 0, W.sha256(b""), "gzip")) == b""


def test_read_chunk_bounds_output() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = bomb.compress(bytes(64 << 20)) + bomb.flush()
    data = E.read_chunk(member, Chunk(0, 10, 0, len(member), 5, W.sha256(bytes(10)), "gzip"))
    assert data == bytes(10)


# --- open_layer ------------------------------------------------------------------------


async def test_open_layer_fetches_tail_then_toc() -> None:
    out = W.build_estargz(SAMPLE)
    fetcher = MemoryFetcher(out.blob)
    index, toc_json = await E.open_layer(fetcher, out.toc_digest)
    footer = E.parse_footer(out.blob[-51:])
    assert toc_json == out.toc_json
    assert fetcher.requests == [(len(out.blob) - 51, len(out.blob)),
                                (footer.toc_offset, len(out.blob) - 51)]
    nodes = path_map(index)
    assert read_file(out.blob, nodes["etc/big"]) == bytes(range(256)) * 40
    # The final payload's range stops at the TOC member instead of the blob end.
    assert max(c.blob_end for n in nodes.values() for c in n.chunks) == footer.toc_offset
    assert read_file(out.blob, nodes["xa"]) == b"x"


def test_data_end_bounds_payload_offsets() -> None:
    doc = toc(reg("a", 1, 100), reg("b", 1, 200))
    index = E.build_index(doc, BLOB, data_end=300)
    assert [c.blob_end for _, n in index.walk() for c in n.chunks] == [200, 300]
    with pytest.raises(FormatError, match="past the end of the data 150"):
        E.build_index(doc, BLOB, data_end=150)
    with pytest.raises(FormatError, match="outside the blob"):
        E.build_index(doc, BLOB, data_end=BLOB + 1)


async def test_open_layer_without_expected_digest_skips_verification() -> None:
    out = W.build_estargz(SAMPLE)
    index, _ = await E.open_layer(MemoryFetcher(out.blob), None)
    assert "etc" in index.root.children


async def test_open_layer_digest_mismatch() -> None:
    out = W.build_estargz(SAMPLE)
    with pytest.raises(DigestMismatch):
        await E.open_layer(MemoryFetcher(out.blob), W.sha256(b"something else"))


@pytest.mark.parametrize("blob", [b"", b"x", gzip.compress(b"plain layer" * 100)])
async def test_open_layer_rejects_non_estargz(blob: bytes) -> None:
    with pytest.raises(FormatError):
        await E.open_layer(MemoryFetcher(blob), None)


async def test_open_layer_bounds_the_toc() -> None:
    out = W.build_estargz(SAMPLE)
    with pytest.raises(FormatError, match="limit"):
        await E.open_layer(MemoryFetcher(out.blob), None, max_toc_bytes=100)


async def test_open_layer_rejects_an_oversized_compressed_toc_before_fetching_it() -> None:
    fake = bytes(3 << 20) + W.estargz_footer(0)
    fetcher = MemoryFetcher(fake)
    with pytest.raises(FormatError, match="over the limit"):
        await E.open_layer(fetcher, None, max_toc_bytes=10)
    assert len(fetcher.requests) == 1


async def test_open_layer_rejects_a_toc_offset_past_the_end() -> None:
    with pytest.raises(FormatError, match="outside the blob"):
        await E.open_layer(MemoryFetcher(b"x" * 10 + W.estargz_footer(10)), None)


# --- inspect ---------------------------------------------------------------------------


def test_inspect_summarises_a_blob() -> None:
    out = W.build_estargz([*SAMPLE, W.reg("p", b"p")], chunk_size=4096, prioritized=["p"])
    info = inspect_estargz_blob(out.blob)
    footer = E.parse_footer(out.blob[-51:])
    assert info["format"] == "estargz" and info["footer"] == {"kind": "estargz", "size": 51}
    assert info["toc_offset"] == footer.toc_offset and info["toc_digest"] == out.toc_digest
    assert info["entries"] == {"block": 1, "char": 1, "chunk": 2, "dir": 1, "fifo": 1,
                               "hardlink": 1, "reg": 6, "symlink": 2}
    assert info["uncompressed_size"] == 20 + 10240 + 1 + 1
    assert info["chunks"] == 3 + 1 + 1 + 1
    assert info["prefetch"]["mode"] == "landmark" and info["prefetch"]["files"] == ["p"]
    assert inspect_estargz_blob(W.build_estargz(SAMPLE).blob)["prefetch"] == {"mode": "none"}


def test_tree_json_has_the_shape_of_tree_dash_j() -> None:
    index = index_of({"name": "b/empty", "type": "dir"}, reg("a"), reg("b/Z"),
                     {"name": "b/ln", "type": "symlink", "linkName": "empty"},
                     {"name": "b/up", "type": "symlink", "linkName": "../b/ln"},
                     {"name": "b/abs", "type": "symlink", "linkName": "/b"},
                     {"name": "b/out", "type": "symlink", "linkName": "../../b"},
                     {"name": "h", "type": "hardlink", "linkName": "a"},
                     {"name": "c", "type": "char"}, reg(".wh.gone"), {"name": "f", "type": "fifo"})
    assert tree_json(index) == [
        {"type": "directory", "name": ".", "contents": [
            {"type": "file", "name": "a"},
            {"type": "directory", "name": "b", "contents": [
                {"type": "file", "name": "Z"},
                {"type": "link", "name": "abs", "target": "/b"},
                {"type": "directory", "name": "empty"},
                {"type": "link", "name": "ln", "target": "empty"},
                {"type": "link", "name": "out", "target": "../../b"},
                {"type": "link", "name": "up", "target": "../b/ln"},
            ]},
            {"type": "char", "name": "c"},
            {"type": "fifo", "name": "f"},
            {"type": "char", "name": "gone"},
            {"type": "file", "name": "h"},
        ]},
        {"type": "report", "directories": 4, "files": 8},
    ]


def test_tree_json_of_an_empty_layer() -> None:
    assert tree_json(E.build_index(toc(), 10)) == [
        {"type": "directory", "name": "."}, {"type": "report", "directories": 0, "files": 0}]


def _run(argv: list[str]) -> tuple[int, str, str]:
    import argparse
    parser = argparse.ArgumentParser()
    add_inspect_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    return run_inspect(parser.parse_args(argv), out, err), out.getvalue(), err.getvalue()


def test_run_inspect_on_a_file(tmp_path: Path) -> None:
    out = W.build_estargz(SAMPLE)
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(out.blob)
    code, stdout, _ = _run([str(path), "--toc-digest", out.toc_digest])
    assert code == 0 and json.loads(stdout)["toc_digest"] == out.toc_digest
    code, stdout, _ = _run([str(path), "--tree"])
    assert code == 0 and json.loads(stdout)[-1]["type"] == "report"
    code, _, err = _run([str(path), "--toc-digest", W.sha256(b"")])
    assert code == 1 and "digest" in err
    path.write_bytes(b"not a layer")
    assert _run([str(path)])[0] == 1
    assert _run([str(tmp_path / "missing")])[0] == 2


async def test_inspect_fetcher_with_tree() -> None:
    out = W.build_estargz(SAMPLE)
    info = await inspect_fetcher(MemoryFetcher(out.blob), expected_toc_digest=out.toc_digest,
                                 with_tree=True)
    assert info["tree"] == tree_json(open_blob(out.blob)[2])


# --- a blob written by stargz-snapshotter's converter -----------------------------------
# `ctr-remote image convert --estargz --oci --estargz-chunk-size 4096 --estargz-record-in`
# (stargz-snapshotter as packaged in Debian 12) of a layer holding dirs, a 20 KiB file,
# an empty file, absolute symlink, hardlink, char/block/fifo, an opaque dir with a
# whiteout, a unicode name and an xattr; prioritised files: etc/big, "x/with space ü".

REAL_TOC_DIGEST = "sha256:2dbf7d4a8439f24f54fe12ac1ef031c5b449c6b6d3596770f259bf59d481f257"
REAL_BLOB_DIGEST = "sha256:1f49ecbba875f74be2879e8a18a8b9297b2bab30ce4094b8c97bbac1ce80d70e"


def test_blob_from_the_stargz_converter() -> None:
    blob = base64.b64decode("".join(REAL_BLOB_B64.split()))
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == REAL_BLOB_DIGEST
    footer, toc_json, index = open_blob(blob)
    assert footer.kind == "estargz"
    E.verify_toc(toc_json, REAL_TOC_DIGEST)
    nodes = path_map(index)
    by_tar = {info.name.rstrip("/"): (info, data) for info, data in W.read_as_tar(blob)}
    for path, node in nodes.items():
        if node.kind is NodeKind.REG and path != "etc/hard":
            assert read_file(blob, node) == by_tar[path][1], path
    assert nodes["etc/hard"].ino == nodes["etc/hosts"].ino and nodes["etc/hosts"].nlink == 2
    assert nodes["etc/link"].link_target == b"/etc/hosts"
    assert nodes["x"].xattrs == {"trusted.overlay.opaque": b"y"}
    assert nodes["x/gone"].kind is NodeKind.CHAR
    assert nodes["xa"].xattrs == {"user.foo": b"bar"}
    assert (nodes["dev/null"].rdev_major, nodes["dev/null"].rdev_minor) == (1, 3)
    assert [c.size for c in nodes["etc/big"].chunks] == [4096] * 5
    assert index.prefetch_inos == [nodes["etc/big"].ino, nodes["x/with space \u00fc"].ino]
    assert index.prefetch_blob_end > 0 and not index.no_prefetch
    assert inspect_estargz_blob(blob)["toc_digest"] == REAL_TOC_DIGEST


async def test_blob_from_the_stargz_converter_through_open_layer() -> None:
    blob = base64.b64decode("".join(REAL_BLOB_B64.split()))
    index, _ = await E.open_layer(MemoryFetcher(blob), REAL_TOC_DIGEST)
    by_tar = {info.name.rstrip("/"): data for info, data in W.read_as_tar(blob)}
    for path, node in index.walk():
        if node.kind is NodeKind.REG and path != "etc/hard":  # tar stores links empty
            assert read_file(blob, node) == by_tar[path], path


REAL_BLOB_B64 = """
H4sIAAAAAAAC/0otSdZnoDEwMDAwMDc1BdMGBgboNJhtaGxuZG5iCBE3NDAwNGRQMGWgAygtLkksYjAwoIYnkT03RAAo/pMy
02ke/2aY8Q6lTTHSgoGhgYmROYOCwWj80xwAAgAA//9ojgixAAQAAB+LCAAAAAAAAv9iYGRiZmFlY+fg5OLm4eXjFxAUEhYR
FROXkJSSlpGVk1dQVFJWUVVT19DU0tbR1dM3MDQyNjE1M7ewtLK2sbWzd3B0cnZxdXP38PTy9vH18w8IDAoOCQ0Lj4iMio6J
jYtPSExKTklNS8/IzMrOyc3LLygsKi4pLSuvqKyqrqmtq29obGpuaW1r7+js6u7p7eufMHHS5ClTp02fMXPW7Dlz581fsHDR
4iVLly1fsXLV6jVr163fsHHT5i1bt23fsXPX7j179+0/cPDQ4SNHjx0/cfLU6TNnz52/cPHS5StXr12/cfPW7Tt3791/8PDR
4ydPnz1/8fLV6zdv373/8PHT5y9fv33/8fPX7z9///0f9f+o/0f9P+r/Uf+P+n/U/6P+H/X/qP9H/T/q/1H/j/p/JPgfEAAA
//+CIJGiABAAAB+LCAAAAAAAAv9iYGRiZmFlY+fg5OLm4eXjFxAUEhYRFROXkJSSlpGVk1dQVFJWUVVT19DU0tbR1dM3MDQy
NjE1M7ewtLK2sbWzd3B0cnZxdXP38PTy9vH18w8IDAoOCQ0Lj4iMio6JjYtPSExKTklNS8/IzMrOyc3LLygsKi4pLSuvqKyq
rqmtq29obGpuaW1r7+js6u7p7eufMHHS5ClTp02fMXPW7Dlz581fsHDR4iVLly1fsXLV6jVr163fsHHT5i1bt23fsXPX7j17
9+0/cPDQ4SNHjx0/cfLU6TNnz52/cPHS5StXr12/cfPW7Tt3791/8PDR4ydPnz1/8fLV6zdv373/8PHT5y9fv33/8fPX7z9/
//0f9f+o/0f9P+r/Uf+P+n/U/6P+H/X/qP9H/T/q/1H/j/p/JPgfEAAA//+CIJGiABAAAB+LCAAAAAAAAv9iYGRiZmFlY+fg
5OLm4eXjFxAUEhYRFROXkJSSlpGVk1dQVFJWUVVT19DU0tbR1dM3MDQyNjE1M7ewtLK2sbWzd3B0cnZxdXP38PTy9vH18w8I
DAoOCQ0Lj4iMio6JjYtPSExKTklNS8/IzMrOyc3LLygsKi4pLSuvqKyqrqmtq29obGpuaW1r7+js6u7p7eufMHHS5ClTp02f
MXPW7Dlz581fsHDR4iVLly1fsXLV6jVr163fsHHT5i1bt23fsXPX7j179+0/cPDQ4SNHjx0/cfLU6TNnz52/cPHS5StXr12/
cfPW7Tt3791/8PDR4ydPnz1/8fLV6zdv373/8PHT5y9fv33/8fPX7z9///0f9f+o/0f9P+r/Uf+P+n/U/6P+H/X/qP9H/T/q
/1H/j/p/JPgfEAAA//+CIJGiABAAAB+LCAAAAAAAAv9iYGRiZmFlY+fg5OLm4eXjFxAUEhYRFROXkJSSlpGVk1dQVFJWUVVT
19DU0tbR1dM3MDQyNjE1M7ewtLK2sbWzd3B0cnZxdXP38PTy9vH18w8IDAoOCQ0Lj4iMio6JjYtPSExKTklNS8/IzMrOyc3L
LygsKi4pLSuvqKyqrqmtq29obGpuaW1r7+js6u7p7eufMHHS5ClTp02fMXPW7Dlz581fsHDR4iVLly1fsXLV6jVr163fsHHT
5i1bt23fsXPX7j179+0/cPDQ4SNHjx0/cfLU6TNnz52/cPHS5StXr12/cfPW7Tt3791/8PDR4ydPnz1/8fLV6zdv373/8PHT
5y9fv33/8fPX7z9///0f9f+o/0f9P+r/Uf+P+n/U/6P+H/X/qP9H/T/q/1H/j/p/JPgfEAAA//+CIJGiABAAAB+LCAAAAAAA
Av9iYGRiZmFlY+fg5OLm4eXjFxAUEhYRFROXkJSSlpGVk1dQVFJWUVVT19DU0tbR1dM3MDQyNjE1M7ewtLK2sbWzd3B0cnZx
dXP38PTy9vH18w8IDAoOCQ0Lj4iMio6JjYtPSExKTklNS8/IzMrOyc3LLygsKi4pLSuvqKyqrqmtq29obGpuaW1r7+js6u7p
7eufMHHS5ClTp02fMXPW7Dlz581fsHDR4iVLly1fsXLV6jVr163fsHHT5i1bt23fsXPX7j179+0/cPDQ4SNHjx0/cfLU6TNn
z52/cPHS5StXr12/cfPW7Tt3791/8PDR4ydPnz1/8fLV6zdv373/8PHT5y9fv33/8fPX7z9///0f9f+o/0f9P+r/Uf+P+n/U
/6P+H/X/qP9H/T/q/1H/j/p/JPgfEAAA//+CIJGiABAAAB+LCAAAAAAAAv+q0GegOTAwMDAwNzAA0waYNBa2uYmJEYOCKQMd
QGlxSWIRg4EBNTyJ7LkhAir0AxIrPFITU1KLivUM9MszSzIUigsSk1MVqBv/Bvji3xgt/g2NTMyNGRQqhlL8D1FgZKJQkFiS
YVuBHPWH93AxjIIRASpok+Ux8r+ZiQme8t8cLf8bmpgZMygYjJb/NAeAAAAA//9zpLAeAAgAAB+LCAAAAAAAAv8qzctMzk9J
ZRgFIxPoFRSlpqWWJGfo5STmpeQmFmVT3w4DCMBFGxgYGCKxDRgMDI1MTcwZFAzoEQClxSWJRQwGBtT25BABgAAAAP//RhnJ
IgAEAAAfiwgAAAAAAAL/4mcYBSMZpJYk62fkF5cU09AOAwMDAzMTExBtaG5qgExDgJEJg6GxuZG5iSFIisHA0NDE1JxBwYAe
AVBaXJJYxGBgUEpAXToRnjQwgHtqqMQ/IAAA//8JZItvAAQAAB+LCAAAAAAAAv/s101urDAMAGCv3ylyAmKDMefJg1BQU0IH
pj+3rxh1UU03HalJE00sIbML8ScbmequwgorUs73xk1+2/9BibsJu/faPq37e8AzEBGF+ZIR8Tp/fyfCugOFMQpw3nZzAsTf
uOTXy2Xk7+blEZLyr1tuQNX6+LpjJG3FP6D/ZE5DYv7MDIoi8N+7/2BfdOgzjnp0bftzf+w6aUC1Zf5H8V/OzgXvf5Eb+h9F
CFSTnz995iYn/20wEN4fb/FnFlCcnT9l2f/jPPq0/v8odQtKyvwPHm+6ep2qy+PX52T2P26w7H/x/B/8YtPa/6n4R5r/dtVG
/9e9Hmdn/8ifr/2FqfjHiI8AAAD//zbSIg8AFgAAH4sIAAAAAAAC/0pJTS1gGAUjFgQkVnikJqakFhXrGehXJNLEDgMIwEUb
GBibItggcUMDU1MjBoUKegRAaXFJYhGDgcEIjX8jS4VgZw9Pn0i9isSSkiK90uLUIr20/HzbpMQirtHsMewBjbI8Rv43MzHB
nf8N0PK/gbmpsTGDgsFQyv/onhsiABAAAP//Ia3bRwAIAAAfiwgAAAAAAAL/qkgsKSliGAUjFQACAAD//9QHPnIAAgAAH4sI
AAAAAAAC/+xXTW/bRhD1VfoVAs+JtDM7+6Vz0VvbQ3tpix72Y1ZiIokqSSV2gvyz3vrHCkpyYtOi1MBBYaMewDD5sHzz5u3u
jN20vl58mJabxNfTN021ufr2IQ4x9NsQ4u3zAQdUwlxNxNV/ELvOgSshvnWRzyQ+jkfFO66bstoU8wm8Go8K3rR1yU0xn/w+
Ho0+jkejUbHxay7mk4LbOCte7aH2ZruHUlkfkXWV2vKwDgWK18K9BvkL4Bz1nMRvX1Z1S8jJ8Wj06dXJFKFc9LLUfIs05YcO
QUFW3GOUlg7vVc4Nt105gAcklQtuOqRolh6VnnsyyrHxHoWUVqK1WntkD4Z9ttFkJo46BJYhGIjMJmUTBWkIMiLmo5a43G3e
/nwQRMLpO+h3/ZTRZpWEJEiKklPgDQSQmjWjzzEAJQBOlqzzxjOg9jYzi5Q1xwxOFl9j115C0bODCO8I/OkzfF/4synHmJPl
WHD4HMsBECfrAURrn2VBJE8XpD/f1CdQ0PXZfrYXRnbo0/dlu5w0Wx958vdflzqWuc+Kou+XQzPQrjDHbLSnKKNRAXJQaG2y
MmlMCYBSVEon0Dl4FNoHqZK0ITM68miVKc4Z+2jy0+5MtzVnbuNyuvKbtPb120sGQc8QFAgDhqQo2EWplfXgJSfg6AgNJRvA
OVTRSQYfgkkpeHTkUPrkQmIpso3BnjXk0eTDV2dZNW1zebT9i3kK/Xl6+9WuTJ2XQhzfF733XcP1j0dJuyPHoq5221tw0b/I
CKgG9kFY4OySktoopxJoliJQIEUuuUxSSSNRKGEDRRbGWqclg2DKVthLB/PR5MP7wOttezO4D31LH5TNMohIhM7mCBHI+Rwy
ReuczsEhofFMwKTJBScpenLKOQjGKgxWqTPKVuWmf1Gam/UdtHu83apZ/0x9UX7mDPo69TJ00ECKr82Q+N3ljjr0t1/38Wa3
Wj0YL77PII8jMfG7H/ybqv7SPjqk3OyRM1ma5HtJwqqKb/tZ8EEWO8yZy1z1SO9Al4y7nk3fL6f7n2r755M7mwd5i2rDT05a
Yt7O/CzM4iyXK77UXunCHEYSeqAAQxogQtKkVFCSJEqPkC1I6XUmmaL0FqxlExzp7HSKEW1K7CTmGPBsu3s0+cDG+UuGqEuG
KHVccu3btu7+M9ynOMySaa6qjvbX9fc3nYSDhhPmSS+ys9Erpa2JOfkoyXrvOSorgrA+YUDTtXoQiA68sUHLTKQtxGjyWfMe
Td6ZNx79Mf509RIv8RIv8b+IfwIAAP//rN7tVQAWAAAfiwgEAAAAAAD/GgBTRxYAMDAwMDAwMDAwMDAwMGExZFNUQVJHWgEA
AP//AAAAAAAAAAA=
"""
