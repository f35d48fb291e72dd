"""The self-hosted worker: an HTTP app around one GPU's runner (served by ``hidream-gateway worker`` and Modal).

Protocol (JSON over HTTP, ``Authorization: Bearer <token>`` when the worker has a token):

- ``GET /health`` -> ``{"status": "ok", "ready", "variants", "pending", "capacity", "load_error"}``
- ``POST /generate`` with the fields of ``WorkerRequest`` -> ``{"images": [base64...], "content_type",
  "width", "height", "seed", "timings"}``. 422: invalid input. 404: variant not served here.
  503 + Retry-After: queue full or model not loaded. 504: not done within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from collections.abc import Coroutine
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference.runner import MAX_SEED, GenerateParams, Generation
from inference.serving import GenerationQueue, NotLoaded, QueueFull
from inference.variants import RESOLUTIONS


class WorkerRequest(BaseModel):
    """One generation; sizes must already be one of HiDream's resolutions."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["full", "dev", "fast"]
    prompt: str = Field(min_length=1, max_length=20_000)
    width: int
    height: int
    seed: int = Field(ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=4)
    negative_prompt: str | None = Field(default=None, max_length=20_000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=100)
    guidance_scale: float | None = Field(default=None, ge=0, le=20)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=90, ge=0, le=100)
    timeout_s: float = Field(default=300, gt=0, le=3600)

    @model_validator(mode="after")
    def _supported_resolution(self) -> WorkerRequest:
        if (self.width, self.height) not in RESOLUTIONS:
            raise ValueError(f"{self.width}x{self.height} is not a HiDream resolution")
        return self

    def params(self) -> GenerateParams:
        return GenerateParams.of(**self.model_dump(exclude={"timeout_s"}))


def generation_body(gen: Generation) -> dict[str, Any]:
    """The JSON answer to ``POST /generate`` (also what the Modal method returns)."""
    return {
        "images": [base64.b64encode(img).decode() for img in gen.images],
        "content_type": gen.content_type,
        "width": gen.width,
        "height": gen.height,
        "seed": gen.seed,
        "timings": gen.timings,
    }


async def _unless_disconnected(work: Coroutine[Any, Any, Generation], request: Request) -> Generation:
    """Await ``work``, cancelling it if the client disconnects first (checked twice a second)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError
    finally:
        if not task.done():
            task.cancel()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_worker_app(queue: GenerationQueue, *, token: str | None, variants: frozenset[str]) -> FastAPI:
    """The worker app; ``queue`` is started here and closed when the app stops."""

    class Unauthorized(Exception):
        pass

    async def check_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized

    app = FastAPI(title="hidream-worker", dependencies=[Depends(check_token)])
    app.router.on_startup.append(queue.start)
    app.router.on_shutdown.append(queue.close)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_request: Any, _exc: Unauthorized) -> JSONResponse:
        return _error(401, "missing or wrong worker token")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        error = queue.load_error
        return {
            "status": "ok",
            "ready": queue.ready,
            "variants": sorted(variants),
            "pending": queue.pending,
            "capacity": queue.capacity,
            "load_error": str(error) if error else None,
        }

    @app.post("/generate", response_model=None)
    async def generate(body: WorkerRequest, request: Request) -> dict[str, Any] | JSONResponse:
        if body.variant not in variants:
            return _error(404, f"variant {body.variant!r} is not served by this worker")
        try:
            gen = await _unless_disconnected(queue.submit(body.params(), timeout=body.timeout_s), request)
        except asyncio.CancelledError:
            # The caller hung up (the gateway failed over): its job left the queue if it had not started.
            return _error(499, "the client went away")
        except QueueFull as exc:
            return _error(503, "busy", {"Retry-After": str(exc.retry_after)})
        except NotLoaded as exc:
            return _error(503, f"not available: {exc}", {"Retry-After": "30"})
        except TimeoutError:
            return _error(504, f"not done within {body.timeout_s:.0f} s")
        except ValueError as exc:  # the pipeline refused these parameters
            return _error(422, f"invalid parameters: {exc}")
        return generation_body(gen)

    return app
