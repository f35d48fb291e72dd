"""Where images live (a local directory, or an S3-compatible bucket), and the signed URLs that serve them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from obstore.store import S3Config

    from gateway.settings import Settings

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
# One S3 request, upload or download, ends by then: an image is a few MB, so only a store that is not answering
# takes this long.
REQUEST_TIMEOUT = timedelta(seconds=10)
# Under this much time since its first try, a failed request is retried (a 503, a reset or refused connection come
# back fast); past it, it is not. So a request that timed out is never retried, and the longest any one operation
# takes is a retry begun just inside this window that then times out: about 15 s.
RETRY_WINDOW = timedelta(seconds=5)
# Listed by S3FileStore.check; tenant ids start with "ten_", so nothing is ever written under it.
PROBE_PREFIX = "readyz-probe"

log = logging.getLogger("hidream_gateway.storage")


@dataclass(frozen=True)
class SavedFile:
    path: str  # relative to the store (its root directory, or its bucket and prefix); kept in ``files.path``
    size_bytes: int
    sha256: str


class FileMissing(LookupError):
    """The store holds nothing at this path (deleted, or written to another replica's local directory)."""


class StorageUnavailable(GatewayError):
    """The store cannot be used now (no bucket, refused credentials, no answer): a 503, never a 404 or a 500."""

    status_code = 503
    error_type = "server_error"
    code = "storage_unavailable"

    def __init__(self, reason: str) -> None:
        # Clients are told only that storage is down; ``reason`` (logs, /readyz) says what an operator must fix.
        super().__init__("Image storage is unavailable; try again later.")
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message} ({self.reason})"


class FileStore(Protocol):
    """Where generated images are written, read back and removed; keys are store-relative paths.

    Every replica of a deployment must see the same files: a directory on one machine serves one process (or
    several sharing a disk), a bucket serves any number. A store that cannot be used at all (no bucket, no answer)
    raises StorageUnavailable from any method. Example::

        saved = await store.save(tenant_id="ten_1", file_id="file_1", content_type="image/png", data=png)
        assert await store.read(saved.path) == png
        await store.delete(saved.path)  # later reads raise FileMissing
        await store.aclose()
    """

    async def save(self, *, tenant_id: str, file_id: str, content_type: str, data: bytes) -> SavedFile:
        """Store ``data`` in full (a reader never sees part of it) and return where it went."""
        ...

    async def read(self, path: str) -> bytes:
        """The bytes at ``path``; FileMissing if there are none."""
        ...

    async def delete(self, path: str) -> None:
        """Remove ``path``; nothing to remove is fine."""
        ...

    async def check(self) -> None:
        """Cheaply confirm the store can take writes now; StorageUnavailable with the reason if not."""
        ...

    async def aclose(self) -> None:
        """Release what the store holds."""
        ...


def _key(tenant_id: str, file_id: str, content_type: str) -> str:
    return f"{tenant_id}/{file_id}.{EXTENSIONS[content_type]}"


def _saved(path: str, data: bytes) -> SavedFile:
    return SavedFile(path, len(data), hashlib.sha256(data).hexdigest())


