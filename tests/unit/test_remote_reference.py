"""Image reference parsing and normalisation (snapshotter.registry.reference)."""

from __future__ import annotations

import pytest

from snapshotter.errdefs import InvalidArgument
from snapshotter.registry.reference import (
    DOCKER_HUB_HOST,
    Reference,
    normalize_host,
    parse_reference,
    validate_digest,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("ubuntu", DOCKER_HUB_HOST, "library/ubuntu", "latest", None),
        ("ubuntu:22.04", DOCKER_HUB_HOST, "library/ubuntu", "22.04", None),
        ("docker.io/ubuntu", DOCKER_HUB_HOST, "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu", DOCKER_HUB_HOST, "library/ubuntu", "latest", None),
        ("registry-1.docker.io/foo/bar:v1", DOCKER_HUB_HOST, "foo/bar", "v1", None),
        ("foo/bar", DOCKER_HUB_HOST, "foo/bar", "latest", None),
        ("ghcr.io/org/app:1.0", "ghcr.io", "org/app", "1.0", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
        ("127.0.0.1:5000/app@" + DIGEST, "127.0.0.1:5000", "app", None, DIGEST),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
        ("Example.COM/app", "example.com", "app", "latest", None),
        ("ubuntu:22.04@" + DIGEST, DOCKER_HUB_HOST, "library/ubuntu", "22.04", DIGEST),
        ("my.reg/a_b__c-d.e/f:T_1.x-y", "my.reg", "a_b__c-d.e/f", "T_1.x-y", None),
    ],
)
def test_parse_reference_normalises(
    text: str, host: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ubuntu",
        "Ubuntu",
        "ubuntu:",
        "ubuntu@sha256:abc",
        "ubuntu@sha512:" + "ab" * 64,
        "ubuntu@sha256:" + "AB" * 32,
        "host.io/",
        "host.io//x",
        "host.io/x/",
        "a/-b",
        "x:" + "t" * 129,
        "host:99999999/x",
        "-host.io/x",
        "x" * 300,
    ],
)
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


def test_reference_properties_and_str() -> None:
    ref = parse_reference("localhost:5000/app:v1")
    assert ref.object == "v1"
    assert ref.scope == "repository:app:pull"
    assert str(ref) == "localhost:5000/app:v1"
    pinned = ref.with_digest(DIGEST)
    assert pinned.object == DIGEST and pinned.tag is None
    assert str(pinned) == f"localhost:5000/app@{DIGEST}"
    assert parse_reference(str(pinned)) == pinned


def test_reference_constructor_validates() -> None:
    with pytest.raises(InvalidArgument):
        Reference(host="docker.io", repository="library/x", tag="latest")
    with pytest.raises(InvalidArgument):
        Reference(host="ghcr.io", repository="x")
    with pytest.raises(InvalidArgument):
        Reference(host="ghcr.io", repository="x", digest="sha256:00")


def test_validate_digest() -> None:
    assert validate_digest(DIGEST) == DIGEST
    for bad in ("", "sha256:", DIGEST + "0", DIGEST.upper(), "md5:" + "a" * 32):
        with pytest.raises(InvalidArgument):
            validate_digest(bad)


def test_normalize_host() -> None:
    assert normalize_host("docker.io") == DOCKER_HUB_HOST
    assert normalize_host("INDEX.docker.io") == DOCKER_HUB_HOST
    assert normalize_host("Reg.Example:443") == "reg.example:443"
    with pytest.raises(InvalidArgument):
        normalize_host("bad host")
