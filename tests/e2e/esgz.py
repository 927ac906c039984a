"""eStargz images for the end-to-end tests: converted by ctr-remote, or made by hand.

* :class:`Converter` wraps a private containerd (overlayfs only, no lazysnap) that pulls a
  source image, converts it with ``ctr-remote image convert --estargz --oci`` (or
  ``ctr-remote image optimize``, which records the files a workload reads and puts them
  before ``.prefetch.landmark``) and pushes the result back to the registry. The same
  containerd runs *reference* containers of the unconverted source image on overlayfs,
  whose output the lazy containers must reproduce.
* :func:`feature_layers` is the main test image: several layers with whiteouts, opaque
  directories, hard links, symlinks, xattrs, empty files, multi-MiB files, odd names and a
  directory of 5,000 entries.
* :func:`describe` reads an image back from the registry (manifest, config, TOC digests,
  chain IDs), which is how tests learn what a conversion produced.
* :func:`esgz_blob` / :func:`push_layers` build eStargz layers directly with the test
  writer (``tests/estargz_writer.py``) for hostile or broken input that no converter makes.

Everything talks to a registry on 127.0.0.1 over plain HTTP and never through a proxy.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..estargz_writer import TarEntry, build_estargz
from .demo import busybox_layer
from .harness import Containerd
from .imagebuild import (
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Layer,
    LayerBlob,
    Opaque,
    PushedImage,
    Symlink,
    Tree,
    Whiteout,
    build_and_push,
    chain_ids,
    expected_tree,
    image_config,
    push_blob,
    push_image,
    push_manifest,
    sha256_digest,
)

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
CHUNK_SIZE = 65536
MANY_ENTRIES = 5000
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ACCEPT = f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- the feature image ------------------------------------------------------------------

LONG_NAME = "/data/" + "n" * 251 + ".txt"  # a 255-byte file name
LONG_UNICODE_NAME = "/data/" + "é" * 127 + "x"  # 255 bytes in UTF-8
DATA_XATTRS = {"user.dir": b"directory xattr"}
BIG_PATH = "/data/big.bin"  # 4 MiB + 123 bytes: 65 chunks of 64 KiB
FILE_XATTRS = {
    "user.one": b"1",
    "user.spaces": "value with spaces = and unicode é".encode(),
    "user.long": bytes(range(33, 127)) * 2,
}


def _data_layer() -> Layer:
    entries: list[Entry] = [
        Dir("/data", 0o755, xattrs=DATA_XATTRS),
        File("/data/empty"),
        File("/data/small.txt", b"small\n"),
        # A hard link's tar header carries mode and owner too, and containerd applies them
        # to the shared inode: link targets keep imagebuild's link defaults (0644, root).
        File(BIG_PATH, _random(11, 4 * 1024 * 1024 + 123)),
        File("/data/exact.bin", _random(12, 3 * CHUNK_SIZE), mode=0o640),
        File("/data/compressible.txt", b"lazysnap eStargz " * 60000),
        File("/data/name with  spaces.txt", b"spaces\n"),
        File("/data/ünïcödé-日本語.txt", b"unicode\n", uid=65534, gid=65534),
        File(LONG_NAME, b"long name\n"),
        File(LONG_UNICODE_NAME, b"long unicode name\n"),
        File("/data/xattrs.txt", b"xattrs\n", xattrs=FILE_XATTRS),
        File("/data/setuid", b"#!/bin/sh\n", mode=0o4755),
        File("/data/setgid-owned", b"g\n", mode=0o2750, uid=1000, gid=2000),
        File("/data/unreadable", b"root reads it anyway\n", mode=0o000),
        Hardlink("/data/small-hardlink.txt", "/data/small.txt"),
        Hardlink("/data/big-hardlink.bin", BIG_PATH),
        Symlink("/data/rel-link", "small.txt"),
        Symlink("/data/abs-link", "/data/dir/a.txt"),
        Symlink("/data/dir-link", "dir"),
        Symlink("/data/chain-link", "rel-link"),
        Symlink("/data/dangling", "/nonexistent/target"),
        Fifo("/data/fifo"),
        Device("/data/char-null", "char", 1, 3),
        Device("/data/block-loop", "block", 7, 0, mode=0o660),
        Dir("/data/sticky", 0o1777),
        Dir("/data/private", 0o700, uid=1000, gid=1000, xattrs={"user.private": b"yes"}),
        File("/data/private/secret.txt", b"secret\n", mode=0o600, uid=1000, gid=1000),
        Hardlink("/data/private/small-hardlink-elsewhere.txt", "/data/small.txt"),
        File("/data/replaced.txt", b"old content, must not be visible\n"),
        Dir("/data/dir", 0o750),
        File("/data/dir/a.txt", b"a\n"),
        File("/data/dir/sub/c.bin", _random(13, 70000)),
        File("/data/gone.txt", b"deleted by the last layer\n"),
        File("/data/gone-dir/x.txt", b"deleted with its directory\n"),
        File("/data/gone-dir/deeper/y.txt", b"y\n"),
    ]
    return Layer(entries)


def _many_layer() -> Layer:
    entries: list[Entry] = [Dir("/many", 0o755)]
    entries += [
        File(f"/many/f{i:04d}", b"" if i % 7 == 0 else f"entry {i}\n".encode())
        for i in range(MANY_ENTRIES)
    ]
    return Layer(entries)


def _change_layer() -> Layer:
    return Layer([
        Dir("/data", 0o775, xattrs=DATA_XATTRS),
        Whiteout("/data/gone.txt"),
        Whiteout("/data/gone-dir"),
        Opaque("/data/dir", 0o755),
        File("/data/dir/new.txt", b"only this is visible in /data/dir\n"),
        File("/data/dir/sub2/d.bin", _random(14, 100_000)),
        File("/data/replaced.txt", b"new content from the last layer\n"),
    ])


def feature_layers() -> list[Layer]:
    """busybox, data (see the module docstring), 5,000 entries, and changes on top."""
    return [busybox_layer(), _data_layer(), _many_layer(), _change_layer()]


# --- reading images back from the registry ----------------------------------------------


def http_get(url: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The body of a GET (urllib errors propagate)."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    with _OPENER.open(req, timeout=60) as resp:
        data: bytes = resp.read()
        return data


@dataclass(frozen=True)
class EsgzLayer:
    """One layer descriptor of a pushed image (``toc_digest`` empty for non-eStargz)."""

    digest: str
    size: int
    diff_id: str
    toc_digest: str
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class EsgzImage:
    """An image as the registry holds it, plus the tree it must produce (if known)."""

    registry: str
    name: str
    tag: str
    manifest: Mapping[str, Any]
    layers: tuple[EsgzLayer, ...]
    chain_ids: tuple[str, ...]
    tree: Tree = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/name:tag``."""
        return f"{self.registry}/{self.name}:{self.tag}"

    def blob(self, index: int) -> bytes:
        """The bytes of layer ``index`` as stored in the registry."""
        return http_get(
            f"http://{self.registry}/v2/{self.name}/blobs/{self.layers[index].digest}")


