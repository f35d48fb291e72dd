"""/metrics, /readyz and /healthz, scraped after real requests; and ``serve --workers 2`` adding up both workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.metrics import MULTIPROC_ENV, Metrics, _forget_dead_processes
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.server import free_port

ROOT = Path(__file__).resolve().parent.parent
CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"
INPUT = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}
GENERATE = {"model": "hidream-i1-fast", "prompt": "a red fox in the snow", "num_inference_steps": 2}

Samples = list[Sample]


def parse(text: str) -> Samples:
    """Every sample of an exposition; parsing fails loudly on anything malformed."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def scrape(client: httpx.Client, base: str = "", **headers: str) -> Samples:
    resp = client.get(f"{base}/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return parse(resp.text)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def billed(client: httpx.Client, key: str, base: str = "") -> Decimal:
    resp = client.get(f"{base}/v1/usage", headers=auth(key))
    assert resp.status_code == 200, resp.text
    return Decimal(resp.json()["total"]["price_usd"])


@pytest.fixture
def fal_gateway(make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal) -> Any:
    """Start a gateway whose one backend is the fake fal, with settings overrides."""

    def start(**overrides: Any) -> Gateway:
        return make_gateway(sqlite_url, from_settings=True, **(fal_only(fal) | overrides))

    return start


def test_requests_attempts_and_spend_are_counted_with_bounded_labels(fal_gateway: Any) -> None:
    gw: Gateway = fal_gateway()
    made = gw.create_tenant()
    key, tenant_id = made["api_key"], made["tenant_id"]
    assert gw.generate(key, n=2).status_code == 200
    created = gw.client.post(CREATE, json={"input": INPUT}, headers=auth(key) | {"Prefer": "wait"})
    assert created.status_code == 201 and created.json()["status"] == "succeeded", created.text
    prediction_id = created.json()["id"]
    assert gw.client.get(f"/v1/predictions/{prediction_id}", headers=auth(key)).status_code == 200
    assert gw.client.get(f"/no/such/path/{prediction_id}").status_code == 404
    too_big = gw.client.post("/v1/images/generations", content=b"x" * (gw.settings.max_body_bytes + 1))
    assert too_big.status_code == 413

    samples = scrape(gw.client)
    requests = "hdg_http_requests_total"
    assert value(samples, requests, route="/v1/images/generations", method="POST", status="200") == 1
    assert value(samples, requests, route="unmatched", method="POST", status="413") == 1  # refused before routing
    assert value(samples, requests, route="/v1/models/{owner}/{name}/predictions", method="POST", status="201") == 1
    assert value(samples, requests, route="/v1/predictions/{prediction_id}", method="GET", status="200") == 1
    assert value(samples, requests, route="unmatched", method="GET", status="404") == 1
    # No label anywhere carries a raw id: routes are templates, unknown paths are "unmatched".
    assert not [s for s in samples if any(prediction_id in v for v in s.labels.values())]
    assert value(samples, "hdg_http_request_duration_seconds_count", route="/v1/predictions/{prediction_id}") == 1

    assert value(samples, "hdg_backend_attempts_total", backend="fal", outcome="succeeded") == 2
    assert value(samples, "hdg_backend_latency_seconds_count", backend="fal") == 2
    assert value(samples, "hdg_backend_up", backend="fal") == 1
    assert value(samples, "hdg_jobs_in_flight") == 0
    spent = value(samples, "hdg_spend_usd_total", tenant=tenant_id, backend="fal")
    assert spent > 0 and Decimal(str(spent)).quantize(Decimal("0.000001")) == billed(gw.client, key)
    assert not [s for s in samples if s.name == "hdg_redis_up"]  # Redis is not configured: no gauge to misread


def test_tenant_label_is_capped_and_the_rest_are_other(fal_gateway: Any) -> None:
    gw: Gateway = fal_gateway(metrics_max_tenants=1)
    first, second = gw.create_tenant("first"), gw.create_tenant("second")
    for tenant in (first, second, second):
        assert gw.generate(tenant["api_key"]).status_code == 200
    spend = [s for s in scrape(gw.client) if s.name == "hdg_spend_usd_total"]
    assert {s.labels["tenant"] for s in spend} == {first["tenant_id"], "other"}
    total = sum(Decimal(str(s.value)) for s in spend).quantize(Decimal("0.000001"))
    assert total == billed(gw.client, first["api_key"]) + billed(gw.client, second["api_key"])


def test_refusals_are_counted_by_reason(fal_gateway: Any) -> None:
    gw: Gateway = fal_gateway()
    limited = gw.create_tenant("limited", rpm=1)["api_key"]
    assert gw.generate(limited).status_code == 200
    assert gw.generate(limited).status_code == 429
    broke = gw.create_tenant("broke", monthly_budget_usd="0")["api_key"]
    assert gw.generate(broke).status_code == 402
    assert gw.generate("sk-not-a-key").status_code == 401  # an error, not a limit's refusal

    samples = scrape(gw.client)
    assert value(samples, "hdg_refusals_total", reason="rate_limit") == 1
    assert value(samples, "hdg_refusals_total", reason="budget") == 1
    assert {s.labels["reason"] for s in samples if s.name == "hdg_refusals_total"} == {"rate_limit", "budget"}


def test_readyz_shows_every_check_and_goes_unready_without_an_eligible_backend(fal_gateway: Any, fal: FakeFal) -> None:
    gw: Gateway = fal_gateway(breaker_failures=1, breaker_open_seconds=60)
    ready = gw.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "backends": {"fal": "up"}, "redis": "not configured", "storage": "ok"},
    }
    fal.faults.fail_jobs = True
    key = gw.create_tenant()["api_key"]
    assert gw.generate(key).status_code == 502  # one failure opens the breaker (breaker_failures=1)

    unready = gw.client.get("/readyz")
    assert unready.status_code == 503
    assert unready.json()["status"] == "unavailable"
    assert unready.json()["checks"]["backends"] == {"fal": "open"}
    samples = scrape(gw.client)
    assert value(samples, "hdg_backend_up", backend="fal") == 0
    assert value(samples, "hdg_backend_attempts_total", backend="fal", outcome="failed") == 1
    assert gw.client.get("/healthz").json() == {"status": "ok"}  # alive all along


