"""Directory read-ahead, end to end: a container that reads one small file of a directory
costs that file (and the amplification after it); once a second small file of the same
directory misses, the daemon fetches the directory's other small files in the
background, and a container reading all of them then makes no further registry request.
A big file of the same directory is left alone."""

from __future__ import annotations

import hashlib
import random

import pytest

from .demo import busybox_layer
from .harness import Containerd, Lazysnap, Registry
from .imagebuild import File, Layer
from .procs import wait_until
from .test_metrics import DEADLINE, push_and_convert
from .test_status import layer_digests, status_json

pytestmark = pytest.mark.e2e
COUNT = 40
SMALL = 20_000  # random bytes: about as big compressed, far below the 64 KiB threshold
BIG = 2_000_000
AMPLIFY = 128 << 10



def test_a_directory_whose_small_files_keep_missing_is_fetched_ahead(
    registry: Registry, quiet_lazysnap: Lazysnap, containerd: Containerd,
) -> None:
    rng = random.Random(4)
    files = {f"/srv/mods/m{i:02d}.bin": rng.randbytes(SMALL) for i in range(COUNT)}
    layer = Layer([*(File(path, data) for path, data in files.items()),
                   File("/srv/mods/zz-big.bin", rng.randbytes(BIG))])
    _, esgz = push_and_convert(containerd, registry, "lazysnap/dirahead-e2e",
                               [busybox_layer(), layer])
    _, top = layer_digests(registry, esgz)
    containerd.rpull(esgz, snapshotter="lazysnap")

    def fetched() -> int:
        _, status = status_json(quiet_lazysnap)
        return next(s["fetched_bytes"] for s in status["snapshots"] if s["digest"] == top)

    def run(name: str, *paths: str) -> str:
        out = containerd.run_container(esgz, name, "md5sum", *paths, snapshotter="lazysnap")
        return out.stdout

    # One file: that file and at most the amplification window after it.
    first = run("dirahead-one", "/srv/mods/m00.bin")
    assert hashlib.md5(files["/srv/mods/m00.bin"]).hexdigest() in first
    after_one = fetched()
    assert after_one < SMALL + AMPLIFY + (64 << 10), after_one

    # A second small file, far from the first in the blob: the directory is fetched ahead.
    run("dirahead-two", "/srv/mods/m30.bin")
    whole = COUNT * SMALL
    got = wait_until(lambda: fetched() if fetched() >= whole else None, timeout=DEADLINE,
                     what="the directory's small files to be fetched ahead")
    assert got < whole + BIG // 2, got  # the big file was not part of it

    # Every small file now comes from the cache: no registry request at all.
    listing = run("dirahead-all", *files)
    for path, data in files.items():
        assert f"{hashlib.md5(data).hexdigest()}  {path}" in listing
    assert fetched() == got
