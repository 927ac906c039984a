"""The image builder and tree comparison, checked on their own and against umoci.

The pure tests pin down whiteout/opaque semantics and the tar encoding; the e2e test pulls
the pushed demo image with skopeo and unpacks it with umoci (an independent OCI
implementation) to confirm that what imagebuild pushes is what expected_tree predicts.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from .demo import DemoImage
from .harness import require_tools
from .imagebuild import (
    Device,
    Dir,
    File,
    Hardlink,
    Layer,
    Node,
    Opaque,
    Symlink,
    Whiteout,
    build_layer,
    chain_ids,
    expected_tree,
    sha256_digest,
)
from .imagetree import END_MARKER, compare_trees, host_tree, parse_listing


def _members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    data, _ = build_layer(layer, {})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def test_whiteout_removes_a_lower_subtree() -> None:
    tree = expected_tree([
        Layer([File("/a/b/c", b"c"), File("/a/keep", b"k")]),
        Layer([Whiteout("/a/b")]),
    ])
    assert sorted(tree) == ["/a", "/a/keep"]


def test_opaque_hides_lower_children_but_keeps_its_own() -> None:
    tree = expected_tree([
        Layer([File("/d/old", b"o"), Dir("/d/sub"), File("/d/sub/x", b"x")]),
        Layer([Opaque("/d", 0o700), File("/d/new", b"n")]),
    ])
    assert sorted(tree) == ["/d", "/d/new"]
    assert tree["/d"].mode == 0o700


def test_directory_over_directory_keeps_children_and_takes_metadata() -> None:
    tree = expected_tree([
        Layer([Dir("/d", 0o755), File("/d/f", b"f")]),
        Layer([Dir("/d", 0o711, uid=5)]),
    ])
    assert sorted(tree) == ["/d", "/d/f"]
    assert (tree["/d"].mode, tree["/d"].uid) == (0o711, 5)


def test_non_directory_over_directory_replaces_the_subtree() -> None:
    tree = expected_tree([
        Layer([File("/d/f", b"f")]),
        Layer([Symlink("/d", "elsewhere")]),
    ])
    assert tree == {"/d": Node("symlink", 0o777, target="elsewhere", xattrs={})}


def test_hard_links_share_content_and_record_their_group() -> None:
    tree = expected_tree([Layer([File("/f", b"data", 0o600), Hardlink("/g", "/f")])])
    assert tree["/g"].md5 == tree["/f"].md5 == hashlib.md5(b"data").hexdigest()
    assert (tree["/g"].mode, tree["/g"].hardlink_of) == (0o600, "/f")


def test_hard_link_to_a_lower_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="same layer"):
        expected_tree([Layer([File("/f", b"x")]), Layer([Hardlink("/g", "/f")])])


def test_tar_encoding_of_special_entries() -> None:
    members = _members(Layer([
        File("/x/f", b"abc", xattrs={"user.k": b"v"}),
        Hardlink("/x/h", "/x/f"),
        Device("/x/dev", "block", 7, 1),
        Whiteout("/x/gone"),
        Opaque("/x/o"),
    ]))
    assert list(members) == ["x", "x/f", "x/h", "x/dev", "x/.wh.gone", "x/o", "x/o/.wh..wh..opq"]
    assert members["x"].isdir()  # implicit parent, emitted before its first child
    assert members["x/f"].pax_headers["SCHILY.xattr.user.k"] == "v"
    assert (members["x/h"].islnk(), members["x/h"].linkname) == (True, "x/f")
    assert (members["x/dev"].isblk(), members["x/dev"].devmajor, members["x/dev"].devminor) == (
        True, 7, 1)


def test_layers_are_deterministic() -> None:
    layer = Layer([File("/a", b"1"), Symlink("/b", "a")])
    assert build_layer(layer, {})[0] == build_layer(layer, {})[0]


def test_chain_ids() -> None:
    a, b = sha256_digest(b"a"), sha256_digest(b"b")
    assert chain_ids([a, b]) == [a, sha256_digest(f"{a} {b}".encode())]


def test_compare_trees_reports_each_kind_of_difference() -> None:
    want = expected_tree([Layer([File("/f", b"x"), Hardlink("/h", "/f"), File("/m", b"m")])])
    seen = {
        "/f": Node("file", 0o644, size=1, md5="0" * 32, inode=1),
        "/h": Node("file", 0o600, size=1, md5=want["/h"].md5, inode=2),
        "/extra": Node("dir", 0o755),
    }
    diffs = compare_trees(want, seen)
    assert "/m: missing" in diffs and "/extra: unexpected" in diffs
    assert any(d.startswith("/f: md5") for d in diffs)
    assert any(d.startswith("/h: mode") for d in diffs)
    assert any(d.startswith("hard links do not share an inode") for d in diffs)
    assert compare_trees(want, seen, ignore=["/"]) == []


def test_parse_listing_requires_the_end_marker() -> None:
    line = "E\t81a4 0 0 3 0 0 12\tmd5\t-\t/path with space\n"
    assert parse_listing(line + END_MARKER)["/path with space"].size == 3
    with pytest.raises(ValueError, match="incomplete"):
        parse_listing(line)


@pytest.mark.e2e
def test_pushed_demo_image_unpacks_with_umoci_as_expected(
    demo_image: DemoImage, tmp_path: Path
) -> None:
    """skopeo + umoci see exactly the tree expected_tree predicts (xattrs included)."""
    require_tools("skopeo", "umoci")
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         f"docker://{demo_image.reference}", f"oci:{layout}:v1"],
        check=True, capture_output=True, timeout=120,
    )
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)],
                   check=True, capture_output=True, timeout=120)
    assert compare_trees(demo_image.tree, host_tree(bundle / "rootfs")) == []
