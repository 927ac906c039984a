"""The benchmark's images: what they contain, how they are built once, and the cache.

Each image is pushed twice into the registry storage under ``bench/.cache/registry``:
``bench/<name>:gzip`` (ordinary gzip layers) and ``bench/<name>:esgz`` (the same image
converted by ``ctr-remote image convert --estargz --oci``); the images of the cold-start
figure also as ``bench/<name>:nydus`` (the gzip image converted by ``python -m snapshotter
convert --format rafs-v6 --from-image``, added on first use) and, with ``--optimized``,
once per workload as ``bench/<name>:opt-<workload>`` (the gzip image converted by
``ctr-remote image optimize --oci`` while running that workload, so the files it reads
come first in each layer, before a prefetch landmark; added on first use).
``bench/.cache/images.json`` records what was pushed (layer digests, sizes, TOC digests,
DiffIDs); an image is built again only when it is missing there or ``CACHE_VERSION``
changed.

* ``tiny``: static busybox, a greeting, an 8 MiB random file and a 200-file tree; needs no
  network (the smoke test uses it).
* ``python``: a Debian bookworm ``minbase`` root file system with python3, made by
  ``debootstrap`` from the Debian mirror apt uses here, split into four layers.
* ``data``: busybox, one 256 MiB random file, a 10,000-file tree and 96 MiB of other data.
* ``layers``: 50 small layers (memory and scale figures); also tagged ``esgz-30`` and
  ``gzip-30`` with only its first 30 layers.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.e2e.demo import busybox_layer
from tests.e2e.harness import REPO_ROOT, Containerd
from tests.e2e.imagebuild import (
    OCI_LAYER_GZIP,
    File,
    Layer,
    LayerBlob,
    build_and_push,
    image_config,
    push_blob,
    push_image,
    push_manifest,
    sha256_digest,
)
from tests.e2e.procs import HarnessError, unmount_all_under

from .wan import loopback_registry

CACHE_VERSION = 1
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
PYTHON_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG=C.UTF-8")
SCALE_LAYERS = 30
MEMORY_LAYERS = 50
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Workload:
    """A command run in a container of an image (cold-start figure)."""

    name: str
    argv: tuple[str, ...]
    expect: str = ""  # a substring its standard output must contain


@dataclass(frozen=True)
class ImageDef:
    """An image the bench knows how to build and what it measures with it."""

    name: str
    workloads: tuple[Workload, ...] = ()
    big_file: str = ""  # the file of the sequential and random read figures
    tree: str = ""  # the directory of the metadata-walk figure
    extra_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerInfo:
    """One layer descriptor as pushed."""

    digest: str
    size: int
    toc_digest: str = ""


@dataclass(frozen=True)
class PushedVariant:
    """One tag of an image in the registry: its layers and DiffIDs."""

    tag: str
    layers: tuple[LayerInfo, ...]
    diff_ids: tuple[str, ...]

    @property
    def size(self) -> int:
        """Compressed size: the sum of the layer blobs."""
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "diff_ids": list(self.diff_ids),
                "layers": [vars(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PushedVariant:
        return cls(raw["tag"], tuple(LayerInfo(**x) for x in raw["layers"]),
                   tuple(raw["diff_ids"]))


@dataclass(frozen=True)
class CachedImage:
    """What the cache index says about one built image."""

    name: str
    variants: dict[str, PushedVariant]
    facts: dict[str, str] = field(default_factory=dict)  # e.g. big_md5

    @property
    def repo(self) -> str:
        """``bench/<name>``."""
        return f"bench/{self.name}"

    def ref(self, host: str, tag: str) -> str:
        """``host/bench/<name>:<tag>``."""
        return f"{host}/{self.repo}:{tag}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "facts": self.facts,
                "variants": {k: v.to_json() for k, v in self.variants.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CachedImage:
        return cls(raw["name"], {k: PushedVariant.from_json(v)
                                 for k, v in raw["variants"].items()}, dict(raw["facts"]))


def optimized_tag(workload: str) -> str:
    """The tag of the image optimised for ``workload``: ``opt-<workload>``."""
    return f"opt-{workload}"


def expected_output(wl: Workload, img: CachedImage) -> str:
    """What ``wl``'s standard output must contain in ``img`` ("" for anything): the MD5
    of the big file for ``md5sum``, else the workload's own ``expect``."""
    if wl.name == "md5sum":
        return img.facts.get("big_md5", "")
    return wl.expect


