"""The demo image every end-to-end test can pull: busybox plus data, three layers.

Layer 1: static busybox at /bin/busybox, applet symlinks in /bin, an empty /tmp.
Layer 2: /data with files of many sizes (a few MiB among them), odd names, a hard link,
a symlink (relative, absolute and dangling), a fifo, device nodes, an xattr, non-root
ownership, setuid bits, /data/dir with a subtree and /data/gone.txt.
Layer 3: whiteout of /data/gone.txt, /data/dir made opaque with new content,
/data/replaced.txt rewritten, /data's mode changed (a directory over a directory).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .imagebuild import (
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Layer,
    Opaque,
    PushedImage,
    Symlink,
    Tree,
    Whiteout,
    build_and_push,
    expected_tree,
)
from .imagetree import top_level

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "ash", "md5sum", "sha256sum", "ls", "cat", "find", "stat", "readlink", "xargs",
    "echo", "head", "tail", "wc", "sleep", "true", "false", "mkdir", "rm", "cut", "test",
    "printf", "dd", "sync", "touch", "cp", "mv", "grep", "sort", "du", "df", "mount",
)
HELLO = b"hello from the lazysnap demo image\n"
GREETING_PATH = "/data/hello.txt"
REPLACED_OLD = b"old content, must not be visible\n"
REPLACED_NEW = b"new content from layer 3\n"


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def busybox_layer() -> Layer:
    """Layer 1: busybox and its applet links (relative targets, as busybox --install -s)."""
    entries: list[Entry] = [Dir("/bin"), File("/bin/busybox", BUSYBOX.read_bytes(), 0o755)]
    entries += [Symlink(f"/bin/{name}", "busybox") for name in APPLETS]
    entries.append(Dir("/tmp", 0o1777))
    return Layer(entries)


def data_layer() -> Layer:
    """Layer 2: assorted data; see the module docstring."""
    return Layer([
        Dir("/data"),
        File(GREETING_PATH, HELLO),
        File("/data/empty"),
        File("/data/small.bin", _random_bytes(1, 4097)),
        File("/data/medium.bin", _random_bytes(2, 300 * 1024 + 17)),
        File("/data/big.bin", _random_bytes(3, 3 * 1024 * 1024 + 5), mode=0o600),
        File("/data/compressible.txt", b"lazysnap " * (1024 * 1024 // 9)),
        File("/data/exec.sh", b"#!/bin/sh\necho exec\n", mode=0o755, uid=1000, gid=1000),
        File("/data/setuid", b"s", mode=0o4755),
        File("/data/name with space.txt", b"space\n"),
        File("/data/ünïcödé.txt", b"unicode\n", uid=65534, gid=65534),
        File("/data/xattr.txt", b"xattr\n", xattrs={"user.lazysnap": b"demo-value"}),
        Hardlink("/data/hello-hardlink.txt", GREETING_PATH),
        Symlink("/data/rel-link", "hello.txt"),
        Symlink("/data/abs-link", "/data/dir/a.txt"),
        Symlink("/data/dangling", "/nonexistent/target"),
        Fifo("/data/fifo"),
        Device("/data/char-null", "char", 1, 3),
        Device("/data/block-loop", "block", 7, 0, mode=0o660),
        File("/data/replaced.txt", REPLACED_OLD),
        Dir("/data/dir", 0o750),
        File("/data/dir/a.txt", b"a\n"),
        File("/data/dir/b.bin", _random_bytes(4, 65536)),
        Dir("/data/dir/sub"),
        File("/data/dir/sub/c.txt", b"c\n"),
        File("/data/gone.txt", b"this file is deleted by layer 3\n"),
    ])


def change_layer() -> Layer:
    """Layer 3: a whiteout, an opaque directory, a rewrite and a directory mode change."""
    return Layer([
        Dir("/data", 0o775),
        Whiteout("/data/gone.txt"),
        Opaque("/data/dir", 0o755),
        File("/data/dir/new.txt", b"only this is visible in /data/dir\n"),
        File("/data/dir/sub2/d.bin", _random_bytes(5, 100_000)),
        File("/data/replaced.txt", REPLACED_NEW),
    ])


def demo_layers() -> list[Layer]:
    """The three layers, bottom first."""
    return [busybox_layer(), data_layer(), change_layer()]


@dataclass(frozen=True)
class DemoImage:
    """The pushed demo image together with what it must look like."""

    image: PushedImage
    layers: tuple[Layer, ...]
    tree: Tree

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/lazysnap/demo:v1``."""
        return self.image.reference

    @property
    def roots(self) -> list[str]:
        """The image's top-level paths (what a container listing walks)."""
        return top_level(self.tree)


def push_demo(registry: str, name: str = "lazysnap/demo", tag: str = "v1") -> DemoImage:
    """Build and push the demo image to ``registry`` (``host:port``)."""
    layers = demo_layers()
    image = build_and_push(registry, name, tag, layers, cmd=["/bin/sh"])
    return DemoImage(image, tuple(layers), expected_tree(layers))
