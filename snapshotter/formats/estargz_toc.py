"""The eStargz TOC (``stargz.index.json``): strict JSON decoding into ``TocEntry`` values.

``parse_toc`` checks every field's type and range and normalises names; it knows
nothing about trees. ``estargz_tree.build_index`` turns the entries into a
``LayerIndex``. Both raise only FormatError, with a message naming the bad entry.

Decoding follows Go's ``encoding/json`` as stargz uses it: unknown keys are ignored, a
``null`` value means "absent", integers must be JSON integers (no ``1.0``, no ``true``),
``xattrs`` values are base64, and lone UTF-16 surrogates in strings become U+FFFD.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats.index import MAX_NAME_BYTES
from snapshotter.formats.limits import MAX_TOC_ENTRIES

DEFAULT_MAX_ENTRIES = MAX_TOC_ENTRIES
"""Refuse TOCs with more entries than this (a real layer has at most tens of thousands)."""

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_PATH_MAX = 4096
_SPARE_ARRAYS = 64
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_SURROGATE = re.compile("[\ud800-\udfff]")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(slots=True)
class TocEntry:
    """One decoded, validated TOC entry.

    ``name`` and ``link_name`` are normalised (see ``clean_name``); ``""`` is the layer
    root. ``symlink_target`` is the symlink's ``linkName`` verbatim. ``index`` is the
    entry's position in the TOC. ``next_offset`` is filled in by ``parse_toc`` for
    ``reg``/``chunk`` entries (the compressed end of the range holding their payload).
    """

    index: int
    name: str
    type: str
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    link_name: str = ""
    symlink_target: bytes = b""
    offset: int = 0
    inner_offset: int = 0
    next_offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""


def clean_name(raw: str, what: str = "name") -> str:
    """Normalise a TOC path like stargz: ``path.Clean("/" + raw)`` minus the leading ``/``.

    Absolute names land inside the layer (``/etc/x`` -> ``etc/x``), ``.`` and empty
    components vanish, ``a/../b`` -> ``b``, and ``""``/``.``/``/`` name the root.
    Stricter than stargz, a ``..`` that would climb above the layer root (``../x``) is
    refused rather than clamped. Raises FormatError for that, for NUL, and for a
    component longer than 255 bytes.
    """
    fast = _clean_fast(raw)
    return _clean_components(raw, what) if fast is None else fast


def _clean_components(raw: str, what: str) -> str:
    """``clean_name`` component by component: any name, and all of its errors."""
    if "\0" in raw:
        raise FormatError(f"{what} {raw[:80]!r} contains NUL")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise FormatError(f"{what} {raw[:80]!r} escapes the layer root")
            parts.pop()
            continue
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise FormatError(f"{what} {raw[:80]!r}: component over {MAX_NAME_BYTES} bytes")
        parts.append(part)
    return "/".join(parts)


def _clean_fast(raw: str) -> str | None:
    """``clean_name(raw)`` for the usual ASCII names, or None when they need a closer look.

    None (never an error) for names with a ``.``/``..``/empty component inside, a NUL,
    a component that may be over the limit, or non-ASCII text: ``_clean_components``
    deals with those and gives the errors.
    """
    name = raw.strip("/")
    if name[:2] == "./":  # a common prefix of TOC names
        name = name[2:].lstrip("/")
    if not name or name == ".":
        return ""
    if "//" in name or "\0" in name or not name.isascii():
        return None
    if name[0] == "." or "/." in name:  # maybe a "." or ".." component
        padded = f"/{name}/"  # (str methods: a regex is several times slower here)
        if "/./" in padded or "/../" in padded:
            return None
    if len(name) > MAX_NAME_BYTES and max(map(len, name.split("/"))) > MAX_NAME_BYTES:
        return None
    return name


def _text(value: str) -> str:
    """Replace lone surrogates (invalid UTF-16 escapes in JSON) with U+FFFD, as Go does."""
    return value if value.isascii() else _SURROGATE.sub("\ufffd", value)


class _Fields:
    """Typed accessors over one JSON object; errors name the entry."""

    def __init__(self, obj: dict[str, Any], index: int) -> None:
        self.obj = obj
        self.index = index
        self.name = ""

    def fail(self, message: str) -> FormatError:
        return FormatError(f"TOC entry #{self.index} ({self.name[:80]!r}): {message}")

    def string(self, key: str) -> str:
        value = self.obj.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(f"{key!r} must be a string, not {type(value).__name__}")
        return _text(value)

    def integer(self, key: str, maximum: int = _INT64_MAX) -> int:
        value = self.obj.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{key!r} must be an integer, not {type(value).__name__}")
        if not 0 <= value <= maximum:
            raise self.fail(f"{key!r} = {value} is out of range [0, {maximum}]")
        return value

    def digest(self, key: str) -> str:
        value = self.string(key)
        if value and not _DIGEST.fullmatch(value):
            raise self.fail(f"{key!r} = {value[:80]!r} is not a sha256/sha512 digest")
        return value

    def mtime_ns(self) -> int:
        value = self.string("modtime")
        if not value:
            return 0
        try:
            return _rfc3339_ns(value)
        except ValueError as exc:
            raise self.fail(f"modtime {value[:40]!r}: {exc}") from None

    def xattrs(self) -> dict[str, bytes]:
        value = self.obj.get("xattrs")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail("'xattrs' must be an object")
        out: dict[str, bytes] = {}
        for key, encoded in value.items():
            key = _text(key)
            if not key or "\0" in key or len(key.encode()) > _XATTR_NAME_MAX:
                raise self.fail(f"invalid xattr name {key[:80]!r}")
            if encoded is None:
                out[key] = b""
                continue
            if not isinstance(encoded, str):
                raise self.fail(f"xattr {key!r} value must be a base64 string")
            try:
                decoded = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise self.fail(f"xattr {key!r} value is not valid base64") from None
            if len(decoded) > _XATTR_SIZE_MAX:
                raise self.fail(f"xattr {key!r} value is over {_XATTR_SIZE_MAX} bytes")
            out[key] = decoded
        return out


@functools.lru_cache(maxsize=4096)  # layers reuse a few timestamps many times
def _rfc3339_ns(value: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time; ValueError if it is not one."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not RFC 3339")
    year, month, day, hour, minute, sec, frac, _z, sign, tzh, tzm = match.groups()
    if int(tzm or 0) > 59:
        raise ValueError("zone offset minutes out of range")
    offset = dt.timedelta(hours=int(tzh or 0), minutes=int(tzm or 0))
    tz = dt.timezone(-offset if sign == "-" else offset)
    when = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(sec),
                       tzinfo=tz)
    delta = when - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def _decode_entry(index: int, obj: object, data_end: int) -> TocEntry:
    """Decode TOC entry ``obj``: the fast path when it can, else the checked one.

    Both give the same entry; only ``_decode_checked`` raises (and names the first
    problem in field order), so the fast path hands over whenever it is in doubt.
    """
    if type(obj) is dict:
        entry = _decode_fast(index, obj, data_end)
        if entry is not None:
            return entry
    return _decode_checked(index, obj, data_end)


def _decode_fast(index: int, obj: dict[str, Any], data_end: int) -> TocEntry | None:
    """``_decode_checked`` without per-field calls for the usual entry; None to hand over.

    Returns an entry only if ``_decode_checked`` would return an equal one; any odd value
    or FormatError means None. Fields are checked in another order, but a call that
    could raise something else (``_rfc3339_ns``) comes after the same checks as there,
    so such an error would escape from both alike. The fields most entries lack are
    read only when the object has more keys than the usual fields account for.
    ``tests/property/test_estargz_fastpath.py`` checks the agreement.
    """
    get = obj.get
    raw_name = get("name")
    kind = get("type")
    if type(raw_name) is not str or type(kind) is not str or kind not in ENTRY_TYPES:
        return None
    try:
        name = _clean_fast(raw_name)
        if name is None:
            name = clean_name(_text(raw_name))
        known = 2  # keys of obj accounted for: name, type, then each non-null one below
        # Integer fields: None is absent (0); anything but an in-range int hands over.
        size = get("size")
        if size is None:
            size = 0
        elif type(size) is int and 0 <= size <= _INT64_MAX:
            known += 1
        else:
            return None
        modtime = get("modtime")
        if modtime is None:
            mtime_ns = 0
        elif type(modtime) is str:
            known += 1
            if not modtime.isascii():
                modtime = _text(modtime)
            mtime_ns = _rfc3339_ns(modtime) if modtime else 0
        else:
            return None
        mode = get("mode")
        if mode is None:
            mode = 0
        elif type(mode) is int and 0 <= mode <= _INT64_MAX:
            known += 1
        else:
            return None
        offset = get("offset")
        if offset is None:
            offset = 0
        elif type(offset) is int and 0 <= offset <= _INT64_MAX:
            known += 1
        else:
            return None
        digest = get("digest")
        if digest is None:
            digest = ""
        elif type(digest) is str and (not digest or _DIGEST.fullmatch(digest) is not None):
            known += 1  # (a non-ASCII digest never matches, before or after _text)
        else:
            return None
        chunk_digest = get("chunkDigest")
        if chunk_digest is None:
            chunk_digest = ""
        elif chunk_digest == digest:
            known += 1
            chunk_digest = digest  # already checked
        elif type(chunk_digest) is str and (
            not chunk_digest or _DIGEST.fullmatch(chunk_digest) is not None
        ):
            known += 1
        else:
            return None
        link = get("linkName")
        if link is None:
            link = ""
        elif type(link) is str:
            known += 1
        else:
            return None
        if len(obj) != known:  # some of the rarer fields are there
            uid = get("uid")
            if uid is None:
                uid = 0
            elif type(uid) is not int or not 0 <= uid <= _UINT32_MAX:
                return None
            gid = get("gid")
            if gid is None:
                gid = 0
            elif type(gid) is not int or not 0 <= gid <= _UINT32_MAX:
                return None
            inner_offset = get("innerOffset")
            if inner_offset is None:
                inner_offset = 0
            elif type(inner_offset) is not int or not 0 <= inner_offset <= _INT64_MAX:
                return None
            dev_major = get("devMajor")
            if dev_major is None:
                dev_major = 0
            elif type(dev_major) is not int or not 0 <= dev_major <= _UINT32_MAX:
                return None
            dev_minor = get("devMinor")
            if dev_minor is None:
                dev_minor = 0
            elif type(dev_minor) is not int or not 0 <= dev_minor <= _UINT32_MAX:
                return None
            chunk_offset = get("chunkOffset")
            if chunk_offset is None:
                chunk_offset = 0
            elif type(chunk_offset) is not int or not 0 <= chunk_offset <= _INT64_MAX:
                return None
            chunk_size = get("chunkSize")
            if chunk_size is None:
                chunk_size = 0
            elif type(chunk_size) is not int or not 0 <= chunk_size <= _INT64_MAX:
                return None
            xattrs = {} if get("xattrs") is None else _Fields(obj, index).xattrs()
        else:  # none of the rarer fields
            uid = gid = inner_offset = dev_major = dev_minor = chunk_offset = chunk_size = 0
            xattrs = {}
        if offset and offset >= data_end:
            return None
        link_name = ""
        symlink_target = b""
        if kind == "hardlink":
            if not link:
                return None
            link_name = clean_name(_text(link), "hardlink target")
        elif kind == "symlink":
            symlink_target = _text(link).encode("utf-8", "surrogateescape")
            if not symlink_target or b"\0" in symlink_target or len(symlink_target) >= _PATH_MAX:
                return None
    except (FormatError, ValueError):  # ValueError: _rfc3339_ns
        return None
    return TocEntry(index, name, kind, size, mtime_ns, mode & 0o7777, uid, gid, link_name,
                    symlink_target, offset, inner_offset, 0, dev_major, dev_minor, xattrs,
                    digest, chunk_offset, chunk_size, chunk_digest)


def _decode_checked(index: int, obj: object, data_end: int) -> TocEntry:
    """Decode one entry with a named check per field; raises FormatError for the first
    problem found."""
    if not isinstance(obj, dict):
        raise FormatError(f"TOC entry #{index} is not an object")
    f = _Fields(obj, index)
    raw_name = f.name = f.string("name")
    kind = f.string("type")
    if kind not in ENTRY_TYPES:
        raise f.fail(f"unknown type {kind[:20]!r}")
    entry = TocEntry(
        index=index,
        name=clean_name(raw_name),
        type=kind,
        size=f.integer("size"),
        mtime_ns=f.mtime_ns(),
        mode=f.integer("mode") & 0o7777,
        uid=f.integer("uid", _UINT32_MAX),
        gid=f.integer("gid", _UINT32_MAX),
        offset=f.integer("offset"),
        inner_offset=f.integer("innerOffset"),
        dev_major=f.integer("devMajor", _UINT32_MAX),
        dev_minor=f.integer("devMinor", _UINT32_MAX),
        xattrs=f.xattrs(),
        digest=f.digest("digest"),
        chunk_offset=f.integer("chunkOffset"),
        chunk_size=f.integer("chunkSize"),
        chunk_digest=f.digest("chunkDigest"),
    )
    if entry.offset and entry.offset >= data_end:
        raise f.fail(f"offset {entry.offset} is past the end of the data {data_end}")
    _decode_link(f, entry)
    return entry


def _decode_link(f: _Fields, entry: TocEntry) -> None:
    link = f.string("linkName")
    if entry.type == "hardlink":
        if not link:
            raise f.fail("hardlink without linkName")
        entry.link_name = clean_name(link, "hardlink target")
    elif entry.type == "symlink":
        target = link.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target or len(target) >= _PATH_MAX:
            raise f.fail(f"invalid symlink target {link[:80]!r}")
        entry.symlink_target = target


class _TooManyObjects(Exception):
    """Internal: aborts JSON decoding early; never escapes this module."""


def _load_json(json_bytes: bytes, max_objects: int, max_arrays: int) -> dict[str, Any]:
    """Decode JSON, refusing NaN/Infinity, more than ``max_objects`` objects and more
    than ``max_arrays`` arrays, with no more memory than a document within those counts.

    ``json.loads`` builds the whole document before anything can look at it, so the
    containers are bounded before it runs: every object starts with a ``{`` byte and
    every array with a ``[`` (in any encoding ``json.loads`` accepts), and counting bytes
    costs about 1 ms per 10 MiB. An input with more ``[`` bytes than ``max_arrays`` is
    refused outright (64 MiB of ``[],`` would otherwise be 21 million lists: 10 s and
    1.6 GB); one with more ``{`` bytes than ``max_objects`` (braces inside names count
    too) is decoded with a hook that counts the real objects and stops at the limit.
    Scalars need no count: each costs at most a few tens of bytes per byte of input, and
    the input is at most ``max_toc_bytes``. Nesting deeper than the interpreter's
    recursion limit is a FormatError (``RecursionError`` from the decoder), and so are
    integers of more than 4,300 digits (``ValueError``).
    """
    objects = 0

    def count_object(obj: dict[str, Any]) -> dict[str, Any]:
        nonlocal objects
        objects += 1
        if objects > max_objects:
            raise _TooManyObjects
        return obj

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    if not isinstance(json_bytes, bytes | bytearray):
        raise FormatError("TOC JSON must be bytes")
    brackets = json_bytes.count(b"[")
    if brackets > max_arrays:
        raise LimitExceeded(
            f"TOC has {brackets} '[' bytes, more than the {max_arrays} JSON arrays a TOC "
            f"within the entry limit may hold")
    hook = None if json_bytes.count(b"{") <= max_objects else count_object
    try:
        doc = json.loads(json_bytes, parse_constant=reject_constant, object_hook=hook)
    except _TooManyObjects:
        raise LimitExceeded(f"TOC has more than {max_objects} JSON objects") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise FormatError(f"TOC is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise FormatError("TOC JSON is not an object")
    return doc


def parse_toc(
    json_bytes: bytes,
    blob_size: int,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    data_end: int | None = None,
) -> list[TocEntry]:
    """Decode and validate the TOC JSON of a blob of ``blob_size`` compressed bytes.

    ``data_end`` (default ``blob_size``) is where payload members stop; pass the
    footer's TOC offset so that the last file's range excludes the TOC and footer.

    Checks ``version == 1``, the type and range of every field, names (see
    ``clean_name``), that payload offsets are inside the blob, and computes each
    ``reg``/``chunk`` entry's ``next_offset`` by walking backwards from ``data_end``
    (protocol-reference §4.3). Raises FormatError for bad JSON, a wrong version, more
    than ``max_entries`` entries, or any malformed entry.
    """
    # Each entry is one object, plus one for its xattrs, plus the document itself; the
    # only array of a TOC is its entry list (a few more are tolerated: unknown keys).
    doc = _load_json(json_bytes, 2 * max_entries + 1, max_entries + _SPARE_ARRAYS)
    version = doc.get("version")
    if isinstance(version, bool) or version != 1:
        raise FormatError(f"unsupported TOC version {str(version)[:20]!r} (want 1)")
    raw_entries = doc.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise FormatError("TOC 'entries' is not a list")
    if len(raw_entries) > max_entries:
        raise LimitExceeded(f"TOC has {len(raw_entries)} entries, over the limit {max_entries}")
    end = blob_size if data_end is None else data_end
    if not 0 <= end <= blob_size:
        raise FormatError(f"data end {end} is outside the blob of {blob_size} bytes")
    entries: list[TocEntry] = []
    append = entries.append
    for i, obj in enumerate(raw_entries):  # _decode_entry, inline
        entry = _decode_fast(i, obj, end) if type(obj) is dict else None
        append(_decode_checked(i, obj, end) if entry is None else entry)
        # Free each JSON object once decoded: this lowers the peak memory and the
        # garbage collector's work (the new entries no longer add to the live objects).
        raw_entries[i] = None
    _set_next_offsets(entries, end)
    return entries


def _set_next_offsets(entries: list[TocEntry], data_end: int) -> None:
    """Give each payload entry the end of its compressed range (stargz ``nextOffset``)."""
    last = data_end
    for entry in reversed(entries):
        if entry.type not in ("reg", "chunk"):
            continue
        entry.next_offset = last
        if entry.offset and not entry.inner_offset:
            last = entry.offset
