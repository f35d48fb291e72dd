"""The ``replicate`` backend: Replicate's HTTP API v1 (create with ``Prefer: wait``, poll, cancel, download)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.backends.base import ImageJob, ImageResult
from gateway.backends.remote import best_effort, decode, download, field, gather_all, send, with_deadline
from gateway.errors import BackendFailed

# Replicate's HiDream models take the resolution as one of these labels (note the "×").
RESOLUTION_LABELS: dict[tuple[int, int], str] = {
    (1024, 1024): "1024 × 1024 (Square)",
    (768, 1360): "768 × 1360 (Portrait)",
    (1360, 768): "1360 × 768 (Landscape)",
    (880, 1168): "880 × 1168 (Portrait)",
    (1168, 880): "1168 × 880 (Landscape)",
    (1248, 832): "1248 × 832 (Landscape)",
    (832, 1248): "832 × 1248 (Portrait)",
}
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


def replicate_input(job: ImageJob, seed: int) -> dict[str, Any]:
    """The model input for one image of ``job``: all of the mapping to Replicate's schema lives here.

    Replicate's models pick steps from ``model_type`` and ``speed_mode``, so a job's own
    ``num_inference_steps`` and ``guidance_scale`` are not passed on; only ``fast`` takes a negative prompt.
    """
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "model_type": job.variant,
        "resolution": RESOLUTION_LABELS[(job.width, job.height)],
        "seed": seed,
        "output_format": "jpg" if job.output_format == "jpeg" else job.output_format,
        "output_quality": job.quality,
    }
    if job.negative_prompt and job.variant == "fast":
        body["negative_prompt"] = job.negative_prompt
    return body


class ReplicateBackend:
    """One prediction per image, created concurrently; outputs are downloaded before Replicate deletes them.

    Example::

        backend = ReplicateBackend(client, token="r8_...", models={"fast": "prunaai/hidream-l1-fast"})
    """

    name = "replicate"
    kind = "replicate"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        token: str,
        models: dict[str, str],
        base_url: str = "https://api.replicate.com",
        poll_seconds: float = 0.5,
    ) -> None:
        self.variants = frozenset(models)
        self._client = client
        self._models = models
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._poll = poll_seconds

    async def ready(self) -> bool:
        return True  # no free health endpoint; the circuit breaker watches real traffic

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        async def all_images() -> list[bytes]:
            return await gather_all(*(self._one(job, job.seed + i, timeout) for i in range(job.n)))

        blobs = await with_deadline(all_images(), timeout=timeout, backend=self.name)
        decoded = await decode(blobs, job.output_format, job.quality, self.name)
        return ImageResult(decoded.images, decoded.content_type, decoded.width, decoded.height, job.seed)

    async def _one(self, job: ImageJob, seed: int, timeout: float) -> bytes:
        wait = max(1, min(60, int(timeout)))
        headers = self._auth | {
            # Hold the create call open until done (at most 60 s), and have Replicate stop the
            # prediction itself if we are gone by the deadline: it bills for the time it runs.
            "Prefer": f"wait={wait}",
            "Cancel-After": f"{max(5, int(timeout) + 1)}s",
        }
        url = f"{self._base}/v1/models/{self._models[job.variant]}/predictions"
        body = {"input": replicate_input(job, seed)}
        # The read timeout must outlast the wait we asked for, or we would abandon a prediction we cannot cancel.
        prediction = await send(
            self._client, self.name, "POST", url, json=body, headers=headers, timeout=wait + 10, submits=True
        )
        urls = field(prediction, "urls", dict, self.name)
        if not isinstance(urls.get("get"), str):
            raise BackendFailed("replicate answered without a urls.get to poll.")
        try:
            while prediction.get("status") not in TERMINAL:
                await asyncio.sleep(self._poll)
                prediction = await send(self._client, self.name, "GET", urls["get"], headers=self._auth)
        except BaseException:
            if isinstance(urls.get("cancel"), str):
                cancel = send(self._client, self.name, "POST", urls["cancel"], headers=self._auth)
                await asyncio.shield(best_effort(cancel, f"cancelling {prediction.get('id')}"))
            raise
        if prediction["status"] != "succeeded":
            raise BackendFailed(f"replicate prediction {prediction['status']}: {prediction.get('error')}")
        output = prediction.get("output")
        if isinstance(output, list) and output:
            output = output[0]
        if not isinstance(output, str):
            raise BackendFailed("replicate prediction succeeded without an output URL.")
        return await download(self._client, output, self.name)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the app."""
