"""The fal fake is faithful: the official fal-client drives it end to end, and every fault knob does what it says."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from PIL import Image

from tests.fakes.fal import PRESET_SIZES, FakeFal

KEY = "fal_key_id:fal_key_secret"
FULL, DEV, FAST = "fal-ai/hidream-i1-full", "fal-ai/hidream-i1-dev", "fal-ai/hidream-i1-fast"


@pytest.fixture
def fake() -> Iterator[FakeFal]:
    with FakeFal(key=KEY) as fake:
        yield fake


@pytest.fixture
def fal(fake: FakeFal, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """The official client aimed at the fake.

    fal-client 1.0.3 builds queue URLs from ``QUEUE_URL_FORMAT = f"https://{FAL_QUEUE_RUN_HOST}/"``, computed once
    at import: the FAL_QUEUE_RUN_HOST variable can move the host but never the scheme, and the fake speaks plain
    HTTP, so the test replaces that one constant. Status, result and cancel then follow the URLs the fake returns.
    """
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{fake.url}/")
    return fal_client.SyncClient(key=KEY)


@pytest.fixture
def http(fake: FakeFal) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"Key {KEY}"}, timeout=5) as client:
        yield client


def submit(http: httpx.Client, app: str = FULL, **body: Any) -> dict[str, Any]:
    resp = http.post(f"/{app}", json={"prompt": "a red fox in the snow", **body})
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- the official client ---------------------------------------------------------------------------------------


def test_official_client_submit_status_result_and_download(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.processing_s = 0.3
    handle = fal.submit(FULL, {"prompt": "a red fox", "image_size": {"width": 640, "height": 384}, "num_images": 2})
    assert isinstance(handle.status(), fal_client.Queued)

    output = handle.get(interval=0.02)
    assert output["prompt"] == "a red fox" and output["has_nsfw_concepts"] == [False, False]
    assert isinstance(output["seed"], int) and isinstance(output["timings"]["inference"], float)
    for i, image in enumerate(output["images"]):
        assert (image["width"], image["height"], image["content_type"]) == (640, 384, "image/jpeg")
        resp = httpx.get(image["url"])
        assert resp.headers["content-type"] == "image/jpeg"
        decoded = decode(resp.content)
        assert (decoded.format, decoded.size) == ("JPEG", (640, 384))
        assert image["url"] == f"{fake.url}/files/{handle.request_id}/{i}.jpg"

    status = fal.status(FULL, handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.Completed) and status.error is None
    assert status.logs and all("message" in line and "timestamp" in line for line in status.logs)
    assert status.metrics["inference_time"] == pytest.approx(0.2)
    assert fal.result(FULL, handle.request_id) == output


def test_official_subscribe_sees_queued_in_progress_completed(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.processing_s = 0.45
    enqueued: list[str] = []
    updates: list[fal_client.Status] = []
    output = fal.subscribe(
        DEV,
        {"prompt": "a lighthouse", "image_size": "portrait_16_9", "output_format": "png", "seed": 42},
        with_logs=True,
        interval=0.03,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )
    kinds = [type(u) for u in updates]
    assert kinds[0] is fal_client.Queued and kinds[-1] is fal_client.Completed
    assert fal_client.InProgress in kinds
    assert kinds.index(fal_client.InProgress) < kinds.index(fal_client.Completed)
    assert all(u.position == 0 for u in updates if isinstance(u, fal_client.Queued))
    assert all(isinstance(u.logs, list) for u in updates if isinstance(u, fal_client.InProgress))
    assert fake.submits == 1 and list(fake.requests) == enqueued
    assert output["seed"] == 42
    image = output["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (576, 1024, "image/png")
    decoded = decode(httpx.get(image["url"]).content)
    assert (decoded.format, decoded.size) == ("PNG", (576, 1024))


def test_official_async_client_subscribes(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.processing_s = 0.1

    async def go() -> dict[str, Any]:
        client = fal_client.AsyncClient(key=KEY)
        return await client.subscribe(FAST, {"prompt": "a kite", "image_size": "landscape_4_3"}, interval=0.02)

    output = asyncio.run(go())
    assert (output["images"][0]["width"], output["images"][0]["height"]) == (1024, 768)


def test_official_cancel_before_and_after_completion(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.processing_s = 30
    handle = fal.submit(FULL, {"prompt": "slow"})
    fal.cancel(FULL, handle.request_id)
    status = handle.status()
    assert isinstance(status, fal_client.Completed) and status.error and status.error_type == "request_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        handle.cancel()
    assert err.value.status_code == 400 and "ALREADY_COMPLETED" in err.value.response.text


def test_official_client_surfaces_failed_jobs(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.fail_jobs = True
    handle = fal.submit(FULL, {"prompt": "doomed"})
    status = handle.status()
    assert isinstance(status, fal_client.Completed) and status.error_type == "runner_server_error" and status.error
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        handle.get(interval=0.01)
    assert (err.value.status_code, err.value.error_type) == (500, "runner_server_error")


def test_official_client_reports_500_and_401(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.error_rate = 1.0
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal.submit(FULL, {"prompt": "x"})
    assert (err.value.status_code, err.value.error_type) == (500, "runner_server_error")
    fake.faults.error_rate = 0.0
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal_client.SyncClient(key="wrong:key").submit(FULL, {"prompt": "x"})
    assert err.value.status_code == 401
    assert fake.submits == 0


def test_official_client_retries_through_throttling(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    fake.faults.throttle = True
    threading.Timer(0.3, lambda: setattr(fake.faults, "throttle", False)).start()
    handle = fal.submit(FULL, {"prompt": "patient"})
    assert fake.submits == 1 and handle.request_id in fake.requests


def test_official_client_sub_path_priority_and_webhook(fake: FakeFal, fal: fal_client.SyncClient) -> None:
    handle = fal.submit(
        FULL, {"prompt": "x"}, path="extra/route", webhook_url="https://hooks.test/fal?x=1", priority="low"
    )
    # Status, result and cancel URLs drop the sub-path.
    assert handle.status_url == f"{fake.url}/{FULL}/requests/{handle.request_id}/status"
    record = fake.requests[handle.request_id]
    assert record["path"] == "extra/route" and record["app_id"] == FULL and record["priority"] == "low"
    assert record["webhook_url"] == "https://hooks.test/fal?x=1"
    assert isinstance(handle.status(), fal_client.Completed)


# --- the protocol, raw ------------------------------------------------------------------------------------------


def test_submit_answers_urls_on_the_fake(fake: FakeFal, http: httpx.Client) -> None:
    answer = submit(http, FAST, seed=3, unknown_field="ignored")
    request_id = answer["request_id"]
    base = f"{fake.url}/{FAST}/requests/{request_id}"
    assert answer["response_url"] == base and answer["gateway_request_id"] == request_id
    assert (answer["status_url"], answer["cancel_url"]) == (f"{base}/status", f"{base}/cancel")
    assert fake.submits == 1
    assert fake.requests[request_id]["input"] == {
        "prompt": "a red fox in the snow",
        "seed": 3,
        "unknown_field": "ignored",
    }


def test_auth_is_required_everywhere(fake: FakeFal, http: httpx.Client) -> None:
    answer = submit(http)
    for headers in ({}, {"Authorization": "Key nope"}, {"Authorization": f"Bearer {KEY}"}):
        with httpx.Client(base_url=fake.url, headers=headers) as anon:
            for resp in (anon.post(f"/{FULL}", json={"prompt": "x"}), anon.get(answer["status_url"])):
                assert resp.status_code == 401 and isinstance(resp.json()["detail"], str)
    assert fake.submits == 1


def test_unknown_app_and_request_are_404(http: httpx.Client) -> None:
    assert http.post("/fal-ai/flux-pro", json={"prompt": "x"}).status_code == 404
    assert http.get("/fal-ai/flux-pro/requests/abc/status").status_code == 404
    assert http.get(f"/{FULL}/requests/no-such-id/status").json() == {"detail": "Request not found"}
    answer = submit(http, FULL)
    assert http.get(f"/{DEV}/requests/{answer['request_id']}").status_code == 404  # wrong app for this id


@pytest.mark.parametrize(
    ("app", "body", "field"),
    [
        (FULL, {"negative_prompt": "blur"}, "prompt"),
        (FULL, {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        (DEV, {"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
        (FAST, {"prompt": "x", "num_images": 5}, "num_images"),
        (FULL, {"prompt": "x", "output_format": "webp"}, "output_format"),
        (FULL, {"prompt": "x", "image_size": "huge"}, "image_size"),
        (FULL, {"prompt": "x", "image_size": {"width": 0, "height": 512}}, "image_size"),
        (FULL, {"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
        (FULL, {"prompt": "x", "seed": "lucky"}, "seed"),
        (DEV, {"prompt": "x", "sync_mode": "maybe"}, "sync_mode"),
        (FAST, {"prompt": "x", "enable_safety_checker": []}, "enable_safety_checker"),
        (FAST, {"prompt": ["not", "a", "string"]}, "prompt"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    fake: FakeFal, http: httpx.Client, app: str, body: dict[str, Any], field: str
) -> None:
    resp = http.post(f"/{app}", json=body)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert any(item["loc"][:2] == ["body", field] for item in detail), detail
    assert all(isinstance(item["msg"], str) and isinstance(item["type"], str) for item in detail)
    assert fake.submits == 0


def test_non_json_body_is_422(http: httpx.Client) -> None:
    resp = http.post(f"/{FULL}", content=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body"]


def test_guidance_scale_only_exists_on_full(http: httpx.Client) -> None:
    # dev and fast do not define it, and fal ignores fields an app does not define.
    submit(http, DEV, guidance_scale=99)
    submit(http, FULL, guidance_scale=20, loras=[{"path": "https://x.test/l.safetensors"}])


@pytest.mark.parametrize("preset", sorted(PRESET_SIZES))
def test_size_presets(http: httpx.Client, preset: str) -> None:
    answer = submit(http, FAST, image_size=preset)
    image = http.get(answer["response_url"]).json()["images"][0]
    assert (image["width"], image["height"]) == PRESET_SIZES[preset]


def test_output_defaults(http: httpx.Client) -> None:
    output = http.get(submit(http, DEV)["response_url"]).json()
    assert set(output) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    image = output["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (1024, 1024, "image/jpeg")
    assert output["has_nsfw_concepts"] == [False] and output["prompt"] == "a red fox in the snow"


def test_sync_mode_returns_data_uris(http: httpx.Client) -> None:
    answer = submit(http, FULL, sync_mode=True, output_format="png", num_images=2, image_size="square")
    images = http.get(answer["response_url"]).json()["images"]
    assert len(images) == 2
    for image in images:
        header, _, data = image["url"].partition(",")
        assert header == "data:image/png;base64"
        decoded = decode(base64.b64decode(data))
        assert (decoded.format, decoded.size) == ("PNG", (512, 512))


def test_queue_lifecycle(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.processing_s = 0.6
    first, second = submit(http), submit(http)
    assert (first["status"], first["queue_position"], second["queue_position"]) == ("IN_QUEUE", 0, 1)
    status = http.get(second["status_url"], params={"logs": "0"}).json()
    assert (status["status"], status["queue_position"]) == ("IN_QUEUE", 1)
    assert status["logs"] is None and status["request_id"] == second["request_id"]
    resp = http.get(second["response_url"])
    assert (resp.status_code, resp.json()) == (400, {"detail": "Request is still in progress"})

    time.sleep(0.3)
    for logs in ("1", "true"):
        status = http.get(first["status_url"], params={"logs": logs}).json()
        assert status["status"] == "IN_PROGRESS" and "queue_position" not in status
        assert [line["message"] for line in status["logs"]] == ["Generating 1 image(s)"]

    time.sleep(0.35)
    status = http.get(first["status_url"]).json()
    assert status["status"] == "COMPLETED" and status["logs"] is None and "error" not in status
    assert status["metrics"]["inference_time"] == pytest.approx(0.4)
    assert http.get(first["response_url"]).status_code == 200


def test_cancel_before_and_after_completion(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.processing_s = 30
    pending = submit(http)
    resp = http.put(pending["cancel_url"])
    assert (resp.status_code, resp.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert http.get(pending["status_url"]).json()["error_type"] == "request_cancelled"
    fake.faults.processing_s = 0
    done = submit(http)
    resp = http.put(done["cancel_url"])
    assert (resp.status_code, resp.json()) == (400, {"status": "ALREADY_COMPLETED"})


# --- faults -----------------------------------------------------------------------------------------------------


def test_latency(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.latency_s = 0.3
    started = time.monotonic()
    submit(http)
    assert time.monotonic() - started >= 0.3


def test_error_rate_hits_queue_routes_not_files(fake: FakeFal, http: httpx.Client) -> None:
    answer = submit(http)
    url = http.get(answer["response_url"]).json()["images"][0]["url"]
    fake.faults.error_rate = 1.0
    for resp in (http.post(f"/{FULL}", json={"prompt": "x"}), http.get(answer["status_url"])):
        assert resp.status_code == 500
        assert resp.headers["x-fal-error-type"] == "runner_server_error"
        assert resp.json()["error_type"] == "runner_server_error"
    assert http.get(url).status_code == 200
    assert fake.submits == 1


def test_throttle(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.throttle, fake.faults.retry_after_s = True, 3
    resp = http.post(f"/{FULL}", json={"prompt": "x"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert fake.submits == 0


def test_malformed(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.malformed = True
    resp = http.post(f"/{FULL}", json={"prompt": "x"})
    assert resp.status_code == 200
    with pytest.raises(ValueError):
        resp.json()


def test_hang_then_recover(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.hang = True
    with pytest.raises(httpx.ReadTimeout):
        http.post(f"/{FULL}", json={"prompt": "x"}, timeout=0.5)
    fake.faults.hang = False
    submit(http)


def test_stop_releases_hung_requests(fake: FakeFal) -> None:
    fake.faults.hang = True
    hung = threading.Thread(target=lambda: httpx.get(f"{fake.url}/{FULL}/requests/x/status", timeout=10))
    hung.start()
    time.sleep(0.2)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 3
    hung.join(timeout=5)
    assert not hung.is_alive()


def test_output_404(fake: FakeFal, http: httpx.Client) -> None:
    answer = submit(http)
    fake.faults.output_404 = True
    output = http.get(answer["response_url"]).json()
    assert http.get(output["images"][0]["url"]).status_code == 404
    fake.faults.output_404 = False
    assert http.get(output["images"][0]["url"]).status_code == 200


def test_fail_jobs(fake: FakeFal, http: httpx.Client) -> None:
    fake.faults.fail_jobs = True
    answer = submit(http)
    status = http.get(answer["status_url"]).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "runner_server_error" and status["error"]
    resp = http.get(answer["response_url"])
    assert resp.status_code == 500 and resp.headers["x-fal-error-type"] == "runner_server_error"
    assert resp.json()["error_type"] == "runner_server_error"


def test_stop_refuses_and_start_restores_on_the_same_port(fake: FakeFal, http: httpx.Client) -> None:
    answer = submit(http)
    port = fake.server.port
    fake.stop()
    with pytest.raises(httpx.ConnectError):
        http.get(answer["status_url"])
    fake.start()
    assert fake.server.port == port
    assert http.get(answer["status_url"]).json()["status"] == "COMPLETED"  # the queue is durable
