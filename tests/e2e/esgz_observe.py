"""Observing lazily pulled images: registry traffic, lazysnap's state, container listings.

* :class:`AccessLog` parses the registry's ``response completed`` log lines (method, URI,
  status, bytes written). Distribution does not log the ``Range`` header, so a range read
  shows as status 206 with fewer bytes written than the blob has.
* :func:`layer_rows`, :func:`daemon_pids`, :func:`lazysnap_mounts` and friends read
  lazysnap's state from its root directory, its metastore and the process table.
* :func:`listing_script` / :func:`parse_listing` list a root filesystem inside a container
  with few processes (``find -exec ... +``), so a directory of thousands of entries is
  quick: ``stat`` of every path, md5 of every regular file, symlink targets and ``ls -l``.
* :func:`probe_read` reads a file in a child process with a deadline: a read that hangs
  fails the test instead of hanging it, and the errno of a failed read is reported.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .daemon_records import FUSE_FSTYPE, is_daemon_process, read_daemon_rows
from .imagebuild import Node, Tree
from .metastore_view import SnapshotRow, read_snapshots
from .procs import HarnessError, MountInfo, mounts_under, processes_mentioning, wait_until
from .stack import Stack

# --- the registry's access log --------------------------------------------------------

_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass(frozen=True)
class Access:
    """One request the registry answered."""

    method: str
    uri: str
    status: int
    written: int


class AccessLog:
    """The registry log at ``path``; ``mark()`` then ``since(mark)`` gives the requests
    answered in between (the registry is shared by the whole session)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """The current end of the log."""
        return self.path.stat().st_size

    def since(self, mark: int) -> list[Access]:
        """Requests logged after ``mark``, in order."""
        with self.path.open("rb") as fh:
            fh.seek(mark)
            text = fh.read().decode("utf-8", "replace")
        out: list[Access] = []
        for line in text.splitlines():
            if 'msg="response completed' not in line:
                continue
            fields = {k: v.strip('"') for k, v in _FIELD.findall(line)}
            try:
                out.append(Access(fields["http.request.method"], fields["http.request.uri"],
                                  int(fields["http.response.status"]),
                                  int(fields.get("http.response.written", "0"))))
            except (KeyError, ValueError):
                continue
        return out

    def blob_gets(self, mark: int, digest: str) -> list[Access]:
        """GET requests for blob ``digest`` (any repository) since ``mark``."""
        return [a for a in self.since(mark)
                if a.method == "GET" and a.uri.split("?")[0].endswith(f"/blobs/{digest}")]


# --- lazysnap's state -------------------------------------------------------------------


def layer_rows(root: Path, chain: Sequence[str]) -> list[SnapshotRow | None]:
    """The metastore record of each chain ID (bottom first); None where there is none.

    Remote snapshots are committed under the bare chain ID; a pulled one under
    containerd's ``<namespace>/<n>/<chainID>`` key."""
    rows = read_snapshots(root).values()
    out: list[SnapshotRow | None] = []
    for chain_id in chain:
        found = [r for r in rows if r.key == chain_id or r.key.endswith(f"/{chain_id}")]
        out.append(found[0] if found else None)
    return out


def fs_dir(root: Path, row: SnapshotRow) -> Path:
    """A snapshot's ``fs`` directory (the FUSE mount point of a remote layer)."""
    return root / "snapshots" / str(row.id) / "fs"


def lazysnap_mounts(root: Path) -> list[MountInfo]:
    """lazysnap's FUSE mounts (and bind mounts of them) under ``root``."""
    return [m for m in mounts_under(root) if m.fstype.startswith(FUSE_FSTYPE)]


def mount_at(path: Path) -> MountInfo | None:
    """The mount whose mount point is exactly ``path``, if any."""
    found = [m for m in mounts_under(path) if m.mountpoint == str(path)]
    return found[0] if found else None


def daemon_pids(root: Path) -> list[int]:
    """Pids of live FUSE daemons serving under ``root`` (by command line)."""
    return sorted(p.pid for p in processes_mentioning(str(root))
                  if is_daemon_process(p.pid, ""))


def live_daemon_records(root: Path) -> dict[str, int]:
    """Daemon id -> pid for every record whose process is alive and is that daemon."""
    return {r.id: r.pid for r in read_daemon_rows(root)
            if r.state == "running" and is_daemon_process(r.pid, r.control)}


