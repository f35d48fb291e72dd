"""Reserved budgets and in-flight caps: a burst never overspends, and every hold is given back exactly once.

Each test runs a real gateway (SQLite, then PostgreSQL) in front of the fake fal provider, sends real HTTP, and
reads the ledger rows and the reconcile report from the database afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from gateway.metering import price_usd
from gateway.reconcile import ReconcileReport, reconcile
from gateway.settings import DEFAULT_PRICES
from gateway.storage.db import open_database, session_factory
from tests.conftest import Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal

FAST_1MP = price_usd(DEFAULT_PRICES, model="hidream-i1-fast", width=1024, height=1024, images=1)  # $0.010486
CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"


def sql(url: str, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on the gateway's database; the rows it returns (committed)."""

    async def main() -> list[tuple[Any, ...]]:
        async with open_database(url) as engine, engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return [tuple(r) for r in result] if result.returns_rows else []

    return asyncio.run(main())


def audit(url: str) -> ReconcileReport:
    async def main() -> ReconcileReport:
        async with open_database(url) as engine, session_factory(engine)() as session:
            return await reconcile(session)

    return asyncio.run(main())


def money(value: Any) -> Decimal:
    """A money column read with plain SQL (SQLite gives a float), to the micro-dollar as the gateway reads it."""
    return Decimal(str(value)).quantize(Decimal("0.000001"))


def ledger(url: str, tenant_id: str) -> tuple[Decimal, Decimal, int]:
    """(spent, reserved) this month and the in-flight count of a tenant."""
    rows = sql(url, "SELECT spent_usd, reserved_usd FROM tenant_spend WHERE tenant_id = :t", t=tenant_id)
    spent = sum((money(r[0]) for r in rows), Decimal(0))
    reserved = sum((money(r[1]) for r in rows), Decimal(0))
    (in_flight,) = sql(url, "SELECT in_flight FROM tenants WHERE id = :t", t=tenant_id)[0]
    return spent, reserved, int(in_flight)


@pytest.fixture
def fal_gateway(make_gateway: GatewayFactory, database_url: str, fal: FakeFal) -> Gateway:
    return make_gateway(database_url, from_settings=True, **fal_only(fal), provider_max_in_flight=1000)


def burst(gw: Gateway, key: str, count: int, **body: Any) -> list[httpx.Response]:
    """``count`` image requests at once, each on its own connection."""

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=gw.url, timeout=120) as client:
            payload = {"model": "hidream-i1-fast", "prompt": "a fox", "size": "1024x1024", **body}
            return client.post("/v1/images/generations", json=payload, headers={"Authorization": f"Bearer {key}"})

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_a_burst_spends_exactly_the_budget_and_not_a_cent_more(fal_gateway: Gateway, fal: FakeFal) -> None:
    fal.faults.processing_s = 1.0  # every request is in flight while the others arrive
    tenant = fal_gateway.create_tenant(monthly_budget_usd=str(FAST_1MP * 5 + Decimal("0.000001")))
    answers = burst(fal_gateway, tenant["api_key"], 20)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 402]
    assert len(ok) == 5 and len(refused) == 15, [r.status_code for r in answers]
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    assert fal.submits == 5  # refused requests never reached a provider
    url = fal_gateway.settings.resolved_database_url
    assert ledger(url, tenant["tenant_id"]) == (FAST_1MP * 5, Decimal(0), 0)
    report = audit(url)
    assert report.mismatches == [] and report.checked["predictions"] == 5


def test_an_expensive_burst_on_a_tiny_budget_bills_nothing(fal_gateway: Gateway, fal: FakeFal) -> None:
    # Measured before reservations: 40 concurrent full n=4 requests on a $0.01 budget were all served ($8.39).
    tenant = fal_gateway.create_tenant(monthly_budget_usd="0.01")
    answers = burst(fal_gateway, tenant["api_key"], 40, model="hidream-i1-full", n=4)
    assert {r.status_code for r in answers} == {402}
    assert fal.submits == 0
    assert ledger(fal_gateway.settings.resolved_database_url, tenant["tenant_id"])[:2] == (Decimal(0), Decimal(0))


