"""Read a local directory tree into the writers' ``Spec`` list.

Everything ``lstat`` reports is kept: type, permission bits (incl. setuid/setgid/sticky),
owner, mtime with nanoseconds, device numbers, symlink targets (as bytes), every xattr
the process may read (``user.``, ``trusted.``, ``security.`` ...), and hard links (a
second name of an already seen non-directory inode becomes ``kind="hardlink"``). Names
that are not UTF-8 are kept as surrogate escapes. Mount points below the root are not
crossed. Regular files are read whole into memory (the writers build the blob there).

Failure modes: ``InvalidArgument`` when ``root`` is not a directory; ``OSError`` from
reading the tree (a file vanishing mid-scan, no permission).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from snapshotter.errdefs import InvalidArgument
from snapshotter.tools.convert.tree import Spec

_KIND = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "sock"}
Progress = Callable[[int], None]


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return out


def _spec(rel: str, full: bytes, st: os.stat_result) -> Spec:
    kind = _KIND.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise InvalidArgument(f"{rel!r}: unsupported file type {st.st_mode:#o}")
    spec = Spec(rel, kind, stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                mtime=st.st_mtime_ns // 1_000_000_000, mtime_nsec=st.st_mtime_ns % 1_000_000_000,
                xattrs=_xattrs(full))
    if kind == "reg":
        with open(full, "rb") as f:
            spec.data = f.read()
    elif kind == "symlink":
        spec.target = os.readlink(full)
    elif kind in ("char", "block"):
        spec.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return spec


def scan(root: str | Path, progress: Progress | None = None) -> list[Spec]:
    """Every name below ``root`` (root's own metadata as path ``""``), parents first.

    ``progress(n)`` is called with the bytes of each regular file read.
    """
    base = os.fsencode(str(root))
    top = os.lstat(base)
    if not stat.S_ISDIR(top.st_mode):
        raise InvalidArgument(f"{root}: not a directory")
    specs = [_spec("", base, top)]
    specs[0].kind = "dir"
    seen: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        kept = []
        for name in [*dirnames, *sorted(filenames)]:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, base))
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != top.st_dev:
                    continue  # a mount point: not part of the tree
                kept.append(name)
            elif st.st_nlink > 1:
                first = seen.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    specs.append(Spec(rel, "hardlink", link=first))
                    continue
            spec = _spec(rel, full, st)
            specs.append(spec)
            if progress is not None and spec.kind == "reg":
                progress(len(spec.data))
        dirnames[:] = kept
    return specs
