"""The registry client: manifests, blob sizes and byte ranges over the OCI distribution API.

Every operation (protocol-reference §7):

* is tried against the host's mirrors in order, then the origin; any ``RegistryError`` (or
  digest mismatch) from a mirror falls through to the next endpoint, while the origin's
  error is final for that attempt;
* runs under the client's :class:`~snapshotter.registry.retry.RetryPolicy` (retries on
  connection errors, timeouts, 408/429/5xx; overall deadline), holding one of the
  ``max_concurrency`` slots of the registry host;
* maps statuses to typed errors: 404 from the origin -> ``BlobNotFound``, 401/403 ->
  ``RegistryAuthError``, 416 -> ``RangeNotSatisfiable``, exhausted retries ->
  ``RegistryUnavailable`` / ``RegistryTimeout``.

Blob reads follow redirects to storage without forwarding ``Authorization``; the storage
URL is cached per blob and re-resolved through the registry once when storage answers
401/403/404/410 (expired signed URLs). Range reads coalesce and split the requested ranges
(:mod:`snapshotter.registry.ranges`), send several ranges per request while the host answers
``multipart/byteranges``, and fall back to one range per request for good (per host) when
it does not. ``Accept-Encoding: identity`` is always sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from yarl import URL

from snapshotter.errdefs import (
    BlobNotFound,
    DigestMismatch,
    FormatError,
    InvalidArgument,
    LazysnapError,
    RangeNotSatisfiable,
    RegistryError,
)
from snapshotter.registry import ranges as rng
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.fetcher import RegistryBlobFetcher
from snapshotter.registry.hosts import Endpoint, HostsConfig
from snapshotter.registry.platforms import Platform, current_platform, select_manifest
from snapshotter.registry.reference import (
    DOCKER_HUB_HOST,
    Reference,
    parse_reference,
    validate_digest,
)
from snapshotter.registry.retry import RetryPolicy, error_for_status
from snapshotter.registry.transport import (
    HttpResponse,
    RegistryStats,
    SessionFactory,
    Transport,
)

__all__ = ["RegistryBlobFetcher", "RegistryClient", "RegistryStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])
"""The Accept header containerd 1.6 sends for manifests."""

MAX_MANIFEST_BYTES = 4 << 20
MULTIPART_OVERHEAD = 512  # bytes per part allowed for part headers when reading a multipart body
MAX_CACHED_LOCATIONS = 4096
_STALE_LOCATION = frozenset({401, 403, 404, 410})
_MULTI_REFUSED = frozenset({200, 400, 413, 416, 501})


class RegistryClient:
    """Reads manifests and blobs from OCI registries; see the module docstring.

    ``session_factory`` makes the aiohttp session (called lazily, inside the event loop);
    ``credentials`` defaults to the docker config named by ``hosts.docker_config``
    (ConfigError if that file is malformed); ``retry`` defaults to ``hosts.max_retries``
    retries within ``hosts.deadline`` seconds; ``clock`` drives token expiry. ``stats``
    holds the counters. Ranges are half-open ``(start, end)`` pairs.
    """

    def __init__(
        self,
        hosts: HostsConfig,
        *,
        session_factory: SessionFactory | None = None,
        credentials: CredentialStore | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] | None = None,
        stats: RegistryStats | None = None,
    ) -> None:
        self.hosts = hosts
        self.stats = stats if stats is not None else RegistryStats()
        if credentials is None:
            credentials = CredentialStore.from_docker_config(hosts.docker_config)
        self._transport = Transport(
            hosts, credentials, self.stats, session_factory=session_factory, clock=clock
        )
        self._retry = retry or RetryPolicy(
            max_attempts=hosts.max_retries + 1, deadline=hosts.deadline
        )
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._single_range_hosts: set[str] = set()
        self._locations: dict[tuple[str, str, str], URL] = {}

    def __repr__(self) -> str:
        return f"RegistryClient(single_range_hosts={sorted(self._single_range_hosts)})"

    async def aclose(self) -> None:
        """Close connections; idempotent. Later calls raise FailedPrecondition."""
        await self._transport.aclose()

    def multi_range_enabled(self, host: str) -> bool:
        """Whether multi-range requests are still sent to registry ``host``."""
        return self.hosts.multi_range and host not in self._single_range_hosts

    # --- manifests -----------------------------------------------------------------------

    async def get_manifest(
        self, ref: Reference | str, platform: Platform | None = None
    ) -> tuple[str, str, bytes]:
        """``(media_type, digest, body)`` of the image manifest ``ref`` names.

        An index or manifest list is resolved to the entry for ``platform`` (default: this
        machine, Linux) and that manifest is fetched by digest. Raises DigestMismatch when
        the body does not hash to the pinned digest or ``Docker-Content-Digest``;
        NotFound when no index entry matches; FormatError for a malformed index; the
        registry errors of the module docstring.
        """
        ref = _as_reference(ref)
        media_type, digest, body = await self._manifest(ref)
        if media_type not in INDEX_MEDIA_TYPES:
            return media_type, digest, body
        entry = select_manifest(_json_object(body, "image index"), platform or current_platform())
        try:
            child = ref.with_digest(str(entry["digest"]))
        except InvalidArgument as exc:
            raise FormatError(f"image index entry: {exc}") from None
        media_type, digest, body = await self._manifest(child)
        if media_type in INDEX_MEDIA_TYPES:
            raise FormatError(f"{child}: an index entry points at another index")
        return media_type, digest, body

    async def _manifest(self, ref: Reference) -> tuple[str, str, bytes]:
        what = f"manifest {ref}"

        async def op(endpoint: Endpoint) -> tuple[str, str, bytes]:
            resp = await self._transport.registry_request(
                "manifest",
                "GET",
                endpoint,
                ref.repository,
                f"manifests/{ref.object}",
                {"Accept": MANIFEST_ACCEPT},
                lambda *_: MAX_MANIFEST_BYTES + 1,
                namespace=_namespace(ref),
            )
            if resp.status != 200:
                raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))
            return _verified_manifest(ref, resp, what)

        return await self._call(ref, what, op)

    # --- blobs ---------------------------------------------------------------------------

    async def blob_size(self, ref: Reference | str, digest: str) -> int:
        """The size of blob ``digest`` in ``ref``'s repository, in bytes.

        Uses HEAD's Content-Length; when HEAD is refused (some redirected storage does) or
        has no length, GET ``Range: bytes=0-1`` and reads the total of Content-Range.
        """
        ref = _as_reference(ref)
        validate_digest(digest)
        what = f"size of blob {digest} in {ref.host}/{ref.repository}"

        async def op(endpoint: Endpoint) -> int:
            resp = await self._blob_request(
                endpoint, ref, digest, "blob_head", "HEAD", {}, _no_body
            )
            length = _content_length(resp)
            if resp.status == 200 and length is not None:
                return length
            if resp.status == 404 and not resp.redirected:
                raise BlobNotFound(f"{what}: HTTP 404")
            if resp.status in (408, 429) or resp.status >= 500:
                raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))
            return await self._size_by_get(endpoint, ref, digest, what)

        return await self._call(ref, what, op)

    async def fetch_tail(
        self, ref: Reference | str, digest: str, length: int
    ) -> tuple[int, bytes] | None:
        """The blob's size and its last ``min(length, size)`` bytes in one request
        (``Range: bytes=-<length>``); None when the host does not answer a suffix range
        with a usable 206, so that the caller asks for the size and the range itself.

        Raises the registry errors of the module docstring (404: BlobNotFound).
        """
        ref = _as_reference(ref)
        validate_digest(digest)
        if length <= 0:
            raise InvalidArgument(f"tail length must be positive, got {length}")
        what = f"last {length} bytes of blob {digest} in {ref.host}/{ref.repository}"
        headers = {"Range": f"bytes=-{length}"}

        def limit(status: int, _: Mapping[str, str]) -> int:
            return length if status == 206 else 0

        async def op(endpoint: Endpoint) -> tuple[int, bytes] | None:
            resp = await self._blob_request(
                endpoint, ref, digest, "blob_range", "GET", headers, limit
            )
            if resp.status != 206:
                if resp.status in (200, 416) or (resp.status == 404 and resp.redirected):
                    return None  # suffix ranges not understood: the caller falls back
                raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))
            try:
                cr = rng.parse_content_range(resp.headers.get("Content-Range", ""))
            except rng.RangeFormatError:
                return None
            if (cr.range is None or cr.total is None or cr.range[1] != cr.total
                    or cr.range[1] - cr.range[0] != len(resp.body)):
                return None  # not the tail we asked for
            return cr.total, resp.body

        return await self._call(ref, what, op)

    async def _size_by_get(self, endpoint: Endpoint, ref: Reference, digest: str, what: str) -> int:
        headers = {"Range": "bytes=0-1"}
        resp = await self._blob_request(
            endpoint, ref, digest, "blob_range", "GET", headers, _no_body
        )
        if resp.status == 206:
            content_range = rng.parse_content_range(resp.headers.get("Content-Range", ""))
            if content_range.total is not None:
                return content_range.total
        length = _content_length(resp)
        if resp.status == 200 and length is not None:
            return length
        if resp.status in (200, 206):
            raise RegistryError(f"{what}: the answer carries no size")
        raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))

    async def fetch_ranges(
        self, ref: Reference | str, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """The bytes of each half-open range of blob ``digest``, in request order.

        Empty ranges give ``b""``. Raises InvalidArgument for malformed ranges,
        RangeNotSatisfiable when a range lies past the end of the blob, and the registry
        errors of the module docstring.
        """
        ref = _as_reference(ref)
        validate_digest(digest)
        requested = list(ranges)
        rng.check_ranges(requested)
        pieces = rng.plan(
            requested, gap=self.hosts.coalesce_gap, max_size=self.hosts.max_request_bytes
        )
        if not pieces:
            return [b"" for _ in requested]
        batches = self._batches(ref.host, pieces)
        fetched = await _gather([self._fetch_batch(ref, digest, batch) for batch in batches])
        return rng.extract(requested, [part for parts in fetched for part in parts])

    def _batches(self, host: str, pieces: list[rng.Range]) -> list[list[rng.Range]]:
        """Group pieces into multi-range requests (count and byte bounded), or singles."""
        if not self.multi_range_enabled(host):
            return [[piece] for piece in pieces]
        batches: list[list[rng.Range]] = []
        current: list[rng.Range] = []
        size = 0
        for piece in pieces:
            length = piece[1] - piece[0]
            full = len(current) >= self.hosts.max_ranges_per_request
            if current and (full or size + length > self.hosts.max_request_bytes):
                batches.append(current)
                current, size = [], 0
            current.append(piece)
            size += length
        batches.append(current)
        return batches

    async def _fetch_batch(
        self, ref: Reference, digest: str, batch: list[rng.Range]
    ) -> list[tuple[rng.Range, bytes]]:
        if len(batch) > 1 and self.multi_range_enabled(ref.host):
            parts = await self._fetch_multi(ref, digest, batch)
            if parts is not None:
                return parts
            if ref.host not in self._single_range_hosts:
                self._single_range_hosts.add(ref.host)
                self.stats.multi_range_fallbacks += 1
                log.info("%s does not serve multi-range requests; using single ranges", ref.host)
        datas = await _gather([self._fetch_single(ref, digest, piece) for piece in batch])
        return list(zip(batch, datas, strict=True))

    async def _fetch_single(self, ref: Reference, digest: str, piece: rng.Range) -> bytes:
        start, end = piece
        what = f"bytes [{start}, {end}) of blob {digest} in {ref.host}/{ref.repository}"
        headers = {"Range": rng.format_range_header([piece])}

        def limit(status: int, response_headers: Mapping[str, str]) -> int:
            if status != 206:
                return end  # a 200 carries the whole blob: read the prefix we need
            try:
                content_range = rng.parse_content_range(response_headers.get("Content-Range", ""))
            except rng.RangeFormatError:
                return end - start
            first = content_range.range[0] if content_range.range else start
            return max(0, end - first)

        async def op(endpoint: Endpoint) -> bytes:
            resp = await self._blob_request(
                endpoint, ref, digest, "blob_range", "GET", headers, limit
            )
            return _single_range_data(resp, piece, what)

        return await self._call(ref, what, op)

    async def _fetch_multi(
        self, ref: Reference, digest: str, batch: list[rng.Range]
    ) -> list[tuple[rng.Range, bytes]] | None:
        """One multi-range request; None when the answer shows the host cannot do them."""
        what = f"{len(batch)} ranges of blob {digest} in {ref.host}/{ref.repository}"
        headers = {"Range": rng.format_range_header(batch)}
        budget = rng.total(batch) + MULTIPART_OVERHEAD * len(batch) + 4096

        def limit(status: int, _: Mapping[str, str]) -> int:
            return budget if status == 206 else 0

        async def op(endpoint: Endpoint) -> list[tuple[rng.Range, bytes]] | None:
            resp = await self._blob_request(
                endpoint, ref, digest, "blob_multirange", "GET", headers, limit
            )
            if resp.status in _MULTI_REFUSED:
                return None
            if resp.status != 206:
                raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))
            return _multi_range_parts(resp, batch)

        return await self._call(ref, what, op)

    async def _blob_request(
        self,
        endpoint: Endpoint,
        ref: Reference,
        digest: str,
        kind: str,
        method: str,
        headers: Mapping[str, str],
        body_limit: Callable[[int, Mapping[str, str]], int],
    ) -> HttpResponse:
        """A blob request, straight to the cached storage URL when there is one."""
        key = (endpoint.base_url, ref.repository, digest)
        cached = self._locations.get(key) if method == "GET" else None
        if cached is not None:
            resp = await self._transport.send(kind, method, cached, headers, body_limit)
            if resp.status not in _STALE_LOCATION:
                return resp
            # A signed URL expired or storage lost track: ask the registry once more.
            self._locations.pop(key, None)
            self.stats.redirect_reresolves += 1
        resp = await self._transport.registry_request(
            kind,
            method,
            endpoint,
            ref.repository,
            f"blobs/{digest}",
            headers,
            body_limit,
            namespace=_namespace(ref),
        )
        if resp.redirected and method == "GET" and 200 <= resp.status < 300:
            if len(self._locations) >= MAX_CACHED_LOCATIONS:
                self._locations.pop(next(iter(self._locations)))
            self._locations[key] = resp.url
        return resp

    def open_blob(
        self, ref: Reference | str, digest: str, size: int | None = None
    ) -> RegistryBlobFetcher:
        """A BlobFetcher for one blob; ``size`` (if known from a descriptor) seeds its cache.

        Raises InvalidArgument for a malformed reference or digest. The fetcher does not
        own the client: closing it leaves the client open.
        """
        return RegistryBlobFetcher(self, _as_reference(ref), validate_digest(digest), size)

    # --- plumbing --------------------------------------------------------------------------

    async def _call(self, ref: Reference, what: str, op: Callable[[Endpoint], Awaitable[T]]) -> T:
        """Run ``op`` over the endpoints of ``ref.host`` under the retry policy and a slot."""
        endpoints = self.hosts.endpoints(ref.host)

        async def attempt() -> T:
            for endpoint in endpoints[:-1]:
                try:
                    return await op(endpoint)
                except (RegistryError, DigestMismatch) as exc:
                    self.stats.mirror_fallbacks += 1
                    log.debug("%s: mirror %s failed (%s)", what, endpoint.base_url, exc)
            return await op(endpoints[-1])

        async with self._slot(ref.host):
            try:
                return await self._retry.run(attempt, what=what, on_retry=self._on_retry)
            except LazysnapError as exc:
                self.stats.count_error(exc)
                raise

    def _slot(self, host: str) -> asyncio.Semaphore:
        slot = self._slots.get(host)
        if slot is None:
            slot = self._slots[host] = asyncio.Semaphore(self.hosts.max_concurrency)
        return slot

    def _on_retry(self, _: RegistryError) -> None:
        self.stats.retries += 1


# --- helpers ---------------------------------------------------------------------------------


def _as_reference(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


def _namespace(ref: Reference) -> str:
    """The ``ns`` query value for mirrors (containerd sends ``docker.io`` for Hub)."""
    return "docker.io" if ref.host == DOCKER_HUB_HOST else ref.host


def _no_body(*_: object) -> int:
    return 0


def _content_length(resp: HttpResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise FormatError(f"{what} is not a JSON object")
    return document


def _verified_manifest(ref: Reference, resp: HttpResponse, what: str) -> tuple[str, str, bytes]:
    """Check size and digests of a manifest answer; return (media type, digest, body)."""
    body = resp.body
    if len(body) > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{what}: larger than {MAX_MANIFEST_BYTES} bytes")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise DigestMismatch(f"{what}: the body hashes to {digest}")
    advertised = resp.headers.get("Docker-Content-Digest", "").strip()
    if advertised.startswith("sha256:") and advertised != digest:
        raise DigestMismatch(f"{what}: Docker-Content-Digest {advertised} but body is {digest}")
    media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type not in INDEX_MEDIA_TYPES | {OCI_MANIFEST, DOCKER_MANIFEST}:
        declared = _declared_media_type(body)
        media_type = declared or media_type
    return media_type, digest, body


def _declared_media_type(body: bytes) -> str | None:
    """The ``mediaType`` field of a manifest body, guessing OCI types when it is absent."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("layers"), list):
        return OCI_MANIFEST
    return None