def test_failures_and_cancels_give_the_hold_back(fal_gateway: Gateway, fal: FakeFal) -> None:
    url = fal_gateway.settings.resolved_database_url
    tenant = fal_gateway.create_tenant(monthly_budget_usd=str(FAST_1MP), max_in_flight=1)
    key = tenant["api_key"]
    auth = {"Authorization": f"Bearer {key}"}

    fal.faults.fail_jobs = True
    assert fal_gateway.generate(key, size="1024x1024").status_code == 502
    assert ledger(url, tenant["tenant_id"]) == (Decimal(0), Decimal(0), 0)  # failed: nothing billed, hold released

    fal.faults.fail_jobs, fal.faults.processing_s = False, 30.0
    created = fal_gateway.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth)
    assert created.status_code == 201, created.text
    assert ledger(url, tenant["tenant_id"]) == (Decimal(0), FAST_1MP, 1)  # held while it runs
    canceled = fal_gateway.client.post(f"/v1/predictions/{created.json()['id']}/cancel", headers=auth)
    assert canceled.json()["status"] == "canceled"
    assert ledger(url, tenant["tenant_id"]) == (Decimal(0), Decimal(0), 0)

    fal.faults.processing_s = 0.0
    assert fal_gateway.generate(key, size="1024x1024").status_code == 200  # the whole budget was still there
    assert ledger(url, tenant["tenant_id"]) == (FAST_1MP, Decimal(0), 0)
    assert audit(url).mismatches == []


def test_in_flight_caps_per_tenant_and_per_key(fal_gateway: Gateway, fal: FakeFal) -> None:
    fal.faults.processing_s = 30.0
    tenant = fal_gateway.create_tenant(max_in_flight=2)
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}
    ids = []
    for _ in range(2):
        created = fal_gateway.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth)
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    refused = fal_gateway.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth)
    assert refused.status_code == 429 and refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("concurrency_limit_exceeded") and refused.headers["Retry-After"] == "1"
    fal_gateway.client.post(f"/v1/predictions/{ids[0]}/cancel", headers=auth)
    again = fal_gateway.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth)
    assert again.status_code == 201  # a slot came back when a job ended

    # A key of its own: one job at a time, whatever its tenant allows.
    resp = fal_gateway.admin("POST", f"/admin/tenants/{tenant['tenant_id']}/keys", json={"max_in_flight": 1})
    assert resp.status_code == 201 and resp.json()["max_in_flight"] == 1
    fal_gateway.admin("PATCH", f"/admin/tenants/{tenant['tenant_id']}", json={"max_in_flight": None})
    key_auth = {"Authorization": f"Bearer {resp.json()['api_key']}"}
    assert fal_gateway.client.post(CREATE, json={"input": {"prompt": "a"}}, headers=key_auth).status_code == 201
    second = fal_gateway.client.post(CREATE, json={"input": {"prompt": "a"}}, headers=key_auth)
    assert second.status_code == 429 and "API key" in second.json()["detail"]
    scraped = fal_gateway.client.get("/metrics").text
    assert 'hdg_refusals_total{reason="concurrency"} 2.0' in scraped
    assert audit(fal_gateway.settings.resolved_database_url).mismatches == []


def test_a_retry_racing_its_original_is_a_replay_not_a_refusal(fal_gateway: Gateway, fal: FakeFal) -> None:
    # One slot: the request that commits first takes it, and the duplicate, refused by that hold, is its replay.
    fal.faults.processing_s = 30.0
    tenant = fal_gateway.create_tenant(max_in_flight=1, monthly_budget_usd=str(FAST_1MP))
    headers = {"Authorization": f"Bearer {tenant['api_key']}", "Idempotency-Key": "retry-1"}

    def create(_: int) -> httpx.Response:
        with httpx.Client(base_url=fal_gateway.url, timeout=60) as client:
            return client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=headers)

    for _ in range(3):  # three rounds of two at once, then a late retry
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(create, range(2)))
        assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
        assert answers[0].json()["id"] == answers[1].json()["id"]
    assert fal.submits == 1