def test_redis_is_shown_but_an_unreachable_one_does_not_make_the_gateway_unready(fal_gateway: Any) -> None:
    up = fal_gateway(redis_url="redis://127.0.0.1:6379/15")
    assert up.client.get("/readyz").json()["checks"]["redis"] == "ok"
    assert value(scrape(up.client), "hdg_redis_up") == 1

    down = fal_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    ready = down.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["redis"] == "unreachable: rate limits are per-process until it is back"
    samples = scrape(down.client)
    assert [s.value for s in samples if s.name == "hdg_redis_up"] == [0]


def test_metrics_token_protects_the_scrape(fal_gateway: Any) -> None:
    gw: Gateway = fal_gateway(metrics_token="scrape-secret")
    assert gw.client.get("/metrics").status_code == 401
    wrong = gw.client.get("/metrics", headers=auth("not-it"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_metrics_token"
    samples = scrape(gw.client, **auth("scrape-secret"))
    assert value(samples, "hdg_http_requests_total", route="/metrics", status="401") == 2
    assert gw.client.get("/readyz").status_code == 200  # health stays open for probes


# -- several worker processes -------------------------------------------------------------------------------------


@dataclass
class Served:
    """A running ``serve --workers 2``, and what it took to start it."""

    url: str
    metrics_dir: Path
    proc: subprocess.Popen[bytes]
    command: list[str]
    env: dict[str, str]


@pytest.fixture
def served(tmp_path: Path, postgres_url: str, fal: FakeFal) -> Iterator[Served]:
    """``hidream-gateway serve --workers 2`` in front of the fake fal, its metrics in the data dir as by default."""
    port = free_port()
    data_dir = (tmp_path / "data").resolve()
    skip = ("HDG_", "PROMETHEUS_", "FAL_KEY", "REPLICATE_API_TOKEN")  # only what this test sets reaches the gateway
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)} | {
        "PYTHONUNBUFFERED": "1",
        "HDG_DATA_DIR": str(data_dir),
        "HDG_DATABASE_URL": postgres_url,
        "HDG_ADMIN_TOKEN": ADMIN_TOKEN,
        "HDG_BACKENDS": "fal",
        "FAL_KEY": fal.key,
        "HDG_FAL_BASE_URL": fal.url,
        "HDG_FAL_OUTPUT_HOSTS": fal.url,
        "HDG_PROVIDER_POLL_SECONDS": "0.05",
    }
    metrics_dir = data_dir / "prometheus" / f"port-{port}"
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while len(list(metrics_dir.glob("gauge_livesum_*.db"))) < 2:  # each worker's app made its files
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield Served(url, metrics_dir, proc, command, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log_path.read_text(errors="replace")[-6000:])