HELLO = Workload("hello", ("python3", "-c", 'print("hello")'), "hello")
IMPORTS = Workload("imports", ("python3", "-c", "import json, sqlite3, asyncio, email"))
IMAGES: dict[str, ImageDef] = {
    "tiny": ImageDef("tiny", (Workload("cat", ("cat", "/data/hello.txt"), "hello"),),
                     big_file="/data/big.bin", tree="/data/tree"),
    "python": ImageDef("python", (HELLO, IMPORTS)),
    "data": ImageDef("data", (Workload("md5sum", ("md5sum", "/data/big.bin")),),
                     big_file="/data/big.bin", tree="/data/tree"),
    "layers": ImageDef("layers", extra_tags=(f"esgz-{SCALE_LAYERS}", f"gzip-{SCALE_LAYERS}")),
}


# --- image contents ---------------------------------------------------------------------


def _random(seed: int, size: int) -> bytes:
    """``size`` pseudo-random bytes from ``seed`` (made 16 MiB at a time: ``randbytes``
    cannot make more than 256 MiB in one call)."""
    rng = random.Random(seed)
    step = 16 << 20
    return b"".join(rng.randbytes(min(step, size - i)) for i in range(0, size, step))


def tree_files(root: str, count: int, seed: int) -> list[File]:
    """``count`` files in directories of 100 below ``root``: sizes 0..16 KiB, half text and
    half random bytes, all deterministic."""
    rng = random.Random(seed)
    files: list[File] = []
    for i in range(count):
        size = rng.randrange(0, 16 * 1024)
        if i % 2:
            data = rng.randbytes(size)
        else:
            data = (f"file {i} of the benchmark tree\n" * (size // 30 + 1)).encode()[:size]
        files.append(File(f"{root}/d{i // 100:03d}/f{i:05d}.txt", data))
    return files


def tiny_layers() -> tuple[list[Layer], dict[str, str]]:
    """busybox + greeting, 8 MiB file, 200-file tree."""
    big = _random(11, 8 << 20)
    data = Layer([File("/data/hello.txt", b"hello from the bench tiny image\n"),
                  File("/data/big.bin", big), *tree_files("/data/tree", 200, 12)])
    return [busybox_layer(), data], {"big_md5": hashlib.md5(big).hexdigest()}


def data_layers() -> tuple[list[Layer], dict[str, str]]:
    """busybox; the 256 MiB file; the 10,000-file tree; 4 x 24 MiB of other data."""
    big = _random(21, 256 << 20)
    more = [File(f"/data/more/part{i}.bin", _random(30 + i, 24 << 20)) for i in range(4)]
    layers = [busybox_layer(), Layer([File("/data/big.bin", big)]),
              Layer(tree_files("/data/tree", 10_000, 22)), Layer(more)]
    return layers, {"big_md5": hashlib.md5(big).hexdigest()}


def many_layers(count: int = MEMORY_LAYERS) -> list[Layer]:
    """``count`` small layers with distinct content (eight small files and 256 KiB each)."""
    return [Layer([*(File(f"/layers/l{i:02d}/f{j}.txt", f"layer {i} file {j}\n".encode() * 50)
                     for j in range(8)),
                   File(f"/layers/l{i:02d}/blob.bin", _random(100 + i, 256 * 1024))])
            for i in range(count)]


# --- the python image from debootstrap ----------------------------------------------------

# (layer name, path prefixes relative to the root); the first match wins, the rest is base.
PYTHON_SPLIT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ("usr/lib/python3", "usr/lib/python3.11")),
    ("libs", ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu")),
    ("share", ("usr/share",)),
)
PYTHON_SKIP = ("proc/", "sys/", "dev/", "run/", "tmp/", "var/cache/apt/", "var/lib/apt/lists/",
               "var/log/")


def debian_mirror(sources: dict[str, str], suite: str = "bookworm") -> str:
    """The first ``debian`` mirror URI that serves ``suite`` in apt source files
    (``{file name: text}``, one-line ``deb`` format or deb822 ``.sources``).

    Raises ValueError when none does.
    """
    for name in sorted(sources):
        text = sources[name]
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "").split()
                if suite in suites and "deb" in fields.get("Types", "deb").split():
                    return str(uris[0])
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    return parts[1]
    raise ValueError(f"no apt source serves {suite}")


