"""What tenants see, and what is recorded, when the backend cannot serve."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from gateway.backends.base import ImageJob
from gateway.backends.local import LocalBackend
from gateway.storage import queue
from gateway.storage.db import open_database, session_factory
from gateway.storage.models import Prediction, new_id, utcnow
from inference.runner import HiDreamRunner
from tests.conftest import Gateway, GatewayFactory


def _no_weights() -> HiDreamRunner:
    raise FileNotFoundError("/weights/HiDream-I1-Fast does not exist")


class _BrokenRunner:
    """Loads fine, then fails every generation, as a runner whose device has gone away would."""

    def generate(self, params: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _usage(gw: Gateway, key: str) -> dict[str, Any]:
    body: dict[str, Any] = gw.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()
    return body


def test_model_that_fails_to_load_makes_the_gateway_unready_and_answers_503(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    gw = make_gateway(sqlite_url, backend=LocalBackend(_no_weights, variants=frozenset({"fast"})))
    key = gw.create_tenant()["api_key"]

    # A failed load is a dead backend, not one still loading: its breaker is open, and /readyz says so.
    readyz = gw.client.get("/readyz")
    assert readyz.status_code == 503 and readyz.json()["checks"]["backends"] == {"local": "open"}
    resp = gw.generate(key)

    assert resp.status_code == 503 and resp.json()["error"]["code"] == "backend_unavailable"
    assert (
        "local is open" in resp.json()["error"]["message"] and "does not exist" not in resp.json()["error"]["message"]
    )
    # Why it is open (its health check's words) is for the operator, not for tenants.
    backends = {b["name"]: b for b in gw.admin("GET", "/admin/backends").json()["data"]}
    assert "does not exist" in backends["local"]["last_error"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert _usage(gw, key)["data"] == []  # refused before a job was made: nothing to bill or record


def test_generation_crash_is_502_recorded_as_failed_and_not_billed(
    make_gateway: GatewayFactory, database_url: str
) -> None:
    gw = make_gateway(
        database_url,
        backend=LocalBackend(lambda: _BrokenRunner(), variants=frozenset({"fast"})),  # type: ignore[arg-type, return-value]
    )
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key)

    assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error"
    assert "CUDA" not in resp.json()["error"]["message"]  # internals stay in the log
    usage = _usage(gw, key)
    [event] = usage["data"]
    assert event["status"] == "failed" and usage["summary"]["price_usd"] == "0.000000"
    failed = gw.client.get(
        f"/v1/images/generations/{event['prediction_id']}", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert failed["status"] == "failed" and failed["data"] == [] and failed["error"] == "local: the backend failed."


def test_variant_no_backend_serves_is_503(make_gateway: GatewayFactory, sqlite_url: str, runner: Any) -> None:
    gw = make_gateway(sqlite_url, backend=LocalBackend(lambda: runner, variants=frozenset({"fast"})))
    key = gw.create_tenant()["api_key"]
    resp = gw.generate(key, model="hidream-i1-full")
    assert resp.status_code == 503 and "hidream-i1-full" in resp.json()["error"]["message"]
    assert gw.generate(key, model="hidream-i1-fast").status_code == 200


def test_admin_patch_limits(sqlite_gateway: Gateway) -> None:
    tenant_id = sqlite_gateway.create_tenant(rpm=5, monthly_budget_usd="10")["tenant_id"]
    path = f"/admin/tenants/{tenant_id}"
    assert sqlite_gateway.admin("PATCH", path, json={"rpm": 7}).json()["rpm"] == 7
    kept = sqlite_gateway.admin("PATCH", path, json={"status": None}).json()
    assert kept["status"] == "active" and kept["rpm"] == 7 and kept["monthly_budget_usd"] == "10.00"
    cleared = sqlite_gateway.admin("PATCH", path, json={"rpm": None, "monthly_budget_usd": None}).json()
    assert cleared["rpm"] is None and cleared["monthly_budget_usd"] is None
    bad = sqlite_gateway.admin("PATCH", path, json={"plan": "gold"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "plan"
    assert sqlite_gateway.admin("PATCH", "/admin/tenants/ten_nobody", json={}).status_code == 400
    assert sqlite_gateway.admin("PATCH", f"/admin/tenants/ten_{'0' * 24}", json={}).status_code == 404


class _Exploding:
    """A backend with a bug: it raises something no adapter translated."""

    name = kind = "exploding"
    variants = frozenset({"fast"})

    async def generate(self, job: Any, *, timeout: float) -> Any:
        raise KeyError("urls")

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


def test_an_unexpected_exception_in_a_backend_still_fails_over(
    make_gateway: GatewayFactory, sqlite_url: str, runner: Any
) -> None:
    local = LocalBackend(lambda: runner, variants=frozenset({"fast"}))
    gw = make_gateway(sqlite_url, backend=[_Exploding(), local], route="exploding,local")
    key = gw.create_tenant()["api_key"]

    resp = gw.generate(key)

    assert resp.status_code == 200 and resp.headers["X-HDG-Backend"] == "local"
    assert resp.headers["X-HDG-Attempts"] == "2"
    health = {b["name"]: b for b in gw.admin("GET", "/admin/backends").json()["data"]}
    assert health["exploding"]["failures"] == 1 and health["exploding"]["last_error"] == "KeyError"


def test_nul_bytes_and_malformed_ids_are_client_errors_on_every_database(gateway: Gateway) -> None:
    key = gateway.create_tenant()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    resp = gateway.generate(key, prompt="a\u0000b")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    for path in ("/v1/images/generations/%00", "/v1/files/%00", "/v1/files/%00/content"):
        assert gateway.client.get(path, headers=auth).status_code == 404, path
    assert gateway.client.get("/files/%00", params={"expires": 9999999999, "signature": "x"}).status_code == 403
    assert gateway.client.get("/files/file_x", params={"expires": 9999999999, "signature": "é"}).status_code == 403
    assert gateway.admin("POST", "/admin/keys/%00/revoke").status_code == 400
    assert gateway.admin("POST", "/admin/tenants", json={"name": "a\u0000b"}).status_code == 400
    assert gateway.admin("GET", "/admin/usage", params={"tenant_id": "\u0000"}).status_code == 400


def _leave_running(database_url: str, tenant: dict[str, Any], job: dict[str, Any]) -> str:
    """A job row as a process that died mid-job leaves it: processing, its lease run out, nobody renewing it."""

    async def insert() -> str:
        now = utcnow()
        p = Prediction(
            id=new_id("gen"),
            tenant_id=tenant["tenant_id"],
            api_key_id=tenant["key_id"],
            model="hidream-i1-fast",
            status="processing",
            prompt="x",
            params={},
            width=1024,
            height=1024,
            n=1,
            seed=1,
            attempts=0,
            created_at=now - timedelta(minutes=1),
            job=job,
            route="cheapest",
            available_at=now - timedelta(minutes=1),
            deadline_at=now + timedelta(minutes=5),
            lease_owner="run_dead",
            lease_expires_at=now - timedelta(seconds=1),
            started_at=now - timedelta(minutes=1),
            cancel_requested=False,
            logs="",
        )
        async with open_database(database_url) as engine, session_factory(engine).begin() as session:
            await (await session.connection()).run_sync(queue.insert_job, p)
        return p.id

    return asyncio.run(insert())


def _until_status(gw: Gateway, key: str, prediction_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    auth = {"Authorization": f"Bearer {key}"}
    while (body := gw.client.get(f"/v1/images/generations/{prediction_id}", headers=auth).json())["status"] != status:
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def test_a_job_a_dead_process_left_running_is_taken_over_and_billed_once(
    make_gateway: GatewayFactory, database_url: str
) -> None:
    first = make_gateway(database_url)
    tenant = first.create_tenant()
    job = ImageJob(variant="fast", prompt="x", width=1024, height=1024, seed=1, num_inference_steps=2)
    stale_id = _leave_running(database_url, tenant, asdict(job))
    second = make_gateway(database_url)  # a restart: its claim loop takes the job over
    _until_status(second, tenant["api_key"], stale_id, "succeeded")
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}
    [event] = second.client.get("/v1/usage/events", headers=auth).json()["data"]
    assert event["prediction_id"] == stale_id and event["status"] == "succeeded" and event["price_usd"] != "0.000000"


def test_a_job_whose_stored_input_cannot_be_read_fails_once_instead_of_looping(sqlite_gateway: Gateway) -> None:
    tenant = sqlite_gateway.create_tenant()
    bad_id = _leave_running(sqlite_gateway.settings.resolved_database_url, tenant, {"variant": "fast", "renamed": 1})
    body = _until_status(sqlite_gateway, tenant["api_key"], bad_id, "failed")
    assert body["error"] == "The job's stored input is invalid."
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}
    [event] = sqlite_gateway.client.get("/v1/usage/events", headers=auth).json()["data"]
    assert event["status"] == "failed" and event["price_usd"] == "0.000000"
