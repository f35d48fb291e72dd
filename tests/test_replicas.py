"""Two gateway processes on one PostgreSQL database (and one Redis), as the README's replica setup runs them.

What was measured before this worked: a burst over two processes against a budget for 50 images served and billed
200; rpm was counted per process; processes started together on a fresh data dir could hold different URL-signing
keys, so a URL signed by one got 403 from the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.reconcile import reconcile
from gateway.storage.db import open_database, session_factory
from tests.fakes.fal import FakeFal
from tests.gateway_process import GatewayProcess
from tests.test_budgets import FAST_1MP, money, sql

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer replicas-admin-token"}
CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"
INPUT = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "output_format": "jpg"}
TERMINAL = {"succeeded", "failed", "canceled"}

Replicas = Callable[..., list[GatewayProcess]]


def env_for(fal: FakeFal, database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "HDG_DATA_DIR": str(data_dir),
        "HDG_DATABASE_URL": database_url,
        "HDG_ADMIN_TOKEN": ADMIN["Authorization"].split()[1],
        "HDG_BACKENDS": "fal",
        "FAL_KEY": fal.key,
        "HDG_FAL_BASE_URL": fal.url,
        "HDG_FAL_OUTPUT_HOSTS": fal.url,
        "HDG_PROVIDER_POLL_SECONDS": "0.2",
        "HDG_PROVIDER_MAX_IN_FLIGHT": "1000",
        **extra,
    }


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    """Start gateway processes at the same moment (as a deployment does); all are killed after the test."""
    started: list[GatewayProcess] = []

    def start(*envs: Mapping[str, str]) -> list[GatewayProcess]:
        procs = [GatewayProcess(env, log_path=tmp_path / f"gw{len(started) + i}.log") for i, env in enumerate(envs)]
        started.extend(procs)
        with ThreadPoolExecutor(len(procs)) as pool:
            return list(pool.map(lambda p: p.start(), procs))

    yield start
    for gw in started:
        gw.kill()
        print(f"==== {gw.log_path.name} ====\n{gw.log_tail()}")


def create_tenant(gw: GatewayProcess, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{gw.url}/admin/tenants", json={"name": "acme", **fields}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_a_burst_over_two_replicas_overspends_by_zero(
    replicas: Replicas, fal: FakeFal, postgres_url: str, tmp_path: Path
) -> None:
    fal.faults.processing_s = 2.0
    a, b = replicas(*(env_for(fal, postgres_url, tmp_path / "data") for _ in range(2)))
    budget = FAST_1MP * 50 + Decimal("0.000001")
    tenant = create_tenant(a, monthly_budget_usd=str(budget))
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}

    def create(i: int) -> httpx.Response:
        gw = (a, b)[i % 2]
        return httpx.post(f"{gw.url}{CREATE}", json={"input": INPUT}, headers=auth, timeout=60)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(create, range(200)))
    created = [r.json()["id"] for r in answers if r.status_code == 201]
    refused = [r for r in answers if r.status_code == 402]
    assert len(created) == 50 and len(refused) == 150, sorted({r.status_code for r in answers})
    assert refused[0].headers["content-type"] == "application/problem+json"
    assert refused[0].json()["type"].endswith("budget_exceeded")

    with httpx.Client(timeout=30) as http:
        for pid in created:
            for _ in range(200):
                status = http.get(f"{a.url}/v1/predictions/{pid}", headers=auth).json()["status"]
                if status in TERMINAL:
                    break
                time.sleep(0.1)
            assert status == "succeeded", (pid, status)
    rows = sql(
        postgres_url, "SELECT spent_usd, reserved_usd FROM tenant_spend WHERE tenant_id = :t", t=tenant["tenant_id"]
    )
    assert [(money(s), money(r)) for s, r in rows] == [(FAST_1MP * 50, Decimal(0))]
    assert fal.submits == 50

    async def audit() -> list[str]:
        async with open_database(postgres_url) as engine, session_factory(engine)() as session:
            return (await reconcile(session)).mismatches

    assert asyncio.run(audit()) == []


def test_rate_limits_hold_across_replicas_through_redis(
    replicas: Replicas, fal: FakeFal, postgres_url: str, tmp_path: Path
) -> None:
    shared = {"HDG_REDIS_URL": "redis://127.0.0.1:6379/0"}
    a, b = replicas(*(env_for(fal, postgres_url, tmp_path / f"d{i}", **shared) for i in range(2)))
    tenant = create_tenant(a, rpm=10)
    auth = {"Authorization": f"Bearer {tenant['api_key']}"}
    codes = [
        httpx.post(f"{gw.url}{CREATE}", json={"input": INPUT}, headers=auth, timeout=30).status_code
        for gw in (a, b) * 10
    ]
    assert codes.count(201) == 10 and codes.count(429) == 10, codes


def test_a_url_signed_by_one_replica_is_served_by_the_other(
    replicas: Replicas, fal: FakeFal, postgres_url: str, tmp_path: Path
) -> None:
    # No HDG_URL_SIGNING_SECRET and a fresh database: both processes race to make the key at the same moment.
    a, b = replicas(*(env_for(fal, postgres_url, tmp_path / "shared-data") for _ in range(2)))
    key = create_tenant(a)["api_key"]
    resp = httpx.post(
        f"{a.url}/v1/images/generations",
        json={"model": "hidream-i1-fast", "prompt": "a fox", "size": "512x512"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    url = resp.json()["data"][0]["url"]
    assert url.startswith(a.url)
    for gw in (a, b):
        got = httpx.get(url.replace(a.url, gw.url), timeout=30)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG"), (gw.url, got.status_code)
