"""Racing clients: exactly one of several conflicting calls wins, the others get the code
containerd's storage gives, and records and directories stay consistent."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import grpc

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .conftest import Service, Snap, snapshot_id

RACERS = 16


def _race(calls: Sequence[Callable[[], object]]) -> list[str]:
    """Run the calls at once (one thread each); return each outcome's status code name."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[str] = ["NOT RUN"] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            calls[i]()
            outcomes[i] = "OK"
        except grpc.RpcError as e:
            outcomes[i] = cast(grpc.Call, e).code().name
        except BaseException as e:  # reported, not swallowed: the assertion shows it
            outcomes[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def _consistent(service: Service, snap: Snap) -> None:
    """One directory per record (Remove is synchronous by default)."""
    assert len(service.snapshot_dirs()) == len(snap.infos()), (
        service.snapshot_dirs(),
        snap.names(),
    )


def test_concurrent_prepare_of_one_key(snap: Snap, service: Service) -> None:
    outcomes = _race([partial(snap.prepare, "same")] * RACERS)
    assert Counter(outcomes) == {"OK": 1, "ALREADY_EXISTS": RACERS - 1}
    assert snap.names() == ["same"]
    _consistent(service, snap)


def test_concurrent_prepare_and_view_of_one_key(snap: Snap, service: Service) -> None:
    snap.prepare("p-a")
    snap.commit("p", "p-a")
    calls = [partial(snap.prepare if i % 2 else snap.view, "same", "p") for i in range(RACERS)]
    outcomes = _race(calls)
    assert Counter(outcomes) == {"OK": 1, "ALREADY_EXISTS": RACERS - 1}
    assert snap.stat("same").kind in (pb.ACTIVE, pb.VIEW)
    assert snap.names() == ["p", "same"]
    _consistent(service, snap)


def test_concurrent_prepare_of_distinct_keys(snap: Snap, service: Service) -> None:
    snap.prepare("p-a")
    snap.commit("p", "p-a")
    mounts: dict[int, Any] = {}

    def prepare(i: int) -> None:
        mounts[i] = snap.prepare(f"k{i}", "p")

    outcomes = _race([partial(prepare, i) for i in range(RACERS)])
    assert Counter(outcomes) == {"OK": RACERS}
    uppers = set()
    for m in mounts.values():
        (upper,) = [o for o in m[0].options if o.startswith("upperdir=")]
        uppers.add(snapshot_id(upper.removeprefix("upperdir="), service.root))
    assert len(uppers) == RACERS
    _consistent(service, snap)


def test_concurrent_commit_to_one_name(snap: Snap, service: Service) -> None:
    for i in range(RACERS):
        snap.prepare(f"a{i}")
    outcomes = _race([partial(snap.commit, "name", f"a{i}") for i in range(RACERS)])
    assert Counter(outcomes) == {"OK": 1, "ALREADY_EXISTS": RACERS - 1}
    winner = outcomes.index("OK")
    assert snap.stat("name").kind == pb.COMMITTED
    for i in range(RACERS):
        if i != winner:
            assert snap.stat(f"a{i}").kind == pb.ACTIVE
    _consistent(service, snap)


def test_concurrent_commit_of_one_key(snap: Snap, service: Service) -> None:
    snap.prepare("a")
    outcomes = _race([partial(snap.commit, f"name{i}", "a") for i in range(RACERS)])
    assert Counter(outcomes) == {"OK": 1, "NOT_FOUND": RACERS - 1}
    assert snap.names() == [f"name{outcomes.index('OK')}"]
    _consistent(service, snap)


def test_concurrent_remove_of_one_key(snap: Snap, service: Service) -> None:
    snap.prepare("a")
    snap.prepare("b")
    outcomes = _race([partial(snap.remove, "a")] * RACERS)
    assert Counter(outcomes) == {"OK": 1, "NOT_FOUND": RACERS - 1}
    assert snap.names() == ["b"]
    _consistent(service, snap)


def test_concurrent_remove_parent_and_prepare_child(snap: Snap, service: Service) -> None:
    """Either the child is created on the parent (and Remove fails FAILED_PRECONDITION),
    or the parent goes first (and Prepare fails NOT_FOUND): never both, never neither."""
    for round_ in range(8):
        snap.prepare(f"p{round_}-a")
        snap.commit(f"p{round_}", f"p{round_}-a")
        outcomes = _race(
            [partial(snap.remove, f"p{round_}"), partial(snap.prepare, f"c{round_}", f"p{round_}")]
        )
        assert outcomes in (["FAILED_PRECONDITION", "OK"], ["OK", "NOT_FOUND"]), outcomes
    _consistent(service, snap)
