"""Observing a root filesystem and comparing it with :func:`imagebuild.expected_tree`.

Two observers produce the same :class:`~.imagebuild.Node` shape: :func:`listing_script` /
:func:`parse_listing` run busybox inside a container (no xattrs there), and
:func:`host_tree` walks a mounted snapshot on the host (xattrs in the ``user.`` namespace
and inode numbers included). :func:`compare_trees` lists every difference.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from .imagebuild import Node, Tree

Kind = Literal["file", "dir", "symlink", "char", "block", "fifo"]
END_MARKER = "LISTING-END"
_KINDS: Mapping[int, Kind] = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


def top_level(tree: Tree) -> list[str]:
    """The top-level paths of ``tree`` (the roots a listing should walk)."""
    return sorted({"/" + path.split("/")[1] for path in tree})


def listing_script(roots: Sequence[str]) -> str:
    """A busybox ``sh`` script printing one tab-separated line per path below ``roots``
    (``-xdev``: mounts the runtime adds are not walked), then :data:`END_MARKER`.

    Line format: ``E <rawmode-hex> <uid> <gid> <size> <major-hex> <minor-hex> <inode>``,
    md5 (or ``-``), link target (or ``-``), path. Needs busybox find, stat, md5sum, readlink.
    """
    quoted = " ".join(shlex.quote(r) for r in roots)
    return (
        f"find {quoted} -xdev | while IFS= read -r p; do "
        "s=$(stat -c '%f %u %g %s %t %T %i' \"$p\"); m=-; l=-; "
        'if [ -L "$p" ]; then l=$(readlink "$p"); '
        'elif [ -f "$p" ]; then m=$(md5sum "$p"); m=${m%% *}; fi; '
        "printf 'E\\t%s\\t%s\\t%s\\t%s\\n' \"$s\" \"$m\" \"$l\" \"$p\"; "
        f"done; echo {END_MARKER}"
    )


def parse_listing(output: str) -> Tree:
    """Parse what :func:`listing_script` printed. Raises ValueError if the output is cut
    short (no end marker) or a line is malformed."""
    lines = output.splitlines()
    if END_MARKER not in lines:
        raise ValueError(f"listing incomplete (no {END_MARKER}):\n{output[-2000:]}")
    tree: Tree = {}
    for line in lines:
        if not line.startswith("E\t"):
            continue
        _, stats, md5, target, path = line.split("\t", 4)
        raw, uid, gid, size, major, minor, inode = stats.split()
        mode = int(raw, 16)
        kind = _KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            raise ValueError(f"unexpected file type in {line!r}")
        tree[path] = Node(
            kind, stat.S_IMODE(mode), int(uid), int(gid),
            size=int(size) if kind == "file" else None,
            md5=md5 if kind == "file" else None,
            target=target if kind == "symlink" else None,
            rdev=(int(major, 16), int(minor, 16)) if kind in ("char", "block") else None,
            inode=int(inode),
        )
    return tree


def _user_xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in sorted(names) if n.startswith("user.")}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def host_node(path: Path) -> Node:
    """Observe one path on the host (lstat, md5 of regular files, ``user.*`` xattrs)."""
    st = os.lstat(path)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise ValueError(f"{path}: unexpected file type {oct(st.st_mode)}")
    return Node(
        kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
        size=st.st_size if kind == "file" else None,
        md5=_md5(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=_user_xattrs(path),
        inode=st.st_ino,
    )


def host_tree(root: Path) -> Tree:
    """Walk a mounted root filesystem on the host (paths relative to ``root``, absolute in the
    result, ``root`` itself excluded; mount points below are not crossed)."""
    tree: Tree = {}
    root_dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            tree["/" + str(full.relative_to(root))] = host_node(full)
        dirnames[:] = [d for d in dirnames if os.lstat(Path(dirpath) / d).st_dev == root_dev]
    return tree


def _node_differences(path: str, want: Node, got: Node) -> list[str]:
    if want.kind != got.kind:
        return [f"{path}: is a {got.kind}, expected a {want.kind}"]
    diffs: list[str] = []
    checks: list[tuple[str, object, object]] = [
        ("uid", want.uid, got.uid), ("gid", want.gid, got.gid),
        ("size", want.size, got.size), ("md5", want.md5, got.md5),
        ("target", want.target, got.target), ("rdev", want.rdev, got.rdev),
    ]
    if want.kind != "symlink":
        checks.append(("mode", oct(want.mode), oct(got.mode)))
    if want.xattrs is not None and got.xattrs is not None:
        checks.append(("xattrs", dict(want.xattrs), dict(got.xattrs)))
    for name, expected, seen in checks:
        if expected != seen:
            diffs.append(f"{path}: {name} is {seen!r}, expected {expected!r}")
    return diffs


def _hardlink_differences(expected: Tree, observed: Tree) -> list[str]:
    groups: dict[str, list[str]] = {}
    for path, node in expected.items():
        if node.hardlink_of is not None:
            groups.setdefault(node.hardlink_of, [node.hardlink_of]).append(path)
    diffs: list[str] = []
    for members in groups.values():
        inodes = {p: observed[p].inode for p in members if p in observed and p in expected}
        if len(set(inodes.values())) > 1:
            diffs.append(f"hard links do not share an inode: {inodes}")
    return diffs


def compare_trees(
    expected: Tree, observed: Tree, *, ignore: Sequence[str] = (), hardlinks: bool = True,
) -> list[str]:
    """Every difference between ``expected`` and ``observed`` (empty means equal).

    Paths equal to or below an entry of ``ignore`` are skipped on both sides. Fields the
    observer left as None (xattrs in a container) are not compared; symlink modes never are.
    With ``hardlinks``, members of a hard-link group must share one observed inode.
    """
    def wanted(path: str) -> bool:
        return not any(path == i or path.startswith(i.rstrip("/") + "/") for i in ignore)

    exp = {p: n for p, n in expected.items() if wanted(p)}
    obs = {p: n for p, n in observed.items() if wanted(p)}
    diffs = [f"{p}: missing" for p in sorted(exp.keys() - obs.keys())]
    diffs += [f"{p}: unexpected" for p in sorted(obs.keys() - exp.keys())]
    for path in sorted(exp.keys() & obs.keys()):
        diffs += _node_differences(path, exp[path], obs[path])
    if hardlinks:
        diffs += _hardlink_differences(exp, obs)
    return diffs
