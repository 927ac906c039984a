"""Fixtures for the end-to-end tests.

Session scope: ``e2e_prerequisites`` (fails, never skips, naming what is missing; every
process fixture depends on it, and tests that start processes themselves request it),
``registry`` (a :class:`~.harness.Registry`), ``demo_image`` (a
:class:`~.demo.DemoImage` pushed to it), ``esgz_converter`` (a containerd that converts
images with ctr-remote) and ``feature_image`` (the eStargz image of esgz.py).

Function scope: ``e2e_workdir`` (a fresh directory under /tmp, unmounted and removed
afterwards; set LAZYSNAP_E2E_KEEP=1 to keep it), ``lazysnap`` (a running
:class:`~.harness.Lazysnap` with an empty config; a test that wants another config uses
``lazysnap_factory``), ``containerd`` (a running :class:`~.harness.Containerd` whose proxy
plugin ``lazysnap`` points at the lazysnap socket of this workdir), ``lazysnap_stack`` (a
factory of a Stack with a given lazysnap config) and ``stack`` (a
:class:`~.stack.Stack`; parametrise it indirectly with a snapshotter name, default
``lazysnap``, e.g. ``@pytest.mark.parametrize("stack", ["lazysnap", "overlayfs"],
indirect=True)``).

When a test fails, the last lines of every log the fixtures registered (lazysnap,
containerd, registry) are attached to the report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .demo import DemoImage, push_demo
from .esgz import Converter, FeatureImage, build_feature_image, feature_layers
from .esgz_observe import listing_script
from .harness import Containerd, Lazysnap, Registry, require_tools
from .imagebuild import expected_tree
from .imagetree import top_level
from .procs import tail, unmount_all_under
from .stack import Stack

_LOGS = pytest.StashKey[dict[Path, tuple[str, int]]]()
LAZYSNAP_SOCKET = "lazysnap.sock"


def _logs(config: pytest.Config) -> dict[Path, tuple[str, int]]:
    return config.stash.setdefault(_LOGS, {})


@contextmanager
def attached_log(request: pytest.FixtureRequest, title: str, path: Path,
                 lines: int = 80) -> Iterator[None]:
    """Attach the tail of ``path`` to the report of any test that fails while in scope."""
    _logs(request.config)[path] = (title, lines)
    try:
        yield
    finally:
        _logs(request.config).pop(path, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, add the tails of the registered logs as report sections."""
    report = yield
    if report.failed:
        for path, (title, lines) in list(_logs(item.config).items()):
            report.sections.append(
                (f"{title} ({path}, last {lines} lines)", tail(path, lines))
            )
    return report


