"""What a layer fetches before it is declared ready, and what it fetches afterwards.

Prefetch (before ready): the files the image producer marked as needed first.
  * ``index.no_prefetch`` (eStargz ``.no.prefetch.landmark``) → nothing;
  * otherwise the files in ``index.prefetch_inos`` (in that order), plus every regular file
    whose compressed bytes lie entirely below ``index.prefetch_blob_end`` (eStargz: the
    range before ``.prefetch.landmark``);
  * bounded by ``prefetch_timeout_s``; a timeout or a fetch error is logged and recorded in
    ``FetchProgress.prefetch_error`` but does not fail the layer: prefetching only warms
    the cache, every chunk can still be fetched on demand. ``prefetch_timeout_s <= 0``
    disables prefetch.

Background fetch (after ready, when enabled): every chunk of every regular file, in
batches of ``BACKGROUND_BATCH_BYTES``, paced to ``background_rate_bytes_per_s`` (0 =
unpaced). Before each batch it waits until no layer sharing the ``Activity`` has had an
on-demand fetch for ``background_silence_s`` seconds (0 = no waiting), so a running
container's misses never queue behind it; a small batch bounds how long a miss that comes
during a batch shares the link with it. Success sets ``fully_fetched``; an error is recorded
in ``background_error`` and ends the background fetch (reads still work on demand).

The policy talks to the reader only through ``BulkFetcher.fetch_all``, so it is tested with
a fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from snapshotter.formats.index import LayerIndex, Node, NodeKind
from snapshotter.fs.read.activity import Activity

BACKGROUND_BATCH_BYTES = 1 << 20


class BulkFetcher(Protocol):
    """The part of ``ChunkReader`` the policy needs."""

    async def fetch_all(
        self,
        nodes: Iterable[Node],
        rate_limit_bytes_per_s: int = 0,
        *,
        batch_bytes: int = ...,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Bring every chunk of ``nodes`` into the cache; return compressed bytes fetched.

        ``gate`` is awaited before each batch of about ``batch_bytes``."""
        ...


@dataclass(slots=True)
class FetchProgress:
    """How far a layer's prefetch and background fetch have got (read by status calls)."""

    prefetch_done: bool = False
    prefetch_error: str | None = None
    fully_fetched: bool = False
    background_error: str | None = None
    # Compressed bytes each phase fetched (0 when it failed) and how long it ran, in
    # seconds (None: the phase did not run, having nothing to fetch or being disabled).
    prefetch_bytes: int = 0
    prefetch_seconds: float | None = None
    background_bytes: int = 0
    background_seconds: float | None = None


def prefetch_nodes(index: LayerIndex) -> list[Node]:
    """The regular files to prefetch, in fetch order, each once (see module docstring)."""
    if index.no_prefetch:
        return []
    out: list[Node] = []
    seen: set[int] = set()

    def add(node: Node) -> None:
        if node.kind is NodeKind.REG and node.chunks and node.ino not in seen:
            seen.add(node.ino)
            out.append(node)

    for ino in index.prefetch_inos:
        node = index.nodes.get(ino)
        if node is not None:
            add(node)
    if index.prefetch_blob_end > 0:
        below = [
            n
            for n in index.nodes.values()
            if n.kind is NodeKind.REG
            and n.chunks
            and all(c.blob == "" and c.blob_end <= index.prefetch_blob_end for c in n.chunks)
        ]
        below.sort(key=lambda n: n.chunks[0].blob_offset)
        for node in below:
            add(node)
    return out


# Files nearly every container start reads from its image, whatever it runs: containerd
# resolves the container's user and groups from /etc/passwd and /etc/group while it
# creates the container, and the dynamic loader reads /etc/ld.so.cache at every exec of
# a dynamically linked program. A layer that has them fetches them right after it is
# mounted (as its registry warm-up), so that these reads are not misses.
STARTUP_FILES = ("etc/passwd", "etc/group", "etc/ld.so.cache")
STARTUP_FILE_MAX_BYTES = 1 << 20
# The same for the ELF interpreter and the C library, which every dynamically linked
# program maps before its first instruction (glibc on Debian/Ubuntu with and without
# merged /usr and on Fedora/RHEL, for x86-64 and arm64; musl, whose loader is its libc).
# Where they live is a fact of the distribution, so the real paths are listed (symlinks
# such as /lib64/ld-linux-x86-64.so.2 are not followed: they may sit in another layer).
LOADER_FILES = (
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libc.so.6",
    "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib64/ld-linux-x86-64.so.2", "usr/lib64/libc.so.6",
    "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "usr/lib/aarch64-linux-gnu/libc.so.6",
    "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "lib/aarch64-linux-gnu/libc.so.6",
    "usr/lib64/ld-linux-aarch64.so.1",
    "lib/ld-musl-x86_64.so.1", "lib/ld-musl-aarch64.so.1",
)
LOADER_FILE_MAX_BYTES = 4 << 20


