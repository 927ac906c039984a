"""The file-system figures, measured on the host through a read-only view of the image's
top snapshot (containerd ``View`` + ``mount``): sequential read of the big file (3),
random 4 KiB reads (4) and a metadata walk (5).

One session per repetition and variant: cold, pull, mount the view, then in this order
(each step only if selected): sequential read cold (straight after the pull: for a lazy
variant every byte comes over the link), wait until lazysnap's cache stops changing
(``settle``), drop the page cache, sequential read warm (the chunk cache is now hot),
drop, random reads, drop, walk (first pass), walk again (second pass, kernel caches
warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.imagebuild import chain_ids

from .env import Variant, drop_caches
from .images import IMAGES, CachedImage
from .runners import BenchError, Run
from .snapshots_api import Lease

MIB = 1 << 20
BLOCK = 4096
RANDOM_READS = 20_000
RANDOM_SECONDS = 15.0
FS_FIGURES = ("seqread", "randread", "walk")


def read_sequential(path: Path, bufsize: int = MIB) -> tuple[int, float]:
    """Read ``path`` start to end in ``bufsize`` chunks: (bytes, seconds)."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total, time.perf_counter() - start


def random_offsets(size: int, count: int, seed: int, block: int = BLOCK) -> list[int]:
    """``count`` block-aligned offsets inside a file of ``size`` bytes (deterministic)."""
    blocks = max(1, size // block)
    rng = random.Random(seed)
    return [rng.randrange(blocks) * block for _ in range(count)]


def read_random(path: Path, offsets: list[int], budget_s: float,
                block: int = BLOCK) -> tuple[int, float]:
    """``pread`` one block at each offset (readahead off) until done or ``budget_s`` has
    passed: (reads, seconds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        deadline = start + budget_s
        done = 0
        for off in offsets:
            os.pread(fd, block, off)
            done += 1
            if done % 256 == 0 and time.perf_counter() > deadline:
                break
        return done, time.perf_counter() - start
    finally:
        os.close(fd)


def walk(root: Path) -> tuple[int, float]:
    """``find ROOT -xdev`` with an lstat of every entry: (entries, seconds)."""
    start = time.perf_counter()
    dev = os.lstat(root).st_dev
    count = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                count += 1
                if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                    stack.append(entry.path)
    return count, time.perf_counter() - start


@contextlib.contextmanager
def view_mount(run: Run, v: Variant, img: CachedImage, target: Path) -> Iterator[Path]:
    """The image's root file system, read-only, at ``target`` (a containerd View of the
    top snapshot); unmounted and removed afterwards."""
    variant = img.variants["esgz" if v.lazy else "gzip"]
    top = chain_ids(variant.diff_ids)[-1]
    key = f"bench-view-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True, exist_ok=True)

    async def view(lease: str) -> list[list[str]]:
        async with run.client(lease) as client:
            return [m.argv(str(target)) for m in await client.view(v.name, key, top)]

    # the lease keeps containerd's garbage collector off the view; deleting it removes it
    with Lease(run.ctr_argv(), key) as lease:
        argvs = asyncio.run(view(lease.id))
        if len(argvs) != 1:
            raise BenchError(f"{v.name}: view of {top} has {len(argvs)} mounts, expected 1")
        subprocess.run(argvs[0], check=True, capture_output=True, timeout=60)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=False, capture_output=True,
                           timeout=60)


def settle(cache: Path, quiet_s: float = 1.0, limit_s: float = 60.0) -> float:
    """Wait until the bytes under ``cache`` have not changed for ``quiet_s`` (at most
    ``limit_s``); return the seconds waited. A lazy snapshotter may still be storing
    what the cold read fetched (chunks, a whole-file copy) when the read returns; those
    writes would land in the page cache after it was dropped and make "warm" a memory
    read."""
    def size() -> int:
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())

    started = time.monotonic()
    last, since = size(), time.monotonic()
    while time.monotonic() - started < limit_s:
        time.sleep(0.2)
        now = size()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return time.monotonic() - started


def fs_figures(run: Run, image: str, selected: set[str]) -> None:
    """Figures (3)-(5) on ``image`` for every variant; see the module docstring."""
    definition = IMAGES[image]
    img = run.images[image]
    for rep in range(run.reps):
        for v in run.variants:
            run.env.cold(v)
            run.env.pull(v, run.env.ref(img, v))
            drop_caches()  # what an eager pull just wrote is not "cold"
            mnt = run.env.workdir / "mnt" / v.name
            with view_mount(run, v, img, mnt) as root:
                big = root / definition.big_file.lstrip("/")
                _session(run, image, v, rep, big, root, selected)


def _session(run: Run, image: str, v: Variant, rep: int, big: Path, root: Path,
             selected: set[str]) -> None:
    if "seqread" in selected or "randread" in selected:
        nbytes, secs = read_sequential(big)  # cold: from the registry for lazy variants
        if "seqread" in selected:
            values = {"mib_per_s": nbytes / MIB / secs, "seconds": secs}
            if v.lazy and run.link is not None and run.link.rate_bits:
                values["link_share"] = nbytes * 8 / secs / run.link.rate_bits
            run.add("seqread", image, "cold", v.name, rep, values)
            lz = run.env.lazysnaps.get(v.name)
            if lz is not None:
                settle(lz.root / "cache")
            drop_caches()
            nbytes, secs = read_sequential(big)
            run.add("seqread", image, "warm", v.name, rep,
                    {"mib_per_s": nbytes / MIB / secs, "seconds": secs})
            run.log(f"  seqread {image} rep {rep} {v.name}: warm {nbytes / MIB / secs:.0f} MiB/s")
    if "randread" in selected:
        drop_caches()
        offsets = random_offsets(big.stat().st_size, RANDOM_READS, seed=rep)
        reads, secs = read_random(big, offsets, RANDOM_SECONDS)
        run.add("randread", image, "warm 4 KiB", v.name, rep, {"iops": reads / secs})
        run.log(f"  randread {image} rep {rep} {v.name}: {reads / secs:.0f} IOPS")
    if "walk" in selected:
        drop_caches()
        entries, first = walk(root)
        _, second = walk(root)
        run.add("walk", image, "first", v.name, rep, {"seconds": first, "entries": entries})
        run.add("walk", image, "second", v.name, rep, {"seconds": second})
        run.log(f"  walk {image} rep {rep} {v.name}: {entries} entries, first {first:.2f}s, "
                f"second {second:.2f}s")
