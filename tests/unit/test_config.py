"""The configuration loader: defaults, the example file, strictness, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.errdefs import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.toml.example"


def test_example_parses_to_exactly_the_defaults() -> None:
    assert config.load(EXAMPLE) == config.Config()


def test_example_documents_every_key() -> None:
    rendered = config.to_toml(config.Config())
    text = EXAMPLE.read_text()
    for line in rendered.splitlines():
        if "=" in line:
            key = line.split("=")[0].strip()
            assert f"\n{key} = " in text, f"{key} is not in config.toml.example"


def test_example_has_the_containerd_proxy_plugin_stanza() -> None:
    text = EXAMPLE.read_text()
    assert "[proxy_plugins.lazysnap]" in text
    assert 'type = "snapshot"' in text


def test_render_round_trips() -> None:
    cfg = config.parse('root = "/x"\n[registry.mirrors]\n"docker.io" = ["http://m:5000"]\n')
    assert config.parse(config.to_toml(cfg)) == cfg


def test_empty_file_is_the_defaults() -> None:
    assert config.parse("") == config.Config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown configuration key bogus"),
        ("[remote]\nbogus = 1", "unknown configuration key remote.bogus"),
        ("[nosuch]\nx = 1", "unknown configuration key nosuch"),
        ("log_level = 3", "log_level must be a string"),
        ('log_level = "loud"', "log_level must be one of"),
        ("version = 2", "version must be 1"),
        ('root = "relative"', "root must be an absolute path"),
        ("[remote]\nmount_timeout = 0", "remote.mount_timeout must be positive"),
        ("[remote]\nenabled = 1", "remote.enabled must be a boolean"),
        ("[cache]\nlimit_bytes = 1.5", "cache.limit_bytes must be an integer"),
        ('[daemon]\nmode = "both"', "daemon.mode must be one of"),
        ("[registry]\ninsecure = [1]", "registry.insecure[0] must be a string"),
        ("remote = 1", "remote must be a table"),
        ("x = [", "invalid TOML"),
    ],
)
def test_invalid_configuration_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        config.parse(text)


def test_flags_override_the_file() -> None:
    cfg = config.parse('root = "/a"\nlog_level = "error"').with_overrides(
        root="/b", address=None, log_level="debug")
    assert cfg.root == "/b" and cfg.log_level == "debug"
    assert cfg.address == config.Config().address


def test_cache_dir_defaults_below_root() -> None:
    assert config.parse('root = "/r"').cache_dir == "/r/cache"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "none.toml")


def test_a_retired_key_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """``daemon.start_timeout`` was documented and never read: files that set it still
    load, and the operator is told it means nothing."""
    from snapshotter.config import parse

    with caplog.at_level("WARNING"):
        cfg = parse("version = 1\n[daemon]\nstart_timeout = 20.0\nmode = \"shared\"\n")
    assert cfg.daemon.mode == "shared"
    assert "daemon.start_timeout is ignored" in caplog.text