def startup_nodes(index: LayerIndex) -> list[Node]:
    """The regular files of ``STARTUP_FILES`` (each at most ``STARTUP_FILE_MAX_BYTES``)
    and of ``LOADER_FILES`` (each at most ``LOADER_FILE_MAX_BYTES``) that ``index`` has,
    in that order; symlinks are not followed."""
    out: list[Node] = []
    seen: set[int] = set()
    for paths, limit in ((STARTUP_FILES, STARTUP_FILE_MAX_BYTES),
                         (LOADER_FILES, LOADER_FILE_MAX_BYTES)):
        for path in paths:
            node = index.resolve(path)
            if (node is not None and node.kind is NodeKind.REG and 0 < node.size <= limit
                    and node.ino not in seen):
                seen.add(node.ino)
                out.append(node)
    return out


def background_nodes(index: LayerIndex) -> list[Node]:
    """Every regular file with data, in the blob order of its first chunk."""
    nodes = [n for n in index.nodes.values() if n.kind is NodeKind.REG and n.chunks]
    nodes.sort(key=lambda n: (n.chunks[0].blob, n.chunks[0].blob_offset))
    return nodes


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Prefetch and background-fetch settings of one layer."""

    prefetch_timeout_s: float
    background: bool
    background_rate_bytes_per_s: int = 0
    background_silence_s: float = 0.0

    async def prefetch(
        self,
        reader: BulkFetcher,
        index: LayerIndex,
        progress: FetchProgress,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        """Run the prefetch; never raises (except cancellation); updates ``progress``."""
        nodes = prefetch_nodes(index) if self.prefetch_timeout_s > 0 else []
        if not nodes:
            progress.prefetch_done = True
            return
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.prefetch_timeout_s):
                fetched = await reader.fetch_all(nodes)
        except TimeoutError:
            progress.prefetch_error = f"prefetch timed out after {self.prefetch_timeout_s}s"
            log.warning("%s; serving on demand", progress.prefetch_error)
            return
        except Exception as exc:  # registry, format or local I/O: all only degrade
            progress.prefetch_error = f"prefetch failed: {exc}"
            log.warning("%s; serving on demand", progress.prefetch_error)
            return
        finally:
            progress.prefetch_seconds = asyncio.get_running_loop().time() - started
        progress.prefetch_bytes = fetched
        progress.prefetch_done = True
        log.info("prefetched %d files (%d compressed bytes fetched)", len(nodes), fetched)

    async def background_fetch(
        self,
        reader: BulkFetcher,
        index: LayerIndex,
        progress: FetchProgress,
        log: logging.LoggerAdapter[logging.Logger],
        activity: Activity | None = None,
    ) -> None:
        """Fetch the whole layer if enabled; never raises (except cancellation).

        ``activity``: whose quiet the fetch waits for (default: a private one, which
        nothing but this layer's reader would update)."""
        if not self.background:
            return
        quiet = activity if activity is not None else Activity(None)
        silence = self.background_silence_s

        async def gate() -> None:
            await quiet.wait_quiet(silence)

        started = asyncio.get_running_loop().time()
        try:
            fetched = await reader.fetch_all(
                background_nodes(index), self.background_rate_bytes_per_s,
                batch_bytes=BACKGROUND_BATCH_BYTES, gate=gate,
            )
        except Exception as exc:  # registry, format or local I/O: all only degrade
            progress.background_error = f"background fetch failed: {exc}"
            log.warning("%s", progress.background_error)
            return
        finally:
            progress.background_seconds = asyncio.get_running_loop().time() - started
        progress.background_bytes = fetched
        progress.fully_fetched = True
        log.info("background fetch complete (%d compressed bytes fetched)", fetched)