def test_a_key_budget_is_its_own(fal_gateway: Gateway) -> None:
    tenant = fal_gateway.create_tenant(monthly_budget_usd="100")
    resp = fal_gateway.admin(
        "POST", f"/admin/tenants/{tenant['tenant_id']}/keys", json={"monthly_budget_usd": str(FAST_1MP)}
    )
    capped = resp.json()["api_key"]
    assert fal_gateway.generate(capped, size="1024x1024").status_code == 200
    refused = fal_gateway.generate(capped, size="1024x1024")
    assert refused.status_code == 402 and "API key's monthly budget" in refused.json()["error"]["message"]
    assert fal_gateway.generate(tenant["api_key"], size="1024x1024").status_code == 200  # the tenant has room
    key_id = resp.json()["id"]
    lifted = fal_gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"monthly_budget_usd": None})
    assert lifted.status_code == 200 and lifted.json()["monthly_budget_usd"] is None
    assert fal_gateway.generate(capped, size="1024x1024").status_code == 200
    url = fal_gateway.settings.resolved_database_url
    rows = sql(url, "SELECT spent_usd FROM key_spend WHERE api_key_id = :k", k=key_id)
    assert [money(r[0]) for r in rows] == [FAST_1MP * 2]
    assert audit(url).mismatches == []


def test_limits_outside_the_columns_range_are_refused_with_400(fal_gateway: Gateway) -> None:
    tenant = fal_gateway.create_tenant()
    key_id = tenant["key_id"]
    for method, path, body in (
        ("POST", "/admin/tenants", {"name": "x", "rpm": 2**31}),
        ("PATCH", f"/admin/tenants/{tenant['tenant_id']}", {"max_in_flight": 2**31}),
        ("POST", f"/admin/tenants/{tenant['tenant_id']}/keys", {"rpm": 2**63}),
        ("PATCH", f"/admin/keys/{key_id}", {"max_in_flight": 2**40}),
        ("PATCH", f"/admin/keys/{key_id}", {"monthly_budget_usd": "-1"}),
    ):
        resp = fal_gateway.admin(method, path, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", (body, resp.text)


def test_reconcile_names_every_planted_mismatch(fal_gateway: Gateway) -> None:
    tenant = fal_gateway.create_tenant(monthly_budget_usd="10")
    for _ in range(2):
        assert fal_gateway.generate(tenant["api_key"], size="1024x1024").status_code == 200
    url = fal_gateway.settings.resolved_database_url
    assert audit(url).mismatches == []
    t = tenant["tenant_id"]
    sql(url, "UPDATE tenant_spend SET spent_usd = spent_usd + 1, reserved_usd = 0.5 WHERE tenant_id = :t", t=t)
    sql(url, "UPDATE tenants SET in_flight = 3 WHERE id = :t", t=t)
    (victim,) = sql(url, "SELECT prediction_id FROM usage_events WHERE tenant_id = :t LIMIT 1", t=t)[0]
    sql(url, "DELETE FROM usage_events WHERE prediction_id = :p", p=victim)
    lines = audit(url).mismatches
    assert any(line.startswith(f"prediction {victim} is succeeded but has no usage event") for line in lines)
    assert any(line.startswith("tenant spend") and t in line for line in lines), lines
    assert any(line.startswith("tenant reserved") and t in line for line in lines), lines
    assert any(line.startswith("tenant in_flight") and t in line for line in lines), lines

    # The repair sets every running total back to what its rows say (the deleted event's charge is gone for good:
    # spend follows the usage events that remain). Then the books balance again.
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "reconcile", "--repair"],
        env={**os.environ, "HDG_DATABASE_URL": url, "HDG_DATA_DIR": str(fal_gateway.settings.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # the prediction without an event still differs
    assert f"repaired tenant in_flight {t}: 3 -> 0" in result.stdout
    assert f"repaired tenant reserved ('{t}'" in result.stdout
    assert "has no usage event" in result.stdout and "reconcile: 1 mismatch" in result.stdout
    assert ledger(url, t) == (FAST_1MP, Decimal(0), 0)
