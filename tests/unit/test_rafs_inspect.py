"""``inspect_rafs``, ``verify_blobs`` and the ``lazysnap inspect`` command (RAFS and eStargz)."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from snapshotter.errdefs import DigestMismatch, FormatError
from snapshotter.formats import rafs
from snapshotter.tools.inspect.estargz import tree_json
from snapshotter.tools.inspect.rafs import (
    add_arguments,
    bootstrap_from_tar,
    inspect_rafs,
    run,
    verify_blobs,
)
from tests import estargz_writer as W
from tests.unit.test_rafs_writer import FIXTURES, SAMPLE, write_v6

V5 = FIXTURES / "rafs-v5-sha256-nocompress"
V5_BOOT = V5 / "bootstrap"
V6 = FIXTURES / "rafs-v6"
V6_BOOT = V6 / "rafs-v6-2.2.boot"


def _run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    return run(parser.parse_args(list(argv)), out, err), out.getvalue(), err.getvalue()


def test_inspect_v5_fixture() -> None:
    doc = inspect_rafs(V5_BOOT.read_bytes())
    assert (doc["format"], doc["version"], doc["chunk_size"]) == ("rafs-v5", 5, 1 << 20)
    assert doc["flags"] == ["COMPRESSION_NONE", "HASH_SHA256"]
    assert doc["superblock"]["inodes_count"] == 51
    assert doc["superblock"]["inode_table_entries"] == 54
    assert doc["inodes"] == {"directory": 24, "file": 21, "link": 7}
    assert (doc["names"], doc["hardlinked"], doc["chunks"], doc["unique_chunks"]) == (54, 1, 27, 23)
    assert [b["blob_id"] for b in doc["blobs"]] == [
        "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"]
    json.dumps(doc)  # JSON-serialisable


def test_inspect_v6_fixture() -> None:
    doc = inspect_rafs(V6_BOOT.read_bytes())
    assert (doc["format"], doc["version"]) == ("rafs-v6", 6)
    assert doc["compression"] == ["zstd"] and doc["digest"] == ["blake3"]
    assert doc["superblock"]["erofs"]["root_nid"] == 128
    assert doc["superblock"]["rafs"]["chunk_table_size"] == 160
    assert doc["superblock"]["devices"][0]["blob_id"] == doc["blobs"][0]["blob_id"]
    assert doc["inodes"] == {"directory": 1, "file": 2} and doc["chunks"] == 2
    json.dumps(doc)


def test_inspect_reports_prefetch_and_whiteouts() -> None:
    image = write_v6(SAMPLE, prefetch=("etc",))
    doc = inspect_rafs(image.bootstrap)
    assert doc["prefetch"] == {"table_entries": 1, "files": ["/etc/hosts"]}
    assert doc["hardlinked"] == 1 and doc["whiteouts"] == 0


def test_verify_blobs_on_fixtures() -> None:
    v5 = verify_blobs(rafs.build_index(V5_BOOT.read_bytes()), V5 / "blobs")
    assert (v5["files"], v5["chunks"], v5["unique_chunks"], v5["bytes"]) == (21, 27, 23, 7703070)
    v6 = verify_blobs(rafs.build_index(V6_BOOT.read_bytes()), V6 / "blobs")
    assert (v6["files"], v6["chunks"], v6["unique_chunks"], v6["bytes"]) == (2, 2, 2, 30331)


def _copy_blobs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return next(dst.iterdir())


def test_verify_blobs_failures(tmp_path: Path) -> None:
    index = rafs.build_index(V5_BOOT.read_bytes())
    blob = _copy_blobs(V5 / "blobs", tmp_path / "blobs")
    original = blob.read_bytes()
    data = bytearray(original)
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="hardlink-test/foo"):
        verify_blobs(index, tmp_path / "blobs")
    blob.write_bytes(original[:1000])
    with pytest.raises(FormatError, match="ends before"):
        verify_blobs(index, tmp_path / "blobs")
    blob.unlink()
    with pytest.raises(FileNotFoundError):
        verify_blobs(index, tmp_path / "blobs")


def test_cli_raw_bootstraps(tmp_path: Path) -> None:
    code, out, err = _run(str(V5_BOOT), "--blob-dir", str(V5 / "blobs"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "rafs-v5" and doc["verified"]["chunks"] == 27
    code, out, err = _run(str(V6_BOOT), "--tree", "--blob-dir", str(V6 / "blobs"))
    assert code == 0, err
    assert json.loads(out) == tree_json(rafs.build_index(V6_BOOT.read_bytes()))
    assert "verified 2 chunks (2 unique) of 2 files" in err


def _layer(tmp_path: Path, name: str, boot: bytes, compress: bool) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for dirname in ("image",) if "/" in name else ():
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(boot), 0o444
        tar.addfile(info, io.BytesIO(boot))
    path = tmp_path / ("layer.tar.gz" if compress else "layer.tar")
    path.write_bytes(gzip.compress(raw.getvalue()) if compress else raw.getvalue())
    return path


@pytest.mark.parametrize("name", ["image/image.boot", "image.boot", "./image/image.boot"])
@pytest.mark.parametrize("compress", [True, False])
def test_cli_bootstrap_layer_tar(tmp_path: Path, name: str, compress: bool) -> None:
    boot = V6_BOOT.read_bytes()
    path = _layer(tmp_path, name, boot, compress)
    assert bootstrap_from_tar(str(path)) == boot
    code, out, err = _run(str(path), "--blob-dir", str(V6 / "blobs"))
    assert code == 0, err
    assert json.loads(out)["verified"]["files"] == 2


def test_cli_estargz_is_delegated(tmp_path: Path) -> None:
    built = W.build_estargz([W.reg("a.txt", b"hello")])
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(built.blob)
    code, out, err = _run(str(path), "--toc-digest", built.toc_digest)
    assert code == 0, err
    assert json.loads(out)["format"] == "estargz"
    code, out, _ = _run(str(path), "--tree")
    assert code == 0 and json.loads(out)[0]["contents"][0]["name"] == "a.txt"
    code, _, err = _run(str(path), "--blob-dir", str(tmp_path))
    assert code == 2 and "RAFS" in err


def test_cli_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"neither a blob nor a bootstrap" * 100)
    code, _, err = _run(str(junk))
    assert code == 1 and "not an eStargz blob" in err
    assert _run(str(tmp_path / "missing"))[0] == 2
    bad = tmp_path / "bad.boot"
    bad.write_bytes(V5_BOOT.read_bytes()[:9000])
    code, _, err = _run(str(bad))
    assert code == 1 and "bad.boot" in err
    blob = _copy_blobs(V6 / "blobs", tmp_path / "blobs")
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, _, err = _run(str(V6_BOOT), "--blob-dir", str(tmp_path / "blobs"))
    assert code == 1 and ("mismatch" in err or "corrupt" in err)
    empty = tmp_path / "empty-layer.tar"
    with tarfile.open(empty, "w") as tar:
        tar.addfile(tarfile.TarInfo("other"), io.BytesIO(b""))
    assert bootstrap_from_tar(str(empty)) is None
    assert _run(str(empty))[0] == 1
