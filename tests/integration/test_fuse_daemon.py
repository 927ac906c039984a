"""The FUSE daemon for real: ``python -m snapshotter.fs`` mounts eStargz layers served by a
local registry-like HTTP server, and the tests look at them through the kernel.

Needs root and /dev/fuse; fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.daemonapi.client import ControlClient
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.errdefs import DaemonError
from tests import estargz_writer as ew

MTIME = 1_600_000_000
MANY = 5000
RNG = random.Random(1234)
BIG = RNG.randbytes(3 * (1 << 20) + 12345)
COLD = RNG.randbytes(2 << 20)
HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"

# A minimal registry: GET /v2/ and GET/HEAD /v2/<name>/blobs/<digest> with single and
# multiple byte ranges (multipart/byteranges). Prints its port on stdout once listening.
SERVER = r"""
import http.server, os, re, sys
BLOBS = sys.argv[1]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _blob(self):
        m = re.fullmatch(r"/v2/.+/blobs/sha256:([0-9a-f]{64})", self.path)
        p = m and os.path.join(BLOBS, m.group(1))
        return open(p, "rb").read() if p and os.path.exists(p) else None
    def _send(self, code, headers, body, head):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
    def do_HEAD(self): self.do_GET(head=True)
    def do_GET(self, head=False):
        if self.path == "/v2/":
            return self._send(200, {"Content-Type": "application/json"}, b"{}", head)
        blob = self._blob()
        if blob is None:
            return self._send(404, {}, b"", head)
        rng = self.headers.get("Range")
        if not rng:
            return self._send(200, {}, blob, head)
        ranges = []
        for part in rng.split("=", 1)[1].split(","):
            a, b = part.strip().split("-")
            ranges.append((int(a), min(int(b), len(blob) - 1)))
        if len(ranges) == 1:
            a, b = ranges[0]
            cr = f"bytes {a}-{b}/{len(blob)}"
            return self._send(206, {"Content-Range": cr}, blob[a:b + 1], head)
        body = b""
        for a, b in ranges:
            body += (b"--BOUNDARY\r\nContent-Type: application/octet-stream\r\n"
                     + f"Content-Range: bytes {a}-{b}/{len(blob)}\r\n\r\n".encode()
                     + blob[a:b + 1] + b"\r\n")
        body += b"--BOUNDARY--\r\n"
        ct = "multipart/byteranges; boundary=BOUNDARY"
        return self._send(206, {"Content-Type": ct}, body, head)

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.fail("the FUSE daemon tests need root (mounting FUSE, trusted.* xattrs)")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("the FUSE daemon tests need /dev/fuse (load the fuse module)")


def layer_a() -> ew.EStargzBlob:
    entries = [
        ew.directory("etc", mtime=MTIME),
        ew.reg("etc/hosts", HOSTS, mode=0o640, uid=1000, gid=1001, mtime=MTIME,
               xattrs={"user.origin": b"test"}),
        ew.hardlink("etc/hosts-link", "etc/hosts"),
        ew.symlink("link", "etc/hosts", mtime=MTIME),
        ew.reg("big.bin", BIG, mode=0o755),
        ew.reg("cold.bin", COLD),
        ew.whiteout("removed"),
        ew.directory("opq"),
        ew.opaque("opq"),
        ew.reg("opq/kept", b"kept"),
        ew.char_device("dev-null", 1, 3, mode=0o666),
        ew.directory("many"),
        *[ew.reg(f"many/f{i:05d}", b"%d" % i) for i in range(MANY)],
    ]
    return ew.build_estargz(entries, chunk_size=1 << 19, prioritized=["etc/hosts"])


def layer_b() -> ew.EStargzBlob:
    return ew.build_estargz([ew.directory("b"), ew.reg("b/only-in-b", b"layer b\n")])


