"""The self-hosted worker protocol, and the gateway's ``worker`` backend talking to it."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import WORKER_TOKEN, GatewayFactory
from tests.fakes.server import ServerThread, free_port

AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}
JOB = {"variant": "fast", "prompt": "a kite", "width": 1248, "height": 832, "seed": 4, "num_inference_steps": 1}


def test_worker_generates_and_reports_health(worker_app: ServerThread) -> None:
    health = httpx.get(f"{worker_app.url}/health", headers=AUTH).json()
    assert health["variants"] == ["dev", "fast", "full"] and health["capacity"] == 5

    resp = httpx.post(f"{worker_app.url}/generate", json=JOB | {"n": 2}, headers=AUTH, timeout=60)

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["width"], body["height"], body["content_type"]) == (1248, 832, "image/png")
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images"]]
    assert [img.size for img in images] == [(1248, 832)] * 2
    assert body["timings"]["inference_s"] > 0
    assert httpx.get(f"{worker_app.url}/health", headers=AUTH).json()["ready"] is True


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"width": 1000}, 422),
        ({"variant": "turbo"}, 422),
        ({"prompt": ""}, 422),
        ({"seed": -1}, 422),
        ({"surprise": 1}, 422),
    ],
)
def test_worker_rejects_bad_input_with_422(worker_app: ServerThread, change: dict[str, object], status: int) -> None:
    resp = httpx.post(f"{worker_app.url}/generate", json=JOB | change, headers=AUTH)
    assert resp.status_code == status


def test_worker_needs_its_token(worker_app: ServerThread) -> None:
    assert httpx.post(f"{worker_app.url}/generate", json=JOB).status_code == 401
    assert httpx.get(f"{worker_app.url}/health", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_gateway_serves_through_a_worker_with_the_same_response_shape(
    make_gateway: GatewayFactory, sqlite_url: str, worker_app: ServerThread
) -> None:
    gw = make_gateway(
        sqlite_url,
        from_settings=True,
        backends=["worker"],
        worker_urls=[worker_app.url],
        worker_token=WORKER_TOKEN,
    )
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key, output_format="webp", size="1168x880", n=2)

    assert resp.status_code == 200, resp.text
    assert resp.headers["X-HDG-Backend"] == "worker" and resp.headers["X-HDG-Attempts"] == "1"
    body = resp.json()
    assert body["size"] == "1168x880" and len(body["data"]) == 2
    img = Image.open(io.BytesIO(gw.client.get(body["data"][0]["url"]).content))
    assert img.format == "WEBP" and img.size == (1168, 880)
    [event] = gw.admin("GET", "/admin/usage/events").json()["data"]  # the admin view carries our costs
    # Self-hosted cost is GPU time the worker measured, at the configured rate.
    assert event["backend"] == "worker" and float(event["cost_usd"]) > 0 and event["images"] == 2


def test_wrong_worker_token_opens_nothing_to_the_tenant_but_a_503(
    make_gateway: GatewayFactory, sqlite_url: str, worker_app: ServerThread
) -> None:
    gw = make_gateway(
        sqlite_url, from_settings=True, backends=["worker"], worker_urls=[worker_app.url], worker_token="wrong"
    )
    key = gw.create_tenant()["api_key"]
    resp = gw.generate(key)
    assert resp.status_code == 503 and "worker is open" in resp.json()["error"]["message"]
    assert "wrong" not in resp.text
    # Why it is open is the operator's to read (and its health check's words never reach a tenant).
    backends = {b["name"]: b for b in gw.admin("GET", "/admin/backends").json()["data"]}
    assert "credentials" in backends["worker"]["last_error"] and "wrong" not in str(backends)


def test_hidream_gateway_worker_command_serves_the_protocol(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HDG_")} | {
        "HDG_DATA_DIR": str(tmp_path),
        "HDG_WORKER_TOKEN": WORKER_TOKEN,
        "HDG_LOCAL_VARIANTS": "fast",
    }
    cli = str(Path(sys.executable).parent / "hidream-gateway")
    proc = subprocess.Popen([cli, "worker", "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", headers=AUTH).json()["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        resp = httpx.post(f"{url}/generate", json=JOB, headers=AUTH, timeout=60)
        assert resp.status_code == 200
        assert httpx.post(f"{url}/generate", json=JOB | {"variant": "full"}, headers=AUTH).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _SlowRunner:
    """Takes ``seconds`` per generation (a stand-in for a busy GPU)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def generate(self, params: Any) -> Any:
        time.sleep(self.seconds)
        raise RuntimeError("only its duration matters here")


def test_a_caller_that_hangs_up_leaves_the_queue() -> None:
    from inference.serving import GenerationQueue
    from inference.worker import create_worker_app

    queue = GenerationQueue(lambda: _SlowRunner(3.0), queue_size=4)
    app = create_worker_app(queue, token=None, variants=frozenset({"fast"}))
    with ServerThread(app) as server:
        busy = threading.Thread(target=lambda: httpx.post(f"{server.url}/generate", json=JOB, timeout=30))
        busy.start()
        while queue.pending < 1:
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):  # the gateway gives up on a queued job
            httpx.post(f"{server.url}/generate", json=JOB, timeout=0.3)
        assert queue.pending == 2
        deadline = time.monotonic() + 2.5
        while queue.pending > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.pending == 1  # dropped before it ever reached the GPU; the running one carries on
        busy.join()
