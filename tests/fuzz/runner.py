"""The libFuzzer side: a worker process per run, its supervisor, and the campaign.

``worker_main`` runs inside ``python -m tests.fuzz worker``: it imports the targets
under ``atheris.instrument_imports()`` and hands one to libFuzzer, which never returns
(it exits the process). ``fuzz`` starts such a worker with the limits below, reads its
output (inputs executed, how it ended), collects the inputs libFuzzer wrote for a
crash, a timeout or an out-of-memory, and saves them under ``regressions/<target>/``
named by their sha1. ``campaign`` runs ``fuzz`` for many targets (``jobs`` at a time),
restarting a target after a finding with that finding's signature ignored, so that one
shallow bug does not hide the rest.

Limits, per input: ``-timeout=2`` (seconds; libFuzzer measures wall time, which on an
idle core is CPU time) and ``-rss_limit_mb=1024``; the worker also caps its address
space (``RLIMIT_AS``) a few GiB above its start so that an allocation too fast for
libFuzzer's once-a-second RSS check ends in ``MemoryError`` rather than a swapping
machine. ``-max_len`` is per target (``targets.TARGETS``).

This module imports nothing from ``snapshotter`` at import time (see ``worker_main``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "RSS_LIMIT_MB",
    "TIMEOUT_SECONDS",
    "CampaignRow",
    "RunResult",
    "campaign",
    "fuzz",
    "worker_main",
]

REPO = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
RSS_LIMIT_MB = 1024
TIMEOUT_SECONDS = 2
WORKER_ADDRESS_SPACE_GUARD = 4 << 30
MAX_RESTARTS = 8
MUTATOR_CPU_SECONDS = 1.0
INSTRUMENTED = ("snapshotter",)
"""Packages whose code gives coverage feedback (the parsers hand hostile bytes to no
pure-Python library; zlib, zstandard and lz4 are C and cannot be instrumented)."""
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")

_EXECUTED = (re.compile(rb"stat::number_of_executed_units:\s*(\d+)"),
             re.compile(rb"Done (\d+) runs"), re.compile(rb"^#(\d+)\s", re.M))


# --- the worker -----------------------------------------------------------------------


class MutatorTooSlow(Exception):
    """Raised by the worker's CPU alarm inside a custom mutator that runs too long."""


def worker_main(target: str, ignore: Path | None, finding: Path, libfuzzer_args: list[str]) -> None:
    """Fuzz ``target`` in this process; never returns (libFuzzer exits).

    Exceptions whose signature is listed in ``ignore`` (one per line) count as handled;
    for any other, its signature and traceback are written to ``finding`` before it
    propagates to atheris, which reports it and writes the input as ``crash-<sha1>``.
    """
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        from tests.fuzz import targets
    from tests.fuzz.mutators import MUTATORS
    from tests.fuzz.replay import signature

    fn = targets.TARGETS[target].fn
    known = set()
    if ignore is not None and ignore.is_file():
        known = {line.strip() for line in ignore.read_text().splitlines() if line.strip()}

    def one_input(data: bytes) -> None:
        try:
            fn(data)
        except Exception as exc:
            sig = signature(exc)
            if sig in known:
                return
            finding.write_text(sig + "\n" + "".join(traceback.format_exception(exc)))
            raise

    options: dict[str, Any] = {}
    custom = MUTATORS.get(target)
    if custom is not None:
        def mutate(data: bytes, max_size: int) -> bytes:
            # atheris.Mutate is a stub until Fuzz() replaces it: look it up on each call.
            out: bytes = atheris.Mutate(data, max_size)
            return out

        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            # libFuzzer's -timeout does not cover mutators: a CPU alarm of our own does.
            signal.setitimer(signal.ITIMER_VIRTUAL, MUTATOR_CPU_SECONDS)
            try:
                out = custom(data, max_size, seed, mutate)
            except Exception:  # a mutator bug must not end the run: plain mutation instead
                out = b""
            finally:
                signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            return out[:max_size] if out else mutate(data, max_size)

        def on_alarm(_signum: int, _frame: FrameType | None) -> None:
            raise MutatorTooSlow

        signal.signal(signal.SIGVTALRM, on_alarm)

        options["custom_mutator"] = mutator
    _cap_address_space()
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input, **options)
    atheris.Fuzz()


def _cap_address_space() -> None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + WORKER_ADDRESS_SPACE_GUARD
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


