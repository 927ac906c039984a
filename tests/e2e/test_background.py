"""Background fetch, end to end: it waits for quiet, then fetches the whole layer.

A lazily pulled layer is not fetched while the pull and the container are active; once
``remote.background_silence`` has passed without on-demand reads, the daemon fetches the
rest of the layer, and ``lazysnap status`` shows every byte of it fetched. The daemons
share the quiet through ``<root>/activity``.
"""

from __future__ import annotations

import random
import time

import pytest

from .conftest import LazysnapFactory
from .harness import Containerd, Lazysnap, Registry
from .imagebuild import File, Layer
from .procs import wait_until
from .test_metrics import DATA_PATH, DEADLINE, push_and_convert
from .test_status import layer_digests, status_json

pytestmark = pytest.mark.e2e
SILENCE = 3.0


@pytest.fixture
def quiet_lazysnap(lazysnap_factory: LazysnapFactory) -> Lazysnap:
    return lazysnap_factory(f'[metrics]\naddress = ""\n[remote]\nbackground_silence = {SILENCE}\n')


def test_background_fetch_waits_for_quiet_then_fetches_the_layer(
    registry: Registry, quiet_lazysnap: Lazysnap, containerd: Containerd,
) -> None:
    lz = quiet_lazysnap
    _, esgz = push_and_convert(containerd, registry, "lazysnap/background-e2e",
                               [Layer([File(DATA_PATH, random.randbytes(3_000_000))])])
    (digest,) = layer_digests(registry, esgz)
    pulled = time.monotonic()
    containerd.rpull(esgz, snapshotter="lazysnap")

    def row() -> dict[str, object]:
        _, status = status_json(lz)
        (found,) = [s for s in status["snapshots"] if s["digest"] == digest]
        return found

    early = row()
    quiet_for = time.monotonic() - pulled
    assert early["remote"] is True and early["total_bytes"] > 1_000_000, early
    if quiet_for < SILENCE:  # still inside the silence period: nothing fetched yet
        assert early["fetched_bytes"] == 0, (quiet_for, early)
    assert (lz.root / "activity").is_file()  # where the daemons share their activity
    wait_until(lambda: row()["fetched_bytes"] >= row()["total_bytes"] * 0.9,
               timeout=DEADLINE, what="the background fetch to fetch the layer")
