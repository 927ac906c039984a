"""OpenModes without a kernel: page-cache mode when there is no backing file, a refused
registration turns passthrough off for good, and an inode keeps its mode while handles
are open. (Registration itself, on a real FUSE device, is in
tests/integration/test_fuse_session.py.)"""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.fs.fuse import wire as w
from snapshotter.fs.fuse.passthrough import CACHED, OpenModes


def test_no_backing_file_means_page_cache_mode(tmp_path: Path) -> None:
    asked: list[int] = []

    def source(ino: int) -> str | None:
        asked.append(ino)
        return None

    modes = OpenModes(-1, source)
    assert modes.open(5) == (w.FOPEN_KEEP_CACHE, 0, CACHED)
    assert modes.open(5) == (w.FOPEN_KEEP_CACHE, 0, CACHED)  # a second handle: same mode
    assert asked == [5]
    modes.release(5)
    modes.release(5)
    modes.release(5)  # one release too many is harmless
    assert modes.open(5) == (w.FOPEN_KEEP_CACHE, 0, CACHED)
    assert asked == [5, 5]  # all handles gone: the mode is chosen again


def test_a_refused_registration_turns_passthrough_off(tmp_path: Path) -> None:
    backing = tmp_path / "whole"
    backing.write_bytes(b"x" * 100)
    fd = os.open(os.devnull, os.O_RDWR)  # not a FUSE device: the ioctl is refused
    try:
        modes = OpenModes(fd, lambda ino: str(backing))
        assert modes.open(1) == (w.FOPEN_KEEP_CACHE, 0, CACHED)
        assert not modes.enabled
        modes.release(1)
        assert modes.open(2) == (w.FOPEN_KEEP_CACHE, 0, CACHED)
    finally:
        os.close(fd)


def test_a_vanished_backing_file_is_page_cache_mode(tmp_path: Path) -> None:
    modes = OpenModes(-1, lambda ino: str(tmp_path / "evicted"))
    assert modes.open(3) == (w.FOPEN_KEEP_CACHE, 0, CACHED)
    assert modes.enabled  # nothing was refused