class LocalFileStore:
    """Files under ``root/<tenant>/``, each written to a temporary name, fsynced and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._real_root = root.resolve()
        self._made: set[Path] = set()  # tenant directories known to exist (each write would stat them otherwise)

    def _resolve(self, path: str) -> Path:
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(self._real_root):
            self._real_root = self.root.resolve()  # the root itself may have moved (a symlink repointed since)
            if not resolved.is_relative_to(self._real_root):
                raise ValueError("path escapes the file store")
        return resolved

    def _write(self, path: str, data: bytes) -> SavedFile:
        dest = self._resolve(path)
        if dest.parent not in self._made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(dest.parent)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            fh = open(tmp, "wb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:  # its directory was removed since: make it again
            dest.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "wb")  # noqa: SIM115
        with fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)  # atomic: a reader finds no file or the whole file, never part of one
        return _saved(path, data)

    async def save(self, *, tenant_id: str, file_id: str, content_type: str, data: bytes) -> SavedFile:
        """Write ``data`` under the tenant's directory (in a thread: fsync and hashing block)."""
        return await asyncio.to_thread(self._write, _key(tenant_id, file_id, content_type), data)

    async def read(self, path: str) -> bytes:
        """The file's bytes; FileMissing if it is not on this machine's disk."""
        resolved = self._resolve(path)
        try:
            return await asyncio.to_thread(resolved.read_bytes)
        except FileNotFoundError:
            raise FileMissing(path) from None

    async def delete(self, path: str) -> None:
        """Remove the file if it exists (used to undo writes whose transaction failed)."""
        await asyncio.to_thread(self._resolve(path).unlink, missing_ok=True)

    def _check(self) -> None:
        try:
            # Saves create it anyway, so a fresh data dir is ready before its first image.
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create {self.root}: {exc.strerror or type(exc).__name__}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"{self.root} is not writable")

    async def check(self) -> None:
        """The directory exists (it is created if need be) and this process may write in it."""
        await asyncio.to_thread(self._check)

    async def aclose(self) -> None:
        """Nothing to release: every call opens and closes its own file."""


class S3FileStore:
    """Objects in an S3-compatible bucket at ``<prefix><tenant>/<file_id>.<ext>``, shared by every replica.

    The bucket can stay private: clients never see it, the gateway reads an object and answers its bytes.
    """

    def __init__(self, store: S3Store, *, prefix: str = "") -> None:
        self._store = store
        self.prefix = prefix.lstrip("/")  # a key starting with "/" is invalid to the store

    def _object(self, path: str) -> str:
        return f"{self.prefix}{path}"

    async def save(self, *, tenant_id: str, file_id: str, content_type: str, data: bytes) -> SavedFile:
        """Upload ``data`` in one PUT (S3 makes an object visible only once it is complete)."""
        path = _key(tenant_id, file_id, content_type)
        with _translated("save"):
            await obstore.put_async(self._store, self._object(path), data, attributes={"Content-Type": content_type})
        # Hashing a large image would hold the event loop.
        return await asyncio.to_thread(_saved, path, data)

    async def read(self, path: str) -> bytes:
        """The object's bytes; FileMissing if the bucket has no such key, StorageUnavailable if there is no bucket."""
        with _translated("read", missing=path):
            result = await obstore.get_async(self._store, self._object(path))
            return bytes(await result.bytes_async())

    async def delete(self, path: str) -> None:
        """Remove the object; S3 answers a delete of a missing key with success."""
        with _translated("delete"):
            await obstore.delete_async(self._store, self._object(path))

    async def check(self) -> None:
        """List a prefix nothing is stored under: one small request that fails as a save would (bucket, keys, network).

        It needs s3:ListBucket, which S3 also wants before it answers a read of a missing key with 404, not 403.
        """
        with _translated("check"):
            await obstore.list(self._store, self._object(PROBE_PREFIX), chunk_size=1).collect_async()

    async def aclose(self) -> None:
        """Nothing to release: the client's connection pool goes with the store object."""


def _reason(exc: Exception) -> str:
    """What went wrong, in a few words and without the request's URL: for /readyz and the logs."""
    text = str(exc)
    code = re.search(r"<Code>(\w+)</Code>", text)  # the S3 error code, when the store answered with one
    if code is not None:
        return "the bucket does not exist (NoSuchBucket)" if code[1] == "NoSuchBucket" else f"S3 error {code[1]}"
    if "kind: Timeout" in text:
        return f"no answer within {REQUEST_TIMEOUT.seconds} s"
    if "kind: Connect" in text:
        return "cannot connect to the endpoint"
    status = re.search(r"status: (\d{3})", text)
    return f"HTTP {status[1]}" if status is not None else type(exc).__name__


