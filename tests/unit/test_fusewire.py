"""The FUSE protocol encoders (fs/fusewire.py), byte for byte against the layouts of
``linux/fuse.h``. Every field is decoded here with ``struct`` at its offset in the C
structure, independently of the module's own ``Struct``s (native byte order, as the
kernel reads them)."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from snapshotter.fs.fuse import wire as w

MTIME = 1_700_000_000_123_456_789
ATIME = 1_600_000_000_000_000_001
CTIME = 1_650_000_000_999_999_999

# sizeof() of the structures in linux/fuse.h
IN_HEADER_SIZE = 40
OUT_HEADER_SIZE = 16
ATTR_SIZE = 88
ENTRY_OUT_SIZE = 128
ATTR_OUT_SIZE = 104
KSTATFS_SIZE = 80
INIT_OUT_SIZE = 64
DIRENT_SIZE = 24  # without the name
INVAL_INODE_SIZE = 24
INVAL_ENTRY_SIZE = 16


def u64(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("=Q", buf, off)[0])


def s64(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("=q", buf, off)[0])


def u32(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("=I", buf, off)[0])


def s32(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("=i", buf, off)[0])


def u16(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("=H", buf, off)[0])


def sample_attr(**kw: int | float) -> w.Attr:
    a = w.Attr()
    a.st_ino = 0x1_0000_0007
    a.st_mode = stat.S_IFREG | 0o640
    a.st_nlink = 3
    a.st_uid = 1000
    a.st_gid = 1001
    a.st_size = 25_600
    a.st_blocks = 50
    a.st_blksize = 4096
    a.st_atime_ns = ATIME
    a.st_mtime_ns = MTIME
    a.st_ctime_ns = CTIME
    a.entry_timeout = 1.5
    a.attr_timeout = 700.25
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def check_attr(buf: bytes, at: int, a: w.Attr) -> None:
    """``struct fuse_attr`` at offset ``at`` of ``buf`` is ``a`` (rdev 0 here)."""
    assert u64(buf, at + 0) == a.st_ino
    assert u64(buf, at + 8) == a.st_size
    assert u64(buf, at + 16) == a.st_blocks
    assert u64(buf, at + 24) == a.st_atime_ns // 10**9
    assert u64(buf, at + 32) == a.st_mtime_ns // 10**9
    assert u64(buf, at + 40) == a.st_ctime_ns // 10**9
    assert u32(buf, at + 48) == a.st_atime_ns % 10**9
    assert u32(buf, at + 52) == a.st_mtime_ns % 10**9
    assert u32(buf, at + 56) == a.st_ctime_ns % 10**9
    assert u32(buf, at + 60) == a.st_mode
    assert u32(buf, at + 64) == a.st_nlink
    assert u32(buf, at + 68) == a.st_uid
    assert u32(buf, at + 72) == a.st_gid
    assert u32(buf, at + 80) == a.st_blksize
    assert u32(buf, at + 84) == 0  # flags


def test_request_header_is_40_bytes_and_parsed_field_by_field() -> None:
    assert w.IN_HEADER.size == IN_HEADER_SIZE
    raw = struct.pack("=IIQQIIIHH", 123, w.LOOKUP, 0xDEAD_BEEF_0001, (7 << 32) | 5,
                      1000, 1001, 4242, 0, 0)
    h = w.parse_header(raw + b"name\0")
    assert (h.length, h.opcode, h.unique, h.nodeid) == (123, 1, 0xDEAD_BEEF_0001, (7 << 32) | 5)
    assert (h.uid, h.gid, h.pid) == (1000, 1001, 4242)
    assert w.parse_header(memoryview(raw)).opcode == w.LOOKUP
    with pytest.raises(w.ProtocolError):
        w.parse_header(raw[:39])


def test_opcode_numbers_match_linux_fuse_h() -> None:
    assert (w.LOOKUP, w.FORGET, w.GETATTR, w.READLINK, w.OPEN, w.READ) == (1, 2, 3, 5, 14, 15)
    assert (w.STATFS, w.GETXATTR, w.LISTXATTR, w.INIT, w.OPENDIR, w.READDIR) == (
        17, 22, 23, 26, 27, 28)
    assert (w.ACCESS, w.DESTROY, w.BATCH_FORGET, w.READDIRPLUS) == (34, 38, 42, 44)
    assert (w.NOTIFY_INVAL_INODE, w.NOTIFY_INVAL_ENTRY) == (2, 3)
    assert w.OPEN not in w.WRITE_OPCODES and w.WRITE in w.WRITE_OPCODES
    assert {w.MKDIR, w.UNLINK, w.CREATE, w.SETXATTR, w.SETATTR} <= w.WRITE_OPCODES


def test_entry_out_layout() -> None:
    a = sample_attr()
    buf = w.entry_out(a)
    assert len(buf) == ENTRY_OUT_SIZE
    assert u64(buf, 0) == a.st_ino  # nodeid
    assert u64(buf, 8) == 0  # generation
    assert u64(buf, 16) == 1  # entry_valid
    assert u64(buf, 24) == 700  # attr_valid
    assert u32(buf, 32) == 500_000_000  # entry_valid_nsec
    assert u32(buf, 36) == 250_000_000  # attr_valid_nsec
    check_attr(buf, 40, a)
    assert u32(buf, 40 + 60) == stat.S_IFREG | 0o640  # attr.mode
    assert u32(buf, 40 + 76) == 0  # attr.rdev


def test_attr_out_layout() -> None:
    a = sample_attr(attr_timeout=0.0)
    buf = w.attr_out(a)
    assert len(buf) == ATTR_OUT_SIZE
    assert (u64(buf, 0), u32(buf, 8), u32(buf, 12)) == (0, 0, 0)  # valid, nsec, dummy
    check_attr(buf, 16, a)
    a.attr_timeout = 3600.0
    assert (u64(w.attr_out(a), 0), u32(w.attr_out(a), 8)) == (3600, 0)


def new_decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's ``new_decode_dev`` (include/linux/kdev_t.h)."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


@pytest.mark.parametrize(("major", "minor", "encoded"), [
    (8, 1, 0x801),  # /dev/sda1
    (1, 3, 0x103),  # /dev/null
    (0, 0, 0),  # an overlayfs whiteout
    (259, 0x12345, 0x12310345),  # a minor above 255 goes to bits 20..31
])
def test_rdev_is_the_kernels_new_encode_dev(major: int, minor: int, encoded: int) -> None:
    a = sample_attr(st_mode=stat.S_IFCHR | 0o666, st_rdev=os.makedev(major, minor))
    assert u32(w.entry_out(a), 40 + 76) == encoded
    assert u32(w.attr_out(a), 16 + 76) == encoded
    assert new_decode_dev(encoded) == (major, minor)


def test_dirent_records_are_padded_to_8_bytes() -> None:
    for name, size in ((b"a", 32), (b"abcdefgh", 32), (b"abcdefghi", 40), (b"x" * 255, 280)):
        rec = w.dirent(77, 9, name, stat.S_IFREG | 0o644)
        assert len(rec) == size and len(rec) % 8 == 0
        assert (u64(rec, 0), u64(rec, 8), u32(rec, 16), u32(rec, 20)) == (
            77, 9, len(name), 8)  # ino, off, namelen, type DT_REG
        assert rec[DIRENT_SIZE:DIRENT_SIZE + len(name)] == name
        assert rec[DIRENT_SIZE + len(name):] == b"\0" * (size - DIRENT_SIZE - len(name))
    types = {stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
             stat.S_IFIFO: 1, stat.S_IFSOCK: 12, stat.S_IFREG: 8}
    for fmt, dt in types.items():
        assert u32(w.dirent(1, 1, b"n", fmt | 0o755), 20) == dt
        assert w.dirent_type(fmt) == dt


def test_direntplus_is_an_entry_out_then_a_dirent() -> None:
    a = sample_attr(st_mode=stat.S_IFDIR | 0o755)
    rec = w.direntplus(a, 12, b"etc")
    assert len(rec) == 160  # FUSE_DIRENT_ALIGN(128 + 24 + 3)
    assert rec[:ENTRY_OUT_SIZE] == w.entry_out(a)
    d = ENTRY_OUT_SIZE
    assert (u64(rec, d), u64(rec, d + 8), u32(rec, d + 16), u32(rec, d + 20)) == (
        a.st_ino, 12, 3, 4)
    assert rec[d + DIRENT_SIZE:] == b"etc" + b"\0" * 5
    assert len(w.direntplus(a, 1, b"x" * 8)) == 160  # 160 exactly: no padding added


def split_records(buf: bytes, fixed: int) -> list[bytes]:
    """Names of the whole records in a READDIR(PLUS) answer, as the kernel parses it; fails
    on a partial record."""
    names, pos = [], 0
    while pos < len(buf):
        namelen = u32(buf, pos + fixed - 8)
        size = (fixed + namelen + 7) & ~7
        assert pos + size <= len(buf), "a record was split"
        names.append(buf[pos + fixed:pos + fixed + namelen])
        pos += size
    return names


def test_dirent_buffer_never_splits_a_record() -> None:
    a = sample_attr()
    records = [w.direntplus(a, i + 1, b"n%d" % i * (i % 7 + 1)) for i in range(40)]
    for size in (0, 100, 160, 1000, 4096, sum(map(len, records))):
        buf = w.DirentBuffer(size)
        added = 0
        for rec in records:
            if not buf.add(rec):
                break
            added += 1
        out = b"".join(buf.parts)
        assert len(out) == buf.used <= size
        assert split_records(out, ENTRY_OUT_SIZE + DIRENT_SIZE) == [
            b"n%d" % i * (i % 7 + 1) for i in range(added)]
        if added < len(records):  # stopped only because the next one did not fit
            assert buf.used + len(records[added]) > size
    small = w.DirentBuffer(64)
    assert small.add(b"\0" * 32) and small.add(b"\0" * 32)  # an exact fit is fine
    assert not small.add(b"\0" * 8) and small.used == 64 and len(small.parts) == 2
    plain = w.DirentBuffer(100)
    for i in range(5):
        plain.add(w.dirent(i + 2, i + 1, b"file%d" % i, stat.S_IFREG))
    assert split_records(b"".join(plain.parts), DIRENT_SIZE) == [b"file0", b"file1", b"file2"]


def init_in(major: int, minor: int, flags: int, max_readahead: int = 131072) -> bytes:
    return struct.pack("=IIII", major, minor, max_readahead, flags) + b"\0" * 48


def test_init_reply_agrees_on_the_common_flags_and_protocol() -> None:
    offered = (w.ASYNC_READ | w.EXPORT_SUPPORT | w.DO_READDIRPLUS | w.READDIRPLUS_AUTO
               | w.NO_OPEN_SUPPORT | w.NO_OPENDIR_SUPPORT | w.MAX_PAGES | (1 << 31))
    offer = w.parse_init(init_in(7, 38, offered))
    assert (offer.major, offer.minor, offer.max_readahead, offer.flags) == (
        7, 38, 131072, offered)
    reply, flags = w.init_reply(offer, max_background=64, max_write=131072, max_pages=256)
    assert flags == offered & w.WANTED_FLAGS == w.ASYNC_READ | w.DO_READDIRPLUS | w.MAX_PAGES
    assert len(reply) == INIT_OUT_SIZE
    assert (u32(reply, 0), u32(reply, 4)) == (7, 31)  # min(kernel, 31)
    assert u32(reply, 8) == 131072  # max_readahead: the kernel's
    assert u32(reply, 12) == flags
    assert (u16(reply, 16), u16(reply, 18)) == (64, 48)  # max_background, congestion
    assert (u32(reply, 20), u32(reply, 24)) == (131072, 1)  # max_write, time_gran
    assert (u16(reply, 28), u16(reply, 30), u32(reply, 32)) == (256, 0, 0)
    assert reply[36:] == b"\0" * 28
    older, _ = w.init_reply(w.parse_init(init_in(7, 26, w.WANTED_FLAGS)), max_background=4,
                            max_write=4096, max_pages=1)
    assert u32(older, 4) == 26 and u32(older, 12) == w.WANTED_FLAGS
    oldest, _ = w.init_reply(w.parse_init(init_in(7, 23, 0)), max_background=4,
                             max_write=4096, max_pages=1)
    assert u32(oldest, 4) == 23 and u32(oldest, 12) == 0


def init_in_ext(minor: int, flags: int) -> bytes:
    """A ``fuse_init_in`` with ``flags2`` (the high 32 bits) at offset 16."""
    return (struct.pack("=IIIII", 7, minor, 131072, flags & 0xFFFFFFFF, flags >> 32)
            + b"\0" * 44)


def test_init_reply_agrees_on_passthrough_only_when_asked_and_offered() -> None:
    offered = w.ASYNC_READ | w.INIT_EXT | w.PASSTHROUGH
    assert (w.INIT_EXT, w.PASSTHROUGH) == (1 << 30, 1 << 37)
    offer = w.parse_init(init_in_ext(40, offered))
    assert offer.flags == offered  # flags2 read, since INIT_EXT is set
    reply, flags = w.init_reply(offer, max_background=4, max_write=4096, max_pages=1,
                                passthrough=True)
    assert flags == w.ASYNC_READ | w.PASSTHROUGH
    assert u32(reply, 12) == w.ASYNC_READ | w.INIT_EXT  # flags: low half, flags2 valid
    assert u32(reply, 32) == 1 << 5  # flags2: PASSTHROUGH is bit 37
    assert u32(reply, 36) == 1  # max_stack_depth: one level of backing files
    assert reply[40:] == b"\0" * 24
    for other, asked in ((offer, False),  # not asked
                         (w.parse_init(init_in_ext(40, w.ASYNC_READ | w.INIT_EXT)), True),
                         # flags2 without INIT_EXT is not read
                         (w.parse_init(init_in_ext(40, w.ASYNC_READ | w.PASSTHROUGH)), True)):
        reply, flags = w.init_reply(other, max_background=4, max_write=4096, max_pages=1,
                                    passthrough=asked)
        assert flags == w.ASYNC_READ
        assert (u32(reply, 12), u32(reply, 32), u32(reply, 36)) == (w.ASYNC_READ, 0, 0)


def test_open_out_layout() -> None:
    out = w.open_out(w.FOPEN_PASSTHROUGH, 7, fh=2)
    assert len(out) == 16  # fh, open_flags, backing_id
    assert (u64(out, 0), u32(out, 8), s32(out, 12)) == (2, 1 << 7, 7)
    assert w.open_out(w.FOPEN_KEEP_CACHE) == struct.pack("=QIi", 0, 1 << 1, 0)


@pytest.mark.parametrize(("major", "minor"), [(6, 40), (8, 0), (7, 22), (7, 0)])
def test_init_from_an_unsupported_kernel_raises(major: int, minor: int) -> None:
    with pytest.raises(w.ProtocolError):
        w.init_reply(w.parse_init(init_in(major, minor, w.WANTED_FLAGS)), max_background=4,
                     max_write=4096, max_pages=1)


def test_a_short_init_request_raises() -> None:
    with pytest.raises(w.ProtocolError):
        w.parse_init(b"\0" * 15)


def test_statfs_out_layout() -> None:
    buf = w.statfs_out(blocks=7, files=5004, bsize=4096, namelen=255)
    assert len(buf) == KSTATFS_SIZE
    assert [u64(buf, off) for off in (0, 8, 16, 24, 32)] == [7, 0, 0, 5004, 0]
    assert [u32(buf, off) for off in (40, 44, 48, 52)] == [4096, 255, 4096, 0]
    assert buf[56:] == b"\0" * 24  # spare[6]


def test_out_header_and_getxattr_size() -> None:
    h = w.out_header(99, -errno.ENOENT, 0)
    assert len(h) == OUT_HEADER_SIZE
    assert (u32(h, 0), s32(h, 4), u64(h, 8)) == (16, -errno.ENOENT, 99)
    assert u32(w.out_header(5, 0, 104), 0) == 120
    assert w.getxattr_size(17) == struct.pack("=II", 17, 0)


def test_notify_inval_entry_layout() -> None:
    msg = w.notify_inval_entry(1, b"12")
    # the kernel wants exactly sizeof(outarg) + namelen + 1 after the header
    assert len(msg) == OUT_HEADER_SIZE + INVAL_ENTRY_SIZE + 2 + 1
    assert (u32(msg, 0), s32(msg, 4), u64(msg, 8)) == (len(msg), w.NOTIFY_INVAL_ENTRY, 0)
    assert (u64(msg, 16), u32(msg, 24), u32(msg, 28)) == (1, 2, 0)
    assert msg[32:] == b"12\0"


def test_notify_inval_inode_layout() -> None:
    msg = w.notify_inval_inode((3 << 32) | 1)
    assert len(msg) == OUT_HEADER_SIZE + INVAL_INODE_SIZE
    assert (u32(msg, 0), s32(msg, 4), u64(msg, 8)) == (40, w.NOTIFY_INVAL_INODE, 0)
    assert (u64(msg, 16), s64(msg, 24), s64(msg, 32)) == ((3 << 32) | 1, 0, 0)
    keep_pages = w.notify_inval_inode(5, -1, 0)
    assert (u64(keep_pages, 16), s64(keep_pages, 24)) == (5, -1)
    assert s64(w.notify_inval_inode(5, 4096, 8192), 32) == 8192


def test_cstring() -> None:
    assert w.cstring(b"hosts\0") == b"hosts"
    assert w.cstring(memoryview(b"\x10\0\0\0\0\0\0\0user.x\0junk"), 8) == b"user.x"
    assert w.cstring(b"\0") == b""
    with pytest.raises(w.ProtocolError):
        w.cstring(b"no terminator")
    with pytest.raises(w.ProtocolError):
        w.cstring(b"ab\0cd", 3)


def test_fuse_error_carries_its_errno() -> None:
    exc = w.FuseError(errno.ENOENT)
    assert exc.errno == errno.ENOENT and os.strerror(errno.ENOENT) in str(exc)
    s = w.StatFs(blocks=1, files=2)
    assert (s.bsize, s.namelen) == (4096, 255)
