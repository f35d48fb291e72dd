"""The ``fal`` backend: fal.ai's queue API (submit, poll ``status_url``, fetch ``response_url``, cancel, download)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx

from gateway.backends.base import ImageJob, ImageResult
from gateway.backends.remote import best_effort, decode, download, field, gather_all, send, with_deadline
from gateway.errors import BackendFailed


def fal_input(job: ImageJob) -> dict[str, Any]:
    """The app input for ``job``: all of the mapping to fal's HiDream schema lives here.

    fal encodes only JPEG and PNG; a WebP job asks for PNG and is re-encoded by the gateway.
    """
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "image_size": {"width": job.width, "height": job.height},
        "seed": job.seed,
        "num_images": job.n,
        "output_format": "jpeg" if job.output_format == "jpeg" else "png",
    }
    if job.negative_prompt:
        body["negative_prompt"] = job.negative_prompt
    if job.num_inference_steps is not None:
        body["num_inference_steps"] = min(job.num_inference_steps, 50)
    if job.guidance_scale is not None and job.variant == "full":
        body["guidance_scale"] = job.guidance_scale
    return body


class FalBackend:
    """Runs a job as one fal queue request (fal makes all ``n`` images in it).

    Example::

        backend = FalBackend(client, key="key_id:key_secret", apps={"fast": "fal-ai/hidream-i1-fast"})
    """

    name = "fal"
    kind = "fal"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        key: str,
        apps: dict[str, str],
        base_url: str = "https://queue.fal.run",
        poll_seconds: float = 0.5,
    ) -> None:
        self.variants = frozenset(apps)
        self._client = client
        self._apps = apps
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Key {key}"}
        self._poll = poll_seconds

    async def ready(self) -> bool:
        return True  # no free health endpoint; the circuit breaker watches real traffic

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        blobs = await with_deadline(self._run(job), timeout=timeout, backend=self.name)
        decoded = await decode(blobs, job.output_format, job.quality, self.name)
        return ImageResult(decoded.images, decoded.content_type, decoded.width, decoded.height, job.seed)

    async def _run(self, job: ImageJob) -> list[bytes]:
        submitted = await send(
            self._client,
            self.name,
            "POST",
            f"{self._base}/{self._apps[job.variant]}",
            json=fal_input(job),
            headers=self._auth,
            submits=True,
        )
        status_url = field(submitted, "status_url", str, self.name)
        response_url = field(submitted, "response_url", str, self.name)
        try:
            while True:
                status = await send(self._client, self.name, "GET", status_url, headers=self._auth)
                if status.get("status") == "COMPLETED":
                    break
                if status.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
                    raise BackendFailed(f"fal answered an unknown status {status.get('status')!r}.")
                await asyncio.sleep(self._poll)
        except BaseException:
            cancel_url = submitted.get("cancel_url")
            if isinstance(cancel_url, str):
                cancel = send(self._client, self.name, "PUT", cancel_url, headers=self._auth)
                await asyncio.shield(best_effort(cancel, f"cancelling {submitted.get('request_id')}"))
            raise
        if status.get("error"):
            raise BackendFailed(f"fal request failed: {status.get('error_type')}: {status.get('error')}")
        result = await send(self._client, self.name, "GET", response_url, headers=self._auth)
        images = field(result, "images", list, self.name)
        if len(images) != job.n or not all(isinstance(i, dict) and isinstance(i.get("url"), str) for i in images):
            raise BackendFailed(f"fal returned {len(images)} malformed or missing images for n={job.n}.")
        return await gather_all(*(self._fetch(i["url"]) for i in images))

    async def _fetch(self, url: str) -> bytes:
        if url.startswith("data:"):  # sync_mode answers carry the image inline
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as exc:  # binascii.Error is a ValueError
                raise BackendFailed("fal returned a malformed data URI.") from exc
        return await download(self._client, url, self.name)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the app."""
