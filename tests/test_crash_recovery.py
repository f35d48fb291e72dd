"""Crash recovery of the job engine, with the gateway as a real process that is SIGKILLed mid-job.

Each test runs gateways under uvicorn in subprocesses (tests/gateway_process.py) in front of a fake fal whose jobs
take seconds, kills one while jobs are in flight, and checks from the outside (the API, the fake's own counts and
the database) that every job finishes once: none lost, none submitted to the provider twice, none billed twice.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from gateway.storage.db import create_engine
from gateway.storage.models import Prediction
from tests.fakes.fal import FakeFal
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "crash-admin-token"
LEASE_S = 3.0
CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"
# JPEG keeps the fake's image encoding (in this process, on the GIL the test also needs) cheap.
INPUT = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "output_format": "jpg"}
TERMINAL = {"succeeded", "failed", "canceled"}

Spawn = Callable[[str, Mapping[str, str]], GatewayProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start gateway processes; every one is SIGKILLed at the end, and their logs printed (shown on failure)."""
    started: list[GatewayProcess] = []

    def start(name: str, env: Mapping[str, str]) -> GatewayProcess:
        gw = GatewayProcess(env, log_path=tmp_path / f"{name}.log")
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.kill()
        print(f"==== {gw.log_path.name} ====\n{gw.log_tail()}")


def gateway_env(fal: FakeFal, *, data_dir: Path, database_url: str, poll_s: float = 0.2) -> dict[str, str]:
    """Settings for a gateway whose only backend is the fake fal; replicas given one data dir share files."""
    return {
        "HDG_DATA_DIR": str(data_dir),
        "HDG_DATABASE_URL": database_url,
        "HDG_ADMIN_TOKEN": ADMIN_TOKEN,
        "HDG_URL_SIGNING_SECRET": "crash-recovery-signing-secret-of-32-chars-or-more",
        "HDG_BACKENDS": "fal",
        "FAL_KEY": fal.key,
        "HDG_FAL_BASE_URL": fal.url,
        "HDG_FAL_OUTPUT_HOSTS": fal.url,
        "HDG_PROVIDER_POLL_SECONDS": str(poll_s),
        "HDG_PROVIDER_MAX_IN_FLIGHT": "1000",
        "HDG_JOB_LEASE_SECONDS": str(LEASE_S),
        "HDG_JOB_POLL_SECONDS": "0.2",
    }


@dataclass
class Tenant:
    """One tenant's key, and calls to any replica with it."""

    key: str
    http: httpx.Client

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def create(self, gw: GatewayProcess, **headers: str) -> httpx.Response:
        return self.http.post(f"{gw.url}{CREATE}", json={"input": INPUT}, headers=self.auth | headers)

    def get(self, gw: GatewayProcess, prediction_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{gw.url}/v1/predictions/{prediction_id}", headers=self.auth)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def usage(self, gw: GatewayProcess) -> list[dict[str, Any]]:
        resp = self.http.get(f"{gw.url}/v1/usage/events", params={"limit": 10_000}, headers=self.auth)
        assert resp.status_code == 200, resp.text
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    def wait_all(self, gw: GatewayProcess, ids: list[str], *, timeout: float) -> dict[str, dict[str, Any]]:
        """Poll until every prediction is terminal; their last JSON by id."""
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        while True:
            for pid in [p for p in ids if p not in done]:
                body = self.get(gw, pid)
                if body["status"] in TERMINAL:
                    done[pid] = body
            if len(done) == len(ids):
                return done
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(ids) - len(done)} of {len(ids)} predictions still running after {timeout} s"
                )
            time.sleep(0.25)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
        yield client


def new_tenant(http: httpx.Client, gw: GatewayProcess) -> Tenant:
    resp = http.post(
        f"{gw.url}/admin/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status_code == 201, resp.text
    return Tenant(resp.json()["api_key"], http)


def provider_jobs(database_url: str) -> dict[str, tuple[str, str | None]]:
    """Every prediction in the database: id -> (status, the fal request id it committed, if any)."""

    async def read() -> dict[str, tuple[str, str | None]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(Prediction.id, Prediction.status, Prediction.provider_ref))).all()
        finally:
            await engine.dispose()
        return {pid: (status, (ref or {}).get("request_id")) for pid, status, ref in rows}

    return asyncio.run(read())


