"""Start-up files, end to end: right after a lazy pull, before any container runs, the
layer that has /etc/passwd and /etc/group has fetched them (containerd reads both while
it creates a container), and a layer without them has fetched nothing; a layer with the
ELF interpreter and the C library has fetched those two and not its other libraries."""

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
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\n"



def test_a_layer_fetches_its_startup_files_right_after_the_pull(
    registry: Registry, quiet_lazysnap: Lazysnap, containerd: Containerd,
) -> None:
    etc = Layer([File("/etc/passwd", PASSWD), File("/etc/group", GROUP),
                 File("/srv/other.bin", bytes(range(256)) * 4096)])
    _, esgz = push_and_convert(containerd, registry, "lazysnap/startup-e2e",
                               [busybox_layer(), etc])
    bottom, top = layer_digests(registry, esgz)
    containerd.rpull(esgz, snapshotter="lazysnap")

    def fetched() -> dict[str, int] | None:
        """Fetched bytes per remote layer, once the top layer has fetched anything."""
        _, status = status_json(quiet_lazysnap)
        rows = {s["digest"]: s["fetched_bytes"] for s in status["snapshots"] if s["remote"]}
        return rows if rows.get(top, 0) > 0 else None

    got = wait_until(fetched, timeout=DEADLINE, what="the start-up files to be fetched")
    assert got[bottom] == 0, got  # busybox has no /etc: nothing fetched
    assert 0 < got[top] < 1_000_000 // 2, got  # the two small files, not /srv/other.bin
    out = containerd.run_container(esgz, "startup", "cat", "/etc/passwd", "/etc/group",
                                   snapshotter="lazysnap")
    assert out.stdout.encode() == PASSWD + GROUP


def test_a_layer_fetches_its_elf_interpreter_and_c_library_right_after_the_pull(
    registry: Registry, quiet_lazysnap: Lazysnap, containerd: Containerd,
) -> None:
    rng = random.Random(7)
    lib = "/usr/lib/x86_64-linux-gnu"
    loader, libc, other = rng.randbytes(50_000), rng.randbytes(300_000), rng.randbytes(300_000)
    layer = Layer([File(f"{lib}/ld-linux-x86-64.so.2", loader), File(f"{lib}/libc.so.6", libc),
                   File(f"{lib}/libother.so.1", other)])
    _, esgz = push_and_convert(containerd, registry, "lazysnap/loader-e2e",
                               [busybox_layer(), layer])
    _, top = layer_digests(registry, esgz)
    containerd.rpull(esgz, snapshotter="lazysnap")
    wanted = len(loader) + len(libc)  # random bytes: about as big compressed

    def fetched() -> int | None:
        _, status = status_json(quiet_lazysnap)
        got = next(s["fetched_bytes"] for s in status["snapshots"] if s["digest"] == top)
        return got if got >= wanted else None

    got = wait_until(fetched, timeout=DEADLINE, what="the loader and libc to be fetched")
    assert got < wanted + len(other) // 2, got  # not the other library
    out = containerd.run_container(esgz, "loader", "md5sum", f"{lib}/libc.so.6",
                                   snapshotter="lazysnap")
    assert hashlib.md5(libc).hexdigest() in out.stdout
