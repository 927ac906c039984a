"""The checked-in generated code matches protos/, and the wire names match containerd's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.types import mount_pb2

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos/generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["protos_generate"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    gen = _load_generator()
    gen.generate(tmp_path)  # type: ignore[attr-defined]
    checked_in = ROOT / "snapshotter" / "_proto"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    old = sorted(p.relative_to(checked_in) for p in checked_in.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == old, "generated file set differs: run python protos/generate.py"
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (checked_in / rel).read_text(), (
            f"{rel} is stale: run python protos/generate.py")


def test_service_and_package_names() -> None:
    svc = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert {m.name for m in svc.methods} == {
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List",
        "Usage", "Cleanup"}
    assert svc.methods_by_name["List"].server_streaming
    assert mount_pb2.DESCRIPTOR.package == "containerd.types"


def _numbers(message: object) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_field_numbers_match_containerd() -> None:
    assert _numbers(pb.PrepareSnapshotRequest) == {
        "snapshotter": 1, "key": 2, "parent": 3, "labels": 4}
    assert _numbers(pb.CommitSnapshotRequest) == {
        "snapshotter": 1, "name": 2, "key": 3, "labels": 4, "parent": 5}
    assert _numbers(pb.Info) == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    assert _numbers(pb.UpdateSnapshotRequest) == {
        "snapshotter": 1, "info": 2, "update_mask": 3}
    assert _numbers(pb.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert _numbers(pb.ListSnapshotsResponse) == {"info": 1}
    assert _numbers(pb.UsageResponse) == {"size": 1, "inodes": 2}
    assert _numbers(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert (pb.UNKNOWN, pb.VIEW, pb.ACTIVE, pb.COMMITTED) == (0, 1, 2, 3)


def test_known_wire_bytes() -> None:
    # key "k" (field 2, length-delimited) then label map entry {"a": "b"} (field 4).
    msg = pb.PrepareSnapshotRequest(key="k", labels={"a": "b"})
    assert msg.SerializeToString() == b"\x12\x01k\x22\x06\x0a\x01a\x12\x01b"
