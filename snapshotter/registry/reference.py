"""Image references: ``[host[:port]/]repository[:tag][@digest]``, parsed and normalised.

Rules (containerd release/1.6 ``reference/docker/reference.go``, protocol-reference §7.1, §7.6):

* The first path component is a registry host when it contains ``.`` or ``:``, is
  ``localhost``, or is a bracketed IPv6 literal (``[::1]:5000``); otherwise the reference
  is a Docker Hub one.
* Docker Hub names (``docker.io``, ``index.docker.io``, ``registry-1.docker.io`` or no host
  at all) are served from the API host ``registry-1.docker.io``; a single-component Docker
  Hub repository gets the ``library/`` prefix (``ubuntu`` -> ``library/ubuntu``).
* The repository matches the distribution-spec ``<name>`` grammar (lower case); the tag
  matches ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``; a digest is ``sha256:`` followed by 64
  lower-case hex digits (the only algorithm lazysnap verifies).
* Without tag and digest the tag is ``latest``; with only a digest the tag stays ``None``.

Every malformed input raises :class:`snapshotter.errdefs.InvalidArgument`; nothing else
escapes from this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from snapshotter.errdefs import InvalidArgument

DOCKER_HUB_HOST = "registry-1.docker.io"
"""The API host serving every Docker Hub repository."""

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", DOCKER_HUB_HOST})
"""Host names that all mean Docker Hub."""

DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DNS_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(rf"(?:{_DNS_LABEL}(?:\.{_DNS_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
_MAX_NAME_LENGTH = 255
_MAX_REFERENCE_LENGTH = 4096


def is_digest(digest: object) -> bool:
    """Whether ``digest`` is ``sha256:`` + 64 lower-case hex digits."""
    return isinstance(digest, str) and _DIGEST_RE.fullmatch(digest) is not None


def validate_digest(digest: str) -> str:
    """Return ``digest`` unchanged if it is ``sha256:`` + 64 lower-case hex digits.

    Raises InvalidArgument otherwise (other algorithms are not supported).
    """
    if not is_digest(digest):
        raise InvalidArgument(f"invalid digest {_shorten(digest)!r}: want sha256:<64 hex>")
    return digest


def normalize_host(host: str) -> str:
    """Map a registry host name to the API host lazysnap talks to.

    Docker Hub aliases become ``registry-1.docker.io``; other names are lower-cased (host
    names are case-insensitive). Raises InvalidArgument for a malformed host.
    """
    if _HOST_RE.fullmatch(host) is None:
        raise InvalidArgument(f"invalid registry host {_shorten(host)!r}")
    lowered = host.lower()
    return DOCKER_HUB_HOST if lowered in DOCKER_HUB_ALIASES else lowered


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference.

    ``host`` is the API host (``registry-1.docker.io``, ``localhost:5000``, ``[::1]:5000``);
    ``repository`` the normalised repository name; at least one of ``tag``/``digest`` is set.
    """

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if normalize_host(self.host) != self.host:
            raise InvalidArgument(f"registry host {self.host!r} is not normalised")
        _check_repository(self.repository)
        if self.tag is not None and _TAG_RE.fullmatch(self.tag) is None:
            raise InvalidArgument(f"invalid tag {_shorten(self.tag)!r}")
        if self.digest is not None:
            validate_digest(self.digest)
        if self.tag is None and self.digest is None:
            raise InvalidArgument("a reference needs a tag or a digest")

    @property
    def object(self) -> str:
        """What to put after ``/manifests/``: the digest when known, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None  # guaranteed by __post_init__
        return self.tag

    @property
    def scope(self) -> str:
        """The token scope for pulling from this repository."""
        return f"repository:{self.repository}:pull"

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` (tag dropped). InvalidArgument if bad."""
        return replace(self, tag=None, digest=validate_digest(digest))

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``[host[:port]/]repository[:tag][@digest]``.

    Raises InvalidArgument with a message naming the offending part.
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument("empty image reference")
    if len(text) > _MAX_REFERENCE_LENGTH or text != text.strip():
        raise InvalidArgument(f"invalid image reference {_shorten(text)!r}")
    remainder, digest = _split_digest(text)
    remainder, tag = _split_tag(remainder)
    host, repository = _split_host(remainder)
    if host == DOCKER_HUB_HOST and "/" not in repository:
        repository = f"library/{repository}"
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host=host, repository=repository, tag=tag, digest=digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    remainder, digest = text.split("@", 1)
    return remainder, validate_digest(digest)


def _split_tag(text: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts the tag; one before it belongs to host:port.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon <= slash:
        return text, None
    tag = text[colon + 1 :]
    if _TAG_RE.fullmatch(tag) is None:
        raise InvalidArgument(f"invalid tag {_shorten(tag)!r} in image reference")
    return text[:colon], tag


def _split_host(text: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    looks_like_host = sep != "" and (
        "." in first or ":" in first or first == "localhost" or first[:1] == "["
    )
    if not looks_like_host:
        _check_repository(text)
        return DOCKER_HUB_HOST, text
    host = normalize_host(first)
    _check_repository(rest)
    return host, rest


def _check_repository(name: str) -> None:
    if len(name) > _MAX_NAME_LENGTH or _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid repository name {_shorten(name)!r}: want lower-case path components"
        )


def _shorten(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