def _make_tempdir(prefix: str) -> Path:
    # Under /tmp, not the checkout: unix socket paths must stay short and the tree must not
    # be picked up by tools scanning /work.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _remove_tempdir(path: Path) -> None:
    unmount_all_under(path)
    if os.environ.get("LAZYSNAP_E2E_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_prerequisites() -> None:
    """Fail (not skip) when a tool the end-to-end tests need is missing."""
    require_tools()


@pytest.fixture(scope="session")
def registry(request: pytest.FixtureRequest, e2e_prerequisites: None) -> Iterator[Registry]:
    """A registry on 127.0.0.1:<free port> for the whole session."""
    workdir = _make_tempdir("lazysnap-e2e-registry-")
    reg = Registry(workdir)
    try:
        with attached_log(request, "registry log", reg.log_path, lines=30):
            reg.start()
            yield reg
    finally:
        reg.stop()
        _remove_tempdir(workdir)


@pytest.fixture(scope="session")
def demo_image(registry: Registry) -> DemoImage:
    """The three-layer demo image (see demo.py), pushed once per session."""
    return push_demo(registry.host)


@pytest.fixture(scope="session")
def esgz_converter(e2e_prerequisites: None) -> Iterator[Converter]:
    """A private containerd (overlayfs, no lazysnap) that converts images to eStargz with
    ctr-remote and runs reference containers (see esgz.py), for the whole session."""
    workdir = _make_tempdir("lazysnap-e2e-convert-")
    ctd = Containerd(workdir / "containerd", proxy_socket=workdir / "unused.sock")
    try:
        ctd.start()
        yield Converter(ctd)
    finally:
        ctd.stop()
        _remove_tempdir(workdir)


@pytest.fixture(scope="session")
def feature_image(registry: Registry, esgz_converter: Converter) -> FeatureImage:
    """The eStargz feature image (esgz.py), converted once per session, with the listing
    of its unconverted source on overlayfs."""
    probe = listing_script(top_level(expected_tree(feature_layers())))
    return build_feature_image(registry.host, esgz_converter, probe)


@pytest.fixture
def e2e_workdir(e2e_prerequisites: None) -> Iterator[Path]:
    """A fresh directory under /tmp for one test's processes; unmounted and removed after."""
    workdir = _make_tempdir("lazysnap-e2e-")
    try:
        yield workdir
    finally:
        _remove_tempdir(workdir)


LazysnapFactory = Callable[..., Lazysnap]


@pytest.fixture
def lazysnap_factory(
    request: pytest.FixtureRequest, e2e_workdir: Path
) -> Iterator[LazysnapFactory]:
    """``factory(config_text="", log_level="debug") -> Lazysnap``: start lazysnap in this
    workdir with the socket containerd's proxy plugin expects. At most one per test. At teardown the
    test errors if lazysnap died during the test or left processes or mounts behind after
    SIGTERM (they are cleaned up either way). FUSE daemons that lazysnap has records of
    outlive it by design; they are stopped (``Lazysnap.stop_daemons``), not reported."""
    started: list[Lazysnap] = []

    def factory(config_text: str = "", log_level: str = "debug") -> Lazysnap:
        if started:
            raise RuntimeError("lazysnap_factory: one lazysnap per test (restart it instead)")
        proc = Lazysnap(e2e_workdir / "lazysnap", socket=e2e_workdir / LAZYSNAP_SOCKET,
                        config_text=config_text, log_level=log_level)
        started.append(proc)
        _logs(request.config)[proc.log_path] = ("lazysnap log", 80)
        proc.start()
        return proc

    try:
        yield factory
    finally:
        for proc in started:
            _stop_lazysnap(request, proc)


def _stop_lazysnap(request: pytest.FixtureRequest, proc: Lazysnap) -> None:
    try:
        died = not proc.running()
        proc.stop()
        proc.stop_daemons()
        leftovers = proc.cleanup()
        if died:
            pytest.fail(f"lazysnap was not running at teardown (crashed?); see {proc.log_path}")
        if leftovers:
            pytest.fail("lazysnap left these behind after SIGTERM (now removed):\n  "
                        + "\n  ".join(leftovers))
    finally:
        _logs(request.config).pop(proc.log_path, None)


@pytest.fixture
def lazysnap(lazysnap_factory: LazysnapFactory) -> Lazysnap:
    """A running lazysnap with an empty config."""
    return lazysnap_factory()


@pytest.fixture
def quiet_lazysnap(lazysnap_factory: LazysnapFactory) -> Lazysnap:
    """A running lazysnap that fetches only what is read (no background fetch) and
    serves no metrics: what a layer fetched is then what its reads and policies asked."""
    return lazysnap_factory('[metrics]\naddress = ""\n[remote]\nbackground_fetch = false\n')


@pytest.fixture
def containerd(request: pytest.FixtureRequest, e2e_workdir: Path) -> Iterator[Containerd]:
    """A running private containerd; proxy snapshotter ``lazysnap`` at this workdir's socket.

    Stopped at teardown with every task, shim and mount of its own."""
    proc = Containerd(e2e_workdir / "containerd", proxy_socket=e2e_workdir / LAZYSNAP_SOCKET)
    try:
        with attached_log(request, "containerd log", proc.log_path):
            proc.start()
            yield proc
    finally:
        proc.stop()


StackFactory = Callable[[str], Stack]


@pytest.fixture
def lazysnap_stack(
    request: pytest.FixtureRequest, lazysnap_factory: LazysnapFactory, e2e_workdir: Path
) -> StackFactory:
    """``factory(config_text) -> Stack``: lazysnap with ``config_text``, then containerd.

    In that order: containerd dials its proxy plugins at start-up and backs off after a
    failed dial, so a containerd started first may answer UNAVAILABLE for a while."""
    def factory(config_text: str) -> Stack:
        lz = lazysnap_factory(config_text=config_text)
        ctd: Containerd = request.getfixturevalue("containerd")
        return Stack("lazysnap", ctd, lz, e2e_workdir)

    return factory


@pytest.fixture
def stack(request: pytest.FixtureRequest, e2e_workdir: Path) -> Stack:
    """containerd plus (for ``lazysnap``, the default) a lazysnap process, started in that
    order so that lazysnap is stopped after containerd."""
    name: str = getattr(request, "param", "lazysnap")
    lz = request.getfixturevalue("lazysnap") if name == "lazysnap" else None
    ctd: Containerd = request.getfixturevalue("containerd")
    return Stack(name, ctd, lz, e2e_workdir)
