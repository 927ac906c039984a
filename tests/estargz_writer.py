"""A test-only eStargz writer: tar-like entries in, a real eStargz blob out.

Used by the eStargz reader tests and by the FUSE tests. The blob follows
protocol-reference §4: one gzip member per payload chunk (or shared members with
``min_chunk_size``, which records ``innerOffset``), the TOC as the tar entry
``stargz.index.json`` in its own member followed by tar end-of-archive blocks, then the
51-byte footer (or the 47-byte legacy one). The whole blob is also a valid ``tar.gz``.

Layout of entries: with ``prioritized`` names, those entries (and their parent directory
entries) come first, then ``.prefetch.landmark``, then the rest; without, the blob
starts with ``.no.prefetch.landmark`` (unless ``landmark=False``).

Example::

    blob, toc_json, digest = build_estargz([directory("etc"), reg("etc/hosts", b"x")])
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

_TAR_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class TarEntry:
    """One tar entry. ``mtime`` is in whole seconds since the epoch (UTC)."""

    name: str
    type: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


class EStargzBlob(NamedTuple):
    blob: bytes
    toc_json: bytes
    toc_digest: str


def reg(name: str, data: bytes = b"", **kw: Any) -> TarEntry:
    return TarEntry(name, "reg", data, **kw)


def directory(name: str, **kw: Any) -> TarEntry:
    kw.setdefault("mode", 0o755)
    return TarEntry(name, "dir", **kw)


def symlink(name: str, target: str, **kw: Any) -> TarEntry:
    kw.setdefault("mode", 0o777)
    return TarEntry(name, "symlink", link_name=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> TarEntry:
    return TarEntry(name, "hardlink", link_name=target, **kw)


def char_device(name: str, major: int, minor: int, **kw: Any) -> TarEntry:
    return TarEntry(name, "char", dev_major=major, dev_minor=minor, **kw)


def block_device(name: str, major: int, minor: int, **kw: Any) -> TarEntry:
    return TarEntry(name, "block", dev_major=major, dev_minor=minor, **kw)


def fifo(name: str, **kw: Any) -> TarEntry:
    return TarEntry(name, "fifo", **kw)


def whiteout(path: str, **kw: Any) -> TarEntry:
    """The AUFS-style whiteout entry that deletes ``path`` from lower layers."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return reg(f"{parent}/.wh.{base}" if parent else f".wh.{base}", **kw)


def opaque(dir_path: str, **kw: Any) -> TarEntry:
    """The marker that makes directory ``dir_path`` opaque."""
    dir_path = dir_path.strip("/")
    return reg(f"{dir_path}/.wh..wh..opq" if dir_path else ".wh..wh..opq", **kw)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member with an ``SG`` Extra subfield."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + bytes(8)


def legacy_footer(toc_offset: int, mtime: int = 0) -> bytes:
    """The 47-byte legacy stargz footer: the Extra field is the bare payload."""
    payload = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + struct.pack("<I", mtime) + b"\x00\xff"
    return header + struct.pack("<H", len(payload)) + payload + b"\x01\x00\x00\xff\xff" + bytes(8)


