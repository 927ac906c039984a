"""Issue 19, end to end: hostile eStargz layers cannot exhaust the node.

One image holds, among good layers, the three hostile TOCs the fuzzer found (rebuilt
from their description, each in an otherwise valid ``tar.gz`` blob):

* entries with distinct deep names that imply hundreds of thousands of directories;
* a TOC whose entry list is two million ``[]`` (a JSON bomb);
* an entry whose ``innerOffset`` is 2^63-1.

``ctr-remote image rpull`` pulls it while a container of another lazily pulled image
reads its files. The good layers are mounted lazily; each hostile layer falls back to an
ordinary pull with its own reason (``limit_exceeded``, ``limit_exceeded``,
``invalid_toc``) in the log and in the fallback metric; a container of the image runs and
reads the hostile layers' real files; the reading container never fails a read; and
``serve`` and every daemon stay under their memory ceilings (peak RSS, VmHWM).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..estargz_writer import directory, reg
from .conftest import StackFactory
from .esgz import FeatureImage, esgz_blob, push_layers, registry_blob
from .esgz_observe import daemon_pids
from .procs import free_port
from .test_daemons import LOOP, _loop_lines, _remove_task, _wait_more_lines
from .test_estargz_faults import _assert_fallback, _is_remote

pytestmark = pytest.mark.e2e
REPO = "lazysnap/hostile"
MiB = 1 << 20


def _deep_names(toc: dict[str, Any]) -> None:
    toc["entries"] += [{"name": f"d{i}/" + "a/" * 200 + "f", "type": "reg", "size": 0}
                       for i in range(5_000)]


def _list_bomb(toc: dict[str, Any]) -> None:
    toc["entries"] = [[] for _ in range(2_000_000)]


def _huge_inner_offset(toc: dict[str, Any]) -> None:
    (entry,) = (e for e in toc["entries"] if e["name"] == "offset/real.txt")
    entry["innerOffset"] = (1 << 63) - 1


def _layer(tag: str, modifier: Any) -> Any:
    return esgz_blob([directory(tag), reg(f"{tag}/real.txt", f"{tag} is here\n".encode())],
                     toc_modifier=modifier)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _data_limit(pid: int) -> int:
    """The soft ``Max data size`` of process ``pid`` (RLIMIT_DATA), bytes."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return int(line.split()[3])
    raise AssertionError(f"no data limit for {pid}")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def test_hostile_layers_fall_back_and_the_node_keeps_serving(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, e2e_workdir: Path,
) -> None:
    port = free_port()
    stack = lazysnap_stack(f'[daemon]\nmode = "dedicated"\n[metrics]\n'
                           f'address = "127.0.0.1:{port}"\n')
    lz, ctd = stack.require_lazysnap(), stack.containerd
    feature = feature_image.esgz
    ctd.rpull(feature.reference, snapshotter="lazysnap")
    log = e2e_workdir / "hostile-reader.log"
    ctd.run_container(feature.reference, "reader", "sh", "-c", f"while true; do {LOOP}; done",
                      snapshotter="lazysnap", detach=True, extra=("--log-uri", f"file://{log}"))
    seen = _wait_more_lines(log, 0, "the reader to start")

    good = _layer("good", None)
    image = push_layers(feature.registry, REPO, "v1", [
        registry_blob(feature, 0), good, _layer("deep", _deep_names),
        _layer("bomb", _list_bomb), _layer("offset", _huge_inner_offset),
        _layer("last", None)])
    ctd.rpull(image.reference, snapshotter="lazysnap")

    assert [_is_remote(ctd, image.chain_ids[i]) for i in range(6)] == [
        True, True, False, False, False, True]
    for index, reason in ((2, "limit_exceeded"), (3, "limit_exceeded"), (4, "invalid_toc")):
        _assert_fallback(lz, ctd, image, index, reason)
    assert _metric(port, 'lazysnap_remote_fallbacks_total{reason="limit_exceeded"}') == 2
    assert _metric(port, 'lazysnap_remote_fallbacks_total{reason="invalid_toc"}') == 1
    out = ctd.run_container(image.reference, "hostile-run", "cat", "/good/real.txt",
                            "/deep/real.txt", "/bomb/real.txt", "/offset/real.txt",
                            "/last/real.txt", snapshotter="lazysnap").stdout
    assert out.splitlines() == [f"{t} is here" for t in ("good", "deep", "bomb", "offset",
                                                         "last")]

    seen = _wait_more_lines(log, seen, "reads after the hostile pull")
    failed = [line for line in _loop_lines(log) if "READ-FAILED" in line or ": " in line]
    assert failed == [], failed[:10]
    assert lz.running()
    assert _peak_rss(lz.pid) < 400 * MiB, _peak_rss(lz.pid)
    daemons = daemon_pids(lz.root)
    assert daemons
    peaks = {pid: _peak_rss(pid) for pid in daemons}
    print(f"peak RSS: serve {_peak_rss(lz.pid) / MiB:.0f} MiB, daemons "
          f"{sorted(round(p / MiB) for p in peaks.values())} MiB")
    assert all(peak < 512 * MiB for peak in peaks.values()), peaks
    # the second line: every daemon runs under its data-memory limit ([daemon] memory_limit)
    for pid in daemons:
        assert _data_limit(pid) == 2 << 30, pid
    _remove_task(stack, "reader")
