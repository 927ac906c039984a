"""Structure-aware mutators: change what is behind a checksum or a compressor.

libFuzzer's byte mutations rarely get past the layers that guard the interesting
parsers: JSON syntax in front of the TOC decoder, gzip CRCs in front of the TOC tar
member, tar header checksums in front of the bootstrap extraction. For those targets a
custom mutator (``MUTATORS[target](data, max_size, seed, mutate)``) takes the input
apart, mutates the inner structure (the TOC as JSON values; the tar stream), and puts it
back together with valid framing; the rest of the time it leaves the bytes to
``mutate`` (``atheris.Mutate``, libFuzzer's own mutations and dictionary).

Everything here is pure and deterministic for a given ``seed``, never raises for any
input (a mutator that cannot take an input apart falls back to ``mutate``) and never
returns more than ``max_size`` bytes. It imports nothing from ``snapshotter``: it runs in
the fuzzing worker outside the instrumented code, so it adds no coverage of its own.
"""

from __future__ import annotations

import copy
import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import zstandard

__all__ = ["MUTATORS", "Mutate", "Mutator", "fix_tar_checksums"]

Mutate = Callable[[bytes, int], bytes]
Mutator = Callable[[bytes, int, int, Mutate], bytes]

_TOC_HEADER = struct.Struct("<QQ")
_TAR_BLOCK = 512
_INFLATE_LIMIT = 4 << 20
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_FOOTER = 51
_LEGACY_FOOTER = 47

_INT_KEYS = ("size", "mode", "uid", "gid", "offset", "innerOffset", "devMajor", "devMinor",
             "chunkOffset", "chunkSize")
_STR_KEYS = ("name", "linkName", "type", "modtime", "digest", "chunkDigest", "userName",
             "groupName")
_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "sock", "")
_BIG_INTS = (0, 1, 2, 255, 4095, 4096, 1 << 31, 1 << 32, (1 << 53) + 1, (1 << 63) - 1, 1 << 63,
             1 << 64, -1, -(1 << 63), 10**30)
_TIMES = ("1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999-23:59",
          "2020-02-30T00:00:00Z", "2023-05-06T07:08:09.1234567890Z", "2023-05-06 07:08:09Z",
          "2023-05-06T24:00:00+99:99", "")
_NAMES = ("", ".", "..", "/", "./", "../x", "a/../../b", "a/./b//c/", ".wh.x", ".wh..wh..opq",
          ".wh..wh.plnk/x", "stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark",
          "x\x00y", "\ud800", "\u00fc/\u00fc", "n" * 256, "a/" * 200 + "f")


# --- JSON (the eStargz TOC) -----------------------------------------------------------


def _entries(doc: dict[str, Any]) -> list[Any]:
    entries = doc.get("entries")
    if not isinstance(entries, list):
        entries = []
        doc["entries"] = entries
    return entries


