"""Idempotency-Key on both create endpoints, and what a client hanging up does to its job."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from gateway.storage.db import open_database
from gateway.storage.models import IdempotencyKey, utcnow
from tests.conftest import FAST, Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal

MODEL = "hidream-ai/hidream-i1-fast"
INPUT = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}


def _usage(gw: Gateway, key: str) -> list[dict[str, Any]]:
    resp = gw.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"})
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def _post(gw: Gateway, key: str, idem: str | None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} | ({"Idempotency-Key": idem} if idem else {})
    return gw.client.post("/v1/images/generations", json={**FAST, "prompt": "a fox", **body}, headers=headers)


def test_a_retry_with_the_key_gets_the_same_generation_and_one_charge(gateway: Gateway) -> None:
    key = gateway.create_tenant()["api_key"]
    first = _post(gateway, key, "retry-1", response_format="b64_json")
    again = _post(gateway, key, "retry-1", response_format="b64_json")
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert base64.b64decode(again.json()["data"][0]["b64_json"]) == base64.b64decode(
        first.json()["data"][0]["b64_json"]
    )
    reordered = gateway.client.post(  # the same JSON with other key order and spacing is the same request
        "/v1/images/generations",
        content=b'{"response_format": "b64_json", "prompt":"a fox",  "num_inference_steps": 2, '
        b'"model": "hidream-i1-fast"}',
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "retry-1", "Content-Type": "application/json"},
    )
    assert reordered.json()["id"] == first.json()["id"]
    assert len(_usage(gateway, key)) == 1
    # Keys belong to a tenant: another tenant's identical key is another request.
    other = gateway.create_tenant("other")["api_key"]
    assert _post(gateway, other, "retry-1", response_format="b64_json").json()["id"] != first.json()["id"]


def test_the_same_key_with_another_body_is_a_conflict(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    key = gw.create_tenant()["api_key"]
    assert _post(gw, key, "k").status_code == 200
    conflict = _post(gw, key, "k", prompt="a different fox")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    auth = {"Authorization": f"Bearer {key}", "Idempotency-Key": "p", "Prefer": "wait"}
    first = gw.client.post(f"/v1/models/{MODEL}/predictions", json={"input": INPUT}, headers=auth)
    same = gw.client.post(f"/v1/models/{MODEL}/predictions", json={"input": INPUT}, headers=auth)
    assert first.status_code == same.status_code == 201 and first.json()["id"] == same.json()["id"]
    other = gw.client.post(f"/v1/models/{MODEL}/predictions", json={"input": INPUT | {"seed": 1}}, headers=auth)
    assert other.status_code == 409 and other.headers["content-type"] == "application/problem+json"
    bad = _post(gw, key, "has space")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
    assert len(_usage(gw, key)) == 2


def test_concurrent_duplicates_make_one_job(gateway: Gateway) -> None:
    key = gateway.create_tenant()["api_key"]
    answers: list[httpx.Response] = []
    start = threading.Barrier(6)

    def send() -> None:
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            start.wait()
            answers.append(
                client.post(
                    f"/v1/models/{MODEL}/predictions",
                    json={"input": INPUT},
                    headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "burst", "Prefer": "wait"},
                )
            )

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    usage = _usage(gateway, key)
    assert len(usage) == 1 and usage[0]["status"] == "succeeded"


@pytest.fixture
def fal_gateway(make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal) -> Gateway:
    return make_gateway(
        sqlite_url,
        from_settings=True,
        **fal_only(fal),
    )


def _latest(gw: Gateway, key: str) -> dict[str, Any]:
    page = gw.client.get("/v1/predictions", headers={"Authorization": f"Bearer {key}"}).json()
    latest: dict[str, Any] = page["results"][0]
    return latest


def _until(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_hanging_up_without_a_key_cancels_the_job_unbilled(fal_gateway: Gateway, fal: FakeFal) -> None:
    gw = fal_gateway
    key = gw.create_tenant()["api_key"]
    fal.faults.processing_s = 30
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=gw.url, timeout=1.5) as impatient:
        impatient.post(
            "/v1/images/generations", json={**FAST, "prompt": "a fox"}, headers={"Authorization": f"Bearer {key}"}
        )
    _until(lambda: _latest(gw, key)["status"] == "canceled")
    assert fal.submits == 1 and all(job.cancelled for job in fal._jobs.values())
    assert [(e["status"], e["price_usd"]) for e in _usage(gw, key)] == [("canceled", "0.000000")]


def test_hanging_up_with_a_key_keeps_the_job_and_a_retry_reattaches(fal_gateway: Gateway, fal: FakeFal) -> None:
    gw = fal_gateway
    key = gw.create_tenant()["api_key"]
    fal.faults.processing_s = 4
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "resume-me"}
    body = {**FAST, "prompt": "a fox"}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=gw.url, timeout=1.5) as impatient:
        impatient.post("/v1/images/generations", json=body, headers=headers)
    assert _latest(gw, key)["status"] in ("starting", "processing")
    retry = gw.client.post("/v1/images/generations", json=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == _latest(gw, key)["id"]
    assert fal.submits == 1
    usage = _usage(gw, key)
    assert len(usage) == 1 and usage[0]["status"] == "succeeded" and usage[0]["price_usd"] != "0.000000"


def test_a_key_is_kept_for_24_hours_then_free_again(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    key = gw.create_tenant()["api_key"]
    first = _post(gw, key, "daily")
    assert _post(gw, key, "daily", prompt="another fox").status_code == 409

    async def age(hours: float) -> None:
        async with open_database(gw.settings.resolved_database_url) as engine, engine.begin() as conn:
            await conn.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=hours)))

    asyncio.run(age(23.9))
    assert _post(gw, key, "daily").json()["id"] == first.json()["id"]  # still the same request
    asyncio.run(age(24.1))
    again = _post(gw, key, "daily", prompt="another fox")
    assert again.status_code == 200 and again.json()["id"] != first.json()["id"]
    assert len(_usage(gw, key)) == 2
