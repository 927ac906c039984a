"""A hypothesis state machine: the metastore behaves like a plain dictionary model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from snapshotter.errdefs import LazysnapError
from snapshotter.metastore.store import MetaStore
from snapshotter.model import Kind

KEYS = st.sampled_from(["a", "b", "c", "d", "default/1/extract-1 sha256:x", "e/f g"])
LABELS = st.dictionaries(st.sampled_from(["x", "y", "z"]), st.text(max_size=3), max_size=3)


def _stored(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if v}


@dataclass
class M:
    kind: Kind
    parent: str
    labels: dict[str, str] = field(default_factory=dict)


class MetaStoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = MetaStore(Path(self.dir.name) / "m.db")
        self.model: dict[str, M] = {}
        self.now = 0

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    def _expect(self, ok: bool, fn: object) -> None:
        try:
            with self.store.write() as tx:
                fn(tx)  # type: ignore[operator]
        except LazysnapError:
            assert not ok, "store refused an operation the model allows"
            return
        assert ok, "store allowed an operation the model refuses"

    @rule(key=KEYS, parent=st.one_of(st.just(""), KEYS), view=st.booleans(), labels=LABELS)
    def create(self, key: str, parent: str, view: bool, labels: dict[str, str]) -> None:
        self.now += 1
        kind = Kind.VIEW if view else Kind.ACTIVE
        ok = key not in self.model and (
            parent == "" or (parent in self.model and self.model[parent].kind is Kind.COMMITTED))
        self._expect(ok, lambda tx: tx.create(key, parent, kind, labels, self.now))
        if ok:
            self.model[key] = M(kind, parent, _stored(labels))

    @rule(key=KEYS, name=KEYS, labels=LABELS)
    def commit(self, key: str, name: str, labels: dict[str, str]) -> None:
        self.now += 1
        ok = key in self.model and self.model[key].kind is Kind.ACTIVE and name not in self.model
        self._expect(ok, lambda tx: tx.commit(key, name, labels, 0, 0, self.now))
        if ok:
            old = self.model.pop(key)
            self.model[name] = M(Kind.COMMITTED, old.parent, _stored(labels))
            for m in self.model.values():
                assert m.parent != key

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        ok = key in self.model and all(m.parent != key for m in self.model.values())
        self._expect(ok, lambda tx: tx.remove(key))
        if ok:
            del self.model[key]

    @rule(key=KEYS, labels=LABELS)
    def update(self, key: str, labels: dict[str, str]) -> None:
        self.now += 1
        ok = key in self.model
        self._expect(ok, lambda tx: tx.update_labels(key, labels, ["labels"], self.now))
        if ok:
            self.model[key].labels = _stored(labels)

    @invariant()
    def agrees(self) -> None:
        with self.store.read() as tx:
            got = {r.key: M(r.kind, r.parent, dict(r.labels)) for r in tx.records()}
        assert got == self.model


MetaStoreModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                            deadline=None)
TestMetaStoreModel = MetaStoreModel.TestCase