def _some_entry(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    entries = [e for e in _entries(doc) if isinstance(e, dict)]
    if not entries or rng.random() < 0.03:
        return doc
    chosen: dict[str, Any] = rng.choice(entries)
    return chosen


def _near(doc: dict[str, Any], key: str, rng: random.Random) -> Any:
    """A value of ``key`` taken from another entry, maybe off by a little."""
    values = [e[key] for e in _entries(doc) if isinstance(e, dict) and key in e]
    if not values:
        return rng.choice(_BIG_INTS)
    value = rng.choice(values)
    if isinstance(value, int) and not isinstance(value, bool):
        return value + rng.choice((-1, 0, 1, 512, -512))
    return value


def _value(key: str, doc: dict[str, Any], rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.08:  # the wrong JSON type
        return rng.choice((None, True, 1.0, 1.5, "1", [], {}, [1], {"a": 1}))
    if key in _INT_KEYS:
        if roll < 0.45:
            return _near(doc, key, rng)
        if roll < 0.8:
            return rng.choice(_BIG_INTS)
        return rng.randrange(0, 1 << rng.choice((4, 8, 16, 24)))
    if key == "type":
        return rng.choice(_TYPES)
    if key == "modtime":
        return rng.choice(_TIMES)
    if key in ("digest", "chunkDigest"):
        return rng.choice(("", f"sha256:{rng.getrandbits(256):064x}",
                           "sha512:" + "0" * 128, "sha256:" + "A" * 64, "md5:00", "sha256:"))
    if key == "xattrs":
        return rng.choice(({"user.x": "eA=="}, {"": ""}, {"u" * 300: ""}, {"user.x": "!!"},
                           {"user.x": None}, {"trusted.overlay.opaque": "eQ=="},
                           {"user.big": "QUFB" * 30000}))
    if key in ("name", "linkName"):
        if roll < 0.5:
            other = _near(doc, "name", rng)
            other = other if isinstance(other, str) else ""
            return rng.choice((other, other + "/x", other.rstrip("/") + "/.wh.x",
                               "./" + other, other + "/", "../" + other, other + "/.."))
        return rng.choice(_NAMES)
    return rng.choice(("", "x", "\ud800", "root", "\x00"))


def _mutate_doc(doc: dict[str, Any], rng: random.Random, max_size: int) -> None:
    entries = _entries(doc)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.45:
            target = _some_entry(doc, rng)
            key = rng.choice((*_INT_KEYS, *_STR_KEYS, "xattrs", "version", "entries"))
            if target is doc and key == "entries":
                continue
            target[key] = 1 if key == "version" and rng.random() < 0.5 else _value(key, doc, rng)
        elif op < 0.55:
            target = _some_entry(doc, rng)
            if target:
                target.pop(rng.choice(list(target)), None)
        elif op < 0.68 and entries:
            entries.insert(rng.randrange(len(entries) + 1), copy.deepcopy(rng.choice(entries)))
        elif op < 0.76 and entries:
            entries.pop(rng.randrange(len(entries)))
        elif op < 0.84 and len(entries) > 1:
            i, j = rng.randrange(len(entries)), rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]
        elif op < 0.92:
            _add_chunk(entries, rng)
        else:
            _replicate(entries, rng, max_size)


def _add_chunk(entries: list[Any], rng: random.Random) -> None:
    regs = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("type") == "reg"]
    if not regs:
        return
    i = rng.choice(regs)
    reg = entries[i]
    size = reg.get("size") if isinstance(reg.get("size"), int) else 0
    chunk = {"name": reg.get("name"), "type": "chunk", "offset": reg.get("offset", 0),
             "chunkOffset": rng.choice((0, size // 2, size, size + 1)),
             "chunkSize": rng.choice((0, 1, size // 2, size))}
    if rng.random() < 0.5:
        chunk["innerOffset"] = rng.choice((1, 512, 1 << 20))
    entries.insert(i + 1, chunk)


def _replicate(entries: list[Any], rng: random.Random, max_size: int) -> None:
    """Many entries at once: distinct deep names (implied directories), or copies."""
    count = rng.choice((10, 100, 1000, 3000))
    count = min(count, max(1, max_size // 40))
    deep = "/".join(["a"] * rng.choice((1, 10, 100)))
    kind = rng.choice(("reg", "dir", "hardlink", "symlink"))
    for i in range(count):
        entries.append({"name": f"d{i}/{deep}", "type": kind, "linkName": "d0"})


def mutate_toc_json(json_bytes: bytes, rng: random.Random, max_size: int) -> bytes | None:
    """A mutated copy of TOC JSON, or None when it is not a JSON object."""
    try:
        doc = json.loads(json_bytes)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    _mutate_doc(doc, rng, max_size)
    compact = rng.random() < 0.7
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.8,
                      separators=(",", ":") if compact else None,
                      indent=None if compact else "\t")
    return text.encode("utf-8", "surrogatepass")


def toc_json(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """``estargz_toc_json``: mutate the TOC values, and sometimes the blob size header."""
    rng = random.Random(seed)
    if rng.random() < 0.35 or len(data) < _TOC_HEADER.size:
        return mutate(data, max_size)
    blob_size, data_end = _TOC_HEADER.unpack_from(data)
    body = mutate_toc_json(data[_TOC_HEADER.size :], rng, max_size)
    if body is None:
        return mutate(data, max_size)
    if rng.random() < 0.15:
        blob_size = rng.choice((0, 1, blob_size - 1, blob_size + 1, 1 << 40, (1 << 63) - 1))
        blob_size &= (1 << 64) - 1
    if rng.random() < 0.15:
        data_end = rng.choice((0, (1 << 64) - 1, max(data_end - 1, 0), blob_size))
    out = _TOC_HEADER.pack(blob_size, data_end) + body
    return out if len(out) <= max_size else mutate(data, max_size)


# --- tar ------------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value) if value < 8 ** (width - 1) else b"7" * width


def tar_header(name: bytes, size: int, typeflag: bytes = b"0") -> bytes:
    """A ustar header block for a regular file ``name`` (at most 100 bytes) of ``size``."""
    header = bytearray(_TAR_BLOCK)
    header[0 : len(name[:100])] = name[:100]
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    return fix_tar_checksums(bytes(header))


def _tar_size(header: bytes) -> int | None:
    """The size field (octal or base-256), or None when it is neither (never negative)."""
    field = header[124:136]
    if field[:1] and field[0] & 0x80:
        return None if field[0] & 0x40 else int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not all(0x30 <= c <= 0x37 for c in text):  # int() would take "-1", "+1", "1_0"
        return None
    return int(text, 8) if text else 0


def fix_tar_checksums(stream: bytes) -> bytes:
    """``stream`` with the checksum of every header it can find rewritten to be right.

    Headers are followed by their data as the size field says; the walk stops at an
    all-zero block, a size it cannot read, or the end.
    """
    out = bytearray(stream)
    pos = 0
    while pos + _TAR_BLOCK <= len(out):
        block = out[pos : pos + _TAR_BLOCK]
        if block == bytes(_TAR_BLOCK):
            break
        total = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        out[pos + 148 : pos + 156] = b"%06o\0 " % (total & 0o777777)
        size = _tar_size(bytes(block))
        if size is None or size > len(out):
            break
        pos += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK  # always forward
    return bytes(out)


# --- gzip members and eStargz blobs -----------------------------------------------------


def _inflate(member: bytes) -> bytes | None:
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(member, _INFLATE_LIMIT)
    except zlib.error:
        return None
    return out if inflater.eof else None


def _deflate(data: bytes, rng: random.Random) -> bytes:
    packer = zlib.compressobj(rng.choice((0, 1, 6, 9)), zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def _mutate_tar_stream(stream: bytes, rng: random.Random, max_size: int,
                       mutate: Mutate) -> bytes:
    """The TOC tar stream with its JSON mutated (the header rebuilt) or its bytes mutated."""
    size = _tar_size(stream[:_TAR_BLOCK])
    name = stream[:100].split(b"\0", 1)[0]
    if size is not None and rng.random() < 0.75:
        body = mutate_toc_json(stream[_TAR_BLOCK : _TAR_BLOCK + size], rng, max_size * 8)
        if body is not None:
            pad = -len(body) % _TAR_BLOCK
            return tar_header(name, len(body)) + body + bytes(pad + 2 * _TAR_BLOCK)
    return fix_tar_checksums(mutate(stream, max(len(stream) + 64, 1024)))


def toc_member(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """``estargz_toc_member``: inflate, mutate the tar stream or the TOC in it, deflate."""
    rng = random.Random(seed)
    stream = None if rng.random() < 0.3 else _inflate(data)
    if stream is None:
        return mutate(data, max_size)
    out = _deflate(_mutate_tar_stream(stream, rng, max_size, mutate), rng)
    return out if len(out) <= max_size else mutate(data, max_size)


def _footer(toc_offset: int, legacy: bool) -> bytes:
    payload = b"%016xSTARGZ" % toc_offset
    if legacy:
        head = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff"
        return head + struct.pack("<H", len(payload)) + payload + b"\x01\x00\x00\xff\xff" + bytes(8)
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    head = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra))
    return head + extra + b"\x01\x00\x00\xff\xff" + bytes(8)


def _split_blob(blob: bytes) -> tuple[int, bool] | None:
    """(TOC offset, legacy footer?) read from the blob's footer, or None."""
    for size, at, legacy in ((_FOOTER, 16, False), (_LEGACY_FOOTER, 12, True)):
        if len(blob) < size:
            continue
        tail = blob[-size:]
        hexpart = tail[at : at + 16]
        if tail[:2] == _GZIP and tail[at + 16 : at + 22] == b"STARGZ":
            try:
                offset = int(hexpart, 16)
            except ValueError:
                return None
            if offset <= len(blob) - size:
                return offset, legacy
    return None


def estargz_blob(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """``estargz_flow``: mutate the TOC (re-packed with a valid member and footer), the
    payload before it (footer kept pointing at the TOC), or the raw bytes."""
    rng = random.Random(seed)
    split = _split_blob(data)
    roll = rng.random()
    if split is None or roll < 0.25:
        return mutate(data, max_size)
    offset, legacy = split
    footer_size = _LEGACY_FOOTER if legacy else _FOOTER
    payload, member = data[:offset], data[offset : len(data) - footer_size]
    if roll < 0.45:
        payload = mutate(payload, max(len(payload), 1) + 64) if payload else payload
        out = payload + member + _footer(len(payload), legacy)
        return out if len(out) <= max_size else mutate(data, max_size)
    stream = _inflate(member)
    if stream is None:
        return mutate(data, max_size)
    new_member = _deflate(_mutate_tar_stream(stream, rng, max_size, mutate), rng)
    out = payload + new_member + _footer(offset, legacy)
    return out if len(out) <= max_size else mutate(data, max_size)


# --- nydus bootstrap layers ------------------------------------------------------------


def _unpack_layer(data: bytes) -> tuple[bytes, str] | None:
    try:
        if data[:2] == _GZIP:
            plain = _inflate(data)
            return None if plain is None else (plain, "gzip")
        if data[:4] == _ZSTD:
            reader = zstandard.ZstdDecompressor(max_window_size=_INFLATE_LIMIT).stream_reader(
                io.BytesIO(data))
            out = reader.read(_INFLATE_LIMIT + 1)
            return (out, "zstd") if len(out) <= _INFLATE_LIMIT else None
    except (zstandard.ZstdError, ValueError, OSError, MemoryError):
        return None
    return data, "plain"


def bootstrap_layer(data: bytes, max_size: int, seed: int, mutate: Mutate) -> bytes:
    """``nydus_bootstrap_tar``: mutate the tar inside, fix its header checksums, and
    compress it as it was (or, sometimes, another way)."""
    rng = random.Random(seed)
    unpacked = None if rng.random() < 0.25 else _unpack_layer(data)
    if unpacked is None:
        return mutate(data, max_size)
    plain, how = unpacked
    tar = mutate(plain, max(len(plain) + 256, 1024))
    if rng.random() < 0.85:
        tar = fix_tar_checksums(tar)
    if rng.random() < 0.1:
        how = rng.choice(("gzip", "zstd", "plain"))
    if how == "gzip":
        out = _deflate(tar, rng)
    elif how == "zstd":
        out = zstandard.ZstdCompressor(level=rng.choice((1, 3, 19))).compress(tar)
    else:
        out = tar
    return out if len(out) <= max_size else mutate(data, max_size)


MUTATORS: dict[str, Mutator] = {
    "estargz_toc_json": toc_json,
    "estargz_toc_member": toc_member,
    "estargz_flow": estargz_blob,
    "nydus_bootstrap_tar": bootstrap_layer,
}
"""The targets that get a structure-aware mutator; the others use libFuzzer's."""
