"""The figures that start containers or mount layers through containerd: cold start (1)
with registry bytes (2), API latency (6), memory (7) and scale (8).

Every figure alternates the variants inside each repetition (A B A B ...) so that the
machine's noise falls on all of them alike, and makes each variant cold before each
measurement (``BenchEnv.cold``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from snapshotter.osutil.proc import rss_bytes
from tests.e2e.harness import CommandError
from tests.e2e.imagebuild import chain_ids

from .env import BenchEnv, Variant, pss_bytes
from .images import (
    IMAGES,
    MEMORY_LAYERS,
    SCALE_LAYERS,
    CachedImage,
    Workload,
    expected_output,
)
from .snapshots_api import Lease, SnapshotsClient, already_exists
from .stats import Key, Sample, latency_metrics, median, percentile
from .wan import LinkSpec

MIB = 1 << 20
MEMORY_POINTS = (1, 10, MEMORY_LAYERS)
API_CLIENTS = (1, 16)
TARGET_REF = "containerd.io/snapshot.ref"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
T = TypeVar("T")


class BenchError(RuntimeError):
    """A measurement could not be taken (a workload failed, a layer was not lazy...)."""


@dataclass
class Run:
    """What every figure needs: the environment, images, settings and the sample sink."""

    env: BenchEnv
    images: dict[str, CachedImage]
    variants: Sequence[Variant]
    reps: int
    link: LinkSpec | None
    log: Callable[[str], None] = print
    samples: list[Sample] = field(default_factory=list)
    api_cycles: int = 100
    cold_extra: Sequence[Variant] = ()  # measured in the cold-start figure only (nydus, opt)

    @property
    def cold_variants(self) -> list[Variant]:
        """The columns of the cold-start figure: every variant plus ``cold_extra``."""
        return [*self.variants, *self.cold_extra]

    def add(self, figure: str, image: str, case: str, variant: str, rep: int,
            values: dict[str, float]) -> None:
        """Record one repetition's values."""
        for metric, value in values.items():
            self.samples.append(Sample(Key(figure, image, case, metric), variant, rep, value))

    def ctr_argv(self) -> list[str]:
        """``ctr`` with this containerd's socket and namespace."""
        ctd = self.env.containerd
        return ["ctr", "--address", str(ctd.socket), "--namespace", ctd.namespace]

    def client(self, lease: str = "") -> SnapshotsClient:
        """A Snapshots API client for this containerd (under ``lease`` if given)."""
        ctd = self.env.containerd
        return SnapshotsClient(ctd.socket, ctd.namespace, lease)


# --- (1) + (2): cold start ----------------------------------------------------------------


def cold_start(run: Run, image: str) -> None:
    """Pull, create and run each workload of ``image`` from cold, for every variant (an
    ``optimized`` one pulls the image optimised for that workload)."""
    img = run.images[image]
    for wl in IMAGES[image].workloads:
        for rep in range(run.reps):
            for v in run.cold_variants:
                values = _one_cold_start(run, img, wl, v)
                run.add("cold", image, wl.name, v.name, rep, values)
                run.log(f"  cold {image}/{wl.name} rep {rep} {v.name}: "
                        f"total {values['total_s']:.2f}s, pull {values['pull_s']:.2f}s, "
                        f"run {values['run_s']:.2f}s, "
                        f"registry {values['registry_bytes'] / MIB:.1f} MiB")


