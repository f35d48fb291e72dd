"""A fake of fal.ai's queue API for the HiDream-I1 endpoints, served over real HTTP (see shared/specs/fal-queue.md).

Example::

    with FakeFal(key="id:secret") as fal:
        fal.faults.processing_s = 0.5
        httpx.post(f"{fal.url}/fal-ai/hidream-i1-fast", json={"prompt": "a fox"},
                   headers={"Authorization": "Key id:secret"})

``url`` stands in for ``https://queue.fal.run``. Image URLs in results point back at the fake (``/files/...``).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from tests.fakes.server import Faults, ServerThread, make_image

Preset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
PRESET_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


class ImageSize(BaseModel):
    """fal's shared ImageSize object; each side is capped at 14142 as in fal's published schemas."""

    width: int = Field(512, gt=0, le=14142)
    height: int = Field(512, gt=0, le=14142)


class DevInput(BaseModel):
    """Input of ``fal-ai/hidream-i1-dev``. Unknown fields are ignored, as fal's pydantic apps do."""

    prompt: str
    negative_prompt: str = ""
    image_size: ImageSize | Preset = "square_hd"
    num_inference_steps: int = Field(28, ge=1, le=50)
    seed: int | None = None
    num_images: int = Field(1, ge=1, le=4)
    sync_mode: bool = False
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png"] = "jpeg"

    def size(self) -> tuple[int, int]:
        if isinstance(self.image_size, ImageSize):
            return self.image_size.width, self.image_size.height
        return PRESET_SIZES[self.image_size]


class FastInput(DevInput):
    """Input of ``fal-ai/hidream-i1-fast``: dev's fields with fewer default steps."""

    num_inference_steps: int = Field(16, ge=1, le=50)


class LoraWeight(BaseModel):
    path: str
    scale: float = 1.0
    weight_name: str | None = None


class FullInput(DevInput):
    """Input of ``fal-ai/hidream-i1-full``: the only variant with guidance_scale and loras."""

    num_inference_steps: int = Field(50, ge=1, le=50)
    guidance_scale: float = Field(5.0, ge=0, le=20)
    loras: list[LoraWeight] = Field(default_factory=list)


APPS: dict[str, type[DevInput]] = {
    "fal-ai/hidream-i1-full": FullInput,
    "fal-ai/hidream-i1-dev": DevInput,
    "fal-ai/hidream-i1-fast": FastInput,
}
RUNNER_ERROR = "runner_server_error"


@dataclass
class _Job:
    """One queued request. Its timeline and fate are fixed at submit time, so later fault flips do not rewrite it."""

    request_id: str
    app_id: str
    input: DevInput
    seed: int
    processing_s: float
    fail: bool
    error_text: str | None = None  # what its failure says, when faults.error_text set one
    created: float = field(default_factory=time.monotonic)
    created_wall: float = field(default_factory=time.time)
    cancelled: bool = False

    def phase(self, now: float) -> str:
        """IN_QUEUE for the first third of processing_s, then IN_PROGRESS, then COMPLETED (at once if cancelled)."""
        elapsed = now - self.created
        if self.cancelled or elapsed >= self.processing_s:
            return "COMPLETED"
        return "IN_QUEUE" if elapsed < self.processing_s / 3 else "IN_PROGRESS"

    def error(self) -> tuple[str, str] | None:
        """(error, error_type) that a finished job carries in its status, or None on success."""
        if self.cancelled:
            return "Request was cancelled", "request_cancelled"
        if self.fail:
            return self.error_text or "Model inference failed: the runner crashed while generating", RUNNER_ERROR
        return None

    def inference_s(self) -> float:
        return round(self.processing_s * 2 / 3, 3)

    def logs(self, phase: str) -> list[dict[str, str]]:
        """Runner log lines so far, stamped when each happened."""

        def line(offset_s: float, message: str) -> dict[str, str]:
            stamp = datetime.fromtimestamp(self.created_wall + offset_s, UTC).isoformat()
            return {"message": message, "level": "INFO", "source": "user", "timestamp": stamp}

        lines = []
        if phase in ("IN_PROGRESS", "COMPLETED") and not self.cancelled:
            lines.append(line(self.processing_s / 3, f"Generating {self.input.num_images} image(s)"))
        if phase == "COMPLETED" and self.error() is None:
            lines.append(line(self.processing_s, "Done"))
        return lines


def _error(status: int, detail: str, error_type: str) -> JSONResponse:
    """fal's request-level error: JSON detail plus error_type in the body and the X-Fal-Error-Type header."""
    body = {"detail": detail, "error_type": error_type}
    return JSONResponse(body, status_code=status, headers={"X-Fal-Error-Type": error_type})


def _validation_error(exc: ValidationError) -> JSONResponse:
    detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


