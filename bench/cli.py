"""``python -m bench``: build (once) and push the images, set up the WAN link, registry,
lazysnap and containerd, measure the selected figures side by side and print a table with
each figure's target, plus a JSON document. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.e2e.harness import REPO_ROOT, require_tools

from .env import (
    LAZYSNAP,
    LAZYSNAP_NYDUS,
    LAZYSNAP_OPT,
    LAZYSNAP_SHARED,
    OVERLAYFS,
    BenchEnv,
    Variant,
    parse_extra,
)
from .fsfigures import FS_FIGURES, fs_figures
from .images import DEFAULT_CACHE, IMAGES, CachedImage, ImageCache
from .report import document, dump, evaluate, table
from .runners import Run, api_latency, cold_start, many_layers
from .stats import summarize
from .wan import LinkSpec, measure_link, parse_duration, parse_rate

FIGURES = ("link", "cold", *FS_FIGURES, "api", "memory", "scale")
DEFAULT_IMAGES = ("python", "data")
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "latest.json"


def _csv(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; exits with a usage message when it is wrong."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", type=_csv(FIGURES), default=list(FIGURES),
                    help=f"figures to measure (default all): {','.join(FIGURES)}")
    ap.add_argument("--images", type=_csv(tuple(n for n in IMAGES if n != "layers")),
                    default=list(DEFAULT_IMAGES), help="images: tiny,python,data")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--rate", type=parse_rate, default=parse_rate("100mbit"),
                    help="link rate each way (default 100mbit)")
    ap.add_argument("--rtt", type=parse_duration, default=parse_duration("20ms"),
                    help="link round-trip time (default 20ms)")
    ap.add_argument("--no-shaping", action="store_true",
                    help="registry on 127.0.0.1, no rate limit and no delay")
    ap.add_argument("--snapshotter", type=parse_extra, action="append", default=[],
                    metavar="NAME=SOCKET", help="an extra proxy snapshotter to compare")
    ap.add_argument("--modes", type=_csv(("dedicated", "shared")),
                    default=["dedicated", "shared"], help="lazysnap daemon modes")
    ap.add_argument("--no-overlayfs", action="store_true", help="skip the eager baseline")
    ap.add_argument("--no-nydus", action="store_true",
                    help="skip lazysnap-nydus (nydus image, cold-start figure only)")
    ap.add_argument("--optimized", action="store_true",
                    help="add lazysnap-opt: the image optimised for each workload by "
                         "ctr-remote image optimize (cold-start figure only)")
    ap.add_argument("--lazysnap-config", action="append", default=[], metavar="TOML",
                    help='extra TOML for lazysnap, e.g. "[remote]\\nbackground_fetch = false"')
    ap.add_argument("--api-cycles", type=int, default=100,
                    help="API cycles per repetition with one client (x4 with 16)")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep every log in bench/results/logs-<time> (default: on failure)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="image cache")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    return args


def variants(args: argparse.Namespace) -> list[Variant]:
    """The columns of the comparison, baseline first."""
    out = [] if args.no_overlayfs else [OVERLAYFS]
    out += [v for v in (LAZYSNAP, LAZYSNAP_SHARED) if v.mode in args.modes]
    out += list(args.snapshotter)
    if not args.no_nydus and "cold" in args.only:
        out.append(LAZYSNAP_NYDUS)
    if args.optimized and "cold" in args.only:
        out.append(LAZYSNAP_OPT)
    return out


def cold_images(args: argparse.Namespace, chosen: Sequence[Variant],
                log: Callable[[str], None]) -> dict[str, CachedImage]:
    """The images of the cold-start figure with every tag the ``chosen`` variants pull
    (nydus, optimised), each added the first time a run needs it."""
    cache = ImageCache(args.cache)
    if LAZYSNAP_NYDUS in chosen:
        cache.ensure_nydus(args.images, log)
    if any(v.optimized for v in chosen):
        cache.ensure_optimized(args.images, log)
    return cache.ensure(args.images, log)  # read again: with the tags added above


def optimized_note(chosen: Sequence[Variant]) -> str:
    """The line printed under the table when an optimised variant ran, else ""."""
    names = ", ".join(v.name for v in chosen if v.optimized)
    if not names:
        return ""
    return (f"\n{names}: lazysnap (dedicated) pulling the eStargz image optimised for the "
            "workload being run (ctr-remote image optimize, prefetch landmark); not checked "
            "against the targets, which are about the images made without a workload.")


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the run ran on."""
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  check=False, cwd=REPO_ROOT).stdout.strip()
        except OSError:
            return ""

    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gib": round(mem / (1 << 30), 1), "python": platform.python_version(),
            "containerd": out("containerd", "--version"),
            "lazysnap_commit": out("git", "rev-parse", "--short", "HEAD")}


