"""A local S3-compatible server (moto in server mode, on a loopback port) and throwaway buckets in it.

Example::

    with MotoS3() as s3:
        bucket = s3.bucket()  # a new, empty bucket
        settings = Settings(**bucket.settings(prefix="hdg/"))  # HDG_STORAGE=s3 pointed at it
        env = bucket.env(prefix="hdg/")  # the same, as HDG_* variables for a gateway process
        assert bucket.keys() == []
        bucket.remove()  # gone, as if someone deleted it (or a deploy named the wrong one)

It is a real HTTP server, so gateway processes started by a test reach it the same way they would reach MinIO.
``SilentServer`` is the opposite: an endpoint that accepts connections and never answers, as a hung store does.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from tests.fakes.server import free_port

ACCESS_KEY_ID = "moto-access-key"
SECRET_ACCESS_KEY = "moto-secret-key"
REGION = "us-east-1"


@dataclass
class Bucket:
    """One bucket on the server, with the settings that point the gateway at it."""

    name: str
    endpoint_url: str
    client: Any  # boto3's S3 client (its type is generated at run time)

    def settings(self, *, prefix: str = "") -> dict[str, Any]:
        """Keyword arguments for ``Settings`` that store images in this bucket."""
        return store_settings(self.name, self.endpoint_url, prefix=prefix)

    def env(self, *, prefix: str = "") -> dict[str, str]:
        """The same settings as ``HDG_*`` environment variables, for a gateway process."""
        return {f"HDG_{name.upper()}": str(value) for name, value in self.settings(prefix=prefix).items()}

    def keys(self) -> list[str]:
        """Every key in the bucket, sorted."""
        listed = self.client.list_objects_v2(Bucket=self.name)
        return sorted(obj["Key"] for obj in listed.get("Contents", []))

    def get(self, key: str) -> tuple[bytes, str]:
        """An object's bytes and Content-Type, read with boto3 (not with the code under test)."""
        obj = self.client.get_object(Bucket=self.name, Key=key)
        return obj["Body"].read(), obj["ContentType"]

    def remove(self) -> None:
        """Delete every object, then the bucket itself."""
        for key in self.keys():
            self.client.delete_object(Bucket=self.name, Key=key)
        self.client.delete_bucket(Bucket=self.name)


def store_settings(bucket: str, endpoint_url: str, *, prefix: str = "") -> dict[str, Any]:
    """Keyword arguments for ``Settings`` that store images in ``bucket`` at ``endpoint_url`` with moto's keys."""
    return {
        "storage": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": endpoint_url,
        "s3_region": REGION,
        "s3_access_key_id": ACCESS_KEY_ID,
        "s3_secret_access_key": SECRET_ACCESS_KEY,
        "s3_prefix": prefix,
    }


class MotoS3:
    """moto's S3 in server mode on a free loopback port, for as long as the context lasts."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        # werkzeug logs a line per request to stderr otherwise, which buries a failing test's own output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        self._client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )
        return self

    def stop(self) -> None:
        self._server.stop()

    def bucket(self) -> Bucket:
        """A new, empty bucket with a unique name (tests share one server, never a bucket)."""
        name = f"hdg-test-{secrets.token_hex(6)}"
        self._client.create_bucket(Bucket=name)
        return Bucket(name=name, endpoint_url=self.url, client=self._client)

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SilentServer:
    """A loopback TCP server that accepts every connection and never sends a byte: a store that hangs.

    Example::

        with SilentServer() as silent:
            settings = Settings(**silent.settings())  # requests to it wait until the client gives up
            assert silent.accepted == 0
    """

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)  # so the accept loop notices ``stop`` soon
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
        self._open: list[socket.socket] = []  # held, so the kernel never closes or resets them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, *, bucket: str = "hdg-silent") -> dict[str, Any]:
        """Keyword arguments for ``Settings`` that point the S3 store at this server."""
        return store_settings(bucket, self.url)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self._open.append(conn)
            self.accepted += 1

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._open:
            conn.close()
        self._sock.close()
