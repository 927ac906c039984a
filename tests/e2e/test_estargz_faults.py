"""Issue 3, faults and bad input: each gives a typed error, a fallback or EIO, never a hang
or a wrong byte, and the reason is logged.

* the registry stops while a file is being read: reads of uncached data fail with EIO
  once the retry deadline has passed, and succeed again when the registry is back;
* a TOC digest label that does not match the TOC: fallback ``digest_mismatch``;
* a footer that is missing or cut short: fallback ``not_estargz``;
* TOC names that are absolute or point out of the layer: absolute names and outward
  symlinks are served inside the layer, a ``../`` name is refused (``invalid_toc``);
* a chunk whose bytes do not match its ``chunkDigest``: EIO for that chunk, the bad
  bytes never reach the chunk cache, the rest of the file and layer still read.

Hand-made layers come from the test writer (tests/estargz_writer.py) on top of the
converted busybox layer of the feature image, so every image can run a container.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from ..estargz_writer import TarEntry, directory, hardlink, reg, symlink
from .conftest import StackFactory
from .esgz import (
    BIG_PATH,
    CHUNK_SIZE,
    TOC_DIGEST,
    EsgzImage,
    FeatureImage,
    copy_image,
    esgz_blob,
    push_layers,
    registry_blob,
)
from .esgz_observe import (
    REMOTE_LABEL,
    assert_remote_layers,
    cache_entries,
    daemon_logs,
    daemon_pids,
    decision_lines,
    fs_dir,
    layer_rows,
    lazysnap_config,
    lazysnap_mounts,
    mount_at,
    probe_read,
)
from .harness import CommandError, Containerd, Lazysnap, Registry
from .imagebuild import LayerBlob
from .metastore_view import SnapshotRow
from .procs import processes_mentioning

pytestmark = pytest.mark.e2e
REPO = "lazysnap/esgz-features"


@pytest.fixture(scope="module")
def busybox_blob(feature_image: FeatureImage) -> LayerBlob:
    """The converted busybox layer (eStargz, with its TOC digest annotation)."""
    return registry_blob(feature_image.esgz, 0)


def _push(feature: FeatureImage, tag: str, *blobs: LayerBlob) -> EsgzImage:
    return push_layers(feature.esgz.registry, REPO, tag, list(blobs))


def _row(lz: Lazysnap, image: EsgzImage, index: int) -> SnapshotRow:
    row = layer_rows(lz.root, image.chain_ids)[index]
    assert row is not None, f"no lazysnap record for layer {index} of {image.reference}"
    return row


def _is_remote(containerd: Containerd, chain_id: str) -> bool:
    info = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "info", chain_id).stdout
    return REMOTE_LABEL in (json.loads(info).get("Labels") or {})


def _decision(lz: Lazysnap, digest: str) -> str:
    lines = decision_lines(lz.log_path.read_text(), digest)
    assert len(lines) == 1, f"decisions for {digest}: {lines}"
    return lines[0]


def _assert_fallback(lz: Lazysnap, containerd: Containerd, image: EsgzImage, index: int,
                     reason: str) -> None:
    """Layer ``index`` was pulled normally for ``reason``: logged, no remote label, and
    its snapshot directory is not a FUSE mount."""
    line = _decision(lz, image.layers[index].digest)
    assert f"reason={reason}" in line, line
    assert not _is_remote(containerd, image.chain_ids[index])
    mount = mount_at(fs_dir(lz.root, _row(lz, image, index)))
    assert mount is None, mount


def _run(containerd: Containerd, image: EsgzImage, name: str, script: str) -> str:
    return containerd.run_container(image.reference, name, "sh", "-c", script,
                                    snapshotter="lazysnap").stdout


# --- the registry goes away in the middle of reading a file -------------------------------

OUTAGE_CONFIG = """\
[remote]
background_fetch = false
readahead_chunks = 0
[registry]
request_timeout = 2.0
connect_timeout = 1.0
deadline = 5.0
max_retries = 2
"""


def test_registry_outage_gives_eio_then_reads_recover(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, e2e_workdir: Path,
) -> None:
    """With its own registry paused (SIGSTOP: connections hang) and then stopped
    (connections refused) half-way through a file, a read of an uncached chunk fails with
    EIO once the retries or the registry deadline are used up, and never hangs; cached
    chunks keep serving; after the registry is back the same read, and the whole file,
    succeed."""
    reg = Registry(e2e_workdir / "outage-registry")
    try:
        reg.start()
        image = copy_image(feature_image.esgz, reg.host)
        stack = lazysnap_stack(lazysnap_config(extra=OUTAGE_CONFIG))
        lz, containerd = stack.require_lazysnap(), stack.containerd
        containerd.rpull(image.reference, snapshotter="lazysnap")
        big = fs_dir(lz.root, _row(lz, image, 1)) / BIG_PATH.lstrip("/")
        data = _expected_bytes_md5(feature_image, BIG_PATH)
        head = probe_read(big, 0, 4 * CHUNK_SIZE)
        assert head.md5 is not None and head.read == 4 * CHUNK_SIZE, head
        (pid,) = [p.pid for p in processes_mentioning(str(reg.config_path))]
        os.kill(pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            hung = probe_read(big, 24 * CHUNK_SIZE, CHUNK_SIZE)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert hung.errno == "EIO", hung
        reg.stop()  # refuses connections
        during = probe_read(big, 32 * CHUNK_SIZE, CHUNK_SIZE)
        assert during.errno == "EIO", during
        assert probe_read(big, 0, 4 * CHUNK_SIZE) == head  # cached chunks still serve
        reg.start()
        after = probe_read(big, 32 * CHUNK_SIZE, CHUNK_SIZE)
        assert after.errno is None and after.read == CHUNK_SIZE, after
        assert probe_read(big).md5 == data
        logs = daemon_logs(lz.root)  # each EIO is logged with its cause
        assert "RegistryTimeout" in logs and "RegistryUnavailable" in logs
    finally:
        reg.stop()


def _expected_bytes_md5(feature: FeatureImage, path: str) -> str:
    node = feature.esgz.tree[path]
    assert node.md5 is not None
    return node.md5


# --- a TOC digest label that does not match ---------------------------------------------

FALLBACK_TEXT = "served after the fallback\n"


def _small(extra: bytes = b"") -> list[TarEntry]:
    """A one-file layer; ``extra`` makes its DiffID (so its chain ID) unique."""
    return [directory("data"), reg("data/file.txt", FALLBACK_TEXT.encode()),
            reg("data/unique", extra)]


def test_toc_digest_mismatch_falls_back(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, busybox_blob: LayerBlob,
) -> None:
    """A layer whose toc.digest annotation names another TOC is refused
    (``digest_mismatch``) and pulled normally; the image still runs."""
    good = esgz_blob(_small(b"toc"))
    wrong = LayerBlob(good.data, good.media_type, good.diff_id,
                      {TOC_DIGEST: "sha256:" + hashlib.sha256(b"another TOC").hexdigest()})
    image = _push(feature_image, "bad-toc-digest", busybox_blob, wrong)
    stack = lazysnap_stack(lazysnap_config())
    lz, containerd = stack.require_lazysnap(), stack.containerd
    containerd.rpull(image.reference, snapshotter="lazysnap")
    assert _is_remote(containerd, image.chain_ids[0])
    _assert_fallback(lz, containerd, image, 1, "digest_mismatch")
    assert _run(containerd, image, "toc-mismatch", "cat /data/file.txt") == \
        FALLBACK_TEXT
    assert len(daemon_pids(lz.root)) == 1  # the busybox layer's only


# --- a footer that is missing or cut short ---------------------------------------------


def test_missing_or_truncated_footer_falls_back(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, busybox_blob: LayerBlob,
) -> None:
    """Without its 51-byte footer a layer is ``not_estargz`` and pulled normally. With
    the footer cut short the blob's gzip tail is broken: lazysnap still answers with a
    fallback (``not_estargz``); whether containerd's own unpack accepts the blob is up
    to containerd (1.6 does), and if it does the image runs."""
    good = esgz_blob(_small(b"missing"))
    missing = LayerBlob(good.data[:-51], good.media_type, good.diff_id, good.annotations)
    image = _push(feature_image, "no-footer", busybox_blob, missing)
    stack = lazysnap_stack(lazysnap_config())
    lz, containerd = stack.require_lazysnap(), stack.containerd
    containerd.rpull(image.reference, snapshotter="lazysnap")
    _assert_fallback(lz, containerd, image, 1, "not_estargz")
    assert _run(containerd, image, "no-footer", "cat /data/file.txt") == \
        FALLBACK_TEXT

    other = esgz_blob(_small(b"cut"))  # another DiffID: containerd must Prepare it anew
    cut = LayerBlob(other.data[:-20], other.media_type, other.diff_id, other.annotations)
    cut_image = _push(feature_image, "cut-footer", busybox_blob, cut)
    try:
        containerd.rpull(cut_image.reference, snapshotter="lazysnap")
    except CommandError:
        pulled = False  # containerd may refuse the broken gzip tail: not lazysnap's call
    else:
        pulled = True
    assert "reason=not_estargz" in _decision(lz, cut_image.layers[1].digest)
    assert lz.running()
    assert len(lazysnap_mounts(lz.root)) == 1  # the shared busybox layer's only
    if pulled:
        assert _run(containerd, cut_image, "cut-footer", "cat /data/file.txt") == \
            FALLBACK_TEXT


# --- names that leave the layer ---------------------------------------------------------

MARKER = b"the marker inside the image\n"


def _inside_layer() -> list[TarEntry]:
    return [
        directory("etc"), reg("etc/marker", MARKER),
        reg("/abs/inside.txt", b"absolute name\n"),
        directory("data"),
        reg("data/../data/dotdot-inside.txt", b"dot-dot that stays inside\n"),
        symlink("data/link-out", "../../../../../../../etc/marker"),
        symlink("data/abs-out", "/etc/marker"),
        hardlink("data/abs-hardlink", "/abs/inside.txt"),
    ]


def _escaping_layer() -> list[TarEntry]:
    return [directory("ok"), reg("ok/fine.txt", b"fine\n"), reg("../escape.txt", b"out\n")]


def test_names_outside_the_layer_never_escape(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, busybox_blob: LayerBlob,
    e2e_workdir: Path,
) -> None:
    """Absolute names and symlinks pointing out of the layer are served inside it (a
    symlink is returned verbatim, never followed by the daemon); a ``../`` name makes
    the TOC invalid and the layer is pulled normally. Nothing appears outside."""
    image = _push(feature_image, "hostile-names", busybox_blob, esgz_blob(_inside_layer()),
                  esgz_blob(_escaping_layer()))
    stack = lazysnap_stack(lazysnap_config())
    lz, containerd = stack.require_lazysnap(), stack.containerd
    containerd.rpull(image.reference, snapshotter="lazysnap")
    assert_remote_layers(stack, image.chain_ids[:2], "dedicated")
    inside = fs_dir(lz.root, _row(lz, image, 1))
    assert (inside / "abs" / "inside.txt").read_bytes() == b"absolute name\n"
    assert (inside / "data" / "dotdot-inside.txt").is_file()
    assert os.readlink(inside / "data" / "link-out") == "../../../../../../../etc/marker"
    assert os.readlink(inside / "data" / "abs-out") == "/etc/marker"
    assert probe_read(inside / "data" / "link-out").errno == "ELOOP"
    assert os.stat(inside / "data" / "abs-hardlink").st_ino == \
        os.stat(inside / "abs" / "inside.txt").st_ino
    _assert_fallback(lz, containerd, image, 2, "invalid_toc")
    out = _run(containerd, image, "hostile", "cat /data/link-out /data/abs-out "
               "/data/abs-hardlink /ok/fine.txt")
    assert out == (MARKER * 2).decode() + "absolute name\nfine\n"
    # containerd's own unpack of the refused layer clamps ``../escape.txt`` to the root of
    # that layer's snapshot; anywhere else would be an escape.
    clamped = fs_dir(lz.root, _row(lz, image, 2)) / "escape.txt"
    escaped = [p for p in _named(e2e_workdir, "escape.txt") if p != clamped]
    assert escaped == [], escaped
    assert not Path("/escape.txt").exists()


def _named(top: Path, name: str) -> list[Path]:
    """Paths called ``name`` below ``top`` (directories vanishing meanwhile are skipped:
    containerd's GC runs concurrently)."""
    return [Path(d) / name for d, dirs, files in os.walk(top) if name in files or name in dirs]


# --- a chunk whose bytes do not match its digest ----------------------------------------

CHUNKY = random.Random(21).randbytes(4 * CHUNK_SIZE)
BAD_CHUNK = 2
BOGUS_DIGEST = "sha256:" + hashlib.sha256(b"not the bytes of this chunk").hexdigest()


def _corrupt_chunk_digest(toc: dict[str, Any]) -> None:
    for entry in toc["entries"]:
        if entry["name"] == "data/chunky.bin" and \
                entry.get("chunkOffset", 0) == BAD_CHUNK * CHUNK_SIZE:
            entry["chunkDigest"] = BOGUS_DIGEST
            return
    raise AssertionError("no chunk to corrupt")


def test_chunk_digest_mismatch_is_eio_and_never_cached(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, busybox_blob: LayerBlob,
) -> None:
    """Reading a chunk whose bytes do not hash to its ``chunkDigest`` fails with EIO
    (again on every try); neither the bogus key nor the real bytes enter the cache; the
    other chunks of the file and the other files read fine."""
    entries = [directory("data"), reg("data/chunky.bin", CHUNKY),
               reg("data/fine.txt", b"fine\n")]
    blob = esgz_blob(entries, chunk_size=CHUNK_SIZE, toc_modifier=_corrupt_chunk_digest)
    image = _push(feature_image, "bad-chunk", busybox_blob, blob)
    stack = lazysnap_stack(lazysnap_config())
    lz, containerd = stack.require_lazysnap(), stack.containerd
    containerd.rpull(image.reference, snapshotter="lazysnap")
    assert _is_remote(containerd, image.chain_ids[1])
    chunky = fs_dir(lz.root, _row(lz, image, 1)) / "data" / "chunky.bin"
    good = probe_read(chunky, 0, BAD_CHUNK * CHUNK_SIZE)
    assert good.md5 == hashlib.md5(CHUNKY[: BAD_CHUNK * CHUNK_SIZE]).hexdigest(), good
    for _ in range(2):
        bad = probe_read(chunky, BAD_CHUNK * CHUNK_SIZE, CHUNK_SIZE)
        assert bad.errno == "EIO", bad
    tail = probe_read(chunky, (BAD_CHUNK + 1) * CHUNK_SIZE, CHUNK_SIZE)
    assert tail.md5 == hashlib.md5(CHUNKY[(BAD_CHUNK + 1) * CHUNK_SIZE:]).hexdigest(), tail
    real = "sha256:" + hashlib.sha256(
        CHUNKY[BAD_CHUNK * CHUNK_SIZE : (BAD_CHUNK + 1) * CHUNK_SIZE]).hexdigest()
    cache = cache_entries(lz.root)
    assert BOGUS_DIGEST not in cache and real not in cache
    holding = [k for k, p in cache.items()
               if "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() == real]
    assert holding == [], f"the bad chunk's bytes are cached under {holding}"
    assert "DigestMismatch" in daemon_logs(lz.root)
    out = _run(containerd, image, "bad-chunk",
               "cat /data/fine.txt; md5sum /data/chunky.bin || echo READ-FAILED")
    assert out.startswith("fine\n") and out.rstrip().endswith("READ-FAILED"), out
