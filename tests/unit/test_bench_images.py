"""bench.images and bench.fsfigures: the pure parts (mirror lookup, layer split, tars from
directories, deterministic contents, the file-system probes on a temporary directory)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from bench import fsfigures, images

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_debian_mirror_from_deb822_sources() -> None:
    assert images.debian_mirror({"debian.sources": DEB822}) == "http://deb.debian.org/debian"


def test_debian_mirror_from_one_line_format() -> None:
    text = ("# comment\ndeb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n")
    assert images.debian_mirror({"sources.list": text}) == "http://mirror.example/debian"


def test_debian_mirror_ignores_other_suites_and_fails_without_one() -> None:
    with pytest.raises(ValueError):
        images.debian_mirror({"x.list": "deb http://a/debian-security bookworm-security main\n",
                              "y.sources": "Types: deb\nURIs: http://b\nSuites: nodistro\n"})


def test_split_paths_first_rule_wins_rest_is_base() -> None:
    paths = ["etc", "etc/passwd", "usr", "usr/lib", "usr/lib/python3", "usr/lib/python3/x.py",
             "usr/lib/python3.11/os.py", "usr/lib/python3x", "usr/share/doc/a"]
    out = images.split_paths(paths, images.PYTHON_SPLIT)
    assert out["python"] == ["usr/lib/python3", "usr/lib/python3/x.py",
                             "usr/lib/python3.11/os.py"]
    assert out["share"] == ["usr/share/doc/a"]
    assert out["libs"] == []
    assert out["base"] == ["etc", "etc/passwd", "usr", "usr/lib", "usr/lib/python3x"]


def test_tar_from_dir_adds_parents_and_keeps_hard_links(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"data")
    os.link(tmp_path / "a" / "b" / "f", tmp_path / "a" / "b" / "g")
    (tmp_path / "a" / "l").symlink_to("b/f")
    tar = images.tar_from_dir(tmp_path, ["a/b/f", "a/b/g", "a/l"])
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = {m.name: m for m in t.getmembers()}
        assert list(members) == ["a", "a/b", "a/b/f", "a/b/g", "a/l"]
        assert members["a"].isdir() and members["a/b/g"].islnk()
        assert members["a/b/g"].linkname == "a/b/f"
        assert members["a/l"].issym() and members["a/l"].linkname == "b/f"
        extracted = t.extractfile("a/b/f")
        assert extracted is not None and extracted.read() == b"data"


def test_walk_skips_the_contents_of_skipped_directories(tmp_path: Path) -> None:
    for d in ("proc/1", "etc", "var/log"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "etc" / "x").write_text("x")
    (tmp_path / "var" / "log" / "y").write_text("y")
    found = images._walk(tmp_path, ("proc/", "var/log/"))
    assert found == ["etc", "proc", "var", "etc/x", "var/log"]


def test_image_contents_are_deterministic() -> None:
    a = images.tree_files("/t", 250, seed=3)
    b = images.tree_files("/t", 250, seed=3)
    assert a == b and len(a) == 250
    assert a[0].path == "/t/d000/f00000.txt" and a[249].path == "/t/d002/f00249.txt"
    assert all(len(f.data) < 16 * 1024 for f in a)
    layers = images.many_layers(3)
    assert len(layers) == 3 and layers[0] != layers[1]


def test_every_image_has_a_builder_and_measured_paths_are_absolute() -> None:
    assert set(images.IMAGES) == set(images.BUILDERS)
    for d in images.IMAGES.values():
        for path in (d.big_file, d.tree):
            assert path == "" or path.startswith("/")


def test_cached_image_round_trips_through_json() -> None:
    variant = images.PushedVariant(
        "esgz", (images.LayerInfo("sha256:a", 10, "sha256:t"),), ("sha256:d",))
    img = images.CachedImage("tiny", {"esgz": variant}, {"big_md5": "x"})
    again = images.CachedImage.from_json(img.to_json())
    assert again == img
    assert again.variants["esgz"].size == 10
    assert again.ref("127.0.0.1:5000", "esgz") == "127.0.0.1:5000/bench/tiny:esgz"


def test_file_system_probes(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))
    nbytes, secs = fsfigures.read_sequential(big, bufsize=64 * 1024)
    assert nbytes == 1 << 20 and secs >= 0
    offsets = fsfigures.random_offsets(1 << 20, 100, seed=1)
    assert offsets == fsfigures.random_offsets(1 << 20, 100, seed=1)
    assert all(o % 4096 == 0 and o < 1 << 20 for o in offsets)
    reads, _ = fsfigures.read_random(big, offsets, budget_s=60)
    assert reads == 100
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("f")
    entries, _ = fsfigures.walk(tmp_path)
    assert entries == 4  # big, d, d/e, d/e/f


def test_ctr_command_attaches_dash_c() -> None:
    from bench.runners import ctr_command

    assert ctr_command(["python3", "-c", 'print("hello")']) == ["python3", '-cprint("hello")']
    assert ctr_command(["md5sum", "/data/big.bin"]) == ["md5sum", "/data/big.bin"]
    assert ctr_command(["sh", "-c"]) == ["sh", "-c"]