@dataclass
class Registry:
    proc: subprocess.Popen[bytes]
    port: int

    def ref(self) -> str:
        return f"127.0.0.1:{self.port}/test/layer:latest"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    mountpoint: Path
    control: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[Registry, dict[str, ew.EStargzBlob]]]:
    blobs_dir = tmp_path / "blobs"
    blobs_dir.mkdir()
    blobs = {"a": layer_a(), "b": layer_b()}
    for blob in blobs.values():
        (blobs_dir / hashlib.sha256(blob.blob).hexdigest()).write_bytes(blob.blob)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(blobs_dir)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    reg = Registry(proc, port)
    try:
        yield reg, blobs
    finally:
        reg.kill()
        proc.stdout.close()


def digest_of(blob: ew.EStargzBlob) -> str:
    return ew.sha256(blob.blob)


def start_daemon(tmp_path: Path, mode: str, layers: list[LayerSpec],
                 make_mountpoint: bool = True) -> Daemon:
    """Start the daemon the way the manager does: own session, an inherited listening
    control socket (so requests wait in the backlog; no polling for readiness)."""
    require_fuse()
    mnt = tmp_path / f"mnt-{mode}"
    if make_mountpoint:
        mnt.mkdir()
    config = {
        "cache_dir": str(tmp_path / "cache"), "cache_limit_bytes": 1 << 30,
        "log_level": "DEBUG", "entry_timeout": 60, "attr_timeout": 60,
        "registry": {"deadline": 3.0, "max_retries": 1, "request_timeout": 2.0,
                     "connect_timeout": 1.0, "docker_config": str(tmp_path / "none.json")},
        "layers": [spec.to_json() for spec in layers],
    }
    conf = tmp_path / f"{mode}.json"
    conf.write_text(json.dumps(config))
    control = str(tmp_path / f"{mode}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(control)
    sock.listen(16)
    log = tmp_path / f"{mode}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapshotter.fs", "--mode", mode, "--mountpoint", str(mnt),
             "--control", control, "--config", str(conf), "--control-fd", str(sock.fileno())],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
    sock.close()
    return Daemon(proc, mnt, control, log)


def stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()
    if os.path.ismount(d.mountpoint):
        subprocess.run(["umount", "-l", str(d.mountpoint)], check=False)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def read_in_child(path: Path, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    """pread in another process, bounded by a deadline so a hang fails the test."""
    code = (f"import os\nfd = os.open({str(path)!r}, os.O_RDONLY)\n"
            f"try:\n    os.pread(fd, {length}, {offset}); print('ok')\n"
            f"except OSError as e:\n    print(e.errno)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def check_layer_a(root: Path) -> None:
    """Everything about layer A that the kernel shows."""
    assert md5(root / "big.bin") == hashlib.md5(BIG).hexdigest()
    assert (root / "etc/hosts").read_bytes() == HOSTS
    st = os.lstat(root / "etc/hosts")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1001)
    assert (st.st_size, st.st_mtime, st.st_nlink) == (len(HOSTS), MTIME, 2)
    assert os.lstat(root / "etc/hosts-link").st_ino == st.st_ino
    ls = subprocess.run(["ls", "-ln", str(root / "etc")], capture_output=True, text=True,
                        check=True).stdout
    assert any(line.startswith(f"-rw-r----- 2 1000 1001 {len(HOSTS)} ") and line.endswith(" hosts")
               for line in ls.splitlines()), ls
    assert stat.S_IMODE(os.lstat(root / "big.bin").st_mode) == 0o755
    assert os.readlink(root / "link") == "etc/hosts"
    wh = os.lstat(root / "removed")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    dev = os.lstat(root / "dev-null")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
    assert os.listdir(root / "opq") == ["kept"]
    assert os.getxattr(root / "etc/hosts", "user.origin") == b"test"
    with pytest.raises(OSError) as info:
        os.getxattr(root / "etc/hosts", "user.absent")
    assert info.value.errno == errno.ENODATA
    names = os.listdir(root / "many")
    assert sorted(names) == [f"f{i:05d}" for i in range(MANY)]
    assert (root / "many/f04321").read_bytes() == b"4321"
    for path, flags in ((root / "etc/hosts", os.O_WRONLY), (root / "etc/hosts", os.O_RDWR),
                        (root / "new", os.O_WRONLY | os.O_CREAT)):
        with pytest.raises(OSError) as info:
            os.open(path, flags, 0o644)
        assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.mkdir(root / "d")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.unlink(root / "link")
    assert info.value.errno == errno.EROFS
    assert os.statvfs(root).f_namemax == 255


async def test_dedicated_daemon(tmp_path: Path, registry: tuple[Registry, dict[str, ew.EStargzBlob]]
                                ) -> None:
    reg, blobs = registry
    a = blobs["a"]
    spec = LayerSpec(layer_id=1, ref=reg.ref(), digest=digest_of(a), toc_digest=a.toc_digest)
    d = start_daemon(tmp_path, "dedicated", [spec])
    client = ControlClient(d.control)
    try:
        ready = await client.wait_ready(1, timeout=60)
        assert ready.ready and ready.prefetch_done and ready.fetched_bytes > 0, d.logs()
        assert os.path.ismount(d.mountpoint)
        check_layer_a(d.mountpoint)
        status = await client.status()
        assert status.state == "running" and status.mode == "dedicated"
        assert status.reader["served_bytes"] >= len(BIG)
        print(f"idle dedicated daemon RSS: {status.rss_bytes / 2**20:.1f} MiB")

        reg.kill()  # the registry goes away: cached data still reads, uncached fails
        assert md5(d.mountpoint / "big.bin") == hashlib.md5(BIG).hexdigest()
        result = read_in_child(d.mountpoint / "cold.bin", (1 << 20) + 100, 4096)
        assert result.stdout.strip() == str(errno.EIO), (result, d.logs())
        assert (await client.status()).state == "running"

        await client.shutdown()
        assert d.proc.wait(timeout=30) == 0, d.logs()
        assert not os.path.ismount(d.mountpoint)
        assert "[layer " + digest_of(a) + "]" in d.logs()
    finally:
        stop_daemon(d)


async def test_shared_daemon(tmp_path: Path, registry: tuple[Registry, dict[str, ew.EStargzBlob]]
                             ) -> None:
    reg, blobs = registry
    a, b = blobs["a"], blobs["b"]
    d = start_daemon(tmp_path, "shared", [])
    client = ControlClient(d.control)
    try:
        await client.add_layer(LayerSpec(5, reg.ref(), digest_of(a), a.toc_digest,
                                          background_fetch=True))
        await client.add_layer(LayerSpec(6, reg.ref(), digest_of(b), None, skip_verify=True))
        await client.add_layer(LayerSpec(7, reg.ref(), digest_of(b), "sha256:" + "0" * 64))
        assert (await client.wait_ready(5, 60)).ready, d.logs()
        assert (await client.wait_ready(6, 60)).ready, d.logs()
        with pytest.raises(DaemonError, match="digest_mismatch"):
            await client.wait_ready(7, 60)
        assert sorted(os.listdir(d.mountpoint)) == ["5", "6"]
        check_layer_a(d.mountpoint / "5")
        assert (d.mountpoint / "6/b/only-in-b").read_bytes() == b"layer b\n"
        assert os.stat(d.mountpoint / "6/b/only-in-b").st_ino >> 32 == 6
        assert os.stat(d.mountpoint / "5").st_ino == (5 << 32) | 1

        await client.remove_layer(5)
        await client.remove_layer(7)
        assert os.listdir(d.mountpoint) == ["6"]
        assert not (d.mountpoint / "5").exists()
        d.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(d.proc.wait, 30) == 0, d.logs()
        assert not os.path.ismount(d.mountpoint)
    finally:
        stop_daemon(d)


async def test_external_unmount_stops_the_daemon(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "shared", [])
    try:
        # answered once the daemon serves its control socket, which it does after mounting
        assert (await ControlClient(d.control).status()).mode == "shared", d.logs()
        assert os.path.ismount(d.mountpoint)
        subprocess.run(["umount", str(d.mountpoint)], check=True)
        assert await asyncio.to_thread(d.proc.wait, 30) == 0, d.logs()
    finally:
        stop_daemon(d)


def test_daemon_without_a_mountpoint_exits_with_an_error(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "shared", [], make_mountpoint=False)
    try:
        assert d.proc.wait(timeout=30) == 1
        assert "cannot mount FUSE" in d.logs()
    finally:
        stop_daemon(d)