@contextmanager
def _translated(operation: str, *, missing: str | None = None) -> Iterator[None]:
    """obstore's errors as the store's: FileMissing for the key ``missing``, StorageUnavailable for the rest."""
    try:
        yield
    except (FileNotFoundError, NotFoundError) as exc:
        # A missing bucket is a 404 too: told apart by its code, it must not read as deleted files.
        if missing is not None and "NoSuchBucket" not in str(exc):
            raise FileMissing(missing) from None
        reason = _reason(exc)
        log.warning("image store %s failed: %s", operation, reason)
        raise StorageUnavailable(reason) from exc
    except (BaseError, OSError) as exc:
        reason = _reason(exc)
        log.warning("image store %s failed: %s", operation, reason)
        raise StorageUnavailable(reason) from exc


def s3_store(settings: Settings) -> S3Store:
    """An obstore client for the configured bucket; ValueError names the setting that is missing."""
    if not settings.s3_bucket:
        raise ValueError("HDG_STORAGE=s3 needs HDG_S3_BUCKET (the bucket images are written to)")
    options: S3Config = {"region": settings.s3_region}
    if settings.s3_endpoint_url:
        # MinIO, R2, Ceph and the like: addressed as <endpoint>/<bucket>/<key>, not as a bucket subdomain.
        options["endpoint"] = settings.s3_endpoint_url
        options["virtual_hosted_style_request"] = False
    if settings.s3_access_key_id is not None or settings.s3_secret_access_key is not None:
        if settings.s3_access_key_id is None or settings.s3_secret_access_key is None:
            missing = "HDG_S3_SECRET_ACCESS_KEY" if settings.s3_secret_access_key is None else "HDG_S3_ACCESS_KEY_ID"
            raise ValueError(f"an S3 access key needs its other half: set {missing} too")
        options["access_key_id"] = settings.s3_access_key_id.get_secret_value()
        options["secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    # Without keys, obstore finds credentials as AWS tools do (AWS_* variables, a web identity, instance roles).
    return S3Store(
        settings.s3_bucket,
        config=options,
        client_options={
            # Plain HTTP only when the endpoint itself says so (a server on the same host or network).
            "allow_http": (settings.s3_endpoint_url or "").startswith("http://"),
            "connect_timeout": timedelta(seconds=5),
            # The only bound on one request (retry_timeout only stops further tries): a store that accepts
            # connections and never answers fails the request, and the client waiting on it, after this long.
            "timeout": REQUEST_TIMEOUT,
        },
        # A request reading an image waits on this: a store that does not answer fails it in 10 s (see RETRY_WINDOW).
        retry_config={"max_retries": 3, "retry_timeout": RETRY_WINDOW},
    )


def build_file_store(settings: Settings) -> FileStore:
    """The store HDG_STORAGE names: the data dir's ``files/`` directory, or the S3 bucket."""
    if settings.storage == "s3":
        return S3FileStore(s3_store(settings), prefix=settings.s3_prefix)
    return LocalFileStore(settings.files_dir)


class UrlSigner:
    """HMAC-SHA256 over ``file_id`` and an expiry time; anyone holding the URL may fetch until it expires."""

    def __init__(self, key: bytes, *, ttl_seconds: int) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds

    def _signature(self, file_id: str, expires: int) -> str:
        mac = hmac.digest(self._key, f"{file_id}.{expires}".encode(), "sha256")  # OpenSSL's one-shot HMAC
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(self, base_url: str, file_id: str, *, now: float | None = None) -> str:
        """A URL for ``file_id`` valid for ``ttl_seconds``."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        # Nothing to escape: an integer and unpadded URL-safe base64 (``file_id`` is the gateway's own id).
        return f"{base_url.rstrip('/')}/files/{file_id}?expires={expires}&signature={self._signature(file_id, expires)}"

    def verify(self, file_id: str, expires: int, signature: str, *, now: float | None = None) -> bool:
        """True when the signature matches and the URL has not expired."""
        if expires < (now if now is not None else time.time()):
            return False
        # Constant-time comparison, so response timing does not reveal how much of a forged signature matched.
        return hmac.compare_digest(self._signature(file_id, expires).encode(), signature.encode())
