"""Push an image (blobs, then the manifest) to an OCI distribution registry.

Blobs go up monolithically: ``HEAD`` (skip the blob when the registry has it), ``POST
/v2/<repo>/blobs/uploads/`` then ``PUT <location>&digest=<digest>`` with the bytes; the
manifest last with ``PUT /v2/<repo>/manifests/<tag>``, whose ``Docker-Content-Digest``
answer must equal the manifest's own digest. Plain HTTP is used for loopback hosts and
hosts listed in the ``[registry] insecure`` setting, HTTPS otherwise. A 401 is answered
once through ``remote.auth.Authenticator`` (Basic or Bearer token flow, credentials from
the docker config file when configured) with scope ``repository:<repo>:pull,push``.

``progress(n)`` is called with the bytes of each piece of a blob as it is sent.

Failure modes: ``RegistryAuthError`` (credentials refused or missing), ``RegistryError``
for any other refusal (status and body in the message), ``RegistryUnavailable`` when the
registry cannot be reached. No retries: a failed push can simply be run again (blobs
already uploaded are skipped).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urljoin

import aiohttp

from snapshotter.errdefs import RegistryAuthError, RegistryError, RegistryUnavailable
from snapshotter.formats.digests import sha256_digest
from snapshotter.registry.auth import Authenticator, CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.reference import Reference
from snapshotter.tools.convert.image import OCI_MANIFEST, NydusImage

PIECE = 1 << 20
Progress = Callable[[int], None]


class Pusher:
    """Pushes to one repository; use ``async with`` (it owns an aiohttp session)."""

    def __init__(self, ref: Reference, hosts: HostsConfig,
                 credentials: CredentialStore | None = None,
                 progress: Progress | None = None) -> None:
        self.ref = ref
        self.base = f"{'http' if hosts.plain_http(ref.host) else 'https'}://{ref.host}"
        self._progress = progress or (lambda n: None)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=hosts.connect_timeout,
                                          sock_read=hosts.request_timeout),
            trust_env=False)
        self._auth = Authenticator(credentials or CredentialStore(), self._token_fetch,
                                   plain_http_ok=hosts.plain_http)
        self._scope = f"repository:{ref.repository}:pull,push"

    async def __aenter__(self) -> Pusher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def _token_fetch(self, method: str, url: str, headers: Mapping[str, str],
                           form: Mapping[str, str] | None) -> tuple[int, bytes]:
        try:
            async with self._session.request(method, url, headers=dict(headers),
                                             data=dict(form) if form else None) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(f"token endpoint {url}: {exc}") from exc

    async def _request(self, method: str, url: str, *, ok: tuple[int, ...],
                       body: bytes | None = None,
                       headers: Mapping[str, str] | None = None,
                       track: bool = False) -> tuple[int, dict[str, str]]:
        """One request (retried once after a 401 with credentials); (status, headers).

        ``track``: send ``body`` in pieces, reporting each to the progress callback.
        """
        sent = await self._auth.authorization(self.ref.host, self._scope)
        for attempt in (1, 2):
            hdrs = dict(headers or {})
            if sent:
                hdrs["Authorization"] = sent
            payload: Any = self._pieces(body) if track and body is not None else body
            try:
                async with self._session.request(method, url, data=payload,
                                                 headers=hdrs) as resp:
                    text = await resp.read()
                    status, got = resp.status, {k.lower(): v for k, v in resp.headers.items()}
                    challenges = resp.headers.getall("WWW-Authenticate", [])
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RegistryUnavailable(f"{method} {url}: {exc}") from exc
            if status == 401 and attempt == 1:
                sent = await self._auth.on_unauthorized(self.ref.host, self._scope,
                                                        challenges, sent)
                continue
            if status == 401:
                raise RegistryAuthError(f"{method} {url}: credentials refused")
            if status not in ok:
                raise RegistryError(f"{method} {url}: HTTP {status}: "
                                    f"{text[:500].decode('utf-8', 'replace')}")
            return status, got
        raise RegistryAuthError(f"{method} {url}: unauthorized")  # not reached

    async def _pieces(self, data: bytes) -> AsyncIterator[bytes]:
        for off in range(0, len(data), PIECE):
            piece = data[off : off + PIECE]
            yield piece
            self._progress(len(piece))

    async def push_blob(self, data: bytes) -> str:
        """Upload ``data`` unless the registry has it; return its digest."""
        digest = sha256_digest(data)
        url = f"{self.base}/v2/{self.ref.repository}/blobs/{digest}"
        status, _ = await self._request("HEAD", url, ok=(200, 404))
        if status == 200:
            self._progress(len(data))
            return digest
        uploads = f"{self.base}/v2/{self.ref.repository}/blobs/uploads/"
        _, headers = await self._request("POST", uploads, ok=(202,), body=b"")
        location = headers.get("location")
        if not location:
            raise RegistryError(f"POST {uploads}: no Location header")
        target = urljoin(uploads, location)
        target += ("&" if "?" in target else "?") + f"digest={digest}"
        await self._request("PUT", target, ok=(201, 204), body=data, track=True, headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        return digest

    async def push_manifest(self, manifest: bytes, tag: str) -> str:
        """PUT the manifest under ``tag``; return its digest (checked against the answer)."""
        url = f"{self.base}/v2/{self.ref.repository}/manifests/{tag}"
        _, headers = await self._request("PUT", url, ok=(200, 201), body=manifest, headers={
            "Content-Type": OCI_MANIFEST, "Content-Length": str(len(manifest))})
        digest = sha256_digest(manifest)
        answered = headers.get("docker-content-digest")
        if answered not in (None, digest):
            raise RegistryError(f"registry stored the manifest as {answered}, not {digest}")
        return digest


async def push_image(image: NydusImage, ref: Reference, hosts: HostsConfig, *,
                     credentials: CredentialStore | None = None,
                     progress: Progress | None = None) -> str:
    """Push every layer, the config and the manifest under ``ref.tag`` (default
    ``latest``); return the manifest digest. Raises as described in the module docstring.
    """
    async with Pusher(ref, hosts, credentials, progress) as pusher:
        for layer in image.layers:
            await pusher.push_blob(layer.data)
        await pusher.push_blob(image.config)
        return await pusher.push_manifest(image.manifest, ref.tag or "latest")
