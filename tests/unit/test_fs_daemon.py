"""The daemon's configuration file and failure reasons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.config import Config, RemoteConfig
from snapshotter.daemonapi.specs import DaemonSpec as DaemonConfig
from snapshotter.daemonapi.specs import daemon_spec
from snapshotter.errdefs import (
    BlobNotFound,
    ConfigError,
    DigestMismatch,
    FormatError,
    LimitExceeded,
    RegistryAuthError,
    RegistryTimeout,
)
from snapshotter.formats.limits import TocLimits
from snapshotter.fs.__main__ import main
from snapshotter.fs.daemon import mount_options
from snapshotter.fs.fuse.session import MountOptions
from snapshotter.fs.layers import failure_reason

DEFAULT_READ_AHEAD_KIB = RemoteConfig.read_ahead_kib
LAYER = {"layer_id": 1, "ref": "localhost:5000/a:b", "digest": "sha256:" + "a" * 64,
         "skip_verify": True}


def test_config_defaults_and_keys() -> None:
    c = DaemonConfig.from_json(
        {"cache_dir": "/c", "cache_limit_bytes": 10, "layers": [LAYER]}, "dedicated"
    )
    assert (c.entry_timeout, c.attr_timeout, c.log_level, c.allow_other) == (
        3600.0, 3600.0, "INFO", True)
    assert c.layers[0].ref == "localhost:5000/a:b" and c.registry == {}
    full = DaemonConfig.from_json(
        {"version": 1, "cache_dir": "/c", "cache_limit_bytes": 10, "cache_fsync": True,
         "registry": {"deadline": 2.0}, "entry_timeout": 5, "attr_timeout": 6.5,
         "log_level": "debug", "allow_other": False, "fuse_max_tasks": 4, "layers": []},
        "shared",
    )
    assert full.attr_timeout == 6.5 and full.log_level == "DEBUG" and full.layers == ()
    assert mount_options(full) == MountOptions("lazysnap", "lazysnap", allow_other=False)
    assert mount_options(c).allow_other
    assert c.read_ahead_kib == DEFAULT_READ_AHEAD_KIB == 4096
    raw = {"cache_dir": "/c", "cache_limit_bytes": 10, "read_ahead_kib": 0}
    assert DaemonConfig.from_json(raw, "shared").read_ahead_kib == 0
    # one default on both sides (it was 0 here and 50 in the configuration)
    assert c.fuse_spin_us == RemoteConfig.fuse_spin_us
    assert DaemonConfig.from_json({**raw, "fuse_spin_us": 50}, "shared").fuse_spin_us == 50


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        ({"cache_dir": "/c", "cache_limit_bytes": 10}, "dedicated"),  # no layer
        ({"cache_dir": "/c", "cache_limit_bytes": 10, "surprise": 1}, "shared"),
        ({"cache_dir": "/c"}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 0}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": True}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "log_level": "LOUD"}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "version": 2}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "read_ahead_kib": -1}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "read_ahead_kib": 1.5}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "fuse_spin_us": -1}, "shared"),
        ({"cache_dir": "/c", "cache_limit_bytes": 1, "layers": [{"layer_id": 1}]}, "shared"),
        ([], "shared"),
    ],
)
def test_bad_configs_are_config_errors(raw: object, mode: str) -> None:
    with pytest.raises(ConfigError):
        DaemonConfig.from_json(raw, mode)


def test_failure_reasons() -> None:
    assert failure_reason(DigestMismatch("x")) == "digest_mismatch"
    assert failure_reason(FormatError("x")) == "format_error"
    assert failure_reason(BlobNotFound("x")) == "blob_not_found"
    assert failure_reason(RegistryAuthError("x")) == "registry_auth"
    assert failure_reason(RegistryTimeout("x")) == "registry_unavailable"
    assert failure_reason(ValueError("x")) == "internal"
    assert failure_reason(LimitExceeded("x")) == "limit_exceeded"
    assert failure_reason(MemoryError()) == "resource_limit"


def test_the_daemon_gets_the_parsing_budgets_and_memory_limit_of_the_config() -> None:
    cfg = Config()
    raw = daemon_spec(cfg).to_json()
    parsed = DaemonConfig.from_json({**raw, "cache_dir": "/c"}, "shared")
    assert parsed.toc_limits == cfg.toc_limits() == TocLimits()
    assert parsed.memory_limit_bytes == cfg.daemon.memory_limit > 0
    bare = DaemonConfig.from_json({"cache_dir": "/c", "cache_limit_bytes": 1}, "shared")
    assert (bare.toc_limits, bare.memory_limit_bytes) == (TocLimits(), cfg.daemon.memory_limit)
    for bad in ({"toc_limits": {"entries": -1}}, {"toc_limits": {"surprise": 1}},
                {"memory_limit_bytes": -1}):
        with pytest.raises(ConfigError):
            DaemonConfig.from_json({"cache_dir": "/c", "cache_limit_bytes": 1, **bad},
                                   "shared")


def test_the_memory_limit_makes_a_big_allocation_fail_in_the_daemon_process() -> None:
    code = ("from snapshotter.fs.__main__ import limit_memory\n"
            "limit_memory(256 << 20)\n"
            "try:\n    bytearray(512 << 20)\nexcept MemoryError:\n    print('refused')\n"
            "else:\n    print('allowed')\n"
            "print(len(bytearray(16 << 20)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["refused", str(16 << 20)]


def test_cli_rejects_a_bad_config_file(tmp_path: Path) -> None:
    path = f"{tmp_path}/conf.json"
    with open(path, "w") as f:
        f.write('{"cache_dir": "/c"}')
    argv = ["--mode", "shared", "--mountpoint", "/m", "--control", "/s", "--config", path]
    assert main(argv) == 2
    assert main([*argv[:-1], f"{tmp_path}/missing.json"]) == 2


def test_startup_nodes_are_the_small_regular_startup_files_a_layer_has() -> None:
    from snapshotter.formats.index import ROOT_INO
    from snapshotter.fs.read.fetchpolicy import STARTUP_FILE_MAX_BYTES, startup_nodes
    from tests.unit.test_fs_fakes import LayerBuilder

    b = LayerBuilder()
    etc = b.dir(ROOT_INO, "etc")
    passwd = b.file(etc.ino, "passwd", b"root:x:0:0::/root:/bin/sh\n")
    b.symlink(etc.ino, "group", b"/usr/share/group")  # not followed
    b.file(etc.ino, "ld.so.cache", b"x" * (STARTUP_FILE_MAX_BYTES + 1))  # too big
    index, _ = b.build()
    assert startup_nodes(index) == [passwd]
    empty, _ = LayerBuilder().build()
    assert startup_nodes(empty) == []
    c = LayerBuilder()
    c.file(ROOT_INO, "etc", b"a file where a directory would be")
    odd, _ = c.build()
    assert startup_nodes(odd) == []


def test_startup_nodes_include_the_elf_interpreter_and_the_c_library() -> None:
    from snapshotter.formats.index import ROOT_INO
    from snapshotter.fs.read.fetchpolicy import LOADER_FILE_MAX_BYTES, startup_nodes
    from tests.unit.test_fs_fakes import LayerBuilder

    b = LayerBuilder()
    etc = b.dir(ROOT_INO, "etc")
    passwd = b.file(etc.ino, "passwd", b"root:x:0:0::/root:/bin/sh\n")
    usr = b.dir(ROOT_INO, "usr")
    lib = b.dir(b.dir(usr.ino, "lib").ino, "x86_64-linux-gnu")
    libc = b.file(lib.ino, "libc.so.6", b"\x7fELF" + bytes(2000))
    loader = b.file(lib.ino, "ld-linux-x86-64.so.2", b"\x7fELF" + bytes(1000))
    b.file(lib.ino, "libm.so.6", b"\x7fELF" + bytes(1000))  # not every program's
    lib64 = b.dir(usr.ino, "lib64")
    b.symlink(lib64.ino, "ld-linux-x86-64.so.2", b"../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    b.file(lib64.ino, "libc.so.6", b"x" * (LOADER_FILE_MAX_BYTES + 1))  # too big
    index, _ = b.build()
    assert startup_nodes(index) == [passwd, loader, libc]
    musl = LayerBuilder()
    ld = musl.file(musl.dir(ROOT_INO, "lib").ino, "ld-musl-x86_64.so.1", b"\x7fELF" + bytes(9))
    alpine, _ = musl.build()
    assert startup_nodes(alpine) == [ld]
