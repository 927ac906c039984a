"""The RAFS v5 and v6 writers as the reader tests use them, plus the writers' self-checks.

The writers now live in ``snapshotter.tools.convert`` (the converter uses them); this module
keeps the names the tests import, with a 4 KiB default chunk size. ``write_v5`` and
``write_v6`` lay a tree out the way nydus-image does (protocol-reference §5.5/§5.6): v5
with breadth-first child ranges in the inode table and one record per name, v6 as an
EROFS image with dirents, inline tails, chunk indexes, the RAFS extended superblock,
device/blob/chunk/prefetch tables. Each returns an ``Image`` holding the bootstrap and
``{blob_id: blob bytes}``. ``write_v6`` output with ``compression="none"`` keeps every
chunk at its uncompressed (4 KiB aligned) offset, so ``fsck.erofs --device`` can read it
as a plain multi-device EROFS image (checked below).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

from snapshotter.tools.convert.tree import BS, Image, Spec, encode_rdev
from snapshotter.tools.convert.write_v5 import write_v5 as _write_v5
from snapshotter.tools.convert.write_v6 import write_v6 as _write_v6

__all__ = ["BS", "FIXTURES", "SAMPLE", "Image", "Spec", "encode_rdev", "write_v5", "write_v6"]

_REPO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nydus"
FIXTURES = _REPO_FIXTURES if _REPO_FIXTURES.is_dir() else Path(
    os.environ.get("LAZYSNAP_NYDUS_FIXTURES", "/work/shared/fixtures/nydus"))
"""The upstream nydus fixtures (README there): ``tests/fixtures/nydus`` when vendored."""


def _align(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def write_v5(specs: list[Spec], *, chunk_size: int = BS, compression: str = "none",
             digest: str = "sha256", prefetch: tuple[str, ...] = ()) -> Image:
    """The production v5 writer with this file's historical default chunk size (4 KiB)."""
    return _write_v5(specs, chunk_size=chunk_size, compression=compression, digest=digest,
                     prefetch=prefetch)


def write_v6(specs: list[Spec], *, chunk_size: int = BS, compression: str = "none",
             digest: str = "blake3", prefetch: tuple[str, ...] = (),
             compact: bool = True) -> Image:
    """The production v6 writer with this file's historical default chunk size (4 KiB)."""
    return _write_v6(specs, chunk_size=chunk_size, compression=compression, digest=digest,
                     prefetch=prefetch, compact=compact)


# --- self-checks ---------------------------------------------------------------------------

SAMPLE = [
    Spec("etc", "dir", 0o755, mtime=1_700_000_000),
    Spec("etc/passwd", "reg", 0o644, uid=1, gid=2, data=b"root:x:0:0\n" * 500,
         xattrs={"user.note": b"hi", "security.selinux": b"ctx"}),
    Spec("etc/hosts", "hardlink", link="etc/passwd"),
    Spec("bin/sh", "symlink", 0o777, target=b"../usr/bin/busybox"),
    Spec("dev/null", "char", 0o666, rdev=(1, 3)),
    Spec("dev/sda1", "block", 0o660, rdev=(8, 300)),
    Spec("run/fifo", "fifo", 0o600),
    Spec("big", "reg", 0o600, uid=70000, mtime=5, mtime_nsec=7, data=os.urandom(3 * BS + 5)),
    Spec("empty", "reg", 0o644),
]


def test_v6_writer_output_is_a_valid_erofs_image(tmp_path: Path) -> None:
    """fsck.erofs accepts the writer's v6 output and extracts the same bytes."""
    image = write_v6(SAMPLE)
    ((_, blob),) = image.blobs.items()
    (tmp_path / "boot").write_bytes(image.bootstrap)
    (tmp_path / "blob").write_bytes(blob.ljust(_align(len(blob), BS), b"\0"))
    out = tmp_path / "out"
    res = subprocess.run(["fsck.erofs", f"--device={tmp_path / 'blob'}", f"--extract={out}",
                          str(tmp_path / "boot")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert (out / "etc" / "passwd").read_bytes() == SAMPLE[1].data
    assert (out / "big").read_bytes() == SAMPLE[7].data
    assert os.readlink(out / "bin" / "sh") == "../usr/bin/busybox"
    assert (out / "etc" / "hosts").read_bytes() == SAMPLE[1].data  # fsck 1.5 copies links
    nids = [_dump_nid(tmp_path, p) for p in ("/etc/hosts", "/etc/passwd")]
    assert nids[0] == nids[1]
    assert os.major(os.lstat(out / "dev" / "sda1").st_rdev) == 8
    assert os.minor(os.lstat(out / "dev" / "sda1").st_rdev) == 300


def _dump_nid(tmp_path: Path, path: str) -> str:
    res = subprocess.run(["dump.erofs", f"--device={tmp_path / 'blob'}", f"--path={path}",
                          str(tmp_path / "boot")], capture_output=True, text=True, check=True)
    return next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("NID:"))


def test_v5_writer_output_has_the_nydus_shape() -> None:
    image = write_v5(SAMPLE)
    boot = image.bootstrap
    assert boot[:4] == b"SFAR" and struct.unpack_from("<I", boot, 4)[0] == 0x500
    (blob_id,) = image.blobs
    assert blob_id.encode() in boot
