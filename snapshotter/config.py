"""lazysnap's configuration: frozen dataclasses whose defaults are defined here, once.

The file format is TOML (``config.toml.example`` documents every key; a test checks that
it parses to exactly these defaults). Loading is strict: an unknown key, a wrong type or
a bad value raises ``ConfigError`` naming the key. Command-line flags override the file
through ``Config.with_overrides``. ``version = 1`` is the only version so far.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from snapshotter.daemonapi.enums import DaemonMode
from snapshotter.errdefs import ConfigError
from snapshotter.formats import limits

log = logging.getLogger(__name__)
CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = "/etc/lazysnap/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
DAEMON_MODES = tuple(str(m) for m in DaemonMode)
GiB = 1 << 30


@dataclass(frozen=True)
class SnapshotterConfig:
    """Local snapshot behaviour (the overlayfs semantics)."""

    # Remove directories as part of Remove (true) or leave them to Cleanup (false).
    sync_remove: bool = True
    # Mount the probe overlay at start-up to check the root supports overlayfs.
    check_overlay: bool = True


@dataclass(frozen=True)
class RemoteConfig:
    """When and how layers are mounted lazily."""

    enabled: bool = True
    # Skip TOC verification altogether (not recommended).
    disable_verification: bool = False
    # Accept layers without a TOC digest label when the client set stargz.skipverify.
    allow_no_verification: bool = False
    # Seconds Prepare waits for a layer's daemon to be mounted and prefetched.
    mount_timeout: float = 30.0
    # Seconds prefetch of the landmark files may take before the layer is reported ready.
    prefetch_timeout: float = 10.0
    # Fetch the whole layer in the background after it is mounted.
    background_fetch: bool = True
    # Bytes per second for the background fetch; 0 means unlimited.
    background_rate: int = 0
    # Seconds without on-demand fetches (in any remote layer) before the background fetch
    # runs; it pauses again on the next on-demand fetch. 0 means it never waits.
    background_silence: float = 5.0
    # Chunks fetched ahead of a sequential reader.
    readahead_chunks: int = 4
    # A missing chunk is fetched together with the uncached chunks that follow it in the
    # layer blob, up to this many more compressed bytes in the same request; 0 disables.
    amplify_bytes: int = 128 << 10
    # Once two small files (compressed size at most dir_ahead_file_bytes) of one directory
    # have missed, fetch that directory's other small files in the background, up to this
    # many compressed bytes, nearest the miss first; 0 disables.
    dir_ahead_bytes: int = 4 << 20
    dir_ahead_file_bytes: int = 64 << 10
    # A file of at least this many bytes (and two chunks or more) read to its end is kept
    # whole in the cache, and later opens read that copy directly (FUSE passthrough where
    # the kernel offers it); 0 disables.
    whole_file_bytes: int = 8 << 20
    # Seconds the kernel may cache entries and attributes of a remote layer.
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    # The kernel's read-ahead window on a remote layer's FUSE mount, KiB (also the most a
    # read request to the daemon can carry, up to 1 MiB); 0 keeps the kernel's 128 KiB.
    read_ahead_kib: int = 4096
    # After answering a request, a FUSE daemon keeps polling its device this many
    # microseconds before it sleeps: a program walking or stat-ing a tree sends its next
    # request within a few tens of microseconds, sooner than a sleeping daemon wakes up;
    # 0 disables (see snapshotter.fs.fuse.session).
    fuse_spin_us: int = 50
    # Largest TOC accepted, bytes.
    max_toc_bytes: int = limits.MAX_TOC_BYTES
    # Most entries of one layer's TOC, the directories it implies included.
    max_toc_entries: int = limits.MAX_TOC_ENTRIES
    # Most directories a TOC may imply (parents it does not name) beyond its entries.
    max_implicit_dirs: int = limits.MAX_IMPLICIT_DIRS
    # serve checks each layer's TOC or bootstrap in a separate process with at most this
    # much address space (bytes; 0 = no limit) and this many seconds per layer: a layer
    # over them falls back (reason limit_exceeded) and serve goes on.
    check_memory_limit: int = 2 * GiB
    check_timeout: float = 20.0
    # On the Prepare of a layer, start fetching the footer and TOC of up to this many of
    # the image's following layers (named by the cri.image-layers / stargz.layers label),
    # so that their own Prepares, which containerd sends one after another, find them
    # fetched; 0 disables.
    toc_lookahead_layers: int = 8


@dataclass(frozen=True)
class DaemonConfig:
    """How FUSE daemons are run and supervised."""

    # "dedicated": one daemon process per remote snapshot; "shared": one for all.
    mode: str = DaemonMode.DEDICATED.value
    # Restarts of a dying daemon before it is given up (per 10 minutes).
    restart_limit: int = 5
    # First and largest delay between restarts, seconds.
    restart_backoff: float = 0.5
    restart_backoff_max: float = 30.0
    # Dedicated mode: fork daemons from a pre-imported template process (milliseconds)
    # instead of starting a Python process for each layer (about half a second).
    zygote: bool = True
    # Data memory (heap) of each FUSE daemon process, bytes (RLIMIT_DATA); 0 = no limit.
    # A layer whose index needs more fails in its own daemon, which keeps serving others.
    memory_limit: int = 2 * GiB


@dataclass(frozen=True)
class CacheConfig:
    """The on-disk chunk cache shared by all daemons."""

    # Directory; empty means <root>/cache.
    dir: str = ""
    # Size limit in bytes; least recently used chunks are evicted beyond it.
    limit_bytes: int = 10 * GiB


@dataclass(frozen=True)
class RegistryConfig:
    """How registries are reached."""

    # host -> mirror endpoints tried before the host, e.g. {"docker.io" = ["http://m:5000"]}.
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    # Hosts reached over plain HTTP (localhost and 127.0.0.1 always are).
    insecure: list[str] = field(default_factory=list)
    # Docker config.json with credentials; empty means /root/.docker/config.json.
    docker_config: str = ""
    # Seconds for one HTTP request, to connect, and for all retries of one call.
    request_timeout: float = 30.0
    connect_timeout: float = 5.0
    deadline: float = 60.0
    # Retries of one call after its first attempt.
    max_retries: int = 4
    # Concurrent requests per registry host.
    max_concurrency: int = 8
    # Send several byte ranges in one request (hosts that refuse get one range each).
    multi_range: bool = True
    # Ranges in one multi-range request.
    max_ranges_per_request: int = 16
    # Ranges closer than this many bytes are fetched as one.
    coalesce_gap: int = 65536
    # Largest single request, bytes; bigger ranges are split.
    max_request_bytes: int = 8 << 20


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    # host:port of /metrics; empty disables it.
    address: str = "127.0.0.1:9610"


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    version: int = CONFIG_VERSION
    root: str = "/var/lib/lazysnap"
    address: str = "/run/lazysnap/lazysnap.sock"
    log_level: str = "info"
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or str(Path(self.root) / "cache")

    @property
    def toc_dir(self) -> str:
        """Where the checked TOCs of mounted eStargz layers are kept for their daemons."""
        return str(Path(self.root) / "tocs")

    @property
    def activity_file(self) -> str:
        """The file through which daemons share on-demand activity (fs.activity)."""
        return str(Path(self.root) / "activity")

    def toc_limits(self) -> limits.TocLimits:
        """The parsing budgets of every eStargz TOC (serve's check and the daemons')."""
        remote = self.remote
        return limits.TocLimits(toc_bytes=remote.max_toc_bytes, entries=remote.max_toc_entries,
                                implicit_dirs=remote.max_implicit_dirs)

    def with_overrides(self, **flags: str | None) -> Config:
        """Return a copy with the top-level keys given (non-None) replaced."""
        changes: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
        unknown = set(changes) - {"root", "address", "log_level"}
        if unknown:
            raise ConfigError(f"cannot override {sorted(unknown)}")
        new = dataclasses.replace(self, **changes)
        _check(new)
        return new


T = TypeVar("T")


def load(path: str | Path | None) -> Config:
    """Load the configuration from ``path`` (None or a missing default file: defaults).

    Raises ConfigError when the file cannot be read or parsed, or is invalid.
    """
    if path is None:
        if not Path(DEFAULT_CONFIG_PATH).exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return parse(text, source=str(path))


def parse(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config; raise ConfigError naming the offending key."""
    import tomllib  # here: the daemons import this module for its defaults, not to parse

    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    config = _build(Config, table, prefix="")
    _check(config)
    return config


