"""Tell a RAFS v5 bootstrap from a RAFS v6 one by its first bytes (protocol-reference §5.4).

nydus-snapshotter reads at most ``MAX_SUPERBLOCK_SIZE`` (8 KiB) from the start of
``image.boot`` and decides:

* RAFS v5 when the little-endian u32 at 0 is ``0x52414653`` (the bytes ``SFAR``) and the
  u32 at 4 is ``0x500``;
* RAFS v6 when at least ``RAFS_V6_MIN_HEAD`` (1408) bytes are there and the u32 at 1024 is
  the EROFS magic ``0xE0F5E1E2``.

Only these bytes are looked at: a "detected" bootstrap may still be malformed, which the
parsers in ``rafs_v5``/``rafs_v6`` report. Every integer is read little-endian whatever the
host (nydus-snapshotter reads the v6 magic in native order, which is the same on x86/arm).
"""

from __future__ import annotations

import struct

from snapshotter.errdefs import FormatError

RAFS_V5 = "rafs-v5"
RAFS_V6 = "rafs-v6"

MAX_SUPERBLOCK_SIZE = 8192
RAFS_V5_MAGIC = 0x52414653
RAFS_V5_VERSION = 0x500
EROFS_SUPER_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
RAFS_V6_MIN_HEAD = 1024 + 128 + 256

_U32 = struct.Struct("<I")


def sniff(head: bytes) -> str | None:
    """Return ``"rafs-v5"``, ``"rafs-v6"`` or None for the first bytes of a file.

    Never raises: bytes that are neither (too short, other magic) give None. Only the
    first ``MAX_SUPERBLOCK_SIZE`` bytes are considered, as nydus-snapshotter does.
    """
    head = head[:MAX_SUPERBLOCK_SIZE]
    if len(head) >= 8:
        magic, version = _U32.unpack_from(head, 0)[0], _U32.unpack_from(head, 4)[0]
        if magic == RAFS_V5_MAGIC and version == RAFS_V5_VERSION:
            return RAFS_V5
    v6_magic = _U32.unpack_from(head, EROFS_SUPER_OFFSET)[0] if len(head) >= RAFS_V6_MIN_HEAD else 0
    if v6_magic == EROFS_MAGIC:
        return RAFS_V6
    return None


def detect_fs_version(head: bytes) -> str:
    """Like ``sniff`` but raise FormatError (naming what was found) instead of returning None."""
    found = sniff(head)
    if found is not None:
        return found
    if len(head) >= 8 and _U32.unpack_from(head, 0)[0] == RAFS_V5_MAGIC:
        version = _U32.unpack_from(head, 4)[0]
        raise FormatError(f"RAFS superblock with unsupported version {version:#x} (want 0x500)")
    raise FormatError(
        f"not a RAFS bootstrap: no RAFS v5 magic at 0 and no EROFS magic at {EROFS_SUPER_OFFSET}"
        f" ({min(len(head), MAX_SUPERBLOCK_SIZE)} bytes examined)"
    )
