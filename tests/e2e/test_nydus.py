"""Issue 5, end to end: nydus images pulled lazily by lazysnap with real containerd.

Images (pushed to the session registry):

* the **fixture image**: the upstream RAFS v5 fixture bytes unchanged (the data blob as
  a ``nydus.blob.v1`` layer, the bootstrap as ``image/image.boot`` in a gzip tar layer)
  with an ordinary busybox layer on top, so a container has a shell;
* **converted images**: a tree the test builds on disk (busybox and its applets, multi-
  chunk and duplicate-chunk files, symlinks, hard links, xattrs, an empty file, a fifo, a
  device, odd names, setuid and sticky modes, owners, nanosecond mtimes) converted with
  ``python -m snapshotter.tools.convert.cli`` to RAFS v6 and v5;
* **bad images**: a truncated bootstrap, a bootstrap with a wrong magic (both fall back to
  an ordinary pull of the bootstrap layer, reason ``invalid_bootstrap``), and a bootstrap
  whose chunk digest does not match the blob (mounted; that file's reads fail with EIO
  and the daemon logs the digest mismatch).

Checks: data blob layers become empty remote snapshots and the bootstrap layer a remote
snapshot whose FUSE mount holds the whole tree; a container (``ctr run``) and the host (the
FUSE mount) see every file with the source's md5 and metadata; the data blobs are read by
range only and neither they nor the bootstrap layer enter containerd's content store; a
restart of lazysnap re-attaches to the running daemon and a killed daemon is restarted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.formats import chunkcodec, rafs
from snapshotter.formats.digests import sha256_digest
from snapshotter.formats.index import LayerIndex, NodeKind
from snapshotter.tools.convert import image as nimage
from snapshotter.tools.convert.tree import Spec
from snapshotter.tools.convert.write_v6 import write_v6

from .conftest import StackFactory
from .harness import REPO_ROOT, Registry
from .imagebuild import Node, Tree, chain_ids, host_architecture, push_blob, push_manifest
from .imagetree import compare_trees, host_tree, listing_script, parse_listing, top_level
from .metastore_view import SnapshotRow, read_snapshots
from .procs import HarnessError, wait_until
from .stack import Stack

pytestmark = pytest.mark.e2e

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "nydus" / "rafs-v5-sha256-nocompress"
APPLETS = ("sh", "find", "stat", "md5sum", "readlink", "printf", "echo", "cat", "ls", "[",
           "test", "head")
REMOTE = "containerd.io/snapshot/remote"
FORMAT = "containerd.io/snapshot/lazysnap.format"
MTIME_NS = 1_650_000_000_123_456_789


@dataclass(frozen=True)
class NydusImage:
    """A pushed image: reference, layer digests (bottom first), chain IDs, source tree."""

    reference: str
    digests: tuple[str, ...]
    chains: tuple[str, ...]
    tree: Tree


def _push(registry: Registry, name: str, layers: list[nimage.LayerBlob],
          cmd: list[str] | None = None) -> NydusImage:
    config = nimage.image_config([x.diff_id for x in layers],
                                 architecture=host_architecture(), cmd=cmd)
    built = nimage.assemble(layers, config)
    for layer in layers:
        push_blob(registry.host, name, layer.data)
    push_blob(registry.host, name, config)
    push_manifest(registry.host, name, "latest", built.manifest)
    return NydusImage(f"{registry.host}/{name}:latest", tuple(x.digest for x in layers),
                      tuple(chain_ids([x.diff_id for x in layers])), {})


def _tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), sha256_digest(raw)


def _busybox_layer() -> nimage.LayerBlob:
    """An ordinary gzip layer with /bin/busybox and its applets (falls back, as it should)."""
    data = Path("/bin/busybox").read_bytes()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    folder = tarfile.TarInfo("bin")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    box = tarfile.TarInfo("bin/busybox")
    box.size, box.mode = len(data), 0o755
    entries += [(folder, None), (box, data)]
    for applet in APPLETS:
        link = tarfile.TarInfo(f"bin/{applet}")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        entries.append((link, None))
    blob, diff_id = _tar_gz(entries)
    return nimage.LayerBlob(blob, nimage.OCI_LAYER_GZIP, diff_id)


def _bootstrap_layer(boot: bytes) -> nimage.LayerBlob:
    return nimage.bootstrap_layer(boot, "6" if boot[:4] != b"SFAR" else "5")


# --- expected trees --------------------------------------------------------------------


def _index_tree(index: LayerIndex, blobs: dict[str, bytes]) -> Tree:
    """What a RAFS image must show: from the bootstrap, file data decoded from the blob
    and verified against every chunk digest (the fixture's ground truth)."""
    kinds = {NodeKind.REG: "file", NodeKind.DIR: "dir", NodeKind.SYMLINK: "symlink",
             NodeKind.CHAR: "char", NodeKind.BLOCK: "block", NodeKind.FIFO: "fifo"}
    names: dict[int, list[str]] = {}
    for path, node in index.walk():
        if path and node.kind is not NodeKind.DIR:
            names.setdefault(node.ino, []).append("/" + path)
    tree: Tree = {}
    for path, node in index.walk():
        if not path:
            continue
        kind = kinds[node.kind]
        md5 = None
        if node.kind is NodeKind.REG:
            data = b"".join(chunkcodec.decode_chunk(blobs[c.blob][c.blob_offset:c.blob_end], c)
                            for c in node.chunks)
            md5 = hashlib.md5(data).hexdigest()
        group = names.get(node.ino, [])
        tree["/" + path] = Node(
            kind, node.mode, node.uid, node.gid,  # type: ignore[arg-type]
            size=node.size if kind == "file" else None, md5=md5,
            target=node.link_target.decode() if kind == "symlink" else None,
            rdev=(node.rdev_major, node.rdev_minor) if kind in ("char", "block") else None,
            hardlink_of=group[0] if len(group) > 1 else None)
    return tree


def _source_tree(root: Path) -> Tree:
    """host_tree of the source with hard-link groups marked (by inode)."""
    observed = host_tree(root)
    first: dict[int, str] = {}
    out: Tree = {}
    for path in sorted(observed):
        node = observed[path]
        group = None
        if node.kind != "dir" and os.lstat(root / path[1:]).st_nlink > 1:
            group = first.setdefault(node.inode or 0, path)
        out[path] = Node(node.kind, node.mode, node.uid, node.gid, size=node.size,
                         md5=node.md5, target=node.target, rdev=node.rdev,
                         xattrs=node.xattrs, hardlink_of=group)
    return out


def _build_source(root: Path) -> None:
    """The tree the converter turns into an image (see the module docstring)."""
    rng = random.Random(5)
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    data = root / "data"
    (data / "sub" / "deep" / "er").mkdir(parents=True)
    (data / "multi.bin").write_bytes(rng.randbytes(3 * (1 << 20) + 4321))
    (data / "dup.bin").write_bytes(b"0123456789abcdef" * (1 << 17))
    (data / "small.txt").write_bytes(b"hello nydus\n")
    (data / "empty").write_bytes(b"")
    (data / "sub" / "deep" / "er" / "leaf").write_bytes(b"leaf\n")
    os.link(data / "small.txt", data / "sub" / "hardlink")
    (data / "link").symlink_to("multi.bin")
    (data / "abs-link").symlink_to("/bin/busybox")
    (data / "dangling").symlink_to("nowhere/at/all")
    for name in ("with space", "ünïcödé.txt", "x" * 255, "-dash", "star*?[]", "a'quote"):
        (data / "odd").mkdir(exist_ok=True)
        (data / "odd" / name).write_bytes(name.encode() * 3)
    (data / "many").mkdir()
    for i in range(400):
        (data / "many" / f"entry-with-a-long-name-{i:04d}").write_bytes(b"%d\n" % i)
    os.mkfifo(data / "fifo", 0o640)
    os.mknod(data / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(data / "small.txt", "user.color", b"blue")
    os.setxattr(data / "sub", "user.dir-note", b"\x00binary\xff")
    os.chmod(data / "multi.bin", 0o4755)
    os.chmod(data / "sub", 0o1777)
    os.chmod(data / "dup.bin", 0o600)
    os.chown(data / "dup.bin", 1000, 1001)
    os.lchown(data / "link", 7, 8)
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


# --- images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_image(registry: Registry) -> NydusImage:
    """The upstream v5 fixture (blob and bootstrap bytes unchanged) + a busybox layer."""
    boot = (FIXTURES / "bootstrap").read_bytes()
    ((blob_path),) = (FIXTURES / "blobs").iterdir()
    blob = blob_path.read_bytes()
    layers = [nimage.blob_layer(blob_path.name, blob), _bootstrap_layer(boot),
              _busybox_layer()]
    pushed = _push(registry, "nydus/fixture-v5", layers)
    tree = _index_tree(rafs.build_index(boot), {blob_path.name: blob})
    return NydusImage(pushed.reference, pushed.digests, pushed.chains, tree)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("nydus-source") / "rootfs"
    _build_source(root)
    yield root


def _convert(registry: Registry, source: Path, fmt: str, *extra: str) -> NydusImage:
    name = f"nydus/converted-{fmt}"
    ref = f"{registry.host}/{name}:latest"
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.tools.convert.cli", "--format", fmt, *extra,
         str(source), ref], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert "push" in result.stderr and "100.0%" in result.stderr, result.stderr
    manifest_digest = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", manifest_digest), result.stdout
    request = urllib.request.Request(f"{registry.url}/v2/{name}/manifests/latest",
                                     headers={"Accept": nimage.OCI_MANIFEST})
    with urllib.request.urlopen(request) as resp:
        manifest = json.loads(resp.read())
    layers = manifest["layers"]
    assert [x["mediaType"] for x in layers] == [nimage.NYDUS_BLOB_MEDIA_TYPE,
                                                nimage.OCI_LAYER_GZIP]
    assert layers[0]["annotations"]["containerd.io/snapshot/nydus-blob"] == "true"
    assert layers[1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert layers[1]["annotations"][nimage.NYDUS_FS_VERSION] == fmt[-1]
    diff_ids = [x["annotations"][nimage.UNCOMPRESSED] for x in layers]
    return NydusImage(ref, tuple(x["digest"] for x in layers), tuple(chain_ids(diff_ids)),
                      _source_tree(source))


@pytest.fixture(scope="module")
def converted(registry: Registry, source_dir: Path) -> dict[str, NydusImage]:
    return {"rafs-v6": _convert(registry, source_dir, "rafs-v6", "--prefetch", "/data/sub"),
            "rafs-v5": _convert(registry, source_dir, "rafs-v5", "--chunk-size", "262144",
                                "--digest", "sha256")}


# --- observations ------------------------------------------------------------------------


def _config(mode: str, background: bool = False) -> str:
    return (f'[daemon]\nmode = "{mode}"\n[remote]\n'
            f"background_fetch = {'true' if background else 'false'}\n")


def _rows(stack: Stack, image: NydusImage) -> list[SnapshotRow]:
    rows = read_snapshots(stack.require_lazysnap().root).values()
    out = []
    for chain in image.chains:
        found = [r for r in rows if r.key == chain or r.key.endswith(f"/{chain}")]
        assert found, f"no snapshot for {chain}"
        out.append(found[0])
    return out


def _fs(stack: Stack, row: SnapshotRow) -> Path:
    return stack.require_lazysnap().root / "snapshots" / str(row.id) / "fs"


def _assert_nydus_layers(stack: Stack, image: NydusImage, fmt: str) -> Path:
    """Blob layer: remote, empty, no daemon. Bootstrap layer: remote, served. Returns the
    bootstrap snapshot's fs (its FUSE mount)."""
    blob_row, boot_row = _rows(stack, image)[:2]
    assert blob_row.labels.get(REMOTE) == "remote snapshot", blob_row.labels
    assert blob_row.labels.get(FORMAT) == "nydus-blob"
    assert os.listdir(_fs(stack, blob_row)) == []
    assert not os.path.ismount(_fs(stack, blob_row))
    assert boot_row.labels.get(REMOTE) == "remote snapshot", boot_row.labels
    assert boot_row.labels.get(FORMAT) == fmt
    fs = _fs(stack, boot_row)
    assert os.path.ismount(fs)
    assert (fs.parent / "image.boot").is_file()
    return fs


def _registry_gets(registry: Registry, mark: int, digest: str) -> list[tuple[int, int]]:
    """(status, bytes written) of each GET of blob ``digest`` logged after ``mark``."""
    with registry.log_path.open("rb") as fh:
        fh.seek(mark)
        text = fh.read().decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        if 'msg="response completed' in line and "http.request.method=GET" in line \
                and f"/blobs/{digest}" in line:
            status = re.search(r"http\.response\.status=(\d+)", line)
            written = re.search(r"http\.response\.written=(\d+)", line)
            out.append((int(status.group(1)) if status else 0,
                        int(written.group(1)) if written else 0))
    return out


def _assert_ranges_only(stack: Stack, registry: Registry, mark: int, digest: str,
                        size: int) -> None:
    gets = _registry_gets(registry, mark, digest)
    assert gets, f"the data blob {digest} was never read"
    assert all(status == 206 and written < size for status, written in gets), gets
    content = stack.containerd.ctr("content", "ls", "-q").stdout.split()
    assert digest not in content, "the data blob entered containerd's content store"


def _container_tree(stack: Stack, image: NydusImage, name: str, roots: list[str]) -> Tree:
    out = stack.containerd.run_container(image.reference, name, "sh", "-c",
                                         listing_script(roots), snapshotter="lazysnap")
    return parse_listing(out.stdout)


def _assert_mtimes(source: Path, mounted: Path) -> None:
    for path in [*source.rglob("*")]:
        rel = path.relative_to(source)
        assert os.lstat(mounted / rel).st_mtime_ns == os.lstat(path).st_mtime_ns, rel


def _daemon_pid(stack: Stack, sid: int, mode: str) -> int:
    rows = {r.id: r.pid for r in stack.require_lazysnap().daemons()}
    return rows["shared" if mode == "shared" else f"layer-{sid}"]


# --- tests --------------------------------------------------------------------------------


def test_fixture_image_runs_from_the_upstream_bytes(
    lazysnap_stack: StackFactory, fixture_image: NydusImage, registry: Registry,
) -> None:
    """The upstream v5 fixture as an image: lazy, complete, read by range only."""
    stack = lazysnap_stack(_config("dedicated"))
    mark = registry.log_path.stat().st_size
    stack.containerd.rpull(fixture_image.reference, snapshotter="lazysnap")
    fs = _assert_nydus_layers(stack, fixture_image, "rafs-v5")
    expected = fixture_image.tree
    assert compare_trees(expected, host_tree(fs)) == []
    seen = _container_tree(stack, fixture_image, "nydus-fixture", top_level(expected))
    assert compare_trees(expected, seen) == []
    ((blob_path),) = (FIXTURES / "blobs").iterdir()
    _assert_ranges_only(stack, registry, mark, fixture_image.digests[0],
                        blob_path.stat().st_size)
    content = stack.containerd.ctr("content", "ls", "-q").stdout.split()
    assert fixture_image.digests[1] not in content  # the bootstrap layer: lazysnap read it
    stack.containerd.ctr("images", "rm", "--sync", fixture_image.reference)
    lz = stack.require_lazysnap()
    wait_until(lambda: lz.daemons() == [] and not os.path.ismount(fs), timeout=60,
               what="the image's daemon to stop once the image is removed")
    assert read_snapshots(lz.root) == {} and not fs.parent.exists()


@pytest.mark.parametrize(("mode", "fmt"), [("dedicated", "rafs-v6"), ("shared", "rafs-v5")])
def test_converted_image_serves_the_source_tree(
    mode: str, fmt: str, lazysnap_stack: StackFactory, converted: dict[str, NydusImage],
    source_dir: Path, registry: Registry,
) -> None:
    """A converted tree: same files, md5s and metadata in a container and on the host;
    then lazysnap restarts (re-attaches) and a killed daemon is restarted."""
    image = converted[fmt]
    stack = lazysnap_stack(_config(mode))
    mark = registry.log_path.stat().st_size
    stack.containerd.rpull(image.reference, snapshotter="lazysnap")
    fs = _assert_nydus_layers(stack, image, fmt)
    assert compare_trees(image.tree,
                         _container_tree(stack, image, "conv", ["/bin", "/data"])) == []
    assert compare_trees(image.tree, host_tree(fs)) == []
    _assert_mtimes(source_dir, fs)
    _assert_ranges_only(stack, registry, mark, image.digests[0], _blob_size(registry, image))

    lz = stack.require_lazysnap()
    boot_row = _rows(stack, image)[1]
    pid = _daemon_pid(stack, boot_row.id, mode)
    lz.stop()
    lz.start()
    assert _daemon_pid(stack, boot_row.id, mode) == pid  # re-attached, not restarted
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return _daemon_pid(stack, boot_row.id, mode) != pid and \
                (fs / "data" / "small.txt").read_bytes() == b"hello nydus\n"
        except (OSError, KeyError):
            return False

    wait_until(restarted, timeout=120, what="the killed daemon to be restarted")
    out = stack.containerd.run_container(image.reference, "after", "md5sum",
                                         "/data/multi.bin", snapshotter="lazysnap").stdout
    assert out.split()[0] == image.tree["/data/multi.bin"].md5


def _blob_size(registry: Registry, image: NydusImage) -> int:
    """The data blob's size, asked with HEAD (a GET would show in the access log)."""
    name = image.reference.split("/", 1)[1].rsplit(":", 1)[0]
    url = f"{registry.url}/v2/{name}/blobs/{image.digests[0]}"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        return int(resp.headers["Content-Length"])


def test_bad_bootstraps_fall_back_to_an_ordinary_pull(
    lazysnap_stack: StackFactory, registry: Registry,
) -> None:
    """Truncated bootstrap / wrong magic: the bootstrap layer is pulled as an ordinary
    layer (reason ``invalid_bootstrap`` logged); the blob layer stays an empty remote
    snapshot."""
    boot = (FIXTURES / "bootstrap").read_bytes()
    ((blob_path),) = (FIXTURES / "blobs").iterdir()
    blob_layer = nimage.blob_layer(blob_path.name, blob_path.read_bytes())
    bad = {"truncated": boot[:9000], "magic": b"XXXX" + boot[4:]}
    stack = lazysnap_stack(_config("dedicated"))
    lz = stack.require_lazysnap()
    for what, data in bad.items():
        image = _push(registry, f"nydus/bad-{what}", [blob_layer, _bootstrap_layer(data)])
        stack.containerd.rpull(image.reference, snapshotter="lazysnap")
        blob_row, boot_row = _rows(stack, image)
        assert blob_row.labels.get(FORMAT) == "nydus-blob"
        assert REMOTE not in boot_row.labels
        assert (_fs(stack, boot_row) / "image" / "image.boot").read_bytes() == data
        lines = [x for x in lz.log_path.read_text().splitlines()
                 if "remote decision" in x and image.digests[1] in x]
        assert len(lines) == 1 and "reason=invalid_bootstrap" in lines[0], lines


def test_chunk_failing_its_digest_is_an_io_error(
    lazysnap_stack: StackFactory, registry: Registry,
) -> None:
    """A bootstrap promising another digest for one chunk: the layer mounts, that file's
    read fails with EIO (never wrong bytes), the others read, the daemon logs why."""
    good, bad = b"good data\n" * 1000, b"B" * 50000
    rafs_image = write_v6([Spec("good.txt", "reg", data=good), Spec("bad.txt", "reg",
                                                                     data=bad)],
                          blob_trailer=True)
    digest = bytes.fromhex(chunkcodec.compute_digest(bad, "blake3").split(":")[1])
    boot = rafs_image.bootstrap.replace(digest, bytes(b ^ 0xFF for b in digest))
    ((blob_id, blob),) = rafs_image.blobs.items()
    image = _push(registry, "nydus/bad-chunk",
                  [nimage.blob_layer(blob_id, blob), _bootstrap_layer(boot)])
    stack = lazysnap_stack(_config("dedicated"))
    stack.containerd.rpull(image.reference, snapshotter="lazysnap")
    fs = _assert_nydus_layers(stack, image, "rafs-v6")
    assert (fs / "good.txt").read_bytes() == good
    probe = subprocess.run([sys.executable, "-c", f"open({str(fs / 'bad.txt')!r}, 'rb').read()"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode != 0 and "Input/output error" in probe.stderr, probe
    boot_row = _rows(stack, image)[1]
    log = stack.require_lazysnap().root / "daemons" / f"layer-{boot_row.id}.log"
    try:
        wait_until(lambda: "digest mismatch" in log.read_text(), timeout=30,
                   what="the daemon to log the digest mismatch")
    except HarnessError:
        pytest.fail(f"daemon log without the mismatch:\n{log.read_text()[-3000:]}")
