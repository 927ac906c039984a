"""FUSE passthrough bookkeeping for a session: which open mode each inode is in, and the
backing files registered with the kernel.

With passthrough (Linux 6.9+) an OPEN may be answered with ``FOPEN_PASSTHROUGH`` and a
backing id, and the kernel then reads that file itself. The kernel refuses (EIO) an open
whose mode differs from the inode's other open handles, so ``OpenModes`` counts each
inode's handles by mode (OPEN adds one, RELEASE takes one away) and keeps the mode they
have while any is open.

Contracts:

* ``open(ino)`` returns ``(open_flags, backing_id, fh)`` for the OPEN answer: passthrough
  when the inode has no open handle and ``source(ino)`` names a file that can be
  registered, page cache kept (``FOPEN_KEEP_CACHE``) otherwise. ``fh`` is the mode.
* ``release(ino)`` forgets one handle; the inode's last one also gives its backing id
  back to the kernel (else an evicted cache file's disk space stays in use). Safe: a new
  OPEN can only use the id after the session answered it, and its RELEASE comes after
  the kernel took its own reference to the file.
* A refused registration (old kernel, no CAP_SYS_ADMIN, a backing file on a file system
  stacked too deep) is logged once and sets ``enabled`` to False for good; opens are
  then answered in page-cache mode.
* At most ``max_backing`` backing files are registered at once; beyond that, new inodes
  open in page-cache mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from collections.abc import Callable

from snapshotter.fs.fuse import wire as w

log = logging.getLogger(__name__)

CACHED, PASSTHROUGH = 1, 2  # the mode of an open handle (its fh)
MAX_BACKING = 1024


class OpenModes:
    """See the module docstring. ``device_fd`` is the session's ``/dev/fuse``
    descriptor; ``source(ino)`` the local file with all of ``ino``'s bytes, or None."""

    def __init__(self, device_fd: int, source: Callable[[int], str | None], *,
                 max_backing: int = MAX_BACKING) -> None:
        self._fd = device_fd
        self._source = source
        self._max = max_backing
        self.enabled = True
        self._backing: dict[int, int] = {}  # ino -> backing id, while it has open handles
        self._opens: dict[int, tuple[int, int]] = {}  # ino -> (mode, open handles)

    def open(self, ino: int) -> tuple[int, int, int]:
        """(open_flags, backing_id, fh) for an OPEN of ``ino``; counts the handle."""
        mode, count = self._opens.get(ino, (CACHED, 0))
        if count == 0:
            mode = PASSTHROUGH if self._backing_id(ino) is not None else CACHED
        self._opens[ino] = (mode, count + 1)
        if mode == PASSTHROUGH:
            return w.FOPEN_PASSTHROUGH, self._backing[ino], mode
        return w.FOPEN_KEEP_CACHE, 0, mode

    def release(self, ino: int) -> None:
        """One handle of ``ino`` fewer (see the module docstring)."""
        mode, count = self._opens.get(ino, (CACHED, 0))
        if count > 1:
            self._opens[ino] = (mode, count - 1)
            return
        self._opens.pop(ino, None)
        backing = self._backing.pop(ino, None)
        if backing is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._fd, w.DEV_IOC_BACKING_CLOSE, struct.pack("=I", backing))

    def _backing_id(self, ino: int) -> int | None:
        found = self._backing.get(ino)
        if found is not None:
            return found
        if not self.enabled or len(self._backing) >= self._max:
            return None
        path = self._source(ino)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # evicted meanwhile
        try:
            arg = bytearray(w.BACKING_MAP.pack(fd, 0, 0))
            backing = int(fcntl.ioctl(self._fd, w.DEV_IOC_BACKING_OPEN, arg, True))
        except OSError as exc:
            log.warning("FUSE passthrough refused (%s): reads go through the daemon", exc)
            self.enabled = False
            return None
        finally:
            os.close(fd)  # the kernel holds its own reference
        self._backing[ino] = backing
        return backing
