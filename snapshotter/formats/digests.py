"""Content digests as OCI writes them."""

from __future__ import annotations

import hashlib


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