# --- one run --------------------------------------------------------------------------


@dataclass
class RunResult:
    """How one worker run ended.

    ``kind``: ``ok`` (ran its budget), ``crash`` (an exception escaped a target),
    ``timeout``, ``oom`` (RSS limit) or ``error`` (the worker failed otherwise; see the
    log). ``artifacts`` are the inputs libFuzzer wrote; ``saved`` their copies under
    ``regressions/``; ``signature``/``report`` describe a crash.
    """

    target: str
    kind: str
    executed: int
    seconds: float
    exit_code: int
    log: str
    artifacts: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    signature: str = ""
    report: str = ""

    def to_json(self) -> str:
        """One line of JSON (the ``RESULT`` line of ``python -m tests.fuzz run``)."""
        return json.dumps(asdict(self), sort_keys=True)


def _dict_line(word: bytes) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}"
                   for b in word)
    return f'"{text}"'


def seed_corpus(target: str, corpus: Path) -> int:
    """Write ``target``'s seeds into ``corpus`` if it holds no file; return how many."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(p.is_file() for p in corpus.iterdir()):
        return 0
    from tests.fuzz import seeds

    built = seeds.build(target)
    for seed in built:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return len(built)


def _classify(exit_code: int, output: bytes) -> str:
    if exit_code == 0:
        return "ok"
    if b"ERROR: libFuzzer: timeout" in output:
        return "timeout"
    if b"ERROR: libFuzzer: out-of-memory" in output:
        return "oom"
    if b"Uncaught Python exception" in output or b"ERROR: libFuzzer: deadly signal" in output:
        return "crash"
    return "error"


def _executed(output: bytes) -> int:
    for pattern in _EXECUTED:
        found = pattern.findall(output)
        if found:
            return int(found[-1])
    return 0


def save_regressions(target: str, artifacts: Sequence[Path]) -> list[Path]:
    """Copy ``artifacts`` to ``regressions/<target>/<sha1 of content>``; return the copies."""
    out = []
    directory = REGRESSIONS / target
    for artifact in artifacts:
        directory.mkdir(parents=True, exist_ok=True)
        data = artifact.read_bytes()
        dest = directory / hashlib.sha1(data).hexdigest()
        if not dest.exists():
            dest.write_bytes(data)
        out.append(dest)
    return out


def fuzz(target: str, *, runs: int | None, seconds: int | None, corpus: Sequence[Path],
         crashes: Path, ignore: Path | None = None, keep: bool = True,
         echo: Callable[[str], None] | None = None, log: Path | None = None,
         extra_args: Sequence[str] = ()) -> RunResult:
    """Run a worker on ``target`` until ``runs`` inputs or ``seconds`` or a finding.

    ``corpus``: libFuzzer corpus directories (new inputs go to the first). ``crashes``:
    where libFuzzer writes findings (and the log, the dictionary and the finding
    report go). ``keep`` copies findings into ``regressions/``. ``echo`` receives each
    output line as it comes. Raises KeyError for an unknown target; a worker that fails
    to start gives ``kind == "error"``.
    """
    from tests.fuzz.targets import TARGETS  # the supervisor needs no instrumentation

    spec = TARGETS[target]
    crashes.mkdir(parents=True, exist_ok=True)
    log = log or crashes / f"{target}.log"
    finding = crashes / f"{target}.finding"
    finding.unlink(missing_ok=True)
    words = crashes / f"{target}.dict"
    words.write_text("".join(_dict_line(w) + "\n" for w in spec.words))
    before = {p.name for p in crashes.iterdir()}
    args = [str(p) for p in corpus] + [
        f"-max_len={spec.max_len}", f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={TIMEOUT_SECONDS}", f"-artifact_prefix={crashes}{os.sep}",
        "-print_final_stats=1", "-detect_leaks=0",
    ]
    if spec.words:
        args.append(f"-dict={words}")
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={max(1, seconds)}")
    args += list(extra_args)
    cmd = [sys.executable, "-m", "tests.fuzz", "worker", "--finding", str(finding)]
    if ignore is not None:
        cmd += ["--ignore", str(ignore)]
    cmd += [target, "--", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    started = time.monotonic()
    output = bytearray()
    with log.open("wb") as sink, subprocess.Popen(
        cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            output += line
            if echo is not None:
                echo(line.decode("utf-8", "replace").rstrip("\n"))
        exit_code = proc.wait()
    elapsed = time.monotonic() - started
    artifacts = sorted(p for p in crashes.iterdir()
                       if p.name not in before and p.name.startswith(ARTIFACT_PREFIXES))
    kind = _classify(exit_code, bytes(output))
    sig, report = "", ""
    if finding.is_file():
        sig, _, report = finding.read_text().partition("\n")
    elif kind in ("timeout", "oom"):
        sig = f"{kind} (libFuzzer)"
    saved = save_regressions(target, artifacts) if keep else []
    return RunResult(target, kind, _executed(bytes(output)), round(elapsed, 1), exit_code,
                     str(log), [str(a) for a in artifacts], [str(s) for s in saved], sig,
                     report)


# --- the campaign ---------------------------------------------------------------------


@dataclass
class CampaignRow:
    """One target's campaign: total inputs and seconds over its runs, and its findings
    (one ``RunResult`` per run that ended in one)."""

    target: str
    executed: int = 0
    seconds: float = 0.0
    runs: int = 0
    findings: list[RunResult] = field(default_factory=list)
    stopped: str = ""

    def line(self) -> str:
        """The summary line printed for this target."""
        return (f"{self.target:<20} inputs {self.executed:>10,}  seconds {self.seconds:>7.1f}"
                f"  crashes {len(self.findings):>2}  runs {self.runs}"
                + (f"  ({self.stopped})" if self.stopped else ""))


def _campaign_target(target: str, runs: int, seconds: int, work: Path, keep: bool,
                     say: Callable[[str], None]) -> CampaignRow:
    row = CampaignRow(target)
    corpus, crashes = work / "corpus" / target, work / "crashes" / target
    seed_corpus(target, corpus)
    ignore = crashes / "known-signatures"
    crashes.mkdir(parents=True, exist_ok=True)
    ignore.touch()
    deadline = time.monotonic() + seconds
    repeated: dict[str, int] = {}
    while row.executed < runs:
        left = int(deadline - time.monotonic())
        if left < 1:
            row.stopped = "time budget spent"
            break
        if row.runs > MAX_RESTARTS:
            row.stopped = f"{MAX_RESTARTS} restarts"
            break
        result = fuzz(target, runs=runs - row.executed, seconds=left, corpus=[corpus],
                      crashes=crashes, ignore=ignore, keep=keep,
                      log=crashes / f"run-{row.runs}.log")
        row.runs += 1
        row.executed += result.executed
        row.seconds += result.seconds
        if result.kind == "ok":
            break
        if result.kind == "error":
            row.stopped = f"worker error, see {result.log}"
            break
        row.findings.append(result)
        say(f"{target}: {result.kind}: {result.signature} -> "
            f"{', '.join(result.saved or result.artifacts)}")
        if result.signature and not result.signature.endswith("(libFuzzer)"):
            with ignore.open("a") as f:
                f.write(result.signature + "\n")
        else:
            repeated[result.kind] = repeated.get(result.kind, 0) + 1
            if repeated[result.kind] >= 2:
                row.stopped = f"second {result.kind}"
                break
    row.seconds = round(row.seconds, 1)
    return row


def campaign(targets: Sequence[str], *, runs: int, seconds: int, jobs: int = 1,
             work: Path | None = None, keep: bool = True,
             say: Callable[[str], None] = print) -> list[CampaignRow]:
    """Fuzz every target in ``targets`` for up to ``runs`` inputs / ``seconds`` each,
    ``jobs`` targets at a time; print one summary line per target and a total.

    Corpora and logs live in ``work`` (a temporary directory, deleted afterwards, when
    None); ``work/campaign.json`` gets the rows. Returns the rows in target order.
    """
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lazysnap-fuzz-")))
        work.mkdir(parents=True, exist_ok=True)

        def one(target: str) -> CampaignRow:
            row = _campaign_target(target, runs, seconds, work, keep, say)
            say(row.line())
            return row

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            rows = list(pool.map(one, targets))
        total = CampaignRow("total", sum(r.executed for r in rows),
                            round(sum(r.seconds for r in rows), 1), sum(r.runs for r in rows),
                            [f for r in rows for f in r.findings])
        say("-" * 78)
        for row in rows:
            say(row.line())
        say(total.line())
        doc: list[dict[str, Any]] = [asdict(r) for r in rows]
        (work / "campaign.json").write_text(json.dumps(doc, indent=1))
    return rows