def per_worker(metrics_dir: Path, name: str, **labels: str) -> dict[int, float]:
    """``name`` as each worker process recorded it, read from its own file."""
    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        counts[pid] = sum(
            s.value
            for metric in merged
            for s in metric.samples
            if s.name == name and labels.items() <= s.labels.items()
        )
    return counts


@pytest.mark.slow
def test_serve_with_two_workers_exports_the_sum_of_both(served: Served, fal: FakeFal) -> None:
    url, metrics_dir = served.url, served.metrics_dir
    fal.faults.processing_s = 0.2  # jobs overlap, so connections land on both workers
    with httpx.Client(base_url=url, timeout=60) as admin:
        made = admin.post("/admin/tenants", json={"name": "acme"}, headers=auth(ADMIN_TOKEN))
        assert made.status_code == 201, made.text
    key, tenant_id = made.json()["api_key"], made.json()["tenant_id"]

    signed: list[str] = []

    def generate(_: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as client:  # a new connection each time
            resp = client.post("/v1/images/generations", json=GENERATE, headers=auth(key))
            signed.extend(d["url"] for d in resp.json().get("data", []))
            return resp.status_code

    route = {"route": "/v1/images/generations", "method": "POST", "status": "200"}
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):  # batches until both workers have served some (the kernel picks who accepts)
            assert list(pool.map(generate, range(8))) == [200] * 8
            sent += 8
            served_by = per_worker(metrics_dir, "hdg_http_requests_total", **route)
            if len([n for n in served_by.values() if n > 0]) >= 2:
                break
    assert len([n for n in served_by.values() if n > 0]) == 2, served_by
    assert sum(served_by.values()) == sent
    # Both workers started on a fresh data dir without HDG_URL_SIGNING_SECRET, and signed these URLs: each one,
    # fetched on a new connection (either worker may take it), verifies.
    for link in signed:
        with httpx.Client(timeout=30) as fresh:
            assert fresh.get(link).status_code == 200, link

    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(6):  # whichever worker answers, it reports both workers' counts
            with httpx.Client(base_url=url, timeout=60) as fresh:
                samples = scrape(fresh)
            assert value(samples, "hdg_http_requests_total", **route) == sent
            assert value(samples, "hdg_backend_attempts_total", backend="fal", outcome="succeeded") == sent
            assert value(samples, "hdg_jobs_in_flight") == 0
            assert value(samples, "hdg_backend_up", backend="fal") == 1
        spent = Decimal(str(value(samples, "hdg_spend_usd_total", tenant=tenant_id)))
        assert spent.quantize(Decimal("0.000001")) == billed(client, key)

    # A worker killed outright: its counts stay, its live gauges are dropped at the next scrape.
    dead = next(pid for pid, n in served_by.items() if n > 0)
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while list(metrics_dir.glob(f"gauge_live*_{dead}.db")):
        assert time.monotonic() < deadline, "the dead worker's gauges were never dropped"
        time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=10) as fresh, contextlib.suppress(httpx.TransportError):
            scrape(fresh)
    with httpx.Client(base_url=url, timeout=10) as fresh:
        samples = scrape(fresh)
    assert value(samples, "hdg_http_requests_total", **route) == sent
    assert value(samples, "hdg_jobs_in_flight") == 0


