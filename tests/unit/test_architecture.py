"""The layout's rules, checked on the source (stdlib ``ast``, nothing is imported).

* No import circle between modules of ``snapshotter/`` and ``daemon_manager/`` (every
  import counts: at module level, inside functions, under ``TYPE_CHECKING``).
* Imports point from the edges to the core: each package may import only what
  ``ALLOWED`` lists for it (docs/design.md, "Layout").
* A setting reads the same on both sides of the process boundary: every default of the
  daemon's specs is the configuration's own.
* Every fallback reason in the code is one of ``daemonapi.reasons.Reason``.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.config import Config
from snapshotter.daemonapi.reasons import Reason
from snapshotter.daemonapi.specs import DaemonSpec, LayerSpec, daemon_spec, layer_spec

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("snapshotter", "daemon_manager")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if "_proto" in parts:
                continue
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package it names); None
    for anything else (the generated protobuf modules included)."""
    if name.startswith("snapshotter._proto"):
        return None
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found = _resolve(alias.name)
                if found is not None:
                    yield found
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                found = _resolve(f"{base}.{alias.name}") or _resolve(base)
                if found is not None:
                    yield found


GRAPH = {m: sorted(set(_imports(m, p)) - {m}) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(GRAPH):
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = [e for e in GRAPH.get(node, []) if e in GRAPH]
            if i < len(edges):
                work.append((node, i + 1))
                nxt = edges[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_there_is_no_import_circle() -> None:
    assert _cycles() == []


def test_the_circle_finder_finds_circles() -> None:
    saved = dict(GRAPH)
    try:
        GRAPH["snapshotter.errdefs"] = ["snapshotter.config"]  # config imports errdefs
        assert any({"snapshotter.config", "snapshotter.errdefs"} <= set(c) for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


# Which rooms each room may import (a room is a package, or a top-level module).
CORE = {"snapshotter.errdefs", "snapshotter.model", "snapshotter.labels", "snapshotter.config",
        "snapshotter.formats", "snapshotter.osutil", "snapshotter.registry"}
ALLOWED: dict[str, set[str]] = {
    "snapshotter.errdefs": set(),
    "snapshotter.model": {"snapshotter.errdefs"},
    "snapshotter.labels": {"snapshotter.errdefs", "snapshotter.registry"},  # reference syntax
    "snapshotter.formats": {"snapshotter.errdefs", "snapshotter.registry"},  # BlobFetcher
    "snapshotter.osutil": {"snapshotter.errdefs"},
    "snapshotter.config": {"snapshotter.errdefs", "snapshotter.formats",
                           "snapshotter.daemonapi"},  # daemonapi.enums only (a leaf)
    "snapshotter.daemonapi": CORE,
    "snapshotter.registry": {"snapshotter.errdefs"},
    "snapshotter.cache": {"snapshotter.errdefs", "snapshotter.formats"},
    "snapshotter.metastore": CORE,
    "snapshotter.metrics": CORE | {"snapshotter.metastore", "snapshotter.daemonapi",
                                   "snapshotter.registry", "daemon_manager"},
    "snapshotter.fs": CORE | {"snapshotter.daemonapi", "snapshotter.registry",
                              "snapshotter.cache", "snapshotter.metrics"},
    "daemon_manager": CORE | {"snapshotter.daemonapi", "snapshotter.metastore",
                              "snapshotter.fs"},  # the zygote runs fs.__main__ only
    "snapshotter.lazy": CORE | {"snapshotter.daemonapi", "snapshotter.registry",
                                "daemon_manager"},
    "snapshotter.snapshot": CORE | {"snapshotter.metastore"},
    "snapshotter.api": CORE | {"snapshotter.snapshot", "snapshotter._proto"},
    "snapshotter.tools": CORE | {"snapshotter.daemonapi", "snapshotter.registry",
                                 "snapshotter.metastore", "snapshotter.metrics",
                                 "snapshotter.lazy", "daemon_manager", "snapshotter.cache"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "daemon_manager":
        return "daemon_manager"
    return ".".join(parts[:2])


def test_imports_point_from_the_edges_to_the_core() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        room = _room(module)
        if room not in ALLOWED:
            continue  # the entry points (cli, app, __main__) may import anything
        for target in targets:
            there = _room(target)
            if there != room and there not in ALLOWED[room]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_daemon_manager_reaches_into_fs_only_through_its_entry_point() -> None:
    into_fs = {(m, t) for m, ts in GRAPH.items() if m.startswith("daemon_manager")
               for t in ts if t.startswith("snapshotter.fs")}
    assert into_fs <= {("daemon_manager.zygote", "snapshotter.fs.__main__")}, into_fs


def test_the_top_of_snapshotter_holds_at_most_eight_modules() -> None:
    top = sorted(p.name for p in (REPO / "snapshotter").glob("*.py"))
    assert len(top) <= 8, top


def test_no_module_grows_past_600_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


# --- one default per setting ----------------------------------------------------------------


def test_layer_spec_defaults_are_the_configurations() -> None:
    """A spec built from the default configuration equals one that states nothing."""
    built = layer_spec(Config(), layer_id=1, ref="r/x:1", digest="sha256:" + "a" * 64)
    bare = LayerSpec(layer_id=1, ref="r/x:1", digest="sha256:" + "a" * 64,
                     activity_file=Config().activity_file)
    assert built == bare
    assert LayerSpec.from_json({"layer_id": 1, "ref": "r/x:1", "digest": "sha256:" + "a" * 64,
                                "activity_file": Config().activity_file}) == built


def test_daemon_spec_defaults_are_the_configurations() -> None:
    cfg = Config()
    built = daemon_spec(cfg)
    bare = DaemonSpec(cache_dir=cfg.cache_dir, cache_limit_bytes=cfg.cache.limit_bytes,
                      registry=built.registry)
    assert built == bare
    assert DaemonSpec.from_json(built.to_json(), "shared") == built


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LayerSpec)])
def test_every_layer_spec_field_survives_its_json(field: str) -> None:
    spec = layer_spec(Config(), layer_id=3, ref="r/x:1", digest="sha256:" + "b" * 64,
                      toc_digest="sha256:" + "c" * 64, toc_file="/t/3.json", blob_size=100,
                      toc_offset=50)
    again = LayerSpec.from_json(spec.to_json())
    assert getattr(again, field) == getattr(spec, field)


# --- one table of reasons -------------------------------------------------------------------


def _reason_literals() -> Iterator[tuple[str, str]]:
    """String constants passed as the reason of ``RemoteLayerError`` or ``Reason(...)``."""
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else ""
            first = node.args[0]
            if name in ("RemoteLayerError", "Reason") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                yield module, first.value


def test_every_reason_in_the_code_is_in_the_one_table() -> None:
    known = {str(r) for r in Reason}
    unknown = [(m, r) for m, r in _reason_literals() if r not in known]
    assert unknown == []


def test_the_reason_finder_sees_reasons() -> None:
    assert _reason_literals() is not None
    tree = ast.parse('RemoteLayerError("made_up", "x")')
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call))
    assert isinstance(call.args[0], ast.Constant) and call.args[0].value not in set(Reason)
