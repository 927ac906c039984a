"""The FUSE kernel protocol, as far as a read-only file system needs it: opcodes, flags and
the byte layout of requests and replies (``linux/fuse.h``, protocol 7.31).

Pure functions and constants only: no I/O. ``snapshotter.fs.fuse.session`` reads requests
from ``/dev/fuse`` and writes what these functions build. All integers are native-endian
(little-endian on the machines FUSE runs on here); every record is padded to 8 bytes.

Contracts:

* ``parse_header`` reads the 40-byte ``fuse_in_header`` at the start of a request; the
  session checks ``len`` against what it read.
* ``Attr`` carries the attributes of one inode plus the entry/attribute cache timeouts;
  ``entry_out``/``attr_out`` encode ``fuse_entry_out``/``fuse_attr_out``.
* ``dirent``/``direntplus`` encode one directory record; ``DirentBuffer`` packs records
  until the kernel's buffer size is reached (a record that does not fit is not added and
  ``add`` returns False, as the kernel requires whole records).
* ``init_reply`` builds the INIT answer from the kernel's offer: the flags we want that
  the kernel offers, protocol minor ``min(kernel, MINOR)``. A kernel whose major is not 7
  raises ``ProtocolError`` (the session then fails the mount).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

MAJOR = 7
MINOR = 31  # max_pages (7.28), no_opendir (7.29), FOPEN_CACHE_DIR (7.28)
ROOT_ID = 1
MIN_READ_BUFFER = 8192

# Opcodes.
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = (
    8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = (
    18, 20, 21, 22, 23, 24, 25, 26)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = (
    27, 28, 29, 30, 31, 32, 33, 34, 35)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = (
    36, 37, 38, 39, 40, 41, 42, 43)
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING = (
    44, 45, 46, 47, 48, 49)
SYNCFS, TMPFILE, STATX = 50, 51, 52

OPCODE_NAMES = {
    LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", SETATTR: "setattr",
    READLINK: "readlink", SYMLINK: "symlink", MKNOD: "mknod", MKDIR: "mkdir",
    UNLINK: "unlink", RMDIR: "rmdir", RENAME: "rename", LINK: "link", OPEN: "open",
    READ: "read", WRITE: "write", STATFS: "statfs", RELEASE: "release", FSYNC: "fsync",
    SETXATTR: "setxattr", GETXATTR: "getxattr", LISTXATTR: "listxattr",
    REMOVEXATTR: "removexattr", FLUSH: "flush", INIT: "init", OPENDIR: "opendir",
    READDIR: "readdir", RELEASEDIR: "releasedir", FSYNCDIR: "fsyncdir", GETLK: "getlk",
    SETLK: "setlk", SETLKW: "setlkw", ACCESS: "access", CREATE: "create",
    INTERRUPT: "interrupt", BMAP: "bmap", DESTROY: "destroy", IOCTL: "ioctl", POLL: "poll",
    NOTIFY_REPLY: "notify_reply", BATCH_FORGET: "batch_forget", FALLOCATE: "fallocate",
    READDIRPLUS: "readdirplus", RENAME2: "rename", LSEEK: "lseek",
    COPY_FILE_RANGE: "copy_file_range", SETUPMAPPING: "setupmapping",
    REMOVEMAPPING: "removemapping", SYNCFS: "syncfs", TMPFILE: "tmpfile", STATX: "statx",
}
# Requests that would change the file system: answered EROFS.
WRITE_OPCODES = frozenset({
    SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
    REMOVEXATTR, CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE,
})
# Requests the kernel sends without waiting for an answer.
NO_REPLY_OPCODES = frozenset({FORGET, BATCH_FORGET})

# INIT flags (fuse_init_in/out.flags).
ASYNC_READ = 1 << 0
EXPORT_SUPPORT = 1 << 4
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30  # flags2 (the high 32 bits of the flags) is valid
PASSTHROUGH = 1 << 37  # in flags2: reads of a file go straight to a backing file

# What lazysnap asks for, when the kernel offers it: parallel reads and lookups, one
# READDIRPLUS per directory block (a walk then needs no LOOKUP per entry), 1 MiB requests,
# symlink targets kept in the page cache.
WANTED_FLAGS = ASYNC_READ | DO_READDIRPLUS | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS

# Open flags (fuse_open_out.open_flags).
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PASSTHROUGH = 1 << 7

# ioctls on the FUSE device: register / forget a backing file for passthrough.
DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("=iIQ")  # fd flags padding

# Notification codes (fuse_out_header.error of an unsolicited message).
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# Directory entry types (DT_*).
DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 1, 2, 4, 6, 8, 10, 12

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
_IN_HEADER_FIELDS = struct.Struct("=IIQQIII4x")  # the same without extlen and padding
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
_ATTR = "QQQQQQIIIIIIIIII"  # fuse_attr: 88 bytes
_ENTRY_OUT = struct.Struct("=QQQQII" + _ATTR)  # 128 bytes
_ATTR_OUT = struct.Struct("=QII" + _ATTR)  # 104 bytes
_DIRENT = struct.Struct("=QQII")  # ino off namelen type: 24 bytes + name
_INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
_INIT_IN_FLAGS2 = struct.Struct("=I")  # at offset 16 (when INIT_EXT is set)
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth (unused): 64 bytes
_INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")
OPEN_IN = struct.Struct("=II")  # flags open_flags
_OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
RELEASE_IN = struct.Struct("=QII")  # fh flags release_flags (lock_owner follows)
_KSTATFS = struct.Struct("=QQQQQIIII24x")  # 80 bytes
READ_IN = struct.Struct("=QQII")  # fh offset size read_flags (first 24 bytes of fuse_read_in)
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")
ACCESS_IN = struct.Struct("=II")  # mask padding
_INVAL_ENTRY = struct.Struct("=QII")  # parent namelen flags
_INVAL_INODE = struct.Struct("=Qqq")  # ino off len
_PAD = b"\0" * 8
_NS = 1_000_000_000


class ProtocolError(Exception):
    """The kernel speaks a FUSE protocol this module cannot answer."""


class Header(NamedTuple):
    """A request's ``fuse_in_header`` (a tuple: the session unpacks it on every request)."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_header(buf: bytes | memoryview) -> Header:
    """The header at the start of ``buf``; raises ProtocolError if it is too short."""
    if len(buf) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than its header")
    return Header._make(_IN_HEADER_FIELDS.unpack_from(buf))


