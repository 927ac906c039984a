"""Issue 2, end to end: pull, run, inspect and garbage-collect the demo image.

Every test runs against lazysnap (the variant that must pass) and against containerd's
built-in ``overlayfs`` snapshotter, which cross-checks the harness, the image builder and
the assertions themselves; the metastore checks apply to lazysnap only.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from .demo import GREETING_PATH, HELLO, REPLACED_NEW, DemoImage
from .imagetree import compare_trees, host_tree, listing_script, parse_listing
from .metastore_view import backend_key_matches, read_snapshots, snapshot_dirs
from .procs import mounts_under, unmount_all_under, wait_until
from .stack import SnapshotInfo, SnapshotListing, Stack

pytestmark = pytest.mark.e2e
SNAPSHOTTERS = pytest.mark.parametrize("stack", ["lazysnap", "overlayfs"], indirect=True)
GC_DEADLINE = 60.0
FORWARDED_LABEL = "containerd.io/snapshot/lazysnap-e2e"
LOCAL_LABEL = "lazysnap-e2e.local"


@SNAPSHOTTERS
def test_container_sees_the_image_tree(stack: Stack, demo_image: DemoImage) -> None:
    """A container's view of every image path equals the tree the layers define."""
    stack.pull(demo_image.reference)
    script = f"cat {GREETING_PATH} && {listing_script(demo_image.roots)}"
    result = stack.containerd.run_container(
        demo_image.reference, "foundation-run", "sh", "-c", script,
        snapshotter=stack.snapshotter,
    )
    assert result.stdout.startswith(HELLO.decode()), result.stdout[:500]
    seen = parse_listing(result.stdout)
    assert compare_trees(demo_image.tree, seen) == []
    assert "/data/gone.txt" not in seen
    assert sorted(p for p in seen if p.startswith("/data/dir/")) == [
        "/data/dir/new.txt", "/data/dir/sub2", "/data/dir/sub2/d.bin",
    ]
    assert seen["/data/replaced.txt"].md5 == demo_image.tree["/data/replaced.txt"].md5
    assert demo_image.tree["/data/replaced.txt"].size == len(REPLACED_NEW)


@SNAPSHOTTERS
def test_snapshot_mounts_on_the_host(stack: Stack, demo_image: DemoImage) -> None:
    """The mounts the snapshotter returns for a container's rootfs show the whole image on
    the host, xattrs, device numbers and hard links included."""
    stack.pull(demo_image.reference)
    # A container, not a bare `ctr snapshots view`: an unreferenced snapshot is fair game for
    # containerd's GC at any moment, a container's rootfs is not.
    stack.containerd.ctr("containers", "create", "--snapshotter", stack.snapshotter,
                         demo_image.reference, "foundation-mounts")
    target = stack.workdir / "rootfs-target"
    target.mkdir()
    command = shlex.split(stack.snapshots_ctr("mounts", str(target), "foundation-mounts"))
    assert command[:1] == ["mount"], command
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
        assert compare_trees(demo_image.tree, host_tree(target)) == []
    finally:
        unmount_all_under(target)
    stack.containerd.ctr("containers", "rm", "foundation-mounts")


def _inherited(labels: dict[str, str]) -> dict[str, str]:
    """The labels containerd forwards to a snapshotter (protocol-reference 1.5).

    Others may still show up in the backend: an Update naming ``labels.<k>`` for a local
    label reaches the backend with the path but without the value, and containerd's own
    bolt store then records ``<k>: ""``; so only inherited labels are compared."""
    return {k: v for k, v in labels.items()
            if k.startswith("containerd.io/snapshot/") or k == "containerd.io/snapshot.ref"}


def _check_against_metastore(
    root: Path, infos: dict[str, SnapshotInfo], usage: dict[str, tuple[int, int]]
) -> None:
    """Each snapshot containerd reports maps to exactly one metastore record that agrees on
    kind, parent, inherited labels and (committed) usage, and there are no other records."""
    rows = read_snapshots(root)
    by_name = {}
    for name in infos:
        matches = [r for r in rows.values() if backend_key_matches(r.key, name)]
        assert len(matches) == 1, f"{name}: metastore records {matches}"
        by_name[name] = matches[0]
    assert len(rows) == len(infos), f"records without a containerd snapshot: {rows}"
    for name, info in infos.items():
        row = by_name[name]
        assert row.kind == info.kind, name
        if info.parent:
            assert row.parent_id is not None, name
            assert backend_key_matches(rows[row.parent_id].key, info.parent), name
        else:
            assert row.parent_id is None, name
        assert _inherited(row.labels) == _inherited(info.labels), name
        if row.kind == "committed":
            assert usage[name] == (row.size, row.inodes), name
        fs_dir = root / "snapshots" / str(row.id)
        assert (fs_dir / "fs").is_dir(), fs_dir
        if row.kind == "active":
            assert (fs_dir / "work").is_dir(), fs_dir