RETIRED_KEYS = {
    "daemon.start_timeout": "daemons are handed their control socket already listening, "
                            "so there is no start to wait for",
}
"""Keys older versions documented that mean nothing now: accepted with a warning, so
that an existing configuration file keeps loading."""


def _build(cls: type[T], table: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    retired = {k for k in table if f"{prefix}{k}" in RETIRED_KEYS}
    for key in sorted(retired):
        log.warning("configuration key %s%s is ignored: %s", prefix, key,
                    RETIRED_KEYS[f"{prefix}{key}"])
    table = {k: v for k, v in table.items() if k not in retired}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"unknown configuration key {prefix}{unknown[0]}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table")
            values[name] = _build(typing.cast(type, hint), value, prefix=f"{key}.")
        else:
            values[name] = _convert(hint, value, key)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be an array")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table")
        _, item = typing.get_args(hint)
        return {str(k): _convert(item, v, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - a bug


def _check(config: Config) -> None:
    if config.version != CONFIG_VERSION:
        raise ConfigError(f"version must be {CONFIG_VERSION}, not {config.version}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if config.daemon.mode not in DAEMON_MODES:
        raise ConfigError(f"daemon.mode must be one of {', '.join(DAEMON_MODES)}")
    if not config.root or not Path(config.root).is_absolute():
        raise ConfigError("root must be an absolute path")
    if not config.address or not Path(config.address).is_absolute():
        raise ConfigError("address must be an absolute socket path")
    for key, val in (
        ("remote.mount_timeout", config.remote.mount_timeout),
        ("remote.prefetch_timeout", config.remote.prefetch_timeout),
        ("remote.check_timeout", config.remote.check_timeout),
        ("remote.dir_ahead_file_bytes", config.remote.dir_ahead_file_bytes),
        ("daemon.restart_backoff", config.daemon.restart_backoff),
        ("registry.request_timeout", config.registry.request_timeout),
        ("registry.deadline", config.registry.deadline),
    ):
        if val <= 0:
            raise ConfigError(f"{key} must be positive")
    for key, ival in (
        ("cache.limit_bytes", config.cache.limit_bytes),
        ("remote.background_rate", config.remote.background_rate),
        ("remote.background_silence", config.remote.background_silence),
        ("remote.amplify_bytes", config.remote.amplify_bytes),
        ("remote.dir_ahead_bytes", config.remote.dir_ahead_bytes),
        ("remote.whole_file_bytes", config.remote.whole_file_bytes),
        ("remote.toc_lookahead_layers", config.remote.toc_lookahead_layers),
        ("remote.read_ahead_kib", config.remote.read_ahead_kib),
        ("remote.fuse_spin_us", config.remote.fuse_spin_us),
        ("daemon.restart_limit", config.daemon.restart_limit),
        ("daemon.memory_limit", config.daemon.memory_limit),
        ("remote.check_memory_limit", config.remote.check_memory_limit),
        ("remote.max_toc_bytes", config.remote.max_toc_bytes),
        ("remote.max_toc_entries", config.remote.max_toc_entries),
        ("remote.max_implicit_dirs", config.remote.max_implicit_dirs),
    ):
        if ival < 0:
            raise ConfigError(f"{key} must not be negative")


def to_toml(config: Config) -> str:
    """Render ``config`` as TOML that ``parse`` reads back to an equal Config."""
    lines: list[str] = []
    sections: list[tuple[str, Any]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, section in sections:
        lines.append(f"\n[{name}]")
        tables: list[tuple[str, dict[str, Any]]] = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, dict):
                tables.append((f.name, value))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for tname, tvalue in tables:
            lines.append(f"[{name}.{tname}]")
            lines.extend(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in tvalue.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot render {type(value).__name__} as TOML")
