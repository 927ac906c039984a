"""Issue 3, end to end: eStargz images converted by ctr-remote, pulled lazily by lazysnap.

The main test (both daemon modes) pulls the feature image of esgz.py with ``ctr-remote
image rpull`` and checks that every layer became a remote snapshot served by its own FUSE
mount, that the layer blobs were read with range requests and never entered containerd's
content store, that a container sees exactly the source tree (md5 of every file, ``stat``
and ``ls -l`` equal to a container of the unconverted image on overlayfs, xattrs on the
host), and that removing the image leaves nothing behind. Two more tests cover an image
optimized with landmarks (prefetch before ready) and a plain gzip image (the fallback).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapshotter.lazy.layers import TAIL_GUESS

from .conftest import StackFactory
from .demo import GREETING_PATH, HELLO, DemoImage
from .esgz import (
    BIG_PATH,
    Converter,
    EsgzImage,
    FeatureImage,
    optimize_and_push,
    toc_entries,
)
from .esgz_observe import (
    REMOTE_LABEL,
    AccessLog,
    assert_no_leftovers,
    assert_remote_layers,
    cache_entries,
    daemon_pids,
    decision_lines,
    fs_dir,
    layer_rows,
    lazysnap_config,
    lazysnap_mounts,
    line_differences,
    listing_script,
    parse_listing,
    remove_image,
)
from .harness import Containerd, Registry
from .imagetree import compare_trees, host_tree, top_level
from .procs import unmount_all_under
from .stack import Stack

pytestmark = pytest.mark.e2e


def _assert_range_reads(log: AccessLog, mark: int, image: EsgzImage) -> None:
    """Every layer blob was read, and only in parts: each GET answered 206 with fewer
    bytes than the blob (the registry log has no Range header to show). A blob no larger
    than the tail Prepare asks for (``TAIL_GUESS``) comes whole in that one request."""
    big = [layer for layer in image.layers if layer.size > TAIL_GUESS]
    assert big, "the image needs layers larger than the tail request"
    for layer in image.layers:
        gets = log.blob_gets(mark, layer.digest)
        assert gets, f"no GET of layer blob {layer.digest}"
        assert all(g.status == 206 for g in gets), gets
        if layer.size > TAIL_GUESS:
            whole = [g for g in gets if g.written >= layer.size]
            assert not whole, f"layer {layer.digest} ({layer.size} bytes) read whole: {whole}"


def _assert_blobs_not_in_content_store(containerd: Containerd, image: EsgzImage) -> None:
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    fetched = [layer.digest for layer in image.layers if layer.digest in content]
    assert fetched == [], f"layer blobs in containerd's content store: {fetched}"


def _assert_container_view(stack: Stack, feature: FeatureImage) -> None:
    """A container reads every file; tree, md5s, stat and ls -l equal the source's."""
    roots = top_level(feature.esgz.tree)
    result = stack.containerd.run_container(
        feature.esgz.reference, "esgz-listing", "sh", "-c", listing_script(roots),
        snapshotter=stack.snapshotter)
    seen = parse_listing(result.stdout)
    reference = parse_listing(feature.reference_listing)
    assert compare_trees(feature.esgz.tree, seen.tree) == []
    for what, want, got in (("stat", reference.stat_lines, seen.stat_lines),
                            ("ls -l", reference.ls_lines, seen.ls_lines)):
        diffs = line_differences(want, got)
        assert diffs == [], f"{what} differs from the source on overlayfs:\n" + "\n".join(diffs)


def _assert_host_view(stack: Stack, image: EsgzImage) -> None:
    """The container rootfs mounted on the host: same tree, ``user.*`` xattrs included."""
    stack.containerd.ctr("containers", "create", "--snapshotter", stack.snapshotter,
                         image.reference, "esgz-host-view")
    target = stack.workdir / "rootfs-target"
    target.mkdir()
    command = shlex.split(stack.snapshots_ctr("mounts", str(target), "esgz-host-view"))
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
        assert compare_trees(image.tree, host_tree(target)) == []
    finally:
        unmount_all_under(target)
    stack.containerd.ctr("containers", "rm", "esgz-host-view")