def wait_for(what: str, condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def all_committed(database_url: str, count: int) -> Callable[[], bool]:
    """True once ``count`` jobs each have a provider job on record (or are over): a kill now loses no submit.

    Between the provider accepting a job and the gateway committing its id there is a window in which a crash
    must resubmit (nothing else knows the job exists); waiting this out keeps the test about what the engine
    promises.
    """

    def check() -> bool:
        jobs = provider_jobs(database_url)
        return len(jobs) == count and all(ref is not None or status in TERMINAL for status, ref in jobs.values())

    return check


def image_at(http: httpx.Client, url: str) -> Image.Image:
    resp = http.get(url)
    assert resp.status_code == 200, resp.text
    img = Image.open(io.BytesIO(resp.content))
    img.load()
    return img


def assert_each_billed_once(usage: list[dict[str, Any]], ids: list[str]) -> None:
    assert sorted(e["prediction_id"] for e in usage) == sorted(ids)
    assert all(e["status"] == "succeeded" and float(e["price_usd"]) > 0 for e in usage), usage


def test_sigkill_in_the_middle_of_200_jobs_loses_none_and_resubmits_none(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path
) -> None:
    """SQLite, one process (the embedded mode): killed with jobs in flight, restarted on the same data."""
    fal.faults.processing_s = 3.0
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gateway.db'}"
    # Polling fal once a second: 200 jobs polled faster would make the fake (in this process) the bottleneck.
    env = gateway_env(fal, data_dir=tmp_path / "data", database_url=database_url, poll_s=1.0)
    gw = spawn("gateway", env)
    tenant = new_tenant(http, gw)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: tenant.create(gw), range(200)))
    assert [a.status_code for a in answers] == [201] * 200, [a.text for a in answers if a.status_code != 201][:3]
    ids = [a.json()["id"] for a in answers]

    wait_for("the fake to see all 200 submits", lambda: fal.submits >= 200)
    assert fal.submits == 200, f"{fal.submits - 200} provider jobs too many before any crash"
    wait_for("every provider job id to be committed", all_committed(database_url, 200))
    wait_for(
        "a few jobs to finish",
        lambda: sum(status == "succeeded" for status, _ in provider_jobs(database_url).values()) >= 3,
    )
    gw.kill()
    at_kill = provider_jobs(database_url)
    in_flight = [pid for pid, (status, _) in at_kill.items() if status not in TERMINAL]
    assert in_flight, "every job had finished before the kill, so it tested nothing"
    print(f"{len(in_flight)} of 200 jobs in flight at the kill")
    assert fal.submits == 200

    gw.restart()
    done = tenant.wait_all(gw, ids, timeout=60)

    assert {body["status"] for body in done.values()} == {"succeeded"}
    assert fal.submits == 200, "a job was submitted to the provider again after the restart"
    request_ids = {ref for _, ref in provider_jobs(database_url).values()}
    assert len(request_ids) == 200 and request_ids == set(fal.requests)
    for pid in in_flight:  # those the new process finished went back to the provider job already running
        assert "Re-attached to the job on fal." in done[pid]["logs"], done[pid]["logs"]
    assert_each_billed_once(tenant.usage(gw), ids)
    for pid in [*in_flight[:3], *ids[:2]]:
        (url,) = done[pid]["output"]
        assert image_at(http, url).size == (1024, 1024)