def _rfc3339(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tar_header(entry: TarEntry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.type = _TAR_TYPES[entry.type]
    info.size = len(entry.data) if entry.type == "reg" else 0
    info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
    info.uname, info.gname, info.mtime = entry.uname, entry.gname, entry.mtime
    info.linkname = entry.link_name
    info.devmajor, info.devminor = entry.dev_major, entry.dev_minor
    info.pax_headers = {
        f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
        for key, value in entry.xattrs.items()
    }
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> bytes:
    return bytes(-n % 512)


class _GzipStream:
    """Concatenated gzip members; tracks each member's compressed start."""

    def __init__(self, level: int) -> None:
        self.out = bytearray()
        self.level = level
        self._comp: Any = None
        self.member_start = 0
        self.member_raw = 0

    def new_member(self) -> None:
        self.close_member()
        self._comp = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.member_start = len(self.out)
        self.member_raw = 0

    def close_member(self) -> None:
        if self._comp is not None:
            self.out += self._comp.flush()
            self._comp = None

    def write(self, data: bytes) -> None:
        self.out += self._comp.compress(data)
        self.member_raw += len(data)


def _toc_entry(entry: TarEntry, tar_name: str) -> dict[str, Any]:
    toc: dict[str, Any] = {"name": tar_name, "type": entry.type}
    if entry.type == "reg":
        toc["size"] = len(entry.data)
    toc["modtime"] = _rfc3339(entry.mtime)
    if entry.link_name:
        toc["linkName"] = entry.link_name
    toc.update(mode=entry.mode, uid=entry.uid, gid=entry.gid)
    if entry.uname:
        toc["userName"] = entry.uname
    if entry.gname:
        toc["groupName"] = entry.gname
    if entry.type in ("char", "block"):
        toc.update(devMajor=entry.dev_major, devMinor=entry.dev_minor)
    if entry.xattrs:
        toc["xattrs"] = {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items()}
    if entry.type == "reg":
        toc["digest"] = sha256(entry.data)
    return toc


def _write_entry(stream: _GzipStream, entry: TarEntry, chunk_size: int,
                 min_chunk_size: int) -> list[dict[str, Any]]:
    # tarfile appends "/" to directory names; the TOC names what the tar holds.
    slash = entry.type == "dir" and not entry.name.endswith("/")
    tar_name = entry.name + ("/" if slash else "")
    stream.write(_tar_header(entry))
    first = _toc_entry(entry, tar_name)
    toc = [first]
    data = entry.data if entry.type == "reg" else b""
    for pos in range(0, len(data), chunk_size):
        piece = data[pos : pos + chunk_size]
        if min_chunk_size == 0 or stream.member_raw >= min_chunk_size:
            stream.new_member()
        part: dict[str, Any] = first if pos == 0 else {"name": tar_name, "type": "chunk"}
        part["offset"] = stream.member_start
        if stream.member_raw:
            part["innerOffset"] = stream.member_raw
        if pos:
            part["chunkOffset"] = pos
        if pos + chunk_size < len(data):
            part["chunkSize"] = len(piece)
        part["chunkDigest"] = sha256(piece)
        if pos:
            toc.append(part)
        stream.write(piece)
    stream.write(_pad(len(data)))
    return toc


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _order(entries: Sequence[TarEntry], prioritized: Sequence[str] | None,
           landmark: bool) -> list[TarEntry]:
    mark = reg(PREFETCH_LANDMARK, LANDMARK_CONTENTS)
    if not prioritized:
        nomark = reg(NO_PREFETCH_LANDMARK, LANDMARK_CONTENTS)
        return [nomark, *entries] if landmark else list(entries)
    by_name = {_clean(e.name): i for i, e in enumerate(entries)}
    first: list[int] = []
    for name in prioritized:
        parts = _clean(name).split("/")
        if "/".join(parts) not in by_name:
            raise ValueError(f"prioritized file {name!r} is not among the entries")
        for depth in range(1, len(parts) + 1):
            i = by_name.get("/".join(parts[:depth]))
            if i is not None and i not in first:
                first.append(i)
    chosen = set(first)
    rest = [e for i, e in enumerate(entries) if i not in chosen]
    return [entries[i] for i in first] + ([mark] if landmark else []) + rest


def build_estargz(
    entries: Iterable[TarEntry],
    *,
    chunk_size: int = 4 << 20,
    min_chunk_size: int = 0,
    prioritized: Sequence[str] | None = None,
    landmark: bool = True,
    legacy: bool = False,
    level: int = 6,
    toc_modifier: Callable[[dict[str, Any]], None] | None = None,
) -> EStargzBlob:
    """Write ``entries`` as an eStargz blob; return ``(blob, toc_json, toc_digest)``.

    ``chunk_size`` splits regular files into chunks; ``min_chunk_size > 0`` lets small
    payloads share a gzip member (entries then carry ``innerOffset``). ``legacy`` writes
    the 47-byte stargz footer. ``toc_modifier`` may edit the TOC dict before it is
    serialised (to test reader edge cases on an otherwise real blob).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    stream = _GzipStream(level)
    stream.new_member()
    toc_entries: list[dict[str, Any]] = []
    for entry in _order(list(entries), prioritized, landmark):
        toc_entries += _write_entry(stream, entry, chunk_size, min_chunk_size)
    toc: dict[str, Any] = {"version": 1, "entries": toc_entries}
    if toc_modifier is not None:
        toc_modifier(toc)
    toc_json = json.dumps(toc, indent="\t").encode()
    stream.new_member()
    toc_offset = stream.member_start
    toc_info = replace(reg(TOC_NAME, toc_json), mode=0o444)
    stream.write(_tar_header(toc_info) + toc_json + _pad(len(toc_json)) + bytes(1024))
    stream.close_member()
    footer = legacy_footer(toc_offset) if legacy else estargz_footer(toc_offset)
    return EStargzBlob(bytes(stream.out) + footer, toc_json, sha256(toc_json))


def read_as_tar(blob: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Read ``blob`` with Python's ``tarfile`` as an ordinary ``tar.gz`` (cross-check)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isreg() else None
            out.append((info, f.read() if f is not None else b""))
    return out