def _assert_layer_mounts(root: Path, image: EsgzImage) -> None:
    """What single layers' FUSE mounts show: the big file spans many 64 KiB chunks in
    the TOC, the eStargz metadata files are hidden, the opaque directory of the top layer
    carries overlayfs's marker xattr (how overlayfs sees it through the lower layer)."""
    big = [e for e in toc_entries(image.blob(1)) if e["name"] == BIG_PATH.lstrip("/")]
    assert len(big) > 60, f"{BIG_PATH} has {len(big)} TOC entries"
    rows = layer_rows(root, image.chain_ids)
    assert all(rows), rows
    for row in rows:
        assert row is not None
        shown = set(os.listdir(fs_dir(root, row)))
        assert not shown & {"stargz.index.json", ".no.prefetch.landmark",
                            ".prefetch.landmark"}, shown
    top = rows[-1]
    assert top is not None
    opaque = fs_dir(root, top) / "data" / "dir"
    assert os.getxattr(opaque, "trusted.overlay.opaque", follow_symlinks=False) == b"y"


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_lazy_pull_serves_the_source_tree(
    mode: str, lazysnap_stack: StackFactory, feature_image: FeatureImage, registry: Registry,
) -> None:
    """rpull makes every layer a remote snapshot; containers see the source tree; image
    removal leaves no mount, daemon, record or directory."""
    stack = lazysnap_stack(lazysnap_config(mode))
    lz, containerd = stack.require_lazysnap(), stack.containerd
    image = feature_image.esgz
    log = AccessLog(registry.log_path)
    mark = log.mark()
    containerd.rpull(image.reference, snapshotter="lazysnap")
    assert_remote_layers(stack, image.chain_ids, mode)
    _assert_blobs_not_in_content_store(containerd, image)
    _assert_container_view(stack, feature_image)
    _assert_host_view(stack, image)
    _assert_range_reads(log, mark, image)
    _assert_layer_mounts(lz.root, image)
    remove_image(stack, image.reference)
    assert_no_leftovers(stack)


# --- landmarks ---------------------------------------------------------------------------

LANDMARK_WORKLOAD = ["sh", "-c", f"cat {GREETING_PATH} /data/medium.bin > /dev/null"]


@pytest.fixture(scope="module")
def landmark_image(esgz_converter: Converter, demo_image: DemoImage) -> EsgzImage:
    """The demo image optimized by ``ctr-remote image optimize`` with a workload that reads
    the greeting and /data/medium.bin: those come before ``.prefetch.landmark``."""
    return optimize_and_push(esgz_converter, demo_image.image, "optimized",
                             LANDMARK_WORKLOAD, demo_image.tree)


def _chunk_keys(entries: list[dict[str, Any]], name: str) -> set[str]:
    return {e.get("chunkDigest") or e["digest"] for e in entries
            if e["name"] == name and e["type"] in ("reg", "chunk") and e.get("size", 1)}


def test_landmark_files_are_prefetched_before_ready(
    lazysnap_stack: StackFactory, landmark_image: EsgzImage, demo_image: DemoImage,
    registry: Registry,
) -> None:
    """With background fetch off, the files before ``.prefetch.landmark`` are in the chunk
    cache as soon as rpull returns, and nothing else of the data layer is."""
    stack = lazysnap_stack(lazysnap_config(extra="[remote]\nbackground_fetch = false\n"))
    lz, containerd = stack.require_lazysnap(), stack.containerd
    data_toc = toc_entries(landmark_image.blob(1))
    names = [e["name"] for e in data_toc]
    assert ".prefetch.landmark" in names, names[:10]
    assert names.index("data/hello.txt") < names.index(".prefetch.landmark"), names[:10]
    log = AccessLog(registry.log_path)
    mark = log.mark()
    containerd.rpull(landmark_image.reference, snapshotter="lazysnap")
    assert_remote_layers(stack, landmark_image.chain_ids, "dedicated")
    cached = set(cache_entries(lz.root))
    for name in ("data/hello.txt", "data/medium.bin"):
        missing = _chunk_keys(data_toc, name) - cached
        assert not missing, f"{name} was not prefetched: {missing}"
    assert not _chunk_keys(data_toc, "data/big.bin") & cached, "big.bin fetched eagerly"
    data_blob = landmark_image.layers[1]
    fetched = sum(a.written for a in log.blob_gets(mark, data_blob.digest))
    assert fetched < data_blob.size // 2, (fetched, data_blob.size)
    listing = containerd.run_container(
        landmark_image.reference, "landmark-run", "sh", "-c", listing_script(["/data"]),
        snapshotter="lazysnap").stdout
    assert compare_trees({p: n for p, n in demo_image.tree.items() if p.startswith("/data")},
                         parse_listing(listing).tree) == []


# --- fallback --------------------------------------------------------------------------


def test_plain_gzip_image_falls_back_to_a_normal_pull(
    lazysnap_stack: StackFactory, demo_image: DemoImage,
) -> None:
    """A non-eStargz image pulls and runs through the fallback: no remote label, no FUSE
    mount, no daemon, and the decision's reason ``not_estargz`` for every layer."""
    stack = lazysnap_stack(lazysnap_config())
    lazysnap, containerd = stack.require_lazysnap(), stack.containerd
    containerd.rpull(demo_image.reference, snapshotter="lazysnap")
    for chain_id in demo_image.image.chain_ids:
        assert REMOTE_LABEL not in stack.snapshot_info(chain_id).labels, chain_id
    assert lazysnap_mounts(lazysnap.root) == []
    assert daemon_pids(lazysnap.root) == []
    text = lazysnap.log_path.read_text()
    for layer in demo_image.image.layers:
        lines = decision_lines(text, layer.digest)
        assert len(lines) == 1 and "reason=not_estargz" in lines[0], (layer.digest, lines)
    result = containerd.run_container(demo_image.reference, "fallback-run", "cat",
                                      GREETING_PATH, snapshotter="lazysnap")
    assert result.stdout == HELLO.decode()