@SNAPSHOTTERS
def test_snapshot_listing_info_and_usage(stack: Stack, demo_image: DemoImage) -> None:
    """``ctr snapshots ls/info/usage`` show the image's chain (committed) and a container's
    rootfs (active); for lazysnap they agree with the metastore and the directories."""
    stack.pull(demo_image.reference)
    stack.containerd.ctr("containers", "create", "--snapshotter", stack.snapshotter,
                         demo_image.reference, "foundation-idle")
    listing = stack.list_snapshots()
    chain = demo_image.image.chain_ids
    assert set(listing) == {*chain, "foundation-idle"}
    for parent, child in zip(("", *chain), chain, strict=False):
        assert listing[child] == SnapshotListing(child, parent, "committed")
    assert listing["foundation-idle"].parent == chain[-1]
    assert listing["foundation-idle"].kind == "active"
    # Update: an inherited label must reach the snapshotter, a containerd-local one must not.
    stack.snapshots_ctr("label", chain[-1], f"{FORWARDED_LABEL}=foundation",
                        f"{LOCAL_LABEL}=containerd-only")
    infos = {name: stack.snapshot_info(name) for name in listing}
    assert infos[chain[-1]].labels[FORWARDED_LABEL] == "foundation"
    assert infos[chain[-1]].labels[LOCAL_LABEL] == "containerd-only"
    assert all(infos[n].kind == listing[n].kind for n in listing)
    assert all(infos[n].parent == listing[n].parent for n in listing)
    usage = stack.snapshot_usage()
    assert set(usage) == set(listing)
    assert all(size > 0 and inodes > 0 for size, inodes in (usage[c] for c in chain))
    if stack.lazysnap is not None:
        _check_against_metastore(stack.lazysnap.root, infos, usage)
        top = [r for r in read_snapshots(stack.lazysnap.root).values()
               if backend_key_matches(r.key, chain[-1])]
        assert top[0].labels.get(FORWARDED_LABEL) == "foundation", top
    stack.containerd.ctr("containers", "rm", "foundation-idle")


def _gc_state(stack: Stack) -> list[str] | None:
    """None when nothing of the image is left anywhere; otherwise what still is."""
    left = [f"ctr snapshot {name}" for name in stack.list_snapshots()]
    if stack.lazysnap is not None:
        root = stack.lazysnap.root
        left += [f"record {r.key}" for r in read_snapshots(root).values()]
        left += [f"directory snapshots/{d}" for d in snapshot_dirs(root)]
        left += [f"mount {m.mountpoint}" for m in mounts_under(root)]
    else:
        overlay = stack.containerd.root / "io.containerd.snapshotter.v1.overlayfs"
        left += [f"overlay directory {d}" for d in snapshot_dirs(overlay)]
    return left or None


@SNAPSHOTTERS
def test_image_removal_collects_every_snapshot(stack: Stack, demo_image: DemoImage) -> None:
    """After the container and the image are removed, containerd's GC removes every
    snapshot: no record, no directory and no mount remains."""
    stack.pull(demo_image.reference)
    stack.containerd.run_container(demo_image.reference, "foundation-gc", "true",
                                   snapshotter=stack.snapshotter)
    assert set(stack.list_snapshots()) == set(demo_image.image.chain_ids)
    before = _gc_state(stack)
    assert before is not None and len(before) >= 2 * len(demo_image.image.chain_ids), before
    stack.containerd.ctr("image", "rm", "--sync", demo_image.reference)
    last: list[list[str] | None] = [None]

    def collected() -> bool:
        last[0] = _gc_state(stack)
        return last[0] is None

    try:
        wait_until(collected, timeout=GC_DEADLINE, what="containerd GC to remove the snapshots")
    except Exception as exc:
        raise AssertionError(f"{exc}; still present: {last[0]}") from exc
