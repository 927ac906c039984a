"""What a daemon is started with and asked to mount: ``DaemonSpec`` and ``LayerSpec``.

Both are frozen and typed on both sides of the process boundary; their JSON is their
field names with plain JSON values (``to_json``/``from_json``), and unknown keys are
refused. Every default is the configuration's own default (``snapshotter.config``), so a
setting is declared and defaulted in one place and reads the same in the snapshotter and
in the daemon; ``daemon_spec`` and ``layer_spec`` build the specs from a ``Config``.
``DaemonSettings`` is what the daemon manager needs to run daemons (``daemon_settings``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from snapshotter.config import Config, DaemonConfig, RemoteConfig
from snapshotter.daemonapi.enums import DaemonMode, LayerFormat
from snapshotter.errdefs import ConfigError, InvalidArgument, LazysnapError
from snapshotter.formats.limits import TocLimits

_R = RemoteConfig
MAX_FUSE_TASKS = 64
"""Concurrent FUSE requests a daemon works on (misses wait for the registry)."""


def json_field(
    raw: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *default: Any,
    error: type[LazysnapError] = InvalidArgument,
    allow_none: bool = False,
    what: str = "layer spec",
) -> Any:
    """``raw[key]`` checked to be a ``kind`` (a bool never passes for an int), or
    ``default[0]`` when the key is absent. Raises ``error`` for a missing key without a
    default or a value of the wrong type (``None`` passes only with ``allow_none``)."""
    if key not in raw:
        if not default:
            raise error(f"{what} lacks {key!r}")
        return default[0]
    value = raw[key]
    if value is None and allow_none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise error(f"{what} key {key!r} has the wrong type")
    return value


def _from_json(cls: type[Any], raw: Mapping[str, Any], error: type[LazysnapError],
               what: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` from ``raw``: each field of a plain
    JSON type checked with ``json_field`` against its annotation's type and defaulted to
    the field's default; unknown keys are ``error``. ``skip`` fields are left out."""
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise error(f"unknown {what} keys: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, nullable = _JSON_TYPES[str(f.type)]
        default = () if f.default is dataclasses.MISSING else (f.default,)
        value = json_field(raw, f.name, kind, *default, error=error, allow_none=nullable,
                           what=what)
        values[f.name] = float(value) if kind == (int, float) and value is not None else value
    return values


_JSON_TYPES: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "int": (int, False), "str": (str, False), "bool": (bool, False),
    "float": ((int, float), False), "str | None": (str, True), "int | None": (int, True),
    "LayerFormat": (str, False),
}


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What the manager asks a daemon to mount.

    ``toc_digest`` None means "no TOC digest label"; the layer is then refused unless
    ``skip_verify``. ``bootstrap`` (RAFS formats only): the absolute path of the nydus
    bootstrap to serve; ``toc_digest`` is then the bootstrap's digest, ``digest`` the
    bootstrap layer's, and the chunks are read from ``sha256:<blob id>`` blobs of ``ref``.
    ``toc_file`` (eStargz only): the absolute path of the layer's TOC JSON, already
    fetched and checked by the snapshotter, with ``blob_size`` and ``toc_offset`` (where
    the TOC member starts); the daemon then mounts without a request to the registry,
    still verifying the file against ``toc_digest``, and fetches footer and TOC itself
    when the file is missing or does not verify. ``activity_file``: the absolute path
    through which daemons share on-demand activity (None: this daemon's layers only; see
    ``snapshotter.fs.read.activity``).

    The fetch settings are ``[remote]``'s, with its defaults (see config.toml.example):
    ``prefetch_timeout_s`` (<= 0 disables prefetch), ``background_fetch``,
    ``background_rate_bytes_per_s`` (0: unpaced), ``background_silence_s``,
    ``readahead_chunks`` (0: none), ``amplify_bytes`` (0: only what was asked; see
    ``snapshotter.fs.read.reader``), ``whole_file_bytes`` (0: none),
    ``dir_ahead_bytes``/``dir_ahead_file_bytes`` (0: off; see
    ``snapshotter.fs.read.dirahead``).
    """

    layer_id: int
    ref: str
    digest: str
    toc_digest: str | None = None
    skip_verify: bool = False
    format: LayerFormat = LayerFormat.ESTARGZ
    prefetch_timeout_s: float = _R.prefetch_timeout
    background_fetch: bool = _R.background_fetch
    background_rate_bytes_per_s: int = _R.background_rate
    readahead_chunks: int = _R.readahead_chunks
    bootstrap: str | None = None
    background_silence_s: float = _R.background_silence
    activity_file: str | None = None
    toc_file: str | None = None
    blob_size: int | None = None
    toc_offset: int | None = None
    amplify_bytes: int = _R.amplify_bytes
    whole_file_bytes: int = _R.whole_file_bytes
    dir_ahead_bytes: int = _R.dir_ahead_bytes
    dir_ahead_file_bytes: int = _R.dir_ahead_file_bytes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = str(self.format)
        return out

    @classmethod
    def from_json(cls, raw: object) -> LayerSpec:
        """Parse and validate; raises InvalidArgument for unknown keys or bad values."""
        if not isinstance(raw, dict):
            raise InvalidArgument("layer spec must be a JSON object")
        values = _from_json(cls, raw, InvalidArgument, "layer spec")
        try:
            values["format"] = LayerFormat(values["format"])
        except ValueError:
            raise InvalidArgument(f"unsupported layer format {values['format']!r}") from None
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        """Raise InvalidArgument for values no daemon could serve."""
        if self.layer_id < 0:
            raise InvalidArgument(f"layer_id must be >= 0, got {self.layer_id}")
        if not self.ref or not self.digest.startswith("sha256:"):
            raise InvalidArgument("layer spec needs a ref and a sha256 digest")
        if not isinstance(self.format, LayerFormat):
            raise InvalidArgument(f"unsupported layer format {self.format!r}")
        if (self.background_rate_bytes_per_s < 0 or self.readahead_chunks < 0
                or self.background_silence_s < 0 or self.amplify_bytes < 0
                or self.whole_file_bytes < 0 or self.dir_ahead_bytes < 0
                or self.dir_ahead_file_bytes <= 0):
            raise InvalidArgument("rates, read-ahead and silence must not be negative")
        if self.activity_file is not None and not os.path.isabs(self.activity_file):
            raise InvalidArgument("the activity file path must be absolute")
        if self.toc_file is not None:
            if self.format is not LayerFormat.ESTARGZ or not os.path.isabs(self.toc_file):
                raise InvalidArgument("a TOC file path must be absolute, for an eStargz layer")
            if (self.blob_size is None or self.toc_offset is None
                    or not 0 <= self.toc_offset < self.blob_size):
                raise InvalidArgument("a TOC file needs blob_size and a toc_offset inside it")
        if self.bootstrap is not None and (not self.format.is_rafs
                                           or not os.path.isabs(self.bootstrap)):
            raise InvalidArgument("a bootstrap path must be absolute, for a RAFS layer")


def layer_spec(
    config: Config, *, layer_id: int, ref: str, digest: str,
    fmt: LayerFormat = LayerFormat.ESTARGZ, toc_digest: str | None = None,
    skip_verify: bool = False, bootstrap: str | None = None, toc_file: str | None = None,
    blob_size: int | None = None, toc_offset: int | None = None,
) -> LayerSpec:
    """The spec of one remote layer, its fetch settings taken from ``config``'s
    ``[remote]`` (the same for eStargz and nydus layers). Raises InvalidArgument."""
    remote = config.remote
    spec = LayerSpec(
        layer_id=layer_id, ref=ref, digest=digest, toc_digest=toc_digest,
        skip_verify=skip_verify, format=fmt, bootstrap=bootstrap, toc_file=toc_file,
        blob_size=blob_size, toc_offset=toc_offset,
        prefetch_timeout_s=remote.prefetch_timeout,
        background_fetch=remote.background_fetch,
        background_rate_bytes_per_s=remote.background_rate,
        background_silence_s=remote.background_silence,
        activity_file=config.activity_file,
        readahead_chunks=remote.readahead_chunks,
        amplify_bytes=remote.amplify_bytes,
        dir_ahead_bytes=remote.dir_ahead_bytes,
        dir_ahead_file_bytes=remote.dir_ahead_file_bytes,
        whole_file_bytes=remote.whole_file_bytes,
    )
    spec.check()
    return spec


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """The ``--config`` JSON a daemon process starts with.

    ``cache_dir``/``cache_limit_bytes``: the chunk cache shared by all daemons;
    ``registry``: the ``[registry]`` table (``snapshotter.registry.hosts``);
    ``layers``: mounted at start (a dedicated daemon has exactly one);
    ``memory_limit_bytes``: the process's data-memory limit (0: none; applied by the
    entry point); ``toc_limits``: the TOC parsing budgets. The other fields are the
    ``[remote]`` settings of the same name (``entry_timeout``, ``attr_timeout``,
    ``read_ahead_kib``, ``fuse_spin_us``), with their defaults, and process knobs
    (``cache_fsync``, ``allow_other``, ``fuse_max_tasks``, ``log_level``).
    """

    cache_dir: str
    cache_limit_bytes: int
    registry: Mapping[str, Any] = field(default_factory=dict)
    entry_timeout: float = _R.entry_timeout
    attr_timeout: float = _R.attr_timeout
    log_level: str = "INFO"
    layers: tuple[LayerSpec, ...] = ()
    cache_fsync: bool = False
    allow_other: bool = True
    fuse_max_tasks: int = MAX_FUSE_TASKS
    read_ahead_kib: int = _R.read_ahead_kib
    fuse_spin_us: int = _R.fuse_spin_us
    memory_limit_bytes: int = DaemonConfig.memory_limit
    toc_limits: TocLimits = field(default_factory=TocLimits)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["registry"] = dict(self.registry)
        out["layers"] = [layer.to_json() for layer in self.layers]
        out["toc_limits"] = self.toc_limits.to_json()
        out["version"] = 1
        return out

    @classmethod
    def from_json(cls, raw: object, mode: DaemonMode | str) -> DaemonSpec:
        """Validate the JSON object ``raw`` for ``mode``; raises ConfigError (unknown keys,
        wrong types, bad values; a dedicated daemon needs exactly one layer)."""
        if not isinstance(raw, dict):
            raise ConfigError("daemon config must be a JSON object")
        raw = dict(raw)
        if raw.pop("version", 1) != 1:
            raise ConfigError("unsupported daemon config version")
        values = _from_json(cls, raw, ConfigError, "daemon config",
                            skip=("registry", "layers", "toc_limits"))
        try:
            values["layers"] = tuple(LayerSpec.from_json(x) for x in
                                     json_field(raw, "layers", list, [], error=ConfigError,
                                                what="daemon config"))
            values["toc_limits"] = TocLimits.from_json(
                json_field(raw, "toc_limits", dict, {}, error=ConfigError, what="daemon config"))
        except InvalidArgument as exc:
            raise ConfigError(f"bad layer or limits in daemon config: {exc}") from None
        values["registry"] = json_field(raw, "registry", dict, {}, error=ConfigError,
                                        what="daemon config")
        values["log_level"] = values["log_level"].upper()
        spec = cls(**values)
        spec.check(DaemonMode(mode))
        return spec

    def check(self, mode: DaemonMode) -> None:
        """Raise ConfigError for values no daemon could run with."""
        if self.cache_limit_bytes <= 0 or self.fuse_max_tasks <= 0:
            raise ConfigError("cache_limit_bytes and fuse_max_tasks must be positive")
        if self.read_ahead_kib < 0 or self.fuse_spin_us < 0 or self.memory_limit_bytes < 0:
            raise ConfigError("read_ahead_kib, fuse_spin_us and memory_limit_bytes must be "
                              ">= 0")
        if self.log_level not in logging.getLevelNamesMapping():
            raise ConfigError(f"unknown log level {self.log_level!r}")
        if mode is DaemonMode.DEDICATED and len(self.layers) != 1:
            raise ConfigError("a dedicated daemon needs exactly one layer in 'layers'")


def daemon_spec(config: Config, layers: tuple[LayerSpec, ...] = ()) -> DaemonSpec:
    """The spec a daemon of ``config`` starts with, serving ``layers``."""
    remote = config.remote
    return DaemonSpec(
        cache_dir=config.cache_dir,
        cache_limit_bytes=config.cache.limit_bytes,
        registry=dataclasses.asdict(config.registry),
        entry_timeout=remote.entry_timeout,
        attr_timeout=remote.attr_timeout,
        log_level=config.log_level.upper(),
        layers=layers,
        read_ahead_kib=remote.read_ahead_kib,
        fuse_spin_us=remote.fuse_spin_us,
        memory_limit_bytes=config.daemon.memory_limit,
        toc_limits=config.toc_limits(),
    )


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How the daemon manager runs daemons: where (``root``), how many (``mode``), how
    they start (``zygote``), how long a layer may take to be ready (``ready_timeout``,
    ``[remote] mount_timeout``), the restart policy, and the spec every daemon starts
    from (``template``: ``daemon_spec`` without layers)."""

    root: Path
    template: DaemonSpec
    mode: DaemonMode
    zygote: bool
    ready_timeout: float
    restart_limit: int
    restart_backoff: float
    restart_backoff_max: float


def daemon_settings(config: Config) -> DaemonSettings:
    """The daemon manager's settings from ``config``."""
    daemon = config.daemon
    return DaemonSettings(
        root=Path(config.root), template=daemon_spec(config), mode=DaemonMode(daemon.mode),
        zygote=daemon.zygote, ready_timeout=config.remote.mount_timeout,
        restart_limit=daemon.restart_limit, restart_backoff=daemon.restart_backoff,
        restart_backoff_max=daemon.restart_backoff_max)


__all__ = ["DaemonSettings", "DaemonSpec", "LayerSpec", "daemon_settings",
           "daemon_spec", "json_field", "layer_spec"]