def _one_cold_start(run: Run, img: CachedImage, wl: Workload, v: Variant) -> dict[str, float]:
    env = run.env
    env.cold(v)
    tag = v.tag_for(wl.name)
    ref = env.ref(img, v, tag)
    mark = env.access.mark()
    pull_s = env.pull(v, ref)
    pulled = env.access.bytes_since(mark)
    cid = f"bench-{uuid.uuid4().hex[:10]}"
    create_s, _ = env.timed_ctr("containers", "create", "--snapshotter", v.name, "--net-host",
                                ref, cid, *ctr_command(wl.argv))
    try:
        run_s, out = env.timed_ctr("tasks", "start", cid)
    finally:
        env.containerd.ctr("tasks", "delete", "-f", cid, check=False)
        env.containerd.ctr("containers", "rm", cid, check=False)
    total_bytes = env.access.bytes_since(mark)
    expect = expected_output(wl, img)
    if expect and expect not in out:
        raise BenchError(f"{wl.name} on {v.name}: expected {expect!r} in output, got {out!r}")
    size = img.variants[tag].size
    return {"pull_s": pull_s, "create_s": create_s, "run_s": run_s,
            "total_s": pull_s + create_s + run_s, "registry_bytes": float(total_bytes),
            "registry_run_bytes": float(total_bytes - pulled),
            "registry_share": total_bytes / size if size else 0.0}