def toc_entries(blob: bytes) -> list[dict[str, Any]]:
    """The TOC entries of an eStargz blob, read as the plain ``tar.gz`` it also is."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        member = tar.extractfile("stargz.index.json")
        if member is None:
            raise ValueError("stargz.index.json is not a regular file")
        entries: list[dict[str, Any]] = json.loads(member.read())["entries"]
        return entries


def describe(registry: str, name: str, tag: str, tree: Tree | None = None) -> EsgzImage:
    """Read manifest and config of ``registry/name:tag`` back; urllib errors propagate."""
    base = f"http://{registry}/v2/{name}"
    manifest = json.loads(http_get(f"{base}/manifests/{tag}", {"Accept": _ACCEPT}))
    config = json.loads(http_get(f"{base}/blobs/{manifest['config']['digest']}"))
    diff_ids = list(config["rootfs"]["diff_ids"])
    layers = tuple(
        EsgzLayer(d["digest"], int(d["size"]), diff_id,
                  (d.get("annotations") or {}).get(TOC_DIGEST, ""),
                  dict(d.get("annotations") or {}))
        for d, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    )
    return EsgzImage(registry, name, tag, manifest, layers, tuple(chain_ids(diff_ids)),
                     tree or {})


def copy_image(image: EsgzImage, registry: str) -> EsgzImage:
    """Copy ``image`` (manifest, config and layer blobs) to another registry, same name
    and tag; return it as described by the new registry."""
    base = f"http://{image.registry}/v2/{image.name}/blobs"
    digests = [image.manifest["config"]["digest"], *(layer.digest for layer in image.layers)]
    for digest in digests:
        push_blob(registry, image.name, http_get(f"{base}/{digest}"))
    body = json.dumps(image.manifest, sort_keys=True, separators=(",", ":")).encode()
    push_manifest(registry, image.name, image.tag, body)
    return describe(registry, image.name, image.tag, image.tree)


# --- hand-made eStargz layers -----------------------------------------------------------


def esgz_blob(entries: Sequence[TarEntry], **options: Any) -> LayerBlob:
    """An eStargz layer written by the test writer, with its DiffID and TOC digest
    annotation. ``options`` go to ``build_estargz`` (chunk_size, toc_modifier, ...)."""
    built = build_estargz(entries, **options)
    diff_id = sha256_digest(gzip.decompress(built.blob))
    return LayerBlob(built.blob, OCI_LAYER_GZIP, diff_id, {TOC_DIGEST: built.toc_digest})


def registry_blob(image: EsgzImage, index: int) -> LayerBlob:
    """Layer ``index`` of a pushed image as a blob that ``push_layers`` can reuse."""
    layer = image.layers[index]
    return LayerBlob(image.blob(index), OCI_LAYER_GZIP, layer.diff_id, layer.annotations)


def push_layers(registry: str, name: str, tag: str, blobs: Sequence[LayerBlob]) -> EsgzImage:
    """Push ``blobs`` (bottom first) as an image with a matching config; describe it."""
    config = image_config([b.diff_id for b in blobs], cmd=["/bin/sh"])
    push_image(registry, name, tag, blobs, config)
    return describe(registry, name, tag)


# --- conversion with ctr-remote -------------------------------------------------------


class Converter:
    """A private containerd that pulls, converts and pushes images and runs reference
    containers on overlayfs. Every method raises CommandError when a command fails."""

    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self._runs = 0

    def pull(self, ref: str) -> None:
        """``ctr image pull`` (content and an overlayfs unpack)."""
        self.containerd.pull(ref, snapshotter="overlayfs")

    def convert(self, src: str, dst: str, *, chunk_size: int = CHUNK_SIZE) -> None:
        """``ctr-remote image convert --estargz --oci`` of a pulled ``src`` into ``dst``."""
        self.containerd.ctr("image", "convert", "--estargz", "--oci",
                            "--estargz-chunk-size", str(chunk_size), src, dst,
                            binary="ctr-remote", timeout=300)

    def optimize(self, src: str, dst: str, workload: Sequence[str]) -> None:
        """``ctr-remote image optimize --oci`` of a pulled ``src`` into ``dst``: runs
        ``workload`` in a container (host network) and moves the files it read before
        ``.prefetch.landmark``."""
        self.containerd.ctr(
            "image", "optimize", "--oci", "--net-host", "--period", "1",
            "--args", json.dumps(list(workload)), src, dst, binary="ctr-remote", timeout=300)

    def push(self, ref: str) -> None:
        """``ctr image push --plain-http REF``."""
        self.containerd.ctr("image", "push", "--plain-http", ref, timeout=300)

    def reference_run(self, ref: str, script: str) -> str:
        """stdout of ``sh -c SCRIPT`` in a container of the pulled ``ref`` on overlayfs."""
        self._runs += 1
        return self.containerd.run_container(
            ref, f"reference-{self._runs}", "sh", "-c", script, snapshotter="overlayfs",
        ).stdout


def convert_and_push(converter: Converter, source: PushedImage, tag: str,
                     tree: Tree) -> EsgzImage:
    """Convert the pushed ``source`` to eStargz (64 KiB chunks) as ``tag`` of the same
    repository, push it and describe it."""
    dst = f"{source.registry}/{source.name}:{tag}"
    converter.pull(source.reference)
    converter.convert(source.reference, dst)
    converter.push(dst)
    return describe(source.registry, source.name, tag, tree)


def optimize_and_push(converter: Converter, source: PushedImage, tag: str,
                      workload: Sequence[str], tree: Tree) -> EsgzImage:
    """``ctr-remote image optimize`` ``source`` with ``workload`` as ``tag``; push, describe."""
    dst = f"{source.registry}/{source.name}:{tag}"
    converter.pull(source.reference)
    converter.optimize(source.reference, dst, workload)
    converter.push(dst)
    return describe(source.registry, source.name, tag, tree)


@dataclass(frozen=True)
class FeatureImage:
    """The converted feature image, its source and the source's reference listing."""

    esgz: EsgzImage
    source: PushedImage
    reference_listing: str


def build_feature_image(registry: str, converter: Converter, listing: str) -> FeatureImage:
    """Push the feature image, convert it and run ``listing`` (a script) on the source."""
    layers = feature_layers()
    source = build_and_push(registry, "lazysnap/esgz-features", "source", layers,
                            cmd=["/bin/sh"])
    esgz = convert_and_push(converter, source, "esgz", expected_tree(layers))
    return FeatureImage(esgz, source, converter.reference_run(source.reference, listing))