def daemon_logs(root: Path) -> str:
    """The logs of every daemon (``ROOT/daemons/*.log``), concatenated."""
    logs = sorted((root / "daemons").glob("*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def cache_entries(root: Path) -> dict[str, Path]:
    """Chunk-cache key (``sha256:<hex>``) -> file, for every chunk in ``ROOT/cache``."""
    out: dict[str, Path] = {}
    base = root / "cache"
    if base.is_dir():
        for path in base.glob("*/*/*"):
            if path.is_file() and not path.name.startswith("."):
                out[f"{path.parent.parent.name}:{path.name}"] = path
    return out


# --- listing a root file system inside a container ------------------------------------

_SECTIONS = ("STAT", "MD5", "LINK", "LS", "END")
_KINDS: dict[int, Literal["file", "dir", "symlink", "char", "block", "fifo"]] = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


def listing_script(roots: Sequence[str]) -> str:
    """A busybox ``sh`` script listing everything below ``roots`` (``-xdev``) in sections:
    ``stat`` lines (raw mode, owner, size, device, inode, links, mtime, path), ``md5sum``
    of regular files, ``readlink`` of symlinks and ``ls -lnAR --full-time``."""
    q = " ".join(shlex.quote(r) for r in roots)
    fmt = "S\t%f %u %g %s %t %T %i %h %Y\t%n"
    mark = "echo ==={}"
    return " && ".join([
        mark.format("STAT"), f"find {q} -xdev -exec stat -c '{fmt}' {{}} +",
        mark.format("MD5"), f"find {q} -xdev -type f -exec md5sum {{}} +",
        mark.format("LINK"),
        f"find {q} -xdev -type l -exec sh -c "
        "'for f; do printf \"L\\t%s\\t%s\\n\" \"$(readlink \"$f\")\" \"$f\"; done' sh {} +",
        mark.format("LS"), f"ls -lnAR --full-time {q}", mark.format("END"),
    ])


@dataclass(frozen=True)
class Listing:
    """What :func:`listing_script` printed: the tree (as ``imagetree`` Nodes, inode
    numbers included, xattrs unknown), and the ``stat`` and ``ls -l`` lines normalised
    for comparison across snapshotters (no inode numbers, no directory sizes, no
    ``total`` lines, since those depend on the file system underneath)."""

    tree: Tree
    stat_lines: tuple[str, ...]
    ls_lines: tuple[str, ...]


def _sections(output: str) -> dict[str, list[str]]:
    lines = output.splitlines()
    found = {name: i for i, line in enumerate(lines) for name in _SECTIONS
             if line == f"==={name}"}
    if list(found) != list(_SECTIONS):
        raise ValueError(f"listing incomplete, sections {list(found)}:\n{output[-2000:]}")
    return {name: lines[found[name] + 1 : found[nxt]]
            for name, nxt in itertools.pairwise(_SECTIONS)}


def parse_listing(output: str) -> Listing:
    """Parse :func:`listing_script` output; ValueError when it is cut short or malformed."""
    sec = _sections(output)
    md5 = {}
    for line in sec["MD5"]:
        digest, _, path = line.partition("  ")
        md5[path] = digest
    links = {}
    for line in sec["LINK"]:
        _, target, path = line.split("\t", 2)
        links[path] = target
    tree: Tree = {}
    stat_lines: list[str] = []
    for line in sec["STAT"]:
        _, fields, path = line.split("\t", 2)
        raw, uid, gid, size, major, minor, inode, nlink, mtime = fields.split()
        mode = int(raw, 16)
        kind = _KINDS[stat.S_IFMT(mode)]
        tree[path] = Node(
            kind, stat.S_IMODE(mode), int(uid), int(gid),
            size=int(size) if kind == "file" else None, md5=md5.get(path),
            target=links.get(path),
            rdev=(int(major, 16), int(minor, 16)) if kind in ("char", "block") else None,
            inode=int(inode),
        )
        shown = "-" if kind == "dir" else size
        stat_lines.append(f"{raw} {uid} {gid} {shown} {major} {minor} {nlink} {mtime} {path}")
    ls_lines = [_normalise_ls(line) for line in sec["LS"] if not line.startswith("total ")]
    return Listing(tree, tuple(sorted(stat_lines)), tuple(ls_lines))


_LS_LONG = re.compile(
    r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+,\s+\d+|\d+)\s+(\S+ \S+ \S+) (.*)$")


def _normalise_ls(line: str) -> str:
    """An ``ls -ln --full-time`` entry with single spaces between the columns (they are
    padded to the widest value) and ``-`` for a directory's size; other lines as is."""
    m = _LS_LONG.match(line)
    if m is None:
        return line
    perms, nlink, uid, gid, size, when, name = m.groups()
    size = "-" if perms.startswith("d") else "".join(size.split())
    return f"{perms} {nlink} {uid} {gid} {size} {when} {name}"


def line_differences(want: Sequence[str], got: Sequence[str], limit: int = 20) -> list[str]:
    """Lines only in ``want`` (``-``) or only in ``got`` (``+``), at most ``limit``."""
    w, g = set(want), set(got)
    diffs = [f"- {x}" for x in want if x not in g] + [f"+ {x}" for x in got if x not in w]
    return diffs[:limit]


# --- reads that cannot hang -----------------------------------------------------------

_READ = r"""
import errno, hashlib, json, os, sys
path, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h, n = hashlib.md5(), 0
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while length < 0 or n < length:
            want = 1 << 20 if length < 0 else min(1 << 20, length - n)
            data = os.pread(fd, want, offset + n)
            if not data:
                break
            h.update(data)
            n += len(data)
    finally:
        os.close(fd)
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e.errno)), "read": n}))
    sys.exit(0)
print(json.dumps({"md5": h.hexdigest(), "read": n}))
"""


@dataclass(frozen=True)
class ReadResult:
    """The outcome of :func:`probe_read`: the md5 of what was read, or the errno name
    (``EIO``, ...) of the failure; ``read`` bytes were read before either."""

    md5: str | None
    errno: str | None
    read: int


def probe_read(path: Path, offset: int = 0, length: int = -1, *,
               timeout: float = 120.0) -> ReadResult:
    """Read ``length`` bytes (-1: to the end) of ``path`` from ``offset`` in a child
    process. Raises AssertionError if the read does not return within ``timeout``
    seconds (a hang is the failure this guards against, not slowness)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _READ, str(path), str(offset), str(length)],
            capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"read of {path} [{offset}, +{length}) hung for {timeout:.0f}s"
                             ) from None
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"read probe of {path} crashed: {exc.stderr}") from exc
    raw = json.loads(result.stdout)
    return ReadResult(raw.get("md5"), raw.get("errno"), int(raw["read"]))


# --- shared assertions ----------------------------------------------------------------

REMOTE_LABEL = "containerd.io/snapshot/remote"
GC_DEADLINE = 60.0


def lazysnap_config(mode: str = "dedicated", extra: str = "") -> str:
    """lazysnap config text selecting daemon ``mode``, plus ``extra`` TOML tables.

    The metrics endpoint is off: its default port is fixed, and other lazysnap processes
    on this machine (other test runs) may hold it."""
    return f'[daemon]\nmode = "{mode}"\n[metrics]\naddress = ""\n{extra}'


def decision_lines(log_text: str, digest: str) -> list[str]:
    """The remote-decision log lines lazysnap wrote for layer ``digest``."""
    return [line for line in log_text.splitlines()
            if "remote decision:" in line and f"layer {digest} " in line]


def assert_remote_layers(stack: Stack, chain: Sequence[str], mode: str) -> None:
    """Every chain ID is a committed remote snapshot (label visible to ``ctr snapshots
    info``) whose ``fs`` is a lazysnap FUSE mount, served by one live daemon per layer
    (dedicated) or by the one shared daemon."""
    lz = stack.require_lazysnap()
    for chain_id, row in zip(chain, layer_rows(lz.root, chain), strict=True):
        info = stack.snapshot_info(chain_id)
        assert info.kind == "committed", info
        assert info.labels.get(REMOTE_LABEL) == "remote snapshot", info.labels
        assert row is not None, f"no metastore record for {chain_id}"
        mount = mount_at(fs_dir(lz.root, row))
        assert mount is not None and mount.fstype == FUSE_FSTYPE, (chain_id, mount)
    live = live_daemon_records(lz.root)
    want = 1 if mode == "shared" else len(chain)
    assert len(live) == want, live
    assert sorted(live.values()) == daemon_pids(lz.root), (live, daemon_pids(lz.root))


def remove_image(stack: Stack, ref: str) -> None:
    """``ctr image rm --sync REF`` (containers using it must be gone already)."""
    stack.containerd.ctr("image", "rm", "--sync", ref)


def leftovers(stack: Stack) -> list[str]:
    """Everything of any image still present: containerd snapshots, lazysnap records
    (snapshots and daemons), snapshot directories, mounts and daemon processes."""
    lz = stack.require_lazysnap()
    left = [f"ctr snapshot {name}" for name in stack.list_snapshots()]
    left += [f"record {r.key}" for r in read_snapshots(lz.root).values()]
    left += [f"daemon record {r.id} ({r.state})" for r in read_daemon_rows(lz.root)]
    base = lz.root / "snapshots"
    if base.is_dir():
        left += [f"directory snapshots/{p.name}" for p in base.iterdir()]
    left += [f"mount {m.mountpoint} ({m.fstype})" for m in mounts_under(lz.root)]
    left += [f"daemon process {pid}" for pid in daemon_pids(lz.root)]
    return left


def assert_no_leftovers(stack: Stack, timeout: float = GC_DEADLINE) -> None:
    """Wait (up to ``timeout``: containerd's GC is asynchronous) until :func:`leftovers`
    is empty; AssertionError naming what is still there otherwise."""
    last: list[list[str]] = [[]]

    def clean() -> bool:
        last[0] = leftovers(stack)
        return not last[0]

    try:
        wait_until(clean, timeout=timeout, what="nothing of the image to remain")
    except HarnessError as exc:
        raise AssertionError(f"{exc}; still present: {last[0]}") from exc
