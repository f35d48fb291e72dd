"""Backend adapters at their boundary: requests they send and how vendor answers become gateway errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.backends.base import BackendInputError, ImageJob
from gateway.backends.fal import FalBackend, fal_input
from gateway.backends.remote import check, normalise, retry_after, send
from gateway.backends.replicate import replicate_input
from gateway.backends.worker import WorkerBackend
from gateway.errors import BackendBusy, BackendFailed, BackendUnavailable
from tests.fakes.server import make_image

JOB = ImageJob(variant="fast", prompt="a fox", width=1360, height=768, seed=9, output_format="jpeg", quality=80)


def test_replicate_input_mapping() -> None:
    body = replicate_input(JOB, seed=10)
    assert body == {
        "prompt": "a fox",
        "model_type": "fast",
        "resolution": "1360 × 768 (Landscape)",
        "seed": 10,
        "output_format": "jpg",
        "output_quality": 80,
    }
    full = ImageJob(variant="full", prompt="x", width=832, height=1248, seed=1, negative_prompt="blur")
    assert "negative_prompt" not in replicate_input(full, 1)  # only fast takes one
    assert replicate_input(full, 1)["resolution"] == "832 × 1248 (Portrait)"


def test_fal_input_mapping() -> None:
    job = ImageJob(
        variant="full", prompt="x", width=1024, height=1024, seed=3, n=2, num_inference_steps=80, guidance_scale=4.0
    )
    assert fal_input(job) == {
        "prompt": "x",
        "image_size": {"width": 1024, "height": 1024},
        "seed": 3,
        "num_images": 2,
        "output_format": "png",
        "num_inference_steps": 50,  # fal's maximum
        "guidance_scale": 4.0,
    }
    assert "guidance_scale" not in fal_input(JOB)


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (422, {}, BackendInputError),
        (400, {}, BackendInputError),
        (429, {"Retry-After": "7"}, BackendBusy),
        (503, {"Retry-After": "3"}, BackendBusy),
        (503, {}, BackendFailed),
        (401, {}, BackendUnavailable),
        (403, {}, BackendUnavailable),
        (404, {}, BackendFailed),
        (500, {}, BackendFailed),
    ],
)
def test_vendor_statuses_map_to_gateway_errors(status: int, headers: dict[str, str], error: type) -> None:
    with pytest.raises(error):
        check(httpx.Response(status, headers=headers, json={"detail": "nope"}), "x")


def test_malformed_answers_are_backend_failures() -> None:
    with pytest.raises(BackendFailed, match="not JSON"):
        check(httpx.Response(200, content=b"<html>"), "x")
    with pytest.raises(BackendFailed, match="not an object"):
        check(httpx.Response(200, json=[1]), "x")


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(httpx.Response(429, headers={"Retry-After": "12"})) == 12
    dated = httpx.Response(
        429, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT", "Date": "Wed, 21 Oct 2026 07:28:00 GMT"}
    )
    assert retry_after(dated) == 30
    assert retry_after(httpx.Response(429), default=4) == 4


def test_worker_sends_token_and_modal_proxy_headers() -> None:
    seen: list[httpx.Request] = []
    png = base64.b64encode(make_image(1360, 768, "png")).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"images": [png], "timings": {"inference_s": 1.5}})

    async def run() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            backend = WorkerBackend(
                "worker",
                "https://gpu.modal.run",
                client,
                variants=frozenset({"fast"}),
                token="t",
                modal_key="wk-1",
                modal_secret="ws-1",
            )
            return await backend.generate(JOB, timeout=30)

    result = asyncio.run(run())
    [req] = seen
    assert req.headers["Authorization"] == "Bearer t"
    assert (req.headers["Modal-Key"], req.headers["Modal-Secret"]) == ("wk-1", "ws-1")
    assert json.loads(req.content)["variant"] == "fast"
    # The worker sent PNG; the tenant asked for JPEG, so the gateway re-encoded it.
    assert Image.open(io.BytesIO(result.images[0])).format == "JPEG" and result.content_type == "image/jpeg"
    assert result.timings == {"inference_s": 1.5}


def test_a_modal_worker_is_not_woken_by_readiness_probes() -> None:
    """Probing a scale-to-zero endpoint would start and bill a GPU; a self-hosted worker is asked."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"ready": True})

    async def run() -> tuple[bool, bool]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            common: dict[str, Any] = {"variants": frozenset({"fast"})}
            creds: dict[str, Any] = {"modal_key": "wk", "modal_secret": "ws"}  # sent to every worker URL
            modal = WorkerBackend("modal", "https://acme--hidream-fast-web.modal.run", client, **creds, **common)
            own = WorkerBackend("own", "http://gpu-1:9000", client, token="t", **creds, **common)
            return await modal.ready(), await own.ready()

    assert asyncio.run(run()) == (True, True)
    assert seen == ["/health"]  # only the self-hosted worker was asked


def test_fal_webp_job_is_reencoded_and_data_uris_are_accepted() -> None:
    png = make_image(1024, 1024, "png")

    def handler(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if request.method == "POST":
            return httpx.Response(200, json={"request_id": "r1", "status_url": f"{url}/s", "response_url": f"{url}/r"})
        if url.endswith("/s"):
            return httpx.Response(200, json={"status": "COMPLETED", "logs": None})
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
        return httpx.Response(200, json={"images": [{"url": data_uri, "width": 1024, "height": 1024}]})

    async def run() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            backend = FalBackend(client, key="k", apps={"fast": "fal-ai/hidream-i1-fast"}, poll_seconds=0.01)
            job = ImageJob(variant="fast", prompt="x", width=1024, height=1024, seed=1, output_format="webp")
            return await backend.generate(job, timeout=10)

    result = asyncio.run(run())
    assert Image.open(io.BytesIO(result.images[0])).format == "WEBP" and result.content_type == "image/webp"


def test_a_4xx_on_a_poll_is_the_providers_fault_not_the_inputs() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "schema changed"})

    async def run(submits: bool) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await send(client, "replicate", "GET", "https://x/v1/predictions/p", submits=submits)

    with pytest.raises(BackendInputError):
        asyncio.run(run(True))
    with pytest.raises(BackendFailed) as failed:
        asyncio.run(run(False))
    assert not isinstance(failed.value, BackendInputError)


def test_broken_answers_become_backend_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await send(client, "fal", "GET", "https://x/status")

    with pytest.raises(BackendFailed, match="unusable"):
        asyncio.run(run())
    with pytest.raises(BackendFailed, match="usable image"):
        normalise([b"\x89PNG garbage"], "png", 90, "fal")
