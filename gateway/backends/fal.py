"""The ``fal`` backend: fal.ai's queue API (submit, poll ``status_url``, fetch ``response_url``, cancel, download)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.backends.base import ImageJob, ImageResult
from gateway.backends.remote import (
    best_effort,
    check,
    decode,
    field,
    gather_all,
    send,
    submit_and_collect,
    with_deadline,
)
from gateway.errors import BackendFailed
from gateway.outbound import OUTPUT_MAX_BYTES, OUTPUT_TIMEOUT_S, ProviderGate

log = logging.getLogger("hidream_gateway.backends")

# fal returns generated files as CDN URLs such as https://v3.fal.media/files/..., with fal.media as the fallback
# host (https://docs.fal.ai/documentation/model-apis/fal-cdn).
OUTPUT_HOSTS = ("fal.media", "*.fal.media")
# Request ids go into a URL path we build (the fallback cancel), so only ever the characters of a UUID.
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
CANCEL_TIMEOUT_S = 5.0


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
        ref = await backend.submit(job, timeout=120)  # {"request_id", "status_url", "response_url", "cancel_url"}
        result = await backend.collect(job, ref, timeout=120)

    The key only goes to URLs on ``base_url``'s host (fal's answers name the status, result and cancel URLs, and
    any on another host fail the job unsent); outputs only come from ``output_hosts`` or inline data URIs.
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
        output_hosts: Sequence[str] = OUTPUT_HOSTS,
        max_bytes: int = OUTPUT_MAX_BYTES,
        output_timeout: float = OUTPUT_TIMEOUT_S,
    ) -> None:
        self.variants = frozenset(apps)
        self._client = client
        self._apps = apps
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Key {key}"}
        self._poll = poll_seconds
        self.gate = ProviderGate(
            self.name, api_base=self._base, output_hosts=output_hosts, max_bytes=max_bytes, timeout=output_timeout
        )

    async def ready(self) -> bool:
        return True  # no free health endpoint; the circuit breaker watches real traffic

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Submit, then collect; the request is cancelled if collecting fails or is cancelled."""
        return await submit_and_collect(self, job, timeout=timeout)

    async def submit(self, job: ImageJob, *, timeout: float) -> dict[str, Any]:
        """Queue the job; returns its id and the status, result and cancel URLs fal named (all on the API host)."""
        app = self._apps[job.variant]
        url = self.gate.api_url(f"{self._base}/{app}")
        submitted = await send(
            self._client, self.name, "POST", url, json=fal_input(job), headers=self._auth, submits=True
        )
        request_id = field(submitted, "request_id", str, self.name)
        if not REQUEST_ID.fullmatch(request_id):
            raise BackendFailed("fal queued a request without a usable request_id.")
        # Status and result paths drop any sub-path of the app id, so fal's documented layout is owner/name.
        cancel_url = f"{self._base}/{'/'.join(app.split('/')[:2])}/requests/{request_id}/cancel"
        named = submitted.get("cancel_url")
        try:
            return {
                "request_id": request_id,
                "status_url": self.gate.api_url(field(submitted, "status_url", str, self.name)),
                "response_url": self.gate.api_url(field(submitted, "response_url", str, self.name)),
                "cancel_url": self.gate.api_url(named if isinstance(named, str) else cancel_url),
            }
        except BackendFailed:
            # fal accepted (and bills) the request but named URLs we will not call: cancel it on the API host.
            await asyncio.shield(self.cancel({"request_id": request_id, "cancel_url": cancel_url}))
            raise

    async def collect(self, job: ImageJob, ref: dict[str, Any], *, timeout: float) -> ImageResult:
        """Wait for the request in ``ref``, fetch its result and download the images; never cancels it."""
        status_url, response_url = (self._ref_url(ref, key) for key in ("status_url", "response_url"))
        blobs = await with_deadline(self._wait(job, status_url, response_url), timeout=timeout, backend=self.name)
        decoded = await decode(blobs, job.output_format, job.quality, self.name)
        return ImageResult(decoded.images, decoded.content_type, decoded.width, decoded.height, job.seed)

    def _ref_url(self, ref: dict[str, Any], key: str) -> str:
        url = ref.get(key)
        if not isinstance(url, str):
            raise BackendFailed(f"fal job reference has no {key}.")
        return self.gate.api_url(url)

    async def _wait(self, job: ImageJob, status_url: str, response_url: str) -> list[bytes]:
        status = await send(self._client, self.name, "GET", status_url, headers=self._auth)
        while status.get("status") != "COMPLETED":
            if status.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
                raise BackendFailed(f"fal answered an unknown status {status.get('status')!r}.")
            await asyncio.sleep(self._poll)
            status = await send(self._client, self.name, "GET", status_url, headers=self._auth)
        if status.get("error"):
            raise BackendFailed(f"fal request failed: {status.get('error_type')}: {status.get('error')}")
        result = await send(self._client, self.name, "GET", response_url, headers=self._auth)
        images = field(result, "images", list, self.name)
        if len(images) != job.n or not all(isinstance(i, dict) and isinstance(i.get("url"), str) for i in images):
            raise BackendFailed(f"fal returned {len(images)} malformed or missing images for n={job.n}.")
        return await gather_all(*(self._fetch(i["url"]) for i in images))

    async def _fetch(self, url: str) -> bytes:
        if url.startswith("data:"):  # sync_mode answers carry the image inline
            if len(url) > self.gate.max_bytes * 4 // 3 + 1024:  # base64 is 4/3 of the bytes, plus the header
                raise BackendFailed(f"fal's inline output is larger than {self.gate.max_bytes} bytes; not kept.")
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as exc:  # binascii.Error is a ValueError
                raise BackendFailed("fal returned a malformed data URI.") from exc
        return await self.gate.download(self._client, url)

    async def cancel(self, ref: dict[str, Any]) -> None:
        """Ask fal to cancel the request in ``ref``; best effort, never raises (a finished one is left as it is)."""
        try:
            url = self._ref_url(ref, "cancel_url")
        except BackendFailed as exc:
            log.warning("not cancelling fal request %s: %s", ref.get("request_id"), exc)
            return
        await best_effort(
            self._put_cancel(url), f"cancelling fal request {ref.get('request_id')}", timeout=CANCEL_TIMEOUT_S
        )

    async def _put_cancel(self, url: str) -> None:
        resp = await self._client.put(url, headers=self._auth, timeout=CANCEL_TIMEOUT_S)
        if resp.status_code == 400 and '"ALREADY_COMPLETED"' in resp.text:
            return  # too late to cancel: it finished, which is just as good
        check(resp, self.name)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the app."""
