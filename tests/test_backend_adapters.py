"""Backend adapters at their boundary: requests they send and how vendor answers become gateway errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.backends.base import BackendInputError, ImageJob
from gateway.backends.fal import FalBackend, fal_input
from gateway.backends.remote import check, normalise, retry_after, send
from gateway.backends.replicate import ReplicateBackend, replicate_input
from gateway.backends.worker import WorkerBackend
from gateway.errors import BackendBusy, BackendFailed, BackendUnauthorized, GenerationTimeout
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
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
        (401, {}, BackendUnauthorized),
        (403, {}, BackendUnauthorized),
        (404, {}, BackendFailed),
        (500, {}, BackendFailed),
    ],
)
def test_vendor_statuses_map_to_gateway_errors(status: int, headers: dict[str, str], error: type) -> None:
    with pytest.raises(error) as raised:
        check(httpx.Response(status, headers=headers, json={"detail": "nope"}), "x")
    assert raised.value.upstream_status == status  # reported in the job's attempt list


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


def test_a_png_kept_as_it_is_is_checked_whole() -> None:
    """A PNG passed through is verified (every chunk's checksum, up to its end) rather than decoded: a cut or
    damaged one is still refused, and an intact one is kept byte for byte with its size."""
    png = make_image(1024, 1024, "png")
    kept = normalise([png], "png", 90, "replicate")
    assert kept.images == [png] and (kept.width, kept.height) == (1024, 1024)
    idat = png.index(b"IDAT")
    damaged = png[: idat + 10] + bytes([png[idat + 10] ^ 0xFF]) + png[idat + 11 :]
    for broken in (png[: len(png) // 2], png[:-12], damaged):  # cut in its data, its end missing, a flipped byte
        with pytest.raises(BackendFailed, match="usable image"):
            normalise([broken], "png", 90, "replicate")
    jpeg = normalise([png], "jpeg", 90, "replicate").images[0]  # another format is decoded and encoded as before
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"


# --- Provider jobs that survive a restart: submit, commit the reference, collect from another backend object ---

REPLICATE_MODELS = {"fast": "prunaai/hidream-l1-fast"}
FAL_APPS = {"fast": "fal-ai/hidream-i1-fast"}
SQUARE = ImageJob(variant="fast", prompt="a fox", width=1024, height=1024, seed=7, n=2, output_format="png")


@pytest.fixture
def fake_replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


@pytest.fixture
def fake_fal() -> Iterator[FakeFal]:
    with FakeFal() as fake:
        yield fake


def _replicate(client: httpx.AsyncClient, fake: FakeReplicate) -> ReplicateBackend:
    return ReplicateBackend(
        client, token=fake.token, models=REPLICATE_MODELS, base_url=fake.url, poll_seconds=0.02, output_hosts=[fake.url]
    )


def _fal(client: httpx.AsyncClient, fake: FakeFal) -> FalBackend:
    return FalBackend(
        client, key=fake.key, apps=FAL_APPS, base_url=fake.url, poll_seconds=0.02, output_hosts=[fake.url]
    )


async def _fresh_process(make: Any, fake: Any, job: ImageJob, stored: str) -> Any:
    """What a restarted gateway does: a new client and backend, and the reference read back from the database."""
    async with httpx.AsyncClient() as client:
        return await make(client, fake).collect(job, json.loads(stored), timeout=30)


@pytest.mark.parametrize("provider", ["replicate", "fal"])
def test_a_submitted_job_is_collected_by_a_new_backend_without_submitting_again(
    provider: str, fake_replicate: FakeReplicate, fake_fal: FakeFal
) -> None:
    fake: Any = fake_replicate if provider == "replicate" else fake_fal
    make: Any = _replicate if provider == "replicate" else _fal
    fake.faults.processing_s = 0.5

    async def submit() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return await make(client, fake).submit(SQUARE, timeout=30)  # type: ignore[no-any-return]

    ref = asyncio.run(submit())
    stored = json.dumps(ref)  # the engine commits this with the job; then the gateway dies
    result = asyncio.run(_fresh_process(make, fake, SQUARE, stored))

    assert len(result.images) == 2 and (result.width, result.height) == (1024, 1024)
    if provider == "replicate":
        assert fake_replicate.creates == 2 and len(ref["predictions"]) == 2  # one prediction per image, once
    else:
        assert fake_fal.submits == 1 and set(ref) == {"request_id", "status_url", "response_url", "cancel_url"}
        assert all(ref[k].startswith(fake_fal.url) for k in ("status_url", "response_url", "cancel_url"))


def _replicate_status(fake: FakeReplicate, ref: dict[str, Any]) -> list[str]:
    return [fake.predictions[pid]["status"] for pid in ref["predictions"]]


def _fal_status(fake: FakeFal, ref: dict[str, Any]) -> str:
    body = httpx.get(ref["status_url"], headers={"Authorization": f"Key {fake.key}"}).json()
    return "cancelled" if body.get("error_type") == "request_cancelled" else str(body["status"])


def test_cancel_takes_provider_jobs_down_and_is_harmless_twice(
    fake_replicate: FakeReplicate, fake_fal: FakeFal, caplog: pytest.LogCaptureFixture
) -> None:
    fake_replicate.faults.processing_s = fake_fal.faults.processing_s = 30

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            replicate, fal = _replicate(client, fake_replicate), _fal(client, fake_fal)
            refs = await replicate.submit(SQUARE, timeout=60), await fal.submit(SQUARE, timeout=60)
            for _ in range(2):  # the second time, both are already over
                await replicate.cancel(refs[0])
                await fal.cancel(refs[1])
            await replicate.cancel({"predictions": ["../../v1/account"]})  # never raises, sends nothing
            await fal.cancel({})
            return refs

    replicate_ref, fal_ref = asyncio.run(run())
    assert _replicate_status(fake_replicate, replicate_ref) == ["canceled", "canceled"]
    assert _fal_status(fake_fal, fal_ref) == "cancelled"
    assert "ALREADY_COMPLETED" not in caplog.text


@pytest.mark.parametrize("method", ["collect", "generate"])
def test_only_a_cancelled_generate_cancels_the_provider_job(
    method: str, fake_replicate: FakeReplicate, fake_fal: FakeFal
) -> None:
    """A graceful shutdown cancels ``collect``: the job must live on for another replica. ``generate`` owns its job."""
    fake_replicate.faults.processing_s = fake_fal.faults.processing_s = 30
    refs: list[dict[str, Any]] = []

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            backends: list[Any] = [_replicate(client, fake_replicate), _fal(client, fake_fal)]
            if method == "collect":
                refs.extend([await b.submit(SQUARE, timeout=60) for b in backends])
                tasks = [
                    asyncio.create_task(b.collect(SQUARE, r, timeout=60)) for b, r in zip(backends, refs, strict=True)
                ]
            else:
                tasks = [asyncio.create_task(b.generate(SQUARE, timeout=60)) for b in backends]
            while fake_replicate.creates < 2 or fake_fal.submits < 1:  # noqa: ASYNC110 (counters of another thread)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # polling by now
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)

    asyncio.run(run())
    if method == "generate":
        refs = [{"predictions": list(fake_replicate.predictions)}, {"status_url": _fal_status_url(fake_fal)}]
    expected = ("canceled", "cancelled") if method == "generate" else ("starting", "IN_QUEUE")
    assert set(_replicate_status(fake_replicate, refs[0])) == {expected[0]}
    assert _fal_status(fake_fal, refs[1]) == expected[1]


def _fal_status_url(fake: FakeFal) -> str:
    [request_id] = fake.requests
    return f"{fake.url}/{FAL_APPS['fast']}/requests/{request_id}/status"


def test_collect_past_its_timeout_raises_and_leaves_the_job_running(fake_replicate: FakeReplicate) -> None:
    fake_replicate.faults.processing_s = 30

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            backend = _replicate(client, fake_replicate)
            ref = await backend.submit(SQUARE, timeout=60)
            with pytest.raises(GenerationTimeout):
                await backend.collect(SQUARE, ref, timeout=0.3)
            with pytest.raises(BackendFailed, match="reference is malformed"):
                await backend.collect(SQUARE, {"predictions": ["a/../b"]}, timeout=1)
            return ref

    ref = asyncio.run(run())
    assert set(_replicate_status(fake_replicate, ref)) == {"starting"}


def test_replicate_submit_cancels_the_predictions_it_made_when_another_create_fails() -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, dict(request.headers)))
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json={"id": "p1", "status": "canceled"})
        seed = json.loads(request.content)["input"]["seed"]
        if seed == 8:  # the second image's create
            return httpx.Response(500, json={"detail": "boom"})
        return httpx.Response(201, json={"id": f"p{seed - 6}", "status": "starting"})

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            backend = ReplicateBackend(client, token="t", models=REPLICATE_MODELS, base_url="https://api.example")
            await backend.submit(SQUARE, timeout=60)

    with pytest.raises(BackendFailed, match="500"):
        asyncio.run(run())
    creates = [headers for method, path, headers in seen if method == "POST" and path.endswith("/predictions")]
    assert len(creates) == 2 and all("prefer" not in h and h["cancel-after"] == "61s" for h in creates)
    assert ("POST", "/v1/predictions/p1/cancel") in [(m, p) for m, p, _ in seen]
