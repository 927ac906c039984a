"""``python -m tests.fuzz``: fuzz lazysnap's parsers (run from the repository root).

Commands::

    run TARGET [--runs N] [--seconds S] [--corpus DIR] [--crashes DIR] [--no-keep] [-v]
    campaign [--runs-per-target N] [--seconds-per-target S] [--jobs J] [--work DIR]
             [--targets T,...] [--no-keep]
    seeds DIR [--targets T,...]
    repro TARGET FILE...
    minimize TARGET FILE [-o OUT] [--seconds S]
    list

``run`` fuzzes one target in a worker process (seeded from ``seeds`` when the corpus is
empty or not given) and ends with a ``RESULT {json}`` line; exit status 0 when nothing
was found, 1 for a finding (saved under ``tests/fuzz/regressions/<target>/`` unless
``--no-keep``), 2 when the worker failed. ``campaign`` runs every target (a worker
each, ``--jobs`` at a time) and prints a line per target and a total. ``repro`` replays
files under the CPU/memory bounds and prints tracebacks; ``minimize`` shrinks a
finding. ``worker`` is internal (it is what ``run`` starts).

Nothing from ``snapshotter`` is imported before the worker instruments it.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

from tests.fuzz import runner

TARGET_NAMES = ("estargz_footer", "estargz_toc_member", "estargz_toc_json", "estargz_flow",
                "rafs", "erofs", "chunkcodec", "nydus_bootstrap_tar")
"""The targets, in campaign order (``targets.TARGETS`` holds the same names; the names
are repeated here so that the worker can parse its arguments before any import)."""

CPU_BOUND_SECONDS = 2.0
MEMORY_BOUND_BYTES = 64 << 20


def _targets(text: str | None) -> list[str]:
    if not text:
        return list(TARGET_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGET_NAMES]
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(unknown)} (see `list`)")
    return names


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="lazysnap-fuzz-run-") as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus"
        crashes = Path(args.crashes) if args.crashes else Path(tmp) / "crashes"
        seeded = runner.seed_corpus(args.target, corpus)
        if seeded:
            _err(f"{args.target}: corpus {corpus} seeded with {seeded} inputs")
        result = runner.fuzz(args.target, runs=args.runs, seconds=args.seconds,
                             corpus=[corpus], crashes=crashes, keep=not args.no_keep,
                             echo=_err if args.verbose else None)
        print(f"{args.target}: {result.kind}, {result.executed:,} inputs in "
              f"{result.seconds:.1f} s, {len(result.artifacts)} finding(s)")
        if result.kind != "ok":
            _report(result)
        print("RESULT " + result.to_json(), flush=True)
    return {"ok": 0, "error": 2}.get(result.kind, 1)


def _report(result: runner.RunResult) -> None:
    print(f"  {result.kind}: {result.signature}")
    if result.report:
        print("  " + result.report.rstrip().replace("\n", "\n  "))
    for path in result.saved or result.artifacts:
        data = Path(path).read_bytes()
        print(f"  input: {path} ({len(data)} bytes)")
        if len(data) <= 512:
            print(f"  base64: {base64.b64encode(data).decode()}")
    if result.kind == "error":
        print(f"  worker log: {result.log}")
        print("  " + Path(result.log).read_text(errors="replace")[-3000:].replace("\n", "\n  "))


def cmd_campaign(args: argparse.Namespace) -> int:
    rows = runner.campaign(_targets(args.targets), runs=args.runs_per_target,
                           seconds=args.seconds_per_target, jobs=args.jobs,
                           work=Path(args.work) if args.work else None, keep=not args.no_keep,
                           say=lambda line: print(line, flush=True))
    return 1 if any(r.findings for r in rows) else 0


def cmd_seeds(args: argparse.Namespace) -> int:
    from tests.fuzz import seeds

    for target, count in seeds.write(Path(args.dir), _targets(args.targets)).items():
        print(f"{target:<20} {count:>4} seeds -> {Path(args.dir) / target}")
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from tests.fuzz import replay

    status = 0
    for name in args.files:
        data = Path(name).read_bytes()
        out = replay.run_one(args.target, data, trace_memory=False)  # CPU, untraced
        peak = replay.run_one(args.target, data).peak_bytes if out.ok else 0
        within = out.cpu_seconds <= CPU_BOUND_SECONDS and peak <= MEMORY_BOUND_BYTES
        verdict = "ok" if out.ok and within else "FAIL"
        print(f"{verdict} {name}: {len(data)} bytes, {out.cpu_seconds:.3f} s CPU, "
              f"peak {peak / (1 << 20):.1f} MiB"
              + ("" if out.ok else f", {out.signature}"))
        if not out.ok:
            print(out.traceback.rstrip())
        if verdict != "ok":
            status = 1
    return status


def cmd_minimize(args: argparse.Namespace) -> int:
    from tests.fuzz import replay

    data = Path(args.file).read_bytes()
    small = replay.minimize(args.target, data, seconds=args.seconds, log=_err)
    out = Path(args.output) if args.output else Path(args.file).with_suffix(".min")
    out.write_bytes(small)
    print(f"{len(data)} -> {len(small)} bytes: {out}")
    print(f"hex: {small.hex()}" if len(small) <= 256 else f"(first 256 bytes) {small[:256].hex()}")
    return 0


def cmd_list(_args: argparse.Namespace) -> int:
    from tests.fuzz.targets import TARGETS

    for name in TARGET_NAMES:
        t = TARGETS[name]
        doc = next(iter((t.fn.__doc__ or "").strip().splitlines()), "")
        print(f"{name:<20} max_len {t.max_len:>6}  {doc}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    runner.worker_main(args.target, Path(args.ignore) if args.ignore else None,
                       Path(args.finding), args.libfuzzer)
    return 2  # not reached: libFuzzer exits the process


def parser() -> argparse.ArgumentParser:
    """The command-line parser (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fuzz one target")
    run.add_argument("target", choices=TARGET_NAMES)
    run.add_argument("--runs", type=int, help="stop after this many inputs")
    run.add_argument("--seconds", type=int, help="stop after this many seconds")
    run.add_argument("--corpus", help="corpus directory (kept; seeded when empty)")
    run.add_argument("--crashes", help="where libFuzzer writes findings and the log")
    run.add_argument("--no-keep", action="store_true",
                     help="do not copy findings into tests/fuzz/regressions/")
    run.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    run.set_defaults(func=cmd_run)

    camp = sub.add_parser("campaign", help="fuzz every target in turn")
    camp.add_argument("--runs-per-target", type=int, default=100_000)
    camp.add_argument("--seconds-per-target", type=int, default=900)
    camp.add_argument("--jobs", type=int, default=1, help="targets fuzzed at the same time")
    camp.add_argument("--work", help="directory for corpora and logs (default: temporary)")
    camp.add_argument("--targets", help="comma-separated subset")
    camp.add_argument("--no-keep", action="store_true")
    camp.set_defaults(func=cmd_campaign)

    seeds = sub.add_parser("seeds", help="write seed corpora")
    seeds.add_argument("dir")
    seeds.add_argument("--targets", help="comma-separated subset")
    seeds.set_defaults(func=cmd_seeds)

    repro = sub.add_parser("repro", help="replay inputs under the bounds")
    repro.add_argument("target", choices=TARGET_NAMES)
    repro.add_argument("files", nargs="+")
    repro.set_defaults(func=cmd_repro)

    mini = sub.add_parser("minimize", help="shrink a finding")
    mini.add_argument("target", choices=TARGET_NAMES)
    mini.add_argument("file")
    mini.add_argument("-o", "--output")
    mini.add_argument("--seconds", type=float, default=60.0)
    mini.set_defaults(func=cmd_minimize)

    lst = sub.add_parser("list", help="list the targets")
    lst.set_defaults(func=cmd_list)

    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("target", choices=TARGET_NAMES)
    worker.add_argument("--finding", required=True)
    worker.add_argument("--ignore")
    worker.add_argument("libfuzzer", nargs=argparse.REMAINDER)
    worker.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
    if getattr(args, "libfuzzer", None) and args.libfuzzer[0] == "--":
        args.libfuzzer = args.libfuzzer[1:]
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
