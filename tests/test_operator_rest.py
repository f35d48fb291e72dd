"""Issue 10, the review's remaining items: tenants see fixed words for attempts (admins keep the backend's own), a
good probe half-opens only a backend a probe saw down, one half-open trial however many jobs race for it, URLs'
passwords never echoed, budgets shown exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.serialize import usd_text
from gateway.backends.base import ImageJob, ImageResult, Probe
from gateway.backends.config import redact_userinfo
from gateway.errors import BackendBusy, BackendFailed, GatewayError, redact_credentials
from gateway.health import HealthBoard
from gateway.jobs import Attempt, JobRunner, attempt_log, final_error
from gateway.settings import default_backend_costs
from gateway.storage.db import open_database, session_factory
from gateway.storage.files import LocalFileStore
from gateway.storage.models import Prediction
from tests.conftest import GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import make_image
from tests.fakes.worker import healthy_worker
from tests.held_job import insert_held_job

MODEL = "hidream-ai/hidream-i1-fast"
SECRET_WORDS = "ZEBRA-7731 internal stack frame at /srv/provider/secret_module.py"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _attempt_logs(database_url: str) -> dict[str, list[dict[str, Any]]]:
    async def read() -> dict[str, list[dict[str, Any]]]:
        async with open_database(database_url) as engine, session_factory(engine)() as session:
            rows = (await session.execute(select(Prediction))).scalars().all()
            return {p.id: p.attempt_log or [] for p in rows}

    return asyncio.run(read())


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


def test_upstream_words_reach_admins_in_attempt_log_and_never_a_tenant(
    make_gateway: GatewayFactory, database_url: str, replicate: FakeReplicate, fal: FakeFal
) -> None:
    gw = make_gateway(
        database_url,
        from_settings=True,
        webhook_allowed_networks=["127.0.0.1/32"],
        **fal_only(fal)
        | {
            "backends": ["replicate", "fal"],
            "replicate_api_token": replicate.token,
            "replicate_base_url": replicate.url,
            "replicate_output_hosts": [replicate.url],
            "breaker_failures": 100,  # both keep being tried, request after request
        },
    )
    key = gw.create_tenant(route="replicate,fal")["api_key"]
    # Replicate's prediction fails with these words; fal answers 500 with them, and quotes its key back.
    replicate.faults.fail_jobs = True
    replicate.faults.error_text = SECRET_WORDS
    fal.faults.error_rate = 1.0
    fal.faults.error_text = f"{SECRET_WORDS} (sent Authorization: Key {fal.key})"

    seen: list[str] = []
    failed = gw.generate(key)
    assert failed.status_code == 502, failed.text
    assert [a["message"] for a in failed.json()["error"]["attempts"]] == [
        "the backend failed",
        "the backend answered 500",
    ]
    seen.append(failed.text)
    [event] = gw.client.get("/v1/usage/events", headers=_auth(key)).json()["data"]
    seen.append(gw.client.get(f"/v1/images/generations/{event['prediction_id']}", headers=_auth(key)).text)

    waited = gw.client.post(
        f"/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": "x"}, "webhook": "http://127.0.0.1:9/hook", "webhook_events_filter": ["logs"]},
        headers=_auth(key) | {"Prefer": "wait=30"},
    )
    assert waited.status_code == 201 and waited.json()["status"] == "failed", waited.text
    seen += [waited.text, gw.client.get(f"/v1/predictions/{waited.json()['id']}", headers=_auth(key)).text]
    seen.append(gw.client.get("/v1/predictions", headers=_auth(key)).text)
    for text in seen:
        assert "ZEBRA-7731" not in text and "secret_module" not in text and fal.key not in text
        assert '"detail"' not in text
    assert waited.json()["error"].startswith("replicate: the backend failed.")
    assert "fal failed: the backend answered 500." in waited.json()["logs"]

    # Admins keep the backend's own words in the stored list, with the credential it quoted redacted.
    logs = _attempt_logs(database_url)
    details = [a["detail"] for log in logs.values() for a in log]
    assert len(logs) == 2 and len(details) == 4
    assert all("ZEBRA-7731" in d for d in details)
    assert not [d for d in details if fal.key in d] and any("Key ***" in d for d in details)


def test_a_credential_echoed_by_a_provider_is_redacted_in_the_detail() -> None:
    attempt = Attempt("fal")
    attempt.end(
        "failed",
        BackendFailed('fal answered 500: {"auth": "Key 1a2b3c4d-id:0f9e8d7c6b5a4f3e2d1c"}', upstream_status=500),
    )
    [entry] = attempt_log([attempt])
    assert entry["detail"] == 'fal answered 500: {"auth": "Key ***"}' and entry["message"] == "the backend answered 500"
    assert redact_credentials("Bearer r8_AbCdEf0123456789 refused; r8_Other123 too") == "Bearer *** refused; *** too"
    assert redact_credentials("wk-abcdef123456 / ws-abcdef123456") == "*** / ***"
    error = final_error([attempt], out_of_time=False)
    [shown] = error.body()["error"]["attempts"]  # the error keeps the stored entry; its body, the tenant's view
    assert shown == {"backend": "fal", "outcome": "failed", "status": 500, "message": "the backend answered 500"}


def _board(now: list[float]) -> HealthBoard:
    return HealthBoard(failure_threshold=2, open_seconds=30, clock=lambda: now[0], probe_seconds=2)


def test_a_good_probe_does_not_cut_short_a_breaker_traffic_opened_while_health_passed() -> None:
    now = [0.0]
    board = _board(now)
    board.register("worker", max_in_flight=4)
    board.probed("worker", Probe("up"))
    board.failure("worker", "worker answered 500")
    board.failure("worker", "worker answered 500")  # its /health is fine, its generations fail
    assert board.status("worker") == "open"
    assert board.retry_after("worker") == 31  # the breaker's open period, not the next probe

    for t in (2.0, 4.0, 20.0):
        now[0] = t
        board.probed("worker", Probe("up"))
        assert board.status("worker") == "open" and not board.admits("worker"), t
    now[0] = 30.0
    assert board.status("worker") == "degraded" and board.admits("worker")  # its timer, as before

    with board.attempt("worker") as admitted:  # the trial fails: open again, still only on its timer
        assert admitted
        board.failure("worker", "worker answered 500")
    now[0] = 32.0
    board.probed("worker", Probe("up"))
    assert board.status("worker") == "open"


@pytest.mark.parametrize("seen", [Probe("down", "worker cannot be reached (ConnectError)."), Probe("loading")])
def test_a_good_probe_half_opens_at_once_after_a_probe_saw_the_backend_down(seen: Probe) -> None:
    now = [0.0]
    board = _board(now)
    board.register("worker", max_in_flight=4)
    board.probed("worker", Probe("up"))
    board.failure("worker", "worker cannot be reached (ConnectError).")
    board.failure("worker", "worker cannot be reached (ConnectError).")  # traffic opened it
    now[0] = 2.0
    board.probed("worker", seen)  # the prober finds it down (or restarting)
    assert board.status("worker") in ("open", "loading") and board.retry_after("worker") == 3
    now[0] = 4.0
    board.probed("worker", Probe("up"))  # back: the next request is its trial, long before 30 s
    assert board.status("worker") == "degraded" and board.admits("worker")


def test_only_one_job_gets_the_trial_of_a_half_open_breaker() -> None:
    now = [0.0]
    board = _board(now)
    board.register("worker", max_in_flight=8)
    board.failure("worker", "x")
    board.failure("worker", "x")
    now[0] = 30.0
    with board.attempt("worker") as first, board.attempt("worker") as second:
        assert (first, second) == (True, False)
        assert board.backends["worker"].in_flight == 1  # the refused one took nothing
    assert board.admits("worker")  # no verdict: the slot is free again


class _GatedWorker:
    """Our worker protocol: fails while ``failing``, else holds each generation until ``release``; counts them."""

    def __init__(self) -> None:
        self.failing = True
        self.release = threading.Event()
        self.generations = 0
        self._image = make_image(64, 64, "png")
        self.server = healthy_worker(self._generate)

    async def _generate(self, request: Request) -> Response:
        job = json.loads(await request.body())
        if self.failing:
            return Response(b'{"detail": "boom"}', status_code=500, media_type="application/json")
        self.generations += 1
        while not self.release.is_set():  # noqa: ASYNC110 (set by the test thread)
            await asyncio.sleep(0.02)
        body = {
            "images": [base64.b64encode(self._image).decode()] * int(job.get("n", 1)),
            "content_type": "image/png",
            "width": 64,
            "height": 64,
            "seed": job.get("seed", 0),
            "timings": {},
        }
        return Response(json.dumps(body), media_type="application/json")


def test_concurrent_jobs_send_a_half_open_worker_exactly_one_trial(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    worker = _GatedWorker()
    worker.server.start()
    try:
        gw = make_gateway(
            sqlite_url,
            from_settings=True,
            backends=["worker"],
            worker_urls=[worker.server.url],
            breaker_failures=1,
            breaker_open_seconds=1,
            webhook_allowed_networks=["127.0.0.1/32"],
        )
        key = gw.create_tenant()["api_key"]
        assert gw.generate(key).status_code == 502  # one failure opens it
        worker.failing = False
        time.sleep(1.2)  # its open second is up: half-open, one trial allowed

        # Jobs that stream their logs to a webhook write each log line before their attempt: an await between
        # admitting the job and taking the trial slot, where the others would slip through without the fix.
        hooked = {"webhook": "http://127.0.0.1:9/hook", "webhook_events_filter": ["logs", "completed"]}

        def create(_: int) -> str:
            resp = gw.client.post(
                f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}} | hooked, headers=_auth(key)
            )
            assert resp.status_code == 201, resp.text
            return str(resp.json()["id"])

        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(create, range(6)))
        deadline = time.monotonic() + 20
        while worker.generations == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)  # room for any other job to reach the worker
        assert worker.generations == 1
        worker.release.set()  # the trial succeeds and closes the breaker

        deadline = time.monotonic() + 60
        ended: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            ended = [gw.client.get(f"/v1/predictions/{i}", headers=_auth(key)).json() for i in ids]
            if all(p["status"] in ("succeeded", "failed") for p in ended):
                break
            time.sleep(0.2)
        # The trial succeeded; the others, refused while it ran, were told so without an attempt on the worker.
        assert [p["status"] for p in ended].count("succeeded") == worker.generations == 1
        for p in ended:
            if p["status"] == "failed":
                assert p["attempts"] == [] and "worker is degraded" in p["error"], p
        assert gw.generate(key).status_code == 200  # closed again: served at once
    finally:
        worker.release.set()
        worker.server.stop()


def test_a_urls_password_is_never_echoed() -> None:
    assert redact_userinfo("https://alice:s3cret@gpu-1:9000/x") == "https://***@gpu-1:9000/x"
    assert redact_userinfo("alice:s3cret@gpu-1") == "***@gpu-1"
    assert redact_userinfo("https://gpu-1:9000/a@b") == "https://gpu-1:9000/a@b"  # an @ in the path is no userinfo


@pytest.mark.parametrize(
    ("amount", "shown"),
    [("0.015", "0.015"), ("10", "10.00"), ("0.1", "0.10"), ("10.000000", "10.00"), ("0.000001", "0.000001")],
)
def test_budgets_show_exactly_with_at_least_cents(amount: str, shown: str) -> None:
    assert usd_text(Decimal(amount)) == shown


def test_budgets_in_the_admin_api_are_exact_strings(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url)
    made = gw.create_tenant(monthly_budget_usd="10")
    assert made["tenant"]["monthly_budget_usd"] == "10.00"
    key = gw.admin("PATCH", f"/admin/keys/{made['key_id']}", json={"monthly_budget_usd": "0.1"})
    assert key.status_code == 200 and key.json()["monthly_budget_usd"] == "0.10"
    listed = gw.admin("GET", "/admin/tenants").json()["data"]
    assert [t["monthly_budget_usd"] for t in listed] == ["10.00"]


class _Scripted:
    """A local-kind backend for the runner: ``act`` runs when it is called (and decides what it answers)."""

    kind = "local"
    variants = frozenset({"fast"})

    def __init__(self, name: str, act: Any) -> None:
        self.name, self.act, self.calls = name, act, 0

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        self.calls += 1
        result: ImageResult = self.act()
        return result

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _fail_over_into_a_full_backend(database_url: str, tmp_path: Path, first: GatewayError, fill: str) -> Any:
    """``alpha`` is tried first (cheapest by name) and ends in ``first``; while it runs, ``beta`` fills up (``fill``:
    ``throttle`` or ``slots``), after routing had put it second. Returns the runner's Finished and the stored row.
    """

    async def run() -> tuple[Any, Prediction, int]:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            p = await insert_held_job(sessions, ImageJob(variant="fast", prompt="a fox", width=64, height=64, seed=1))
            health = HealthBoard()

            def alpha_act() -> ImageResult:
                if fill == "throttle":
                    health.throttled("beta", 30)
                else:
                    health.backends["beta"].in_flight = 1  # another job took its only slot
                raise first

            alpha, beta = _Scripted("alpha", alpha_act), _Scripted("beta", lambda: pytest.fail("beta was sent a job"))
            for b in (alpha, beta):
                health.register(b.name, max_in_flight=1)
            runner = JobRunner(
                sessions=sessions,
                backends=[alpha, beta],
                files=LocalFileStore(tmp_path / "files"),
                prices={"hidream-i1-fast": Decimal("0.01")},
                costs=default_backend_costs(),
                gpu_usd_per_second=Decimal("0.001"),
                health=health,
                attempt_timeout=30,
            )
            finished = await runner.execute(p, owner="run_me", allowed=None, why=lambda: None)
            async with sessions() as session:
                row = await session.get(Prediction, p.id)
            assert row is not None
            return finished, row, beta.calls

    return asyncio.run(run())


@pytest.mark.parametrize("fill", ["throttle", "slots"])
def test_a_backend_that_filled_up_before_its_turn_is_listed_as_busy(
    database_url: str, tmp_path: Path, fill: str
) -> None:
    upstream = BackendFailed("alpha answered 500: ZEBRA-7731", upstream_status=500)
    finished, row, beta_calls = _fail_over_into_a_full_backend(database_url, tmp_path, upstream, fill)
    assert beta_calls == 0
    error = finished.error
    assert isinstance(error, BackendFailed) and error.status_code == 502
    assert (
        error.message
        == "alpha: the backend answered 500. None of the 2 attempts succeeded; each is listed in attempts."
    )
    shown = error.body()["error"]["attempts"]
    assert [(a["backend"], a["outcome"], a["status"], a["message"]) for a in shown] == [
        ("alpha", "failed", 500, "the backend answered 500"),
        ("beta", "busy", None, "the backend is at capacity"),
    ]
    assert [(a["backend"], a["outcome"]) for a in row.attempt_log or []] == [("alpha", "failed"), ("beta", "busy")]
    assert row.attempts == 1  # beta was listed, not sent anything
    assert "beta skipped: the backend is at capacity." in row.logs


def test_busy_everywhere_after_failing_over_is_a_503_naming_both(database_url: str, tmp_path: Path) -> None:
    throttled = BackendBusy("alpha is throttling or busy.", retry_after=7, upstream_status=429)
    finished, row, _ = _fail_over_into_a_full_backend(database_url, tmp_path, throttled, "slots")
    error = finished.error
    assert isinstance(error, BackendBusy) and error.status_code == 503
    assert 1 <= int(error.headers["Retry-After"]) <= 7  # the sooner of alpha's 7 s and beta's own estimate
    assert error.message.startswith("alpha: the backend is at capacity. None of the 2 attempts succeeded")
    assert [(a["backend"], a["outcome"]) for a in row.attempt_log or []] == [("alpha", "busy"), ("beta", "busy")]
    assert row.error_code == "backend_busy" and row.status == "failed"
