"""Routing by cost and availability with failover, end to end: a real worker and fake Replicate and fal servers."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.conftest import WORKER_TOKEN, Gateway, GatewayFactory
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import ServerThread


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


@pytest.fixture
def providers(
    make_gateway: GatewayFactory, database_url: str, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal
) -> Any:
    """Start a gateway whose backends are the worker and both fakes, built from its settings."""

    def start(**overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "backends": ["worker", "replicate", "fal"],
            "worker_urls": [worker_app.url],
            "worker_token": WORKER_TOKEN,
            "replicate_api_token": replicate.token,
            "replicate_base_url": replicate.url,
            "replicate_output_hosts": [replicate.url],  # the fakes serve outputs themselves, over plain http
            "fal_key": fal.key,
            "fal_base_url": fal.url,
            "fal_output_hosts": [fal.url],
            "provider_poll_seconds": 0.05,
        }
        return make_gateway(database_url, from_settings=True, **(settings | overrides))

    return start


def _usage(gw: Gateway, key: str) -> dict[str, Any]:
    """The key's tenant's usage events as the admin sees them (with what each backend cost us)."""
    body: dict[str, Any] = gw.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()
    assert all("cost_usd" not in e for e in body["data"])  # a tenant never sees our costs
    ids = {e["prediction_id"] for e in body["data"]}
    everyone = gw.admin("GET", "/admin/usage/events").json()["data"]
    body["data"] = [e for e in everyone if e["prediction_id"] in ids]
    return body


def _backends(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in gw.admin("GET", "/admin/backends").json()["data"]}


def test_cheapest_live_backend_serves_and_failover_walks_the_price_list(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = providers()
    key = gw.create_tenant()["api_key"]

    first = gw.generate(key)
    assert first.status_code == 200 and first.headers["X-HDG-Backend"] == "worker"

    worker_app.stop()  # our GPU goes away: the next cheapest is Replicate ($0.010 an image)
    second = gw.generate(key)
    assert second.status_code == 200, second.text
    assert (second.headers["X-HDG-Backend"], second.headers["X-HDG-Attempts"]) == ("replicate", "2")

    replicate.faults.throttle = True  # Replicate says 429: fal ($0.010486 a 1024x1024 fast image) is last
    replicate.faults.retry_after_s = 30
    third = gw.generate(key)
    assert (third.headers["X-HDG-Backend"], third.headers["X-HDG-Attempts"]) == ("fal", "3")
    img = Image.open(io.BytesIO(gw.client.get(third.json()["data"][0]["url"]).content))
    assert img.format == "PNG" and img.size == (1024, 1024)  # same shape whoever served it

    usage = _usage(gw, key)
    assert [(e["backend"], e["attempts"], e["cost_usd"]) for e in usage["data"]] == [
        ("worker", 1, usage["data"][0]["cost_usd"]),
        ("replicate", 2, "0.010000"),
        ("fal", 3, "0.010486"),
    ]
    assert {e["price_usd"] for e in usage["data"]} == {"0.010486"}  # the tenant's price does not change
    health = _backends(gw)
    # Replicate asked for 30 s; the gateway waits at most 10 before asking again.
    assert health["worker"]["failures"] == 2 and 5 < health["replicate"]["throttled_for_s"] <= 10
    assert replicate.creates == 1 and fal.submits == 1


def test_a_price_change_through_the_admin_api_routes_the_very_next_request_by_the_new_prices(
    providers: Any, replicate: FakeReplicate
) -> None:
    gw = providers()
    key = gw.create_tenant()["api_key"]
    assert gw.generate(key).headers["X-HDG-Backend"] == "worker"  # the cheapest, now routed (and estimated) once

    # Our GPU became dearer than Replicate's $0.010 an image: the next request goes there, at the new estimate.
    changed = gw.admin("PUT", "/admin/backends/worker/costs", json={"fast": {"per_image": "0.02"}})
    assert changed.status_code == 200, changed.text
    moved = gw.generate(key)
    assert (moved.headers["X-HDG-Backend"], moved.headers["X-HDG-Attempts"]) == ("replicate", "1")

    changed = gw.admin("PUT", "/admin/backends/worker/costs", json={"fast": {"per_image": "0.001"}})
    assert changed.status_code == 200, changed.text
    back = gw.generate(key)
    assert back.headers["X-HDG-Backend"] == "worker"
    assert replicate.creates == 1
    assert [e["backend"] for e in _usage(gw, key)["data"]] == ["worker", "replicate", "worker"]


@pytest.mark.parametrize(
    "fault",
    [
        {"error_rate": 1.0},
        {"malformed": True},
        {"output_404": True},
        {"fail_jobs": True},
        {"hang": True},
    ],
)
def test_broken_replicate_fails_over_to_fal_and_bills_once(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal, fault: dict[str, Any]
) -> None:
    worker_app.stop()
    gw = providers(attempt_timeout_seconds=1.0)
    key = gw.create_tenant()["api_key"]
    for name, value in fault.items():
        setattr(replicate.faults, name, value)

    resp = gw.generate(key)

    replicate.faults.hang = False
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-HDG-Backend"] == "fal"
    [event] = _usage(gw, key)["data"]
    assert event["backend"] == "fal" and event["status"] == "succeeded" and event["cost_usd"] == "0.010486"


def test_slow_backend_past_the_attempt_timeout_is_cancelled_and_skipped(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal
) -> None:
    worker_app.stop()
    replicate.faults.processing_s = 30
    gw = providers(attempt_timeout_seconds=1.5)
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key)

    assert resp.headers["X-HDG-Backend"] == "fal"
    [prediction] = replicate.predictions.values()
    assert prediction["status"] == "canceled"  # we stopped paying for it


def test_input_error_from_a_backend_is_returned_not_retried(
    providers: Any, replicate: FakeReplicate, fal: FakeFal
) -> None:
    # The gateway accepts longer prompts than the worker does, so the worker's 422 is the input's fault.
    gw = providers(max_prompt_chars=30_000)
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key, prompt="x" * 25_000)

    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert replicate.creates == 0 and fal.submits == 0
    assert _backends(gw)["worker"]["circuit"] == "closed"


def test_circuit_opens_skips_the_broken_backend_then_a_good_health_probe_recovers_it_at_once(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate
) -> None:
    # The breaker would stay open for a minute on its timer: only the health probe can bring the worker back sooner.
    gw = providers(breaker_failures=2, breaker_open_seconds=60, health_interval_seconds=0.2)
    key = gw.create_tenant()["api_key"]
    assert gw.client.get("/readyz").json()["checks"]["backends"]["worker"] == "up"
    worker_app.stop()  # after its health check passed: only real traffic finds out
    assert [gw.generate(key).headers["X-HDG-Attempts"] for _ in range(2)] == ["2", "2"]
    assert _backends(gw)["worker"]["state"] == "open"

    skipped = gw.generate(key)  # open: not even tried
    assert (skipped.headers["X-HDG-Backend"], skipped.headers["X-HDG-Attempts"]) == ("replicate", "1")
    deadline = time.monotonic() + 10
    while _backends(gw)["worker"]["probe"] != "down":  # the prober, asking an open backend, finds it gone
        assert time.monotonic() < deadline
        time.sleep(0.05)

    worker_app.start()
    time.sleep(1.0)  # a few probe intervals: the probe that finds it back makes it half-open
    trial = gw.generate(key)  # the trial
    assert (trial.headers["X-HDG-Backend"], trial.headers["X-HDG-Attempts"]) == ("worker", "1")
    assert _backends(gw)["worker"]["circuit"] == "closed" and _backends(gw)["worker"]["state"] == "up"
    assert replicate.creates == 3


def test_route_header_tenant_allow_list_and_no_candidate(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = providers()
    key = gw.create_tenant()["api_key"]

    assert (
        gw.client.post(
            "/v1/images/generations",
            json={"prompt": "x", "num_inference_steps": 1},
            headers={"Authorization": f"Bearer {key}", "X-HDG-Route": "fal,replicate"},
        ).headers["X-HDG-Backend"]
        == "fal"
    )
    bad = gw.client.post(
        "/v1/images/generations",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {key}", "X-HDG-Route": "midjourney"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-HDG-Route"
    # Valid names, but more text than a job's row keeps: refused before it is parsed (or kept by the parse cache).
    endless = gw.client.post(
        "/v1/images/generations",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {key}", "X-HDG-Route": ",".join(["fal"] * 100_000)},
    )
    assert endless.status_code == 400 and endless.json()["error"]["param"] == "X-HDG-Route"
    assert "longer than 200 characters" in endless.json()["error"]["message"]

    only_fal = gw.create_tenant("only-fal", allowed_backends=["fal"], route="cheapest")
    assert gw.generate(only_fal["api_key"]).headers["X-HDG-Backend"] == "fal"
    fal.stop()
    down = gw.generate(only_fal["api_key"])
    assert down.status_code == 502 and down.json()["error"]["code"] == "backend_error"  # tried, and it failed
    assert [a["outcome"] for a in down.json()["error"]["attempts"]] == ["unreachable"]
    for _ in range(3):  # open fal's circuit: now nothing is eligible, answered without trying
        gw.generate(only_fal["api_key"])
    none_left = gw.generate(only_fal["api_key"])
    assert none_left.status_code == 503 and "No backend can serve" in none_left.json()["error"]["message"]
    assert gw.generate(key).headers["X-HDG-Backend"] == "worker"  # other tenants are unaffected


def test_killing_a_backend_mid_run_loses_no_request_and_bills_none_twice(
    providers: Any, worker_app: ServerThread, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = providers()
    key = gw.create_tenant()["api_key"]
    statuses: list[int] = []
    lock = threading.Lock()

    def client_loop() -> None:
        for _ in range(6):
            status = gw.generate(key).status_code
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    while len(statuses) < 4:
        threading.Event().wait(0.02)
    replicate.faults.error_rate = 1.0  # broken already, and unused while the worker is up
    worker_app.stop()  # mid-run
    for t in threads:
        t.join()

    assert statuses == [200] * 18
    usage = _usage(gw, key)
    assert usage["summary"]["requests"] == 18 and usage["summary"]["images"] == 18
    predictions = [e["prediction_id"] for e in usage["data"]]
    assert len(set(predictions)) == 18  # one usage event per generation
    assert {e["backend"] for e in usage["data"]} <= {"worker", "fal"} and fal.submits >= 1
