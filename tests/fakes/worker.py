"""An instant stand-in for our own worker protocol (inference/worker.py): a canned image, no model.

For benchmarks that measure the gateway, not the model; tests that need real generation use the real worker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.server import ServerThread, make_image


def instant_worker_app(width: int = 64, height: int = 64) -> Starlette:
    """Answers every ``POST /generate`` at once with one canned PNG (whatever ``n`` asked for)."""
    image = base64.b64encode(make_image(width, height, "png")).decode()

    async def generate(request: Request) -> Response:
        job = json.loads(await request.body())
        body = {
            "images": [image] * int(job.get("n", 1)),
            "content_type": "image/png",
            "width": width,
            "height": height,
            "seed": job.get("seed", 0),
            "timings": {},
        }
        return Response(json.dumps(body), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status": "ok", "ready": true}', media_type="application/json")

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)])


def healthy_worker(generate: Callable[[Request], Awaitable[Response]]) -> ServerThread:
    """A worker that always reports healthy and answers ``POST /generate`` with ``generate`` (not started)."""

    async def health(request: Request) -> Response:
        return Response(b'{"status": "ok", "ready": true}', media_type="application/json")

    return ServerThread(Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)]))