def system_mirror() -> str:
    """The Debian mirror apt uses on this machine (see :func:`debian_mirror`)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    texts = {p.name: p.read_text() for p in files if p.is_file()}
    return debian_mirror(texts)


def split_paths(paths: Sequence[str],
                rules: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[str]]:
    """Assign root-relative ``paths`` to layers: the first rule with a prefix that equals the
    path or is a parent of it, else ``base``. Order within a layer is kept."""
    out: dict[str, list[str]] = {"base": [], **{name: [] for name, _ in rules}}
    for path in paths:
        target = "base"
        for name, prefixes in rules:
            if any(path == p or path.startswith(p + "/") for p in prefixes):
                target = name
                break
        out[target].append(path)
    return out


def _walk(root: Path, skip: Sequence[str]) -> list[str]:
    """Every path below ``root`` (relative, sorted, parents first); the contents (not the
    directories themselves) of ``skip`` prefixes are left out."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if any(rel.startswith(s) for s in skip):
                continue
            found.append(rel)
    return found


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def tar_from_dir(root: Path, paths: Sequence[str]) -> bytes:
    """An uncompressed PAX tar of ``paths`` (relative to ``root``) with their missing
    parent directories; hard links within the layer are kept as links."""
    buf = io.BytesIO()
    done: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in paths:
            for parent in (*_ancestors(rel), rel):
                if parent in done:
                    continue
                done.add(parent)
                info = tar.gettarinfo(str(root / parent), arcname=parent)
                info.uname = info.gname = ""
                if info.isreg():
                    with open(root / parent, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def debootstrap_python(target: Path, mirror: str) -> None:
    """``debootstrap --variant=minbase --include=python3 bookworm TARGET MIRROR``."""
    if shutil.which("debootstrap") is None:
        raise HarnessError("debootstrap is missing: apt-get install debootstrap")
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(target),
         mirror], capture_output=True, text=True, check=False, timeout=1800)
    if result.returncode != 0:
        raise HarnessError(f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr}")


def push_python(host: str, workdir: Path) -> dict[str, str]:
    """Build the python image from debootstrap and push it as ``bench/python:gzip``."""
    rootfs = workdir / "python-rootfs"
    try:
        debootstrap_python(rootfs, system_mirror())
        unmount_all_under(rootfs)
        layers = split_paths(_walk(rootfs, PYTHON_SKIP), PYTHON_SPLIT)
        blobs: list[LayerBlob] = []
        for name in ("base", "libs", "python", "share"):
            tar = tar_from_dir(rootfs, layers[name])
            blobs.append(LayerBlob(gzip.compress(tar, compresslevel=6, mtime=0),
                                   OCI_LAYER_GZIP, sha256_digest(tar)))
    finally:
        unmount_all_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
    config = image_config([b.diff_id for b in blobs], cmd=["python3"], env=PYTHON_ENV)
    push_image(host, "bench/python", "gzip", blobs, config)
    return {}


# --- the registry side ---------------------------------------------------------------------