class Attr:
    """The attributes of one inode as the kernel gets them, and how long it may cache the
    name (``entry_timeout``) and the attributes (``attr_timeout``), in seconds."""

    __slots__ = (
        "attr_timeout",
        "entry_timeout",
        "st_atime_ns",
        "st_blksize",
        "st_blocks",
        "st_ctime_ns",
        "st_gid",
        "st_ino",
        "st_mode",
        "st_mtime_ns",
        "st_nlink",
        "st_rdev",
        "st_size",
        "st_uid",
    )

    def __init__(self) -> None:
        self.st_ino = 0
        self.st_mode = 0
        self.st_nlink = 1
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blocks = 0
        self.st_blksize = 4096
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0
        self.entry_timeout = 0.0
        self.attr_timeout = 0.0

    def _fields(self) -> tuple[int, ...]:
        a, m, c = self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns
        rdev = self.st_rdev
        if rdev:  # fuse_attr.rdev is the kernel's new_encode_dev() of major:minor
            major, minor = os.major(rdev), os.minor(rdev)
            rdev = ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF
        return (self.st_ino, self.st_size, self.st_blocks, a // _NS, m // _NS, c // _NS,
                a % _NS, m % _NS, c % _NS, self.st_mode, self.st_nlink, self.st_uid,
                self.st_gid, rdev, self.st_blksize, 0)


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * _NS)


def entry_out(attr: Attr) -> bytes:
    """``fuse_entry_out`` for ``attr`` (the reply to LOOKUP; generation 0)."""
    es, ens = _split(attr.entry_timeout)
    as_, ans = _split(attr.attr_timeout)
    return _ENTRY_OUT.pack(attr.st_ino, 0, es, as_, ens, ans, *attr._fields())


def attr_out(attr: Attr) -> bytes:
    """``fuse_attr_out`` for ``attr`` (the reply to GETATTR)."""
    as_, ans = _split(attr.attr_timeout)
    return _ATTR_OUT.pack(as_, ans, 0, *attr._fields())


def dirent_type(mode: int) -> int:
    """The DT_* type of a ``st_mode``."""
    return (mode >> 12) & 0xF


def _record(fixed: bytes, name: bytes) -> bytes:
    size = len(fixed) + len(name)
    return fixed + name + _PAD[: (-size) % 8]


def dirent(ino: int, next_off: int, name: bytes, mode: int) -> bytes:
    """One ``fuse_dirent`` record (READDIR), padded to 8 bytes."""
    return _record(_DIRENT.pack(ino, next_off, len(name), dirent_type(mode)), name)


def direntplus(attr: Attr, next_off: int, name: bytes) -> bytes:
    """One ``fuse_direntplus`` record (READDIRPLUS), padded to 8 bytes."""
    fixed = entry_out(attr) + _DIRENT.pack(attr.st_ino, next_off, len(name),
                                           dirent_type(attr.st_mode))
    return _record(fixed, name)