def _single_range_data(resp: HttpResponse, piece: rng.Range, what: str) -> bytes:
    """The bytes of ``piece`` from a 206 (Content-Range) or 200 (whole blob) answer."""
    _, end = piece
    if resp.status == 200:
        total_size = _content_length(resp)
        if len(resp.body) < end and total_size is not None and total_size < end:
            raise RangeNotSatisfiable(f"{what}: the blob has only {total_size} bytes")
        first = 0
    elif resp.status == 206:
        header = resp.headers.get("Content-Range")
        if header is None:
            raise rng.RangeFormatError(f"{what}: 206 without Content-Range")
        content_range = rng.parse_content_range(header)
        if content_range.range is None:
            raise rng.RangeFormatError(f"{what}: 206 without a concrete range")
        first = content_range.range[0]
        if content_range.total is not None and content_range.total < end:
            raise RangeNotSatisfiable(f"{what}: the blob has only {content_range.total} bytes")
    else:
        raise error_for_status(resp.status, what, resp.headers.get("Retry-After"))
    held = (first, first + len(resp.body))
    return rng.extract([piece], [(held, resp.body)])[0]


def _multi_range_parts(
    resp: HttpResponse, batch: list[rng.Range]
) -> list[tuple[rng.Range, bytes]] | None:
    """Parts of a 206 multi-range answer covering ``batch``, or None if unusable."""
    content_type = resp.headers.get("Content-Type", "")
    try:
        if content_type.strip().lower().startswith("multipart/byteranges"):
            parts = rng.parse_multipart_byteranges(resp.body, rng.multipart_boundary(content_type))
        else:
            # The server merged the ranges into one (allowed by RFC 9110).
            content_range = rng.parse_content_range(resp.headers.get("Content-Range", ""))
            if content_range.range is None:
                return None
            first = content_range.range[0]
            parts = [((first, first + len(resp.body)), resp.body)]
        rng.extract(batch, parts)
    except rng.RangeFormatError:
        return None
    return parts


async def _gather(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently; on failure cancel the rest and raise the first error."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failures:
        failure = _first_error(failures)
    if failure is not None:
        raise failure  # outside the handler, so the group does not become its context
    return [task.result() for task in tasks]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    typed = [e for e in leaves if isinstance(e, LazysnapError)]
    return (typed or leaves)[0]
