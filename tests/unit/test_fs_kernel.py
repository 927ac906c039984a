"""Kernel tuning of a FUSE mount: finding the mount's device, writing its read-ahead."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.fs.fuse.kernel import mount_device, set_read_ahead


def mountinfo(tmp_path: Path, *mounts: tuple[str, str]) -> str:
    """A mountinfo file listing ``(major:minor, mount point as escaped there)``."""
    lines = [f"{20 + i} 1 {dev} / {point} ro,relatime - fuse.lazysnap lazysnap ro\n"
             for i, (dev, point) in enumerate(mounts)]
    path = tmp_path / "mountinfo"
    path.write_text("".join(lines))
    return str(path)


def test_mount_device_finds_the_last_mount_at_a_path(tmp_path: Path) -> None:
    mnt = tmp_path / "snapshots" / "4" / "fs"
    info = mountinfo(tmp_path, ("0:40", str(mnt)), ("0:41", "/elsewhere"), ("0:42", str(mnt)))
    assert mount_device(str(mnt), info) == "0:42"
    assert mount_device(str(mnt) + "/", info) == "0:42"
    assert mount_device("/not/mounted", info) is None
    assert mount_device(str(mnt), str(tmp_path / "missing")) is None


def test_mount_device_undoes_octal_escapes(tmp_path: Path) -> None:
    mnt = tmp_path / "a dir\\x"
    escaped = str(mnt).replace("\\", "\\134").replace(" ", "\\040")
    info = mountinfo(tmp_path, ("0:50", escaped))
    assert mount_device(str(mnt), info) == "0:50"


def test_mount_device_resolves_symlinks_in_the_parent(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "fs").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    info = mountinfo(tmp_path, ("0:51", str(real / "fs")))
    assert mount_device(str(tmp_path / "link" / "fs"), info) == "0:51"


def test_set_read_ahead_writes_the_bdi_of_the_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "fs"
    info = mountinfo(tmp_path, ("0:60", str(mnt)))
    bdi = tmp_path / "bdi"
    (bdi / "0:60").mkdir(parents=True)
    (bdi / "0:60" / "read_ahead_kb").write_text("128\n")
    assert set_read_ahead(str(mnt), 4096, mountinfo=info, bdi_root=str(bdi))
    assert (bdi / "0:60" / "read_ahead_kb").read_text() == "4096\n"


@pytest.mark.parametrize("case", ["zero", "no mount", "no bdi"])
def test_set_read_ahead_is_best_effort(tmp_path: Path, case: str) -> None:
    mnt = tmp_path / "fs"
    info = mountinfo(tmp_path, ("0:61", str(mnt) if case != "no mount" else "/x"))
    bdi = tmp_path / "bdi"
    bdi.mkdir()
    kib = 0 if case == "zero" else 1024
    assert not set_read_ahead(str(mnt), kib, mountinfo=info, bdi_root=str(bdi))
    assert list(bdi.iterdir()) == []