@pytest.mark.slow
def test_a_second_serve_on_the_same_data_dir_and_port_refuses_and_leaves_the_first_alone(served: Served) -> None:
    readyz = {"route": "/readyz", "method": "GET", "status": "200"}
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for _ in range(5):
            assert client.get("/readyz").status_code == 200
        before = value(scrape(client), "hdg_http_requests_total", **readyz)
    files = sorted(p.name for p in served.metrics_dir.iterdir())
    assert len([name for name in files if name.startswith("gauge_livesum_")]) == 2

    # The same command again, by mistake; then once more with the directory named in the environment.
    data_dir, port = served.env["HDG_DATA_DIR"], served.command[-1]
    for env, message in (
        (served.env, f"another gateway is serving with this data dir ({data_dir}) on port {port}"),
        (
            served.env | {MULTIPROC_ENV: str(served.metrics_dir)},
            f"another gateway is serving with {MULTIPROC_ENV}={served.metrics_dir}",
        ),
    ):
        second = subprocess.run(
            served.command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert second.returncode == 2 and message in second.stderr, second.stderr

    assert sorted(p.name for p in served.metrics_dir.iterdir()) == files
    assert served.proc.poll() is None
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
        # The workers still write to the files /metrics reads: nothing counted before is lost, nothing since missed.
        assert value(scrape(client), "hdg_http_requests_total", **readyz) == before + 3


def dead_worker(directory: Path) -> int:
    """Run a process that records metrics into ``directory`` as a worker does and exits without cleaning up."""
    script = (
        "from prometheus_client import Counter, Gauge\n"
        "Counter('hdg_done', 'Done.').inc()\n"
        "Gauge('hdg_running', 'Running.', multiprocess_mode='livesum').inc()\n"
        "Gauge('hdg_up', 'Up.', multiprocess_mode='livemostrecent').set(1)\n"
    )
    directory.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {MULTIPROC_ENV: str(directory)})
    assert proc.wait(60) == 0
    return proc.pid


def test_concurrent_scrapes_forget_a_dead_worker_without_tripping_on_each_other(tmp_path: Path) -> None:
    left_behind = tmp_path / "left-behind"
    pid = dead_worker(left_behind)
    live = [f"gauge_livemostrecent_{pid}.db", f"gauge_livesum_{pid}.db"]
    assert sorted(p.name for p in left_behind.iterdir()) == [f"counter_{pid}.db", *live]
    directory = tmp_path / "metrics"
    threads = 8
    barrier = threading.Barrier(threads)

    def forget(_: int) -> None:
        barrier.wait()  # all at once, so they find the same files
        _forget_dead_processes(str(directory))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, so one deletes between another's glob and delete
    try:
        for _ in range(100):
            shutil.copytree(left_behind, directory, dirs_exist_ok=True)
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(forget, range(threads)))  # raises what any of them raised
            assert sorted(p.name for p in directory.iterdir()) == [f"counter_{pid}.db"]
    finally:
        sys.setswitchinterval(switch)
    # A scrape then reports the dead worker's count and none of its live gauges.
    body, _ = Metrics(max_tenants=1, redis=False, multiprocess_dir=str(directory)).render(None)
    samples = parse(body.decode())
    assert value(samples, "hdg_done_total") == 1
    assert not [s for s in samples if s.name in ("hdg_running", "hdg_up")]


def test_opentelemetry_is_looked_up_per_request_only_when_hdg_otel_is_set(
    make_gateway: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI asks OpenTelemetry for its tracer provider on every request unless told not to; the gateway tells it
    # not to, unless the operator turns it on.
    from opentelemetry import trace

    asked: list[int] = []
    real = trace.get_tracer_provider

    def counted() -> Any:
        asked.append(1)
        return real()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    off = make_gateway(sqlite_url)
    for _ in range(3):
        assert off.client.get("/healthz").status_code == 200
    assert asked == []
    on = make_gateway(sqlite_url, otel=True)
    assert on.client.get("/healthz").status_code == 200
    assert asked
