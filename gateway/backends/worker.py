"""The ``worker`` backend: our own GPU worker (``hidream-gateway worker``, or the Modal deployment) over HTTP."""

from __future__ import annotations

import base64

import httpx

from gateway.backends.base import ImageJob, ImageResult, Probe
from gateway.backends.remote import decode, field, send, with_deadline
from gateway.errors import BackendFailed


class WorkerBackend:
    """Sends jobs to one worker's ``POST /generate``; see inference/worker.py for the protocol.

    A Modal endpoint is the same backend with Modal's proxy-auth headers.

    Example::

        backend = WorkerBackend("worker", "https://gpu-1:9000", client, token="s3cret", variants=frozenset({"fast"}))
    """

    kind = "worker"

    def __init__(
        self,
        name: str,
        url: str,
        client: httpx.AsyncClient,
        *,
        variants: frozenset[str],
        token: str | None = None,
        modal_key: str | None = None,
        modal_secret: str | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.variants = variants
        self._client = client
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        if modal_key and modal_secret:
            self._headers |= {"Modal-Key": modal_key, "Modal-Secret": modal_secret}
        # A Modal endpoint scales to zero: requests start it, so it is never "not loaded". The proxy-auth headers
        # go to every worker URL, so the host, not the headers, tells a Modal endpoint from a self-hosted worker.
        host = httpx.URL(self.url).host
        self.scales_to_zero = bool(modal_key and modal_secret) and (host == "modal.run" or host.endswith(".modal.run"))

    async def probe(self) -> Probe:
        """What the worker's /health says (free: no generation): up, loading, or down and why.

        A Modal endpoint is not probed: each probe is an input that would start a GPU container (and keep one
        billed through every readiness poll, defeating scale-to-zero) or wait behind generations for a slot.
        It is ready in the sense that matters, a request starts it; its circuit breaker judges it by real traffic.
        """
        if self.scales_to_zero:
            return Probe("unchecked")
        try:
            resp = await self._client.get(f"{self.url}/health", headers=self._headers, timeout=5)
        except httpx.HTTPError as exc:
            return Probe("down", f"{self.name} cannot be reached ({type(exc).__name__}).")
        if resp.status_code in (401, 403):
            return Probe("down", f"{self.name} rejected the gateway's credentials ({resp.status_code}).")
        try:
            body = resp.json() if resp.status_code == 200 else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return Probe("down", f"{self.name}'s health check answered {resp.status_code} without its JSON status.")
        if body.get("ready") is True:
            return Probe("up")
        if body.get("load_error"):
            return Probe("down", f"{self.name}'s model failed to load: {str(body['load_error'])[:200]}")
        return Probe("loading")

    async def ready(self) -> bool:
        """The worker has loaded its model (a Modal endpoint always: a request starts it)."""
        return (await self.probe()).status in ("up", "unchecked")

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        body = job.as_dict() | {"timeout_s": max(1.0, timeout - 1.0)}
        answer = await with_deadline(
            send(
                self._client,
                self.name,
                "POST",
                f"{self.url}/generate",
                json=body,
                headers=self._headers,
                timeout=timeout,
                submits=True,
            ),
            timeout=timeout,
            backend=self.name,
        )
        try:
            blobs = [base64.b64decode(b, validate=True) for b in field(answer, "images", list, self.name)]
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError; so is non-ASCII text
            raise BackendFailed(f"{self.name} returned images that are not base64.") from exc
        if len(blobs) != job.n:
            raise BackendFailed(f"{self.name} returned {len(blobs)} images for n={job.n}.")
        raw = answer.get("timings")
        raw = raw if isinstance(raw, dict) else {}
        # Only finite, non-negative seconds: they become a cost on the tenant's usage event.
        timings = {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and 0 <= v < 86_400}
        decoded = await decode(blobs, job.output_format, job.quality, self.name)
        return ImageResult(decoded.images, decoded.content_type, decoded.width, decoded.height, job.seed, timings)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the app."""