class FakeFal:
    """fal's queue (submit, status, result, cancel) for the three HiDream-I1 apps, plus the files results link to.

    - ``faults``: the shared knobs; they apply to queue routes, and only ``output_404`` to ``/files``.
    - ``submits``: how many jobs were accepted; ``requests``: request_id -> what was submitted
      (``app_id``, sub-``path``, raw ``input``, ``webhook_url``, ``priority``, ``request_timeout``).
    - ``urls_base``: where the status, result and cancel URLs in answers point (default: the host the caller used),
      to play a provider that names another host; ``output_base``: the same for image URLs in results.
    """

    def __init__(self, key: str = "fal_key_id:fal_key_secret") -> None:
        self.key = key
        self.faults = Faults()
        self.submits = 0
        self.requests: dict[str, dict[str, Any]] = {}
        self.urls_base: str | None = None
        self.output_base: str | None = None
        self._jobs: dict[str, _Job] = {}
        self._stopping = False
        self.server = ServerThread(self._build_app())

    @property
    def url(self) -> str:
        """The queue base, standing in for https://queue.fal.run."""
        return self.server.url

    def start(self) -> FakeFal:
        self.server.start()
        return self

    def stop(self) -> None:
        """Stop serving (connections are refused) but keep the port, the jobs and the records for start()."""
        self._stopping = True
        try:
            self.server.stop()
        finally:
            self._stopping = False

    def __enter__(self) -> FakeFal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _faulted(self) -> Response | None:
        """The answer a fault forces on a queue route, or None to serve it normally."""
        faults = self.faults
        if faults.latency_s > 0:
            await asyncio.sleep(faults.latency_s)
        # Not Faults.hang_while_set: uvicorn's graceful shutdown waits for every open request, so a hung one
        # must also let go when the fake stops, or stop() would block until the test clears the flag.
        while faults.hang and not self._stopping:  # noqa: ASYNC110 (flags flipped by the test thread)
            await asyncio.sleep(0.05)
        if faults.throttle:
            headers = {"Retry-After": str(faults.retry_after_s)}
            return JSONResponse({"detail": "Too many requests"}, status_code=429, headers=headers)
        if faults.roll_error():
            return _error(500, faults.error_text or "Internal server error", RUNNER_ERROR)
        if faults.malformed:
            return Response("<html><body>upstream sent garbage</body></html>", media_type="text/html")
        return None

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compare in constant time, as a real key check would.
        return scheme == "Key" and secrets.compare_digest(token.encode(), self.key.encode())

    async def _gate(self, request: Request, app_id: str) -> Response | None:
        """Faults, then auth, then the app id: what every queue route checks before its own work."""
        if (faulted := await self._faulted()) is not None:
            return faulted
        if not self._authorized(request):
            return JSONResponse({"detail": "Invalid or missing credentials: use 'Authorization: Key <key>'"}, 401)
        if app_id not in APPS:
            return JSONResponse({"detail": f"Application '{app_id}' not found"}, 404)
        return None

    def _job(self, app_id: str, request_id: str) -> _Job | None:
        job = self._jobs.get(request_id)
        return job if job is not None and job.app_id == app_id else None

    def _urls(self, request: Request, job: _Job) -> dict[str, str]:
        # Built from the host the caller used, without any sub-path, as fal does.
        host = self.urls_base or str(request.base_url)
        base = f"{host.rstrip('/')}/{job.app_id}/requests/{job.request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def _queue_position(self, job: _Job, now: float) -> int:
        """How many still-queued requests were submitted before this one (0 means next)."""
        return sum(1 for j in self._jobs.values() if j.created < job.created and j.phase(now) == "IN_QUEUE")

    async def _submit(self, request: Request, app_id: str, path: str | None) -> Response:
        if (refused := await self._gate(request, app_id)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            detail = [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]
            return JSONResponse({"detail": detail}, status_code=422)
        try:
            parsed = APPS[app_id].model_validate(body)
        except ValidationError as exc:
            return _validation_error(exc)
        request_id = str(uuid.uuid4())
        seed = parsed.seed if parsed.seed is not None else secrets.randbelow(2**31)
        job = _Job(
            request_id, app_id, parsed, seed, self.faults.processing_s, self.faults.fail_jobs, self.faults.error_text
        )
        self._jobs[request_id] = job
        self.requests[request_id] = {
            "app_id": app_id,
            "path": path,
            "input": body,
            "webhook_url": request.query_params.get("fal_webhook"),
            "priority": request.headers.get("x-fal-queue-priority"),
            "request_timeout": request.headers.get("x-fal-request-timeout"),
        }
        self.submits += 1
        now = time.monotonic()
        status = job.phase(now)
        answer: dict[str, Any] = {"status": status, "request_id": request_id, "gateway_request_id": request_id}
        if status == "IN_QUEUE":
            answer["queue_position"] = self._queue_position(job, now)
        return JSONResponse({**answer, **self._urls(request, job)})

    async def _status(self, request: Request, app_id: str, request_id: str) -> Response:
        if (refused := await self._gate(request, app_id)) is not None:
            return refused
        if (job := self._job(app_id, request_id)) is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        # The docs say logs=1|0, the official client sends logs=true|false.
        with_logs = request.query_params.get("logs", "0").lower() in ("1", "true")
        now = time.monotonic()
        phase = job.phase(now)
        body: dict[str, Any] = {"status": phase, "request_id": request_id, **self._urls(request, job)}
        body["logs"] = job.logs(phase) if with_logs else None
        body["metrics"] = {}
        if phase == "IN_QUEUE":
            body["queue_position"] = self._queue_position(job, now)
        elif phase == "COMPLETED":
            body["metrics"] = {"inference_time": job.inference_s()}
            if (error := job.error()) is not None:
                body["error"], body["error_type"] = error
        return JSONResponse(body)

    async def _result(self, request: Request, app_id: str, request_id: str) -> Response:
        if (refused := await self._gate(request, app_id)) is not None:
            return refused
        if (job := self._job(app_id, request_id)) is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if job.phase(time.monotonic()) != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, 400)
        if job.cancelled:
            return _error(400, "Request was cancelled", "request_cancelled")
        if job.fail:
            failure = job.error_text or "Model inference failed: the runner crashed while generating"
            return _error(500, failure, RUNNER_ERROR)
        return JSONResponse(self._output(request, job))

    def _output(self, request: Request, job: _Job) -> dict[str, Any]:
        """The HiDream-I1 output object; image URLs point at /files, or are data URIs with sync_mode."""
        width, height = job.input.size()
        fmt = job.input.output_format
        content_type = f"image/{fmt}"
        base = (self.output_base or str(request.base_url)).rstrip("/")
        images = []
        for i in range(job.input.num_images):
            if job.input.sync_mode:
                data = base64.b64encode(make_image(width, height, fmt, job.seed + i)).decode()
                url = f"data:{content_type};base64,{data}"
            else:
                url = f"{base}/files/{job.request_id}/{i}.{'jpg' if fmt == 'jpeg' else fmt}"
            images.append({"url": url, "width": width, "height": height, "content_type": content_type})
        return {
            "images": images,
            "timings": {"inference": job.inference_s()},
            "seed": job.seed,
            "has_nsfw_concepts": [False] * job.input.num_images,
            "prompt": job.input.prompt,
        }

    async def _cancel(self, request: Request, app_id: str, request_id: str) -> Response:
        if (refused := await self._gate(request, app_id)) is not None:
            return refused
        if (job := self._job(app_id, request_id)) is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if job.phase(time.monotonic()) == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        job.cancelled = True
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    def _file(self, request_id: str, name: str) -> Response:
        """A generated image, like fal's CDN: public, no auth, untouched by faults except output_404."""
        job = self._jobs.get(request_id)
        index, _, ext = name.partition(".")
        ready = job is not None and job.phase(time.monotonic()) == "COMPLETED" and job.error() is None
        if self.faults.output_404 or job is None or not ready or not index.isdigit():
            return JSONResponse({"detail": "File not found"}, 404)
        fmt = job.input.output_format
        if int(index) >= job.input.num_images or ext != ("jpg" if fmt == "jpeg" else fmt):
            return JSONResponse({"detail": "File not found"}, 404)
        width, height = job.input.size()
        return Response(make_image(width, height, fmt, job.seed + int(index)), media_type=f"image/{fmt}")

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/files/{request_id}/{name}")
        async def get_file(request_id: str, name: str) -> Response:
            return self._file(request_id, name)

        @app.post("/{owner}/{name}")
        async def submit(request: Request, owner: str, name: str) -> Response:
            return await self._submit(request, f"{owner}/{name}", None)

        @app.post("/{owner}/{name}/{path:path}")
        async def submit_sub_path(request: Request, owner: str, name: str, path: str) -> Response:
            return await self._submit(request, f"{owner}/{name}", path)

        @app.get("/{owner}/{name}/requests/{request_id}/status")
        async def status(request: Request, owner: str, name: str, request_id: str) -> Response:
            return await self._status(request, f"{owner}/{name}", request_id)

        @app.get("/{owner}/{name}/requests/{request_id}")
        async def result(request: Request, owner: str, name: str, request_id: str) -> Response:
            return await self._result(request, f"{owner}/{name}", request_id)

        @app.put("/{owner}/{name}/requests/{request_id}/cancel")
        async def cancel(request: Request, owner: str, name: str, request_id: str) -> Response:
            return await self._cancel(request, f"{owner}/{name}", request_id)

        return app