def needed_images(args: argparse.Namespace) -> list[str]:
    """The selected images, plus ``layers`` for the memory and scale figures."""
    names = list(args.images)
    if {"memory", "scale"} & set(args.only):
        names.append("layers")
    return names


def fs_image(args: argparse.Namespace) -> str | None:
    """The image the file-system figures use: the first selected one with a big file."""
    return next((n for n in args.images if IMAGES[n].big_file), None)


def measure(run: Run, args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Every selected figure, in the order of ``FIGURES``."""
    only = set(args.only)
    if "link" in only:
        meta["link_measured"] = _link(run)
    if "cold" in only:
        for name in args.images:
            log(f"figure cold start: {name}")
            cold_start(run, name)
    fs = only & set(FS_FIGURES)
    image = fs_image(args)
    if fs and image:
        log(f"figures {','.join(sorted(fs))}: {image}")
        fs_figures(run, image, fs)
    if "api" in only:
        log("figure API latency")
        api_latency(run)
    if {"memory", "scale"} & only:
        log("figures memory/scale")
        many_layers(run, "memory" in only, "scale" in only)


def _link(run: Run) -> dict[str, float]:
    biggest = max(((img, layer) for img in run.images.values()
                   for layer in img.variants["gzip"].layers), key=lambda p: p[1].size)
    img, layer = biggest
    nbytes = min(layer.size, 32 << 20)
    m = measure_link(run.env.registry.host, f"/v2/{img.repo}/blobs/{layer.digest}", nbytes)
    log(f"link: RTT {m.rtt_s * 1000:.1f} ms (new connection {m.connect_rtt_s * 1000:.1f} ms), "
        f"rate {m.rate_bits / 1e6:.1f} Mbit/s over {nbytes >> 20} MiB")
    return {"rtt_ms": m.rtt_s * 1000, "connect_rtt_ms": m.connect_rtt_s * 1000,
            "rate_mbit": m.rate_bits / 1e6, "probe_bytes": m.probe_bytes}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success (targets missed do not change the status)."""
    args = parse_args(argv)
    require_tools()
    link = None if args.no_shaping else LinkSpec(args.rate, args.rtt)
    chosen = variants(args)
    images: dict[str, CachedImage] = ImageCache(args.cache).ensure(needed_images(args), log)
    images.update(cold_images(args, chosen, log))
    every = [v for v in chosen if not v.cold_only]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv[1:]), "machine": machine(),
        "link": None if link is None else {"rate_bits": link.rate_bits, "rtt_s": link.rtt_s},
        "variants": [v.name for v in every],
        "cold_only_variants": [v.name for v in chosen if v.cold_only], "reps": args.reps,
        "optimized_variants": [v.name for v in chosen if v.optimized],
        "variant_labels": {v.name: v.label for v in chosen},
        "image_sizes": {n: {t: v.size for t, v in img.variants.items()}
                        for n, img in images.items()}}
    started = time.monotonic()
    with BenchEnv(chosen, link, ImageCache(args.cache).storage,
                  lazysnap_overrides="\n".join(args.lazysnap_config) + "\n", log=log,
                  always_keep_logs=args.keep_logs) as env:
        run = Run(env, images, every, args.reps, link, log=log, api_cycles=args.api_cycles,
                  cold_extra=[v for v in chosen if v.cold_only])
        measure(run, args, meta)
        meta["retries"] = env.retries
    meta["duration_s"] = round(time.monotonic() - started, 1)
    summary = summarize(run.samples)
    verdicts = evaluate(summary, untargeted=[v.name for v in chosen if v.optimized])
    print(table(summary, [v.name for v in chosen], verdicts, {v.name: v.label for v in chosen})
          + optimized_note(chosen))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(dump(document(run.samples, summary, verdicts, meta)))
    log(f"JSON written to {args.json} ({meta['duration_s']:.0f}s)")
    return 0
