"""POST /v1/images/generations end to end: real HTTP, real tiny pipeline, real image bytes."""

from __future__ import annotations

import base64
import io
import threading
import time

from PIL import Image

from tests.conftest import Gateway, GatewayFactory


def _image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_generate_returns_signed_url_to_a_real_png_and_bills_once(gateway: Gateway) -> None:
    key = gateway.create_tenant()["api_key"]

    resp = gateway.generate(key, prompt="a lighthouse at dusk", seed=11)

    assert resp.status_code == 200, resp.text
    assert resp.headers["X-HDG-Backend"] == "local"
    assert resp.headers["X-Request-Id"].startswith("req_")
    body = resp.json()
    assert body["model"] == "hidream-i1-fast" and body["size"] == "1024x1024" and body["seed"] == 11
    assert isinstance(body["created"], int)
    [item] = body["data"]
    assert item["revised_prompt"] is None and "b64_json" not in item
    image = gateway.client.get(item["url"])  # no API key: the signature is the credential
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    img = _image(image.content)
    assert img.format == "PNG" and img.size == (1024, 1024)

    usage = gateway.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()
    [event] = usage["data"]
    assert event["prediction_id"] == body["id"]
    assert event["status"] == "succeeded" and event["images"] == 1 and event["backend"] == "local"
    # 1024x1024 at the default $0.01 per megapixel for fast.
    assert event["price_usd"] == "0.010486"
    assert usage["summary"] == {"requests": 1, "images": 1, "price_usd": "0.010486"}


def test_b64_json_jpeg_and_size_mapped_to_nearest_resolution(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]

    resp = sqlite_gateway.generate(key, size="1920x1080", response_format="b64_json", output_format="jpeg", n=2)

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["size"] == "1360x768" and body["output_format"] == "jpeg"
    assert len(body["data"]) == 2
    images = [_image(base64.b64decode(d["b64_json"])) for d in body["data"]]
    assert all(img.format == "JPEG" and img.size == (1360, 768) for img in images)
    assert images[0].tobytes() != images[1].tobytes()  # each image has its own seed


def test_webp_output(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    resp = sqlite_gateway.generate(key, size="832x1248", response_format="b64_json", output_format="webp")
    assert resp.status_code == 200, resp.text
    img = _image(base64.b64decode(resp.json()["data"][0]["b64_json"]))
    assert img.format == "WEBP" and img.size == (832, 1248)


def test_same_seed_same_pixels_other_seed_other_pixels(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]

    def pixels(seed: int) -> bytes:
        resp = sqlite_gateway.generate(key, seed=seed, response_format="b64_json")
        assert resp.status_code == 200, resp.text
        return _image(base64.b64decode(resp.json()["data"][0]["b64_json"])).tobytes()

    assert pixels(5) == pixels(5)
    assert pixels(5) != pixels(6)


def test_get_generation_returns_fresh_urls(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    created = sqlite_gateway.generate(key).json()

    resp = sqlite_gateway.client.get(
        f"/v1/images/generations/{created['id']}", headers={"Authorization": f"Bearer {key}"}
    )

    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "succeeded" and body["id"] == created["id"]
    assert sqlite_gateway.client.get(body["data"][0]["url"]).status_code == 200


def test_full_queue_answers_503_with_retry_after(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url, queue_size=0)
    key = gw.create_tenant()["api_key"]
    first: dict[str, int] = {}
    slow = threading.Thread(target=lambda: first.update(status=gw.generate(key, num_inference_steps=30).status_code))
    slow.start()
    deadline = time.monotonic() + 30
    while gw.backend.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    busy = gw.generate(key)

    assert busy.status_code == 503
    assert int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["code"] == "backend_busy"
    slow.join()
    assert first["status"] == 200


def test_timeout_fails_the_prediction_and_bills_nothing(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url, request_timeout_seconds=0.3)
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key, num_inference_steps=40)

    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    usage = gw.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()
    [event] = usage["data"]
    assert event["status"] == "failed" and event["price_usd"] == "0.000000"
    assert usage["summary"]["price_usd"] == "0.000000"


def test_the_schema_documents_the_create_body_and_headers(sqlite_gateway: Gateway) -> None:
    # The route reads its body and headers itself (no FastAPI parameters): the schema must still say what it takes.
    operation = sqlite_gateway.client.get("/openapi.json").json()["paths"]["/v1/images/generations"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"]
    assert {"prompt", "model", "n", "size", "response_format", "seed"} <= set(schema["properties"])
    assert {p["name"] for p in operation["parameters"] if p["in"] == "header"} == {"X-HDG-Route", "Idempotency-Key"}
