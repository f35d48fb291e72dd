"""Running an ASGI app on a real loopback port in a thread, and the fault knobs every fake shares."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from PIL import Image


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerThread:
    """Runs an ASGI app under uvicorn on a loopback port, in a background thread.

    ``port`` stays the same across ``stop()`` and ``start()``, so a fake can go down and come back. ``tls``: a
    certificate file and its key file, to serve HTTPS instead.
    """

    def __init__(self, app: Any, port: int = 0, *, tls: tuple[str, str] | None = None) -> None:
        self.app = app
        self.port = port
        self.tls = tls
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port, self.sock = sock.getsockname()[1], sock
        # Idle connections are kept longer than httpx's pool keeps them (5 s), as real providers and CDNs do:
        # with equal timeouts, a request sent on a connection the server is closing that moment is reset.
        certs = {"ssl_certfile": self.tls[0], "ssl_keyfile": self.tls[1]} if self.tls else {}
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_keep_alive=75, **certs)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)
        if self.sock is not None:
            self.sock.close()
        self.server = self.thread = self.sock = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Faults:
    """What a fake should get wrong. Tests flip these at any time; they apply to the next request.

    - ``latency_s``: added before every API response.
    - ``error_rate``: share of API requests answered 500 (0.0 to 1.0).
    - ``throttle``: answer API requests 429 with ``Retry-After: retry_after_s``.
    - ``hang``: accept API requests and never answer (until the fake stops or hang is cleared).
    - ``malformed``: answer API requests 200 with a body that is not JSON.
    - ``output_404``: output image URLs answer 404.
    - ``fail_jobs``: jobs end in the provider's failed state (a model error, not an HTTP error).
    - ``processing_s``: how long a job takes from creation to success.
    - ``error_text``: the provider's words in the errors the two above make (None: its usual ones).
    """

    latency_s: float = 0.0
    error_rate: float = 0.0
    throttle: bool = False
    retry_after_s: int = 1
    hang: bool = False
    malformed: bool = False
    output_404: bool = False
    fail_jobs: bool = False
    processing_s: float = 0.0
    error_text: str | None = None

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def hang_while_set(self) -> None:
        while self.hang:  # noqa: ASYNC110 (a plain flag flipped by the test thread)
            await asyncio.sleep(0.05)

    def roll_error(self) -> bool:
        return self.error_rate > 0 and random.random() < self.error_rate


def make_image(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A real, decodable image of the given size: a seeded colour gradient (PNG, JPEG or WebP)."""
    rng = random.Random(seed)
    base = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (width, height), base), 0.5)
    buf = io.BytesIO()
    pil_format = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    img.save(buf, format=pil_format)
    return buf.getvalue()