def test_a_second_replica_takes_over_the_jobs_of_one_that_was_killed(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL, replicas A and B: A dies with 20 jobs in flight; B, never told, finishes them all."""
    fal.faults.processing_s = 4.0
    env = gateway_env(fal, data_dir=tmp_path / "shared", database_url=postgres_url)
    a, b = spawn("a", env), spawn("b", env)
    tenant = new_tenant(http, a)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: tenant.create(a), range(20)))
    assert [r.status_code for r in answers] == [201] * 20
    ids = [r.json()["id"] for r in answers]
    wait_for("the fake to see all 20 submits", lambda: fal.submits >= 20)
    assert fal.submits == 20
    wait_for("every provider job id to be committed", all_committed(postgres_url, 20))
    a.kill()
    killed = time.monotonic()
    in_flight = [pid for pid, (status, _) in provider_jobs(postgres_url).items() if status not in TERMINAL]
    assert in_flight

    # B claims once A's leases lapse, then waits out what is left of each provider job.
    done = tenant.wait_all(b, ids, timeout=LEASE_S + fal.faults.processing_s + 15)
    took = time.monotonic() - killed
    assert {body["status"] for body in done.values()} == {"succeeded"}
    assert took < LEASE_S + fal.faults.processing_s + 5, f"B took {took:.1f} s after the kill"
    assert fal.submits == 20
    for pid in in_flight:
        assert "Re-attached to the job on fal." in done[pid]["logs"]
    assert_each_billed_once(tenant.usage(b), ids)
    (url,) = done[in_flight[0]]["output"]
    assert image_at(http, url).size == (1024, 1024)


def test_concurrent_duplicates_with_one_idempotency_key_on_two_replicas_make_one_job(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path, postgres_url: str
) -> None:
    """Ten creates with one key, released together across A and B: one job, one submit, one charge."""
    fal.faults.processing_s = 1.0
    env = gateway_env(fal, data_dir=tmp_path / "shared", database_url=postgres_url)
    a, b = spawn("a", env), spawn("b", env)
    tenant = new_tenant(http, a)
    barrier = threading.Barrier(10)

    def create(i: int) -> httpx.Response:
        barrier.wait()
        return tenant.create(a if i % 2 == 0 else b, **{"Idempotency-Key": "order-42"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(create, range(10)))

    assert [r.status_code for r in answers] == [201] * 10, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in answers) == 1
    pid = answers[0].json()["id"]
    assert tenant.wait_all(b, [pid], timeout=30)[pid]["status"] == "succeeded"
    assert fal.submits == 1
    assert_each_billed_once(tenant.usage(a), [pid])

    other = {"input": INPUT | {"prompt": "something else"}}
    for gw in (a, b):
        resp = http.post(f"{gw.url}{CREATE}", json=other, headers=tenant.auth | {"Idempotency-Key": "order-42"})
        assert resp.status_code == 409, resp.text
        assert resp.json()["type"].endswith(":idempotency_key_reused"), resp.text
    assert fal.submits == 1


def test_a_sync_request_retried_with_its_key_on_another_replica_after_a_crash_gets_the_same_image(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path, postgres_url: str
) -> None:
    """OpenAI path: A dies while the client waits; the retry with the key, sent to B, gets the same job's image."""
    fal.faults.processing_s = 4.0
    env = gateway_env(fal, data_dir=tmp_path / "shared", database_url=postgres_url)
    a, b = spawn("a", env), spawn("b", env)
    tenant = new_tenant(http, a)
    body = {"model": "hidream-i1-fast", "prompt": "a red fox in the snow", "num_inference_steps": 2}
    headers = tenant.auth | {"Idempotency-Key": "sync-7"}

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, f"{a.url}/v1/images/generations", json=body, headers=headers)
        wait_for("the fake to see the submit", lambda: fal.submits == 1)
        wait_for("the provider job id to be committed", all_committed(postgres_url, 1))
        a.kill()
        with pytest.raises(httpx.TransportError):
            first.result(timeout=30)
    ((pid, (status, _)),) = provider_jobs(postgres_url).items()
    assert status == "processing"

    retry = http.post(f"{b.url}/v1/images/generations", json=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.headers["X-HDG-Prediction-Id"] == pid
    assert retry.headers.get("Idempotent-Replayed") == "true"
    (entry,) = retry.json()["data"]
    assert image_at(http, entry["url"]).size == (1024, 1024)
    assert fal.submits == 1
    assert_each_billed_once(tenant.usage(b), [pid])


def test_a_clean_shutdown_hands_its_jobs_over_at_once(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path
) -> None:
    """SIGTERM releases the leases: the restarted process re-attaches well before a 30 s lease would run out."""
    fal.faults.processing_s = 4.0
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    env = gateway_env(fal, data_dir=tmp_path / "data", database_url=database_url) | {"HDG_JOB_LEASE_SECONDS": "30"}
    gw = spawn("gw", env)
    tenant = new_tenant(http, gw)
    ids = [tenant.create(gw).json()["id"] for _ in range(10)]
    wait_for("every provider job id to be committed", all_committed(database_url, 10))
    gw.terminate()
    stopped = time.monotonic()
    gw.start()
    done = tenant.wait_all(gw, ids, timeout=25)
    took = time.monotonic() - stopped
    assert took < 20, f"the jobs took {took:.1f} s after the shutdown: their leases were not released"
    assert {body["status"] for body in done.values()} == {"succeeded"}
    assert fal.submits == 10
    assert all("Re-attached to the job on fal." in body["logs"] for body in done.values())
    assert_each_billed_once(tenant.usage(gw), ids)


def test_a_cancel_sent_to_one_replica_stops_a_job_running_on_another(
    fal: FakeFal, spawn: Spawn, http: httpx.Client, tmp_path: Path, postgres_url: str
) -> None:
    """B flags the job; A's heartbeat brings the flag back, cancels at the provider and settles it unbilled."""
    fal.faults.processing_s = 30.0
    env = gateway_env(fal, data_dir=tmp_path / "shared", database_url=postgres_url)
    a, b = spawn("a", env), spawn("b", env)
    tenant = new_tenant(http, a)
    pid = tenant.create(a).json()["id"]
    wait_for("the job to reach the provider", all_committed(postgres_url, 1))
    assert http.post(f"{b.url}/v1/predictions/{pid}/cancel", headers=tenant.auth).status_code == 200
    done = tenant.wait_all(b, [pid], timeout=LEASE_S + 10)
    assert done[pid]["status"] == "canceled"
    assert fal.submits == 1 and [job.cancelled for job in fal._jobs.values()] == [True]
    assert [(e["status"], e["price_usd"]) for e in tenant.usage(a)] == [("canceled", "0.000000")]