def ctr_command(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``-c CODE`` written as ``-cCODE`` (same meaning for python3 and
    sh). ``ctr containers create`` re-orders its arguments and would take a lone ``-c``
    for its own ``--config`` flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "-c" and i + 1 < len(argv):
            out.append("-c" + argv[i + 1])
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# --- (6): Snapshots API latency through containerd -----------------------------------------


async def _api_run(client: SnapshotsClient, snapshotter: str, clients: int,
                   cycles: int) -> tuple[list[dict[str, float]], float]:
    tag = uuid.uuid4().hex[:8]

    async def worker(n: int, count: int, into: list[dict[str, float]]) -> None:
        for i in range(count):
            into.append(await client.cycle(snapshotter, f"bench-api-{tag}-{n}-{i}"))

    await worker(-1, 5, [])  # warm up channel, containerd and the snapshotter
    results: list[dict[str, float]] = []
    start = time.perf_counter()
    await asyncio.gather(*(worker(n, max(1, cycles // clients), results)
                           for n in range(clients)))
    return results, time.perf_counter() - start


def api_latency(run: Run) -> None:
    """Prepare+Mounts+Commit+Remove cycles through containerd, 1 and 16 clients."""
    for rep in range(run.reps):
        for clients in API_CLIENTS:
            for v in run.variants:
                results, wall = _api_once(run, v, clients)
                cycles = [r["cycle"] for r in results]
                values = dict(latency_metrics(cycles, wall, ops_per_item=4))
                for op in ("prepare", "mounts", "commit", "remove"):
                    values[f"{op}_p50_s"] = percentile([r[op] for r in results], 50)
                case = f"{clients} client{'s' if clients > 1 else ''}"
                run.add("api", "-", case, v.name, rep, values)
                run.log(f"  api {case} rep {rep} {v.name}: p50 {values['p50_s'] * 1000:.1f} ms, "
                        f"p99 {values['p99_s'] * 1000:.1f} ms, {values['ops_per_s']:.0f} ops/s")


def _api_once(run: Run, v: Variant, clients: int) -> tuple[list[dict[str, float]], float]:
    cycles = run.api_cycles * (4 if clients > 1 else 1)

    def body(c: SnapshotsClient) -> Awaitable[tuple[list[dict[str, float]], float]]:
        return _api_run(c, v.name, clients, cycles)

    with Lease(run.ctr_argv(), f"bench-api-{uuid.uuid4().hex[:8]}") as lease:
        return asyncio.run(_with_client(run, lease.id, body))


async def _with_client(run: Run, lease: str,
                       body: Callable[[SnapshotsClient], Awaitable[T]]) -> T:
    async with run.client(lease) as client:
        return await body(client)


# --- (7) + (8): many remote layers ---------------------------------------------------------


@dataclass
class PrepareSession:
    """Per-layer Prepare latencies and memory readings of one variant."""

    latencies: list[float] = field(default_factory=list)
    memory: dict[int, dict[str, float]] = field(default_factory=dict)


def _memory_reading(run: Run, v: Variant) -> dict[str, float]:
    serve_pid = run.env.lazysnaps[v.name].pid
    pids = run.env.daemon_pids(v.name)
    serve = rss_bytes(serve_pid) / MIB
    daemons = [rss_bytes(pid) / MIB for pid in pids]
    pss = (pss_bytes(serve_pid) + sum(pss_bytes(pid) for pid in pids)) / MIB
    return {"serve_mib": serve, "daemon_max_mib": max(daemons, default=0.0),
            "daemon_sum_mib": sum(daemons), "daemons": float(len(daemons)),
            "total_mib": serve + sum(daemons), "total_pss_mib": pss}


async def _prepare_layers(run: Run, client: SnapshotsClient, v: Variant, img: CachedImage,
                          count: int, session: PrepareSession) -> None:
    variant = img.variants["esgz"]
    chain = chain_ids(variant.diff_ids)
    ref = run.env.ref(img, v, "esgz")
    for i, layer in enumerate(variant.layers[:count]):
        labels = {TARGET_REF: chain[i], STARGZ_REFERENCE: ref, STARGZ_DIGEST: layer.digest}
        if layer.toc_digest:
            labels[TOC_DIGEST] = layer.toc_digest
        start = time.perf_counter()
        try:
            await client.prepare(v.name, f"extract-bench-{i} {chain[i]}",
                                 chain[i - 1] if i else "", labels)
        except Exception as exc:
            if not already_exists(exc):
                raise
        else:
            raise BenchError(f"{v.name}: layer {i + 1} was not mounted remotely (fallback)")
        session.latencies.append(time.perf_counter() - start)
        if v.ours and i + 1 in MEMORY_POINTS:
            session.memory[i + 1] = _memory_reading(run, v)


def prepare_session(run: Run, v: Variant, count: int) -> PrepareSession:
    """From cold, Prepare the first ``count`` layers of the ``layers`` image one by one
    through containerd (as the unpacker does: ALREADY_EXISTS expected)."""
    run.env.cold(v)
    session = PrepareSession()
    img = run.images["layers"]
    with Lease(run.ctr_argv(), f"bench-layers-{uuid.uuid4().hex[:8]}") as lease:
        asyncio.run(_with_client(run, lease.id, lambda c: _prepare_layers(
            run, c, v, img, count, session)))
    return session


def many_layers(run: Run, memory: bool, scale: bool) -> None:
    """Figures (7) and (8) for every lazy variant (memory only for lazysnap's own)."""
    count = MEMORY_LAYERS if memory else SCALE_LAYERS
    for rep in range(run.reps):
        for v in run.variants:
            if scale:
                _scale_pull(run, v, rep)
            if not v.lazy or (memory and not scale and not v.ours):
                continue
            s = prepare_session(run, v, count)
            for n, reading in s.memory.items() if memory else ():
                run.add("memory", "layers", f"{n} layers", v.name, rep, reading)
            if scale:
                lat = s.latencies[:SCALE_LAYERS]
                run.add("scale", "layers", f"prepare ({SCALE_LAYERS} layers)", v.name, rep,
                        {"first_s": lat[0], "p50_s": median(lat), "last_s": lat[-1],
                         "max_s": max(lat)})
            run.log(f"  layers rep {rep} {v.name}: prepare p50 "
                    f"{median(s.latencies) * 1000:.0f} ms; memory {s.memory.get(MEMORY_LAYERS)}")


def _scale_pull(run: Run, v: Variant, rep: int) -> None:
    run.env.cold(v)
    img = run.images["layers"]
    tag = f"{'esgz' if v.lazy else 'gzip'}-{SCALE_LAYERS}"
    try:
        seconds = run.env.pull(v, run.env.ref(img, v, tag))
    except CommandError as exc:
        raise BenchError(f"pull of {tag} with {v.name} failed: {exc}") from exc
    run.add("scale", "layers", f"pull ({SCALE_LAYERS} layers)", v.name, rep,
            {"pull_s": seconds})
    run.log(f"  scale pull rep {rep} {v.name}: {seconds:.2f}s")
