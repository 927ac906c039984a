"""RAFS version detection from a bootstrap's first bytes (protocol-reference §5.4)."""

from __future__ import annotations

import struct

import pytest

from snapshotter.errdefs import FormatError
from snapshotter.formats import detect
from tests.unit.test_rafs_writer import FIXTURES


def test_fixtures() -> None:
    v5 = (FIXTURES / "rafs-v5-sha256-nocompress" / "bootstrap").read_bytes()
    v6 = (FIXTURES / "rafs-v6" / "rafs-v6-2.2.boot").read_bytes()
    assert v5[:4] == b"SFAR"  # the magic 0x52414653 stored little-endian
    assert detect.detect_fs_version(v5) == detect.sniff(v5) == "rafs-v5"
    assert detect.detect_fs_version(v6) == detect.sniff(v6) == "rafs-v6"
    assert detect.sniff(v6[: detect.MAX_SUPERBLOCK_SIZE]) == "rafs-v6"


def test_minimal_heads() -> None:
    assert detect.sniff(struct.pack("<II", 0x52414653, 0x500)) == "rafs-v5"
    head = bytearray(1408)
    struct.pack_into("<I", head, 1024, 0xE0F5E1E2)
    assert detect.sniff(bytes(head)) == "rafs-v6"
    assert detect.sniff(bytes(head[:1407])) is None  # v6 needs 1024 + 128 + 256 bytes


def test_only_the_first_8k_count() -> None:
    head = bytes(8192) + struct.pack("<II", 0x52414653, 0x500)
    assert detect.sniff(head) is None


@pytest.mark.parametrize("head", [b"", b"SFAR", b"SFAR\x00\x04\x00\x00", bytes(9000),
                                  b"\x1f\x8b" + bytes(100)])
def test_not_rafs(head: bytes) -> None:
    assert detect.sniff(head) is None
    with pytest.raises(FormatError):
        detect.detect_fs_version(head)


def test_unsupported_version_is_named() -> None:
    with pytest.raises(FormatError, match="0x400"):
        detect.detect_fs_version(struct.pack("<II", 0x52414653, 0x400))
