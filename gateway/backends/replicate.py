"""The ``replicate`` backend: Replicate's HTTP API v1 (create, poll, cancel, download), re-attachable by id."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.backends.base import ImageJob, ImageResult
from gateway.backends.remote import best_effort, decode, gather_all, send, submit_and_collect, with_deadline
from gateway.errors import BackendFailed
from gateway.outbound import OUTPUT_MAX_BYTES, OUTPUT_TIMEOUT_S, ProviderGate

log = logging.getLogger("hidream_gateway.backends")

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
# "Output files are served by replicate.delivery and its subdomains":
# https://replicate.com/docs/topics/predictions/output-files
OUTPUT_HOSTS = ("replicate.delivery", "*.replicate.delivery")
# Ids go into URL paths we build, so only ever the characters Replicate's ids are made of.
PREDICTION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
CANCEL_TIMEOUT_S = 5.0


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
        ref = await backend.submit(job, timeout=120)  # {"predictions": ["<id>", ...]}
        result = await backend.collect(job, ref, timeout=120)

    Polls and cancels go to URLs built from ``base_url`` and the prediction id, never to the ``urls`` an answer
    names, so the token only ever goes to ``base_url``; outputs only come from ``output_hosts``.
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
        output_hosts: Sequence[str] = OUTPUT_HOSTS,
        max_bytes: int = OUTPUT_MAX_BYTES,
        output_timeout: float = OUTPUT_TIMEOUT_S,
    ) -> None:
        self.variants = frozenset(models)
        self._client = client
        self._models = models
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._poll = poll_seconds
        self.gate = ProviderGate(
            self.name, api_base=self._base, output_hosts=output_hosts, max_bytes=max_bytes, timeout=output_timeout
        )

    async def ready(self) -> bool:
        return True  # no free health endpoint; the circuit breaker watches real traffic

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Submit, then collect; the predictions are cancelled if collecting fails or is cancelled."""
        return await submit_and_collect(self, job, timeout=timeout)

    async def submit(self, job: ImageJob, *, timeout: float) -> dict[str, Any]:
        """Create one prediction per image, concurrently; if any create fails, cancel the ones made and raise."""
        creates = [asyncio.create_task(self._create(job, job.seed + i, timeout)) for i in range(job.n)]
        try:
            await asyncio.wait(creates)
        except BaseException:  # cancelled mid-way: predictions already made are billed, so take them down
            for task in creates:
                task.cancel()
            await asyncio.shield(self._cancel_created(creates))
            raise
        for task in creates:
            if (error := task.exception()) is not None:
                await asyncio.shield(self._cancel_created(creates))
                raise error
        return {"predictions": [task.result() for task in creates]}

    async def _create(self, job: ImageJob, seed: int, timeout: float) -> str:
        # No `Prefer: wait`: the id must be committed before anything waits on it. Cancel-After has Replicate stop
        # the prediction itself if nobody is left to collect or cancel it: it bills for the time it runs.
        headers = self._auth | {"Cancel-After": f"{max(5, int(timeout) + 1)}s"}
        url = self.gate.api_url(f"{self._base}/v1/models/{self._models[job.variant]}/predictions")
        body = {"input": replicate_input(job, seed)}
        prediction = await send(self._client, self.name, "POST", url, json=body, headers=headers, submits=True)
        pid = prediction.get("id")
        if not isinstance(pid, str) or not PREDICTION_ID.fullmatch(pid):
            raise BackendFailed("replicate created a prediction without a usable id.")
        return pid

    async def _cancel_created(self, creates: list[asyncio.Task[str]]) -> None:
        await asyncio.wait(creates)
        made = [t.result() for t in creates if not t.cancelled() and t.exception() is None]
        if made:
            await self.cancel({"predictions": made})

    async def collect(self, job: ImageJob, ref: dict[str, Any], *, timeout: float) -> ImageResult:
        """Wait for every prediction in ``ref`` and download its output; never cancels them."""
        waits = (self._finish(pid) for pid in _prediction_ids(ref))
        blobs = await with_deadline(gather_all(*waits), timeout=timeout, backend=self.name)
        decoded = await decode(blobs, job.output_format, job.quality, self.name)
        return ImageResult(decoded.images, decoded.content_type, decoded.width, decoded.height, job.seed)

    async def _finish(self, pid: str) -> bytes:
        url = self.gate.api_url(f"{self._base}/v1/predictions/{pid}")
        # Ask at once: a re-attaching gateway often finds the prediction already done.
        prediction = await send(self._client, self.name, "GET", url, headers=self._auth)
        while prediction.get("status") not in TERMINAL:
            await asyncio.sleep(self._poll)
            prediction = await send(self._client, self.name, "GET", url, headers=self._auth)
        if prediction["status"] != "succeeded":
            raise BackendFailed(f"replicate prediction {prediction['status']}: {prediction.get('error')}")
        output = prediction.get("output")
        if isinstance(output, list) and output:
            output = output[0]
        if not isinstance(output, str):
            raise BackendFailed("replicate prediction succeeded without an output URL.")
        return await self.gate.download(self._client, output)

    async def cancel(self, ref: dict[str, Any]) -> None:
        """Cancel every prediction in ``ref``; best effort, never raises (a finished one is left as it is)."""
        try:
            ids = _prediction_ids(ref)
        except BackendFailed as exc:
            log.warning("not cancelling replicate predictions: %s", exc)
            return
        await asyncio.gather(*(self._cancel_one(pid) for pid in ids))

    async def _cancel_one(self, pid: str) -> None:
        url = self.gate.api_url(f"{self._base}/v1/predictions/{pid}/cancel")
        request = send(self._client, self.name, "POST", url, headers=self._auth, timeout=CANCEL_TIMEOUT_S)
        await best_effort(request, f"cancelling replicate prediction {pid}", timeout=CANCEL_TIMEOUT_S)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the app."""


def _prediction_ids(ref: dict[str, Any]) -> list[str]:
    """The prediction ids a ``submit`` reference holds, checked: they go into URL paths."""
    ids = ref.get("predictions")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and PREDICTION_ID.fullmatch(i) for i in ids):
        raise BackendFailed("replicate job reference is malformed.")
    return ids