class DirentBuffer:
    """Whole directory records up to ``size`` bytes (the READDIR request's size)."""

    __slots__ = ("parts", "size", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.parts: list[bytes] = []

    def add(self, record: bytes) -> bool:
        """Append ``record``; False (nothing added) when it does not fit."""
        if self.used + len(record) > self.size:
            return False
        self.parts.append(record)
        self.used += len(record)
        return True


@dataclass(frozen=True, slots=True)
class InitOffer:
    """What the kernel's INIT request offers."""

    major: int
    minor: int
    max_readahead: int
    flags: int


def parse_init(body: bytes | memoryview) -> InitOffer:
    """The ``fuse_init_in`` body of an INIT request, ``flags`` widened to 64 bits with
    ``flags2`` when the kernel sets INIT_EXT; raises ProtocolError if short."""
    if len(body) < _INIT_IN.size:
        raise ProtocolError("INIT request too short")
    major, minor, max_readahead, flags = _INIT_IN.unpack_from(body)
    if flags & INIT_EXT and len(body) >= _INIT_IN.size + _INIT_IN_FLAGS2.size:
        (flags2,) = _INIT_IN_FLAGS2.unpack_from(body, _INIT_IN.size)
        flags |= flags2 << 32
    return InitOffer(major, minor, max_readahead, flags)


def init_reply(offer: InitOffer, *, max_background: int, max_write: int,
               max_pages: int, passthrough: bool = False) -> tuple[bytes, int]:
    """The ``fuse_init_out`` answering ``offer`` and the flags agreed on.

    ``passthrough`` asks for FUSE passthrough when the kernel offers it (Linux 6.9+):
    backing files one level deep (``max_stack_depth`` 1, so an overlay still fits on
    top). Raises ProtocolError for a kernel whose major version is not 7 or whose minor
    is below 23 (older than Linux 3.15: no READDIRPLUS / max_pages semantics to rely on).
    """
    if offer.major != MAJOR:
        raise ProtocolError(f"kernel FUSE protocol {offer.major}.{offer.minor}, need 7.x")
    if offer.minor < 23:
        raise ProtocolError(f"kernel FUSE protocol 7.{offer.minor} is too old (need 7.23)")
    flags = offer.flags & WANTED_FLAGS
    if passthrough and offer.flags & PASSTHROUGH and offer.flags & INIT_EXT:
        flags |= PASSTHROUGH
    wire = flags | INIT_EXT if flags >> 32 else flags
    reply = _INIT_OUT.pack(MAJOR, min(offer.minor, MINOR), offer.max_readahead,
                           wire & 0xFFFFFFFF, max_background, max_background * 3 // 4,
                           max_write, 1, max_pages, 0, wire >> 32,
                           1 if flags & PASSTHROUGH else 0)
    return reply, flags


def open_out(open_flags: int, backing_id: int = 0, fh: int = 0) -> bytes:
    """``fuse_open_out``: the answer to OPEN."""
    return _OPEN_OUT.pack(fh, open_flags, backing_id)


def statfs_out(*, blocks: int, files: int, bsize: int, namelen: int) -> bytes:
    """``fuse_statfs_out`` of a full read-only file system (no free blocks or inodes)."""
    return _KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def getxattr_size(size: int) -> bytes:
    """``fuse_getxattr_out``: the answer to a GETXATTR/LISTXATTR that asked for the size."""
    return GETXATTR_OUT.pack(size, 0)


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    """``fuse_out_header`` of a reply (``error`` is 0 or a negative errno)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, error, unique)


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """The whole FUSE_NOTIFY_INVAL_ENTRY message for ``name`` in directory ``parent``."""
    body = _INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def notify_inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """The whole FUSE_NOTIFY_INVAL_INODE message: attributes of ``ino`` and its cached
    pages from ``offset`` (``length`` 0: to the end; a negative offset keeps the pages).
    For a directory this also drops its cached listing."""
    body = _INVAL_INODE.pack(ino, offset, length)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body


def cstring(body: bytes | memoryview, start: int = 0) -> bytes:
    """The NUL-terminated string at ``start`` of ``body`` (without the NUL); raises
    ProtocolError when there is no NUL."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("name without its terminating NUL")
    return raw[:end]


class FuseError(Exception):
    """A request's answer is this errno (raised by request handlers)."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_

    def __str__(self) -> str:
        return f"FUSE error {self.errno} ({os.strerror(self.errno)})"


@dataclass(frozen=True, slots=True)
class StatFs:
    """What a STATFS answer says of a read-only file system."""

    blocks: int
    files: int
    bsize: int = 4096
    namelen: int = 255
