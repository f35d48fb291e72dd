"""Image files on local disk, and the signed, expiring URLs that serve them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


@dataclass(frozen=True)
class SavedFile:
    path: str  # relative to the store's root
    size_bytes: int
    sha256: str


class FileStore:
    """Writes files atomically under ``root/<tenant>/``; readers never see a partial file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, *, tenant_id: str, file_id: str, content_type: str, data: bytes) -> SavedFile:
        """Write ``data`` and return where it went (blocking: call it in a thread)."""
        rel = f"{tenant_id}/{file_id}.{EXTENSIONS[content_type]}"
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        return SavedFile(rel, len(data), hashlib.sha256(data).hexdigest())

    def resolve(self, rel: str) -> Path:
        """The absolute path of a stored file."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("path escapes the file store")
        return path

    def delete(self, rel: str) -> None:
        """Remove a stored file if it exists (used to undo writes whose transaction failed)."""
        self.resolve(rel).unlink(missing_ok=True)


class UrlSigner:
    """HMAC-SHA256 over ``file_id`` and an expiry time; anyone holding the URL may fetch until it expires."""

    def __init__(self, key: bytes, *, ttl_seconds: int) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds

    def _signature(self, file_id: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{file_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(self, base_url: str, file_id: str, *, now: float | None = None) -> str:
        """A URL for ``file_id`` valid for ``ttl_seconds``."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        query = urlencode({"expires": expires, "signature": self._signature(file_id, expires)})
        return f"{base_url.rstrip('/')}/files/{file_id}?{query}"

    def verify(self, file_id: str, expires: int, signature: str, *, now: float | None = None) -> bool:
        """True when the signature matches and the URL has not expired."""
        if expires < (now if now is not None else time.time()):
            return False
        # Constant-time comparison, so response timing does not reveal how much of a forged signature matched.
        return hmac.compare_digest(self._signature(file_id, expires).encode(), signature.encode())
