"""Mount construction with containerd overlayfs semantics (protocol-reference §3.2). Pure.

``parents`` are the parents' ``fs`` directories, nearest parent first, base layer last,
which is the order overlayfs wants in ``lowerdir`` (leftmost is the top).
"""

from __future__ import annotations

from collections.abc import Sequence

from snapshotter.model import Kind, Mount


def snapshot_mounts(
    kind: Kind,
    fs_dir: str,
    work_dir: str,
    parents: Sequence[str],
    overlay_options: Sequence[str] = (),
) -> list[Mount]:
    """The mounts for an active or view snapshot.

    * no parents: a bind mount of its own ``fs`` (rw for active, ro for a view);
    * a view of exactly one parent: a read-only bind of that parent;
    * active with parents: overlay with workdir, upperdir, lowerdir;
    * a view of two or more parents: a read-only overlay with only lowerdir.
    ``overlay_options`` (e.g. ``index=off``) come first, as containerd puts them.
    Raises ValueError for a committed snapshot: only active and view ones are mounted.
    """
    if kind is Kind.COMMITTED:
        raise ValueError("committed snapshots have no mounts")
    if not parents:
        mode = "rw" if kind is Kind.ACTIVE else "ro"
        return [Mount("bind", fs_dir, (mode, "rbind"))]
    if kind is Kind.VIEW and len(parents) == 1:
        return [Mount("bind", parents[0], ("ro", "rbind"))]
    options = list(overlay_options)
    if kind is Kind.ACTIVE:
        options += [f"workdir={work_dir}", f"upperdir={fs_dir}"]
    options.append("lowerdir=" + ":".join(parents))
    return [Mount("overlay", "overlay", tuple(options))]