def _get_json(url: str, accept: str = "") -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with _OPENER.open(req, timeout=60) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def read_variant(host: str, repo: str, tag: str) -> PushedVariant:
    """Manifest and config of ``repo:tag`` as a PushedVariant."""
    manifest = _get_json(f"http://{host}/v2/{repo}/manifests/{tag}", OCI_MANIFEST)
    config = _get_json(f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}")
    layers = tuple(
        LayerInfo(d["digest"], int(d["size"]),
                  (d.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION, ""))
        for d in manifest["layers"])
    return PushedVariant(tag, layers, tuple(config["rootfs"]["diff_ids"]))


def push_prefix(host: str, repo: str, tag: str, new_tag: str, count: int) -> None:
    """Push ``repo:new_tag``: ``repo:tag`` cut down to its first ``count`` layers."""
    manifest = _get_json(f"http://{host}/v2/{repo}/manifests/{tag}", OCI_MANIFEST)
    config = _get_json(f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}")
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:count]
    config["history"] = [h for h in config.get("history", []) if not h.get("empty_layer")]
    config["history"] = config["history"][:count]
    raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    digest = push_blob(host, repo, raw)
    manifest["config"] = {**manifest["config"], "digest": digest, "size": len(raw)}
    manifest["layers"] = manifest["layers"][:count]
    push_manifest(host, repo, new_tag,
                  json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


def convert_estargz(containerd: Containerd, src: str, dst: str) -> None:
    """Pull ``src``, convert it with ``ctr-remote image convert --estargz --oci`` to ``dst``
    and push that; both images are removed from containerd afterwards."""
    containerd.pull(src, snapshotter="overlayfs", timeout=1800)
    containerd.ctr("image", "convert", "--estargz", "--oci", src, dst, binary="ctr-remote",
                   timeout=1800)
    containerd.ctr("image", "push", "--plain-http", dst, timeout=1800)
    containerd.ctr("image", "rm", "--sync", src, dst, timeout=600)


OPTIMIZE_PERIOD_S = 300  # the longest a workload may run while it is recorded
_EXIT_CODE = re.compile(r"container exit with code (\d+)")


def optimize_argv(wl: Workload, src: str, dst: str) -> list[str]:
    """``ctr-remote`` arguments that optimise ``src`` for ``wl`` into ``dst``: ``image
    optimize --oci`` with the workload's argv as ``--entrypoint`` (its first word) and
    ``--args`` (the rest), both JSON arrays."""
    return ["image", "optimize", "--oci", f"--period={OPTIMIZE_PERIOD_S}",
            f"--entrypoint={json.dumps(list(wl.argv[:1]))}",
            f"--args={json.dumps(list(wl.argv[1:]))}", src, dst]


def check_optimize_run(wl: Workload, expect: str, stdout: str, stderr: str) -> None:
    """Raise HarnessError unless the recorded run of ``wl`` succeeded: the exit code
    ``ctr-remote`` logs must be 0 and ``expect`` (if any) must be in the output."""
    codes = _EXIT_CODE.findall(stderr)
    if not codes or codes[-1] != "0":
        raise HarnessError(f"optimising for {wl.name}: the workload did not exit with 0:\n"
                           f"{stderr[-3000:]}")
    if expect and expect not in stdout:
        raise HarnessError(f"optimising for {wl.name}: expected {expect!r} in {stdout!r}")


def optimize_for(containerd: Containerd, wl: Workload, expect: str, src: str,
                 dst: str) -> None:
    """Optimise the image ``src`` (already in ``containerd``) for ``wl``: the workload runs
    once in a container of this containerd, the files it opens are moved to the front of
    their layers before a prefetch landmark, and the result is pushed as ``dst`` (then
    removed from containerd). HarnessError if the workload failed."""
    result = containerd.ctr(*optimize_argv(wl, src, dst), binary="ctr-remote",
                            timeout=1800)
    check_optimize_run(wl, expect, result.stdout, result.stderr)
    containerd.ctr("image", "push", "--plain-http", dst, timeout=1800)
    containerd.ctr("image", "rm", "--sync", dst, timeout=600)


def optimize_image(containerd: Containerd, host: str, img: CachedImage,
                   workloads: Sequence[Workload]) -> CachedImage:
    """``img`` with an ``opt-<workload>`` tag for each of ``workloads``, each optimised
    from its ``gzip`` tag (see :func:`optimize_for`) and pushed to the registry ``host``."""
    src = img.ref(host, "gzip")
    containerd.pull(src, snapshotter="overlayfs", timeout=1800)
    try:
        added: dict[str, PushedVariant] = {}
        for wl in workloads:
            tag = optimized_tag(wl.name)
            optimize_for(containerd, wl, expected_output(wl, img), src, img.ref(host, tag))
            added[tag] = read_variant(host, img.repo, tag)
    finally:
        containerd.ctr("image", "rm", "--sync", src, timeout=600, check=False)
    return replace(img, variants={**img.variants, **added})


def missing_optimized(images: dict[str, CachedImage],
                      names: Sequence[str]) -> dict[str, list[Workload]]:
    """For each of ``names`` whose optimised tags are not all in ``images``: the
    workloads that lack theirs (images with every tag are left out)."""
    out: dict[str, list[Workload]] = {}
    for name in names:
        lacking = [wl for wl in IMAGES[name].workloads
                   if optimized_tag(wl.name) not in images[name].variants]
        if lacking:
            out[name] = lacking
    return out


def convert_nydus(src: str, dst: str) -> None:
    """Convert the OCI image ``src`` into a RAFS v6 nydus image with lazysnap's converter
    (``python -m snapshotter convert --from-image``) and push it as ``dst``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter", "convert", "--format", "rafs-v6",
         "--from-image", src, dst], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=3600)
    if result.returncode != 0:
        raise HarnessError(f"nydus conversion of {src} failed:\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")


Builder = Callable[[str, Path], dict[str, str]]


def _imagebuild_pusher(make: Callable[[], tuple[list[Layer], dict[str, str]]],
                       name: str, cmd: Sequence[str]) -> Builder:
    def push(host: str, workdir: Path) -> dict[str, str]:
        layers, facts = make()
        build_and_push(host, f"bench/{name}", "gzip", layers, cmd=list(cmd))
        return facts
    return push


BUILDERS: dict[str, Builder] = {
    "tiny": _imagebuild_pusher(tiny_layers, "tiny", ["/bin/sh"]),
    "data": _imagebuild_pusher(data_layers, "data", ["/bin/sh"]),
    "layers": _imagebuild_pusher(lambda: (many_layers(), {}), "layers", ["/bin/sh"]),
    "python": push_python,
}


class ImageCache:
    """``bench/.cache``: registry storage plus ``images.json``; see the module docstring."""

    def __init__(self, root: Path = DEFAULT_CACHE) -> None:
        self.root = root
        self.storage = root / "registry"
        self.index_path = root / "images.json"

    def load(self) -> dict[str, CachedImage]:
        """The images recorded for this ``CACHE_VERSION`` (others are ignored)."""
        try:
            raw = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}
        if raw.get("version") != CACHE_VERSION:
            return {}
        return {k: CachedImage.from_json(v) for k, v in raw.get("images", {}).items()}

    def _save(self, images: dict[str, CachedImage]) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION,
                                   "images": {k: v.to_json() for k, v in images.items()}},
                                  indent=1, sort_keys=True))
        tmp.replace(self.index_path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's lock (one builder at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def ensure(self, names: Sequence[str], log: Callable[[str], None]) -> dict[str, CachedImage]:
        """Build and push whatever of ``names`` the cache lacks; return all of ``names``."""
        cached = self.load()  # the index is replaced atomically: no lock needed to read it
        if all(n in cached for n in names):
            return {n: cached[n] for n in names}
        with self.locked():
            images = self.load()
            missing = [n for n in names if n not in images]
            if missing:
                self._build(missing, images, log)
            return {n: images[n] for n in names}

    def ensure_nydus(self, names: Sequence[str],
                     log: Callable[[str], None]) -> dict[str, CachedImage]:
        """``ensure(names)``, plus a ``nydus`` tag for each (converted from ``gzip`` once)."""
        have = self.ensure(names, log)
        if all("nydus" in have[n].variants for n in names):
            return have
        with self.locked():
            images = self.load()
            missing = [n for n in names if "nydus" not in images[n].variants]
            if not missing:
                return {n: images[n] for n in names}
            work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-nydus-", dir="/tmp"))
            registry = loopback_registry(work / "registry", self.storage)
            try:
                registry.start()
                for name in missing:
                    log(f"converting image {name} to nydus (once; cached in {self.root})")
                    img = images[name]
                    convert_nydus(img.ref(registry.host, "gzip"),
                                  img.ref(registry.host, "nydus"))
                    nydus = read_variant(registry.host, img.repo, "nydus")
                    images[name] = replace(img, variants={**img.variants, "nydus": nydus})
                    self._save(images)
            finally:
                registry.stop()
                shutil.rmtree(work, ignore_errors=True)
            return {n: images[n] for n in names}

    def ensure_optimized(self, names: Sequence[str],
                         log: Callable[[str], None]) -> dict[str, CachedImage]:
        """``ensure(names)``, plus an ``opt-<workload>`` tag for every workload of each
        (optimised from ``gzip`` for that workload once, see :func:`optimize_image`)."""
        have = self.ensure(names, log)
        if not missing_optimized(have, names):
            return have
        with self.locked():
            images = self.load()
            missing = missing_optimized(images, names)
            if missing:
                with self._build_env() as (host, containerd, _):
                    for name, workloads in missing.items():
                        log(f"optimising image {name} for {', '.join(w.name for w in workloads)}"
                            f" (once; cached in {self.root})")
                        images[name] = optimize_image(containerd, host, images[name],
                                                      workloads)
                        self._save(images)
            return {n: images[n] for n in names}

    @contextmanager
    def _build_env(self) -> Iterator[tuple[str, Containerd, Path]]:
        """A registry on 127.0.0.1 serving the cache's storage and a private containerd
        (overlayfs only) in a temporary work directory, all removed on exit; yields
        (registry host, containerd, work directory)."""
        work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-build-", dir="/tmp"))
        registry = loopback_registry(work / "registry", self.storage)
        containerd = Containerd(work / "containerd", proxy_socket=work / "none.sock",
                                debug_level="info")
        try:
            registry.start()
            containerd.start()
            yield registry.host, containerd, work
        finally:
            containerd.stop()
            registry.stop()
            unmount_all_under(work)
            shutil.rmtree(work, ignore_errors=True)

    def _build(self, names: Sequence[str], images: dict[str, CachedImage],
               log: Callable[[str], None]) -> None:
        """Build ``names`` into ``images``, saving the index after each one."""
        with self._build_env() as (host, containerd, work):
            for name in names:
                log(f"building image {name} (once; cached in {self.root})")
                images[name] = self._build_one(name, host, containerd, work)
                self._save(images)

    def _build_one(self, name: str, host: str, containerd: Containerd,
                   work: Path) -> CachedImage:
        facts = BUILDERS[name](host, work)
        repo = f"bench/{name}"
        convert_estargz(containerd, f"{host}/{repo}:gzip", f"{host}/{repo}:esgz")
        tags = ["gzip", "esgz"]
        for extra in IMAGES[name].extra_tags:
            kind, count = extra.split("-")
            push_prefix(host, repo, kind, extra, int(count))
            tags.append(extra)
        return CachedImage(name, {t: read_variant(host, repo, t) for t in tags}, facts)
