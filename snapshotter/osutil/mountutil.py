"""Thin wrappers over mount(2)/umount2(2) and /proc/self/mountinfo.

Raise OSError with the errno of the failed call. Used for the start-up overlay probe, for
bind mounts of shared-mode layers, and to find and remove leftover mounts under a root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

MS_RDONLY = 1
MS_BIND = 4096
MS_REC = 16384
MNT_FORCE = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raise OSError on failure."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def unmount(target: str, flags: int = 0) -> None:
    """umount2(2); raise OSError on failure (EINVAL when ``target`` is not mounted)."""
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field  # the common case: nothing escaped
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: str | Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them in)."""
    prefix = str(Path(root))
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: str | Path) -> None:
    """Lazily unmount everything at or below ``root``; mounts already gone are ignored."""
    for point in mounts_under(root):
        with contextlib.suppress(OSError):
            unmount(point, MNT_DETACH)
