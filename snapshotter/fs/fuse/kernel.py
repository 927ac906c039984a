"""Kernel-side tuning of a FUSE mount that the FUSE protocol itself cannot express.

The kernel reads ahead on a FUSE file through the mount's backing device info (bdi,
``/sys/class/bdi/<major>:<minor>``), whose ``read_ahead_kb`` starts at 128 KiB for every
FUSE mount; the FUSE INIT reply can only lower it. That window also caps the size of the
read requests the daemon gets (128 KiB, while the connection allows 1 MiB: libfuse 3
negotiates ``max_pages`` = 256), and sequential reads from the page-cache-cold chunk cache
pay the per-request cost of the Python handlers once per 128 KiB. ``set_read_ahead``
raises it. It must run after the kernel has processed the daemon's INIT reply, which sets
the window to the smaller of the current one and the reply's ``max_readahead`` (libfuse
echoes the kernel's 128 KiB): the daemon calls it right after its INIT handler.

The mount is found in ``/proc/self/mountinfo`` by its mount point, never with ``stat``:
a ``stat`` of the mount point would be a FUSE request to the very daemon that is setting
up and not yet serving.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
BDI_ROOT = "/sys/class/bdi"


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space ...) undone."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mount_device(mountpoint: str, mountinfo: str = MOUNTINFO) -> str | None:
    """``"major:minor"`` of the file system mounted last at ``mountpoint``, or None.

    ``mountpoint`` is compared after ``os.path.realpath`` of its parent (the mount point
    itself is not resolved: that would be a request to the mount). Reads ``mountinfo``;
    an unreadable file means None.
    """
    parent, name = os.path.split(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(parent), name)
    found: str | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and _unescape(fields[4]) == target:
                    found = fields[2]  # later lines are mounted on top of earlier ones
    except OSError:
        return None
    return found


def set_read_ahead(mountpoint: str, kib: int, *, mountinfo: str = MOUNTINFO,
                   bdi_root: str = BDI_ROOT) -> bool:
    """Set the kernel read-ahead window of the mount at ``mountpoint`` to ``kib`` KiB.

    Returns True when it was written. ``kib <= 0`` leaves the kernel's default and
    returns False. Best effort: a mount that cannot be found, a missing bdi directory or
    a refused write (no root, read-only sysfs in a container) is logged and returns
    False; the mount works either way, only with smaller reads.
    """
    if kib <= 0:
        return False
    dev = mount_device(mountpoint, mountinfo)
    if dev is None:
        log.warning("read-ahead not set: no mount found at %s", mountpoint)
        return False
    path = os.path.join(bdi_root, dev, "read_ahead_kb")
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.warning("read-ahead not set for %s (%s): %s", mountpoint, path, exc)
        return False
    log.debug("read-ahead of %s (bdi %s) set to %d KiB", mountpoint, dev, kib)
    return True
