"""The converter: directory scan, RAFS v5/v6 writers read back, image layers, push, CLI."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from snapshotter import labels as L
from snapshotter.errdefs import InvalidArgument, RegistryError
from snapshotter.formats import chunkcodec, rafs
from snapshotter.formats.digests import sha256_digest
from snapshotter.formats.index import LayerIndex, NodeKind
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.reference import parse_reference
from snapshotter.tools.convert import cli, image, ociimage, scan
from snapshotter.tools.convert.push import push_image
from snapshotter.tools.convert.tree import Spec
from snapshotter.tools.convert.write_v5 import write_v5
from snapshotter.tools.convert.write_v6 import write_v6

MTIME_NS = 1_600_000_000_987_654_321
CHUNK = 64 << 10


def make_tree(root: Path) -> None:
    """Every kind of entry the converter must carry over."""
    root.mkdir()
    (root / "multi.bin").write_bytes(os.urandom(3 * CHUNK + 77))
    (root / "dup.bin").write_bytes(b"A" * (4 * CHUNK))
    (root / "empty").write_bytes(b"")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "f").write_bytes(b"deep\n")
    os.link(root / "multi.bin", root / "dir" / "hard")
    (root / "link").symlink_to("dir/sub/f")
    (root / "odd name ü").write_bytes(b"odd")
    (root / ("n" * 255)).write_bytes(b"long")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(root / "dir", "user.k", b"v\x00w")
    os.setxattr(root / "multi.bin", "trusted.t", b"x")
    os.chmod(root / "multi.bin", 0o4755)
    os.chown(root / "empty", 1000, 1001)
    for p in [*root.rglob("*"), root]:
        os.utime(p, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


def file_data(index: LayerIndex, blobs: dict[str, bytes], path: str) -> bytes:
    node = next(n for p, n in index.walk() if p == path)
    return b"".join(chunkcodec.decode_chunk(blobs[c.blob][c.blob_offset:c.blob_end], c)
                    for c in node.chunks)


def assert_same_tree(index: LayerIndex, blobs: dict[str, bytes], root: Path) -> None:
    seen = {p: n for p, n in index.walk() if p}
    expected = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert set(seen) == expected
    for rel, node in seen.items():
        st = os.lstat(root / rel)
        assert node.st_mode == st.st_mode, rel
        assert (node.uid, node.gid, node.mtime_ns) == (st.st_uid, st.st_gid, st.st_mtime_ns)
        if node.kind is NodeKind.REG:
            assert file_data(index, blobs, rel) == (root / rel).read_bytes(), rel
        if node.kind is NodeKind.SYMLINK:
            assert node.link_target == os.readlink(root / rel).encode()
        if node.kind is NodeKind.CHAR:
            assert (node.rdev_major, node.rdev_minor) == (1, 3)
    assert seen["dir/hard"].ino == seen["multi.bin"].ino and seen["multi.bin"].nlink == 2
    assert seen["dir"].xattrs == {"user.k": b"v\x00w"}
    assert seen["multi.bin"].xattrs == {"trusted.t": b"x"}
    assert len(seen["multi.bin"].chunks) == 4


@pytest.mark.parametrize("writer", ["v5", "v6"])
@pytest.mark.parametrize(("compression", "digest"),
                         [("zstd", "blake3"), ("lz4_block", "sha256"), ("none", "sha256")])
def test_scanned_tree_round_trips(tmp_path: Path, writer: str, compression: str,
                                  digest: str) -> None:
    make_tree(tmp_path / "src")
    write = write_v5 if writer == "v5" else write_v6
    out = write(scan.scan(tmp_path / "src"), chunk_size=CHUNK, compression=compression,
                digest=digest, prefetch=("dir",), blob_trailer=True)
    index = rafs.build_index(out.bootstrap)
    assert index.format == f"rafs-{writer}"
    assert_same_tree(index, out.blobs, tmp_path / "src")
    assert sorted(index.prefetch_inos) == sorted(
        n.ino for p, n in index.walk() if p in ("dir/sub/f", "dir/hard"))
    (blob_id, blob), = out.blobs.items()
    assert hashlib.sha256(blob).hexdigest() == blob_id  # a registry serves it by that name
    dup = next(n for p, n in index.walk() if p == "dup.bin")
    assert len({c.blob_offset for c in dup.chunks}) == 1  # equal chunks stored once


def test_blob_trailer_is_a_payload_first_tar_header(tmp_path: Path) -> None:
    """nydus-snapshotter finds ``image.blob`` by reading the last 512 bytes as a tar header
    and the data right before it."""
    out = write_v6([Spec("f", "reg", data=b"x" * 10000)], blob_trailer=True)
    (blob,) = out.blobs.values()
    header = tarfile.TarInfo.frombuf(blob[-512:], "utf-8", "surrogateescape")
    assert header.name == "image.blob" and header.size == len(blob) - 512


def test_converted_v6_is_read_by_fsck_erofs(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    out = write_v6(scan.scan(tmp_path / "src"), chunk_size=CHUNK, compression="none")
    (blob,) = out.blobs.values()
    (tmp_path / "boot").write_bytes(out.bootstrap)
    (tmp_path / "blob").write_bytes(blob.ljust(-(-len(blob) // 4096) * 4096, b"\0"))
    res = subprocess.run(["fsck.erofs", f"--device={tmp_path / 'blob'}",
                          f"--extract={tmp_path / 'out'}", str(tmp_path / "boot")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    for name in ("multi.bin", "dup.bin", "dir/sub/f", "odd name ü"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_big_files_get_chunk_indexes_across_blocks() -> None:
    """More chunk indexes than one 4 KiB block holds (600 chunks of 4 KiB)."""
    data = os.urandom(600 * 4096)
    out = write_v6([Spec("big", "reg", data=data), Spec("z", "reg", data=b"z")],
                   chunk_size=4096)
    index = rafs.build_index(out.bootstrap)
    assert file_data(index, out.blobs, "big") == data
    assert file_data(index, out.blobs, "z") == b"z"


@pytest.mark.parametrize("specs", [
    [Spec("a", "reg"), Spec("a", "reg")],
    [Spec("a/b", "reg"), Spec("a/b/c", "reg")],
    [Spec("h", "hardlink", link="missing")],
    [Spec("bad\0name", "reg")],
    [Spec("x", "socketish")],
])
def test_writer_refuses_bad_input(specs: list[Spec]) -> None:
    with pytest.raises(InvalidArgument):
        write_v6(specs)


def test_writer_refuses_bad_options() -> None:
    with pytest.raises(InvalidArgument):
        write_v5([], chunk_size=3000)
    with pytest.raises(InvalidArgument):
        write_v6([], compression="brotli")
    with pytest.raises(InvalidArgument):
        write_v6([Spec("a", "reg")], prefetch=("b",))


def test_nydus_image_layers_and_manifest() -> None:
    out = write_v6([Spec("f", "reg", data=b"hello")], blob_trailer=True)
    built = image.nydus_image(out.bootstrap, out.blobs, "6", architecture="amd64",
                              cmd=["sh"])
    blob_layer, boot_layer = built.layers
    (blob_id,) = out.blobs
    assert blob_layer.digest == f"sha256:{blob_id}" == blob_layer.diff_id
    assert blob_layer.media_type == image.NYDUS_BLOB_MEDIA_TYPE
    assert blob_layer.annotations[L.NYDUS_BLOB] == "true"
    assert boot_layer.media_type == image.OCI_LAYER_GZIP
    assert boot_layer.annotations == {L.NYDUS_BOOTSTRAP: "true", image.NYDUS_FS_VERSION: "6",
                                      image.UNCOMPRESSED: boot_layer.diff_id}
    raw = gzip.decompress(boot_layer.data)
    assert sha256_digest(raw) == boot_layer.diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == ["image", "image/image.boot"]
        assert members["image"].isdir() and members["image"].mode == 0o755
        assert members["image/image.boot"].mode == 0o444
        boot = tar.extractfile("image/image.boot")
        assert boot is not None and boot.read() == out.bootstrap
    manifest = json.loads(built.manifest)
    assert [x["digest"] for x in manifest["layers"]] == [x.digest for x in built.layers]
    config = json.loads(built.config)
    assert config["rootfs"]["diff_ids"] == [blob_layer.diff_id, boot_layer.diff_id]
    assert config["config"]["Cmd"] == ["sh"]
    again = image.nydus_image(out.bootstrap, out.blobs, "6", architecture="amd64", cmd=["sh"])
    assert again.manifest_digest == built.manifest_digest  # deterministic
    with pytest.raises(InvalidArgument):
        image.blob_layer("0" * 64, b"not that")


def _tar(entries: list[tuple[str, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, data.decode()
                data = b""
            else:
                info.size = len(data)
                info.pax_headers = {"SCHILY.xattr.user.x": "1"} if name == "a/keep" else {}
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def test_oci_layers_apply_with_whiteouts_and_links() -> None:
    root = ociimage.RootFS()
    root.apply(_tar([("a", "dir", b""), ("a/keep", "file", b"k"), ("a/gone", "file", b"g"),
                     ("o", "dir", b""), ("o/old", "file", b"o"), ("h", "file", b"hh"),
                     ("h2", "link", b"h")]))
    root.apply(_tar([("a/.wh.gone", "file", b""), ("o/.wh..wh..opq", "file", b""),
                     ("o/new", "file", b"n"), ("h", "file", b"new h")]))
    specs = {s.path: s for s in root.specs()}
    assert sorted(specs) == ["a", "a/keep", "h", "h2", "o", "o/new"]
    assert specs["a/keep"].xattrs == {"user.x": b"1"}
    assert specs["h2"].kind == "reg" and specs["h2"].data == b"hh"  # its target was replaced
    assert specs["h"].data == b"new h"
    assert ociimage.decompress(gzip.compress(b"tar")) == b"tar"


# --- push and the CLI against an in-process registry that accepts uploads -----------------


class UploadRegistry:
    """Just enough of the distribution push API: HEAD/POST/PUT blobs, PUT manifests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.refuse = False
        self.app = web.Application()
        self.app.router.add_route("HEAD", "/v2/{name:.+}/blobs/{digest}", self.head)
        self.app.router.add_post("/v2/{name:.+}/blobs/uploads/", self.start)
        self.app.router.add_put("/v2/{name:.+}/blobs/uploads/{id}", self.finish)
        self.app.router.add_put("/v2/{name:.+}/manifests/{tag}", self.manifest)

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def start(self, request: web.Request) -> web.Response:
        return web.Response(status=202, headers={"Location": "/v2/x/blobs/uploads/1?s=t"})

    async def finish(self, request: web.Request) -> web.Response:
        body = await request.read()
        digest = request.query["digest"]
        if self.refuse or sha256_digest(body) != digest or request.query.get("s") != "t":
            return web.Response(status=400, text="digest invalid")
        self.blobs[digest] = body
        return web.Response(status=201)

    async def manifest(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.manifests[request.match_info["tag"]] = body
        return web.Response(status=201,
                            headers={"Docker-Content-Digest": sha256_digest(body)})


@pytest.fixture
async def upload_registry() -> AsyncIterator[tuple[UploadRegistry, str]]:
    reg = UploadRegistry()
    runner = web.AppRunner(reg.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield reg, f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_push_uploads_blobs_then_the_manifest(
        upload_registry: tuple[UploadRegistry, str]) -> None:
    reg, host = upload_registry
    out = write_v6([Spec("f", "reg", data=b"data")], blob_trailer=True)
    built = image.nydus_image(out.bootstrap, out.blobs, "6", architecture="amd64")
    seen: list[int] = []
    digest = await push_image(built, parse_reference(f"{host}/app:nydus"), HostsConfig(),
                              progress=seen.append)
    assert digest == built.manifest_digest and reg.manifests["nydus"] == built.manifest
    assert set(reg.blobs) == {x.digest for x in built.layers} | {built.config_digest}
    assert sum(seen) == sum(len(x.data) for x in built.layers) + len(built.config)
    await push_image(built, parse_reference(f"{host}/app:nydus"), HostsConfig())  # skips


async def test_push_reports_a_refusal(upload_registry: tuple[UploadRegistry, str]) -> None:
    reg, host = upload_registry
    reg.refuse = True
    out = write_v6([Spec("f", "reg", data=b"x")], blob_trailer=True)
    built = image.nydus_image(out.bootstrap, out.blobs, "6", architecture="amd64")
    with pytest.raises(RegistryError, match="HTTP 400: digest invalid"):
        await push_image(built, parse_reference(f"{host}/other:tag"), HostsConfig())
    assert reg.manifests == {}


async def test_cli_converts_and_pushes(tmp_path: Path, upload_registry: tuple[UploadRegistry,
                                                                               str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    reg, host = upload_registry
    make_tree(tmp_path / "src")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--format", "rafs-v5", "--chunk-size", str(CHUNK), "--output",
                              str(tmp_path / "out"), "--cmd", "sh -c 'echo hi'",
                              str(tmp_path / "src"), f"{host}/conv:v5"])
    digest = await cli.convert(args, cli.ProgressBar(io.StringIO()))
    manifest = json.loads(reg.manifests["v5"])
    assert digest == sha256_digest(reg.manifests["v5"])
    assert manifest["layers"][-1]["annotations"][image.NYDUS_FS_VERSION] == "5"
    boot = (tmp_path / "out" / "image.boot").read_bytes()
    blobs = {p.name: p.read_bytes() for p in (tmp_path / "out" / "blobs").iterdir()}
    assert_same_tree(rafs.build_index(boot), blobs, tmp_path / "src")
    config = json.loads(reg.blobs[manifest["config"]["digest"]])
    assert config["config"]["Cmd"] == ["sh", "-c", "echo hi"]


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["127.0.0.1:1/x:y"]) == 2  # neither a directory nor --from-image
    assert "give a source directory" in capsys.readouterr().err
    assert cli.main(["--from-image", "a/b:c", "/tmp", "127.0.0.1:1/x:y"]) == 2


def test_progress_bar_lines_without_a_terminal() -> None:
    out = io.StringIO()
    bar = cli.ProgressBar(out)
    bar.start("push", 2 << 20)
    bar.advance(1 << 20)
    bar.advance(1 << 20)
    bar.finish()
    assert out.getvalue().splitlines() == [
        "push       [##############################] 100.0%      2.0/2.0 MiB"]


async def test_cli_converts_an_oci_image_from_a_registry(
    tmp_path: Path, upload_registry: tuple[UploadRegistry, str],
) -> None:
    """``--from-image``: the layers are applied in order (whiteouts included) and the
    result converted like a directory."""
    from tests.fakeregistry import FakeRegistry

    reg, host = upload_registry
    source = await FakeRegistry().start()
    try:
        lower = gzip.compress(_tar([("etc", "dir", b""), ("etc/a", "file", b"a"),
                                    ("etc/b", "file", b"b")]))
        upper = gzip.compress(_tar([("etc/.wh.a", "file", b""), ("etc/c", "file", b"c")]))
        layers = [{"mediaType": image.OCI_LAYER_GZIP, "digest": source.put_blob("src", x),
                   "size": len(x)} for x in (lower, upper)]
        manifest = json.dumps({"schemaVersion": 2, "mediaType": image.OCI_MANIFEST,
                               "config": {"mediaType": image.OCI_CONFIG,
                                          "digest": "sha256:" + "0" * 64, "size": 2},
                               "layers": layers}).encode()
        source.put_manifest("src", "v1", manifest, image.OCI_MANIFEST)
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        args = parser.parse_args(["--from-image", f"{source.host}/src:v1", "--output",
                                  str(tmp_path / "out"), f"{host}/conv:v6"])
        await cli.convert(args, cli.ProgressBar(io.StringIO()))
    finally:
        await source.aclose()
    index = rafs.build_index((tmp_path / "out" / "image.boot").read_bytes())
    assert sorted(p for p, _ in index.walk()) == ["", "etc", "etc/b", "etc/c"]
    assert "v6" in reg.manifests
