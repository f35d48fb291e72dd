"""Health probes and real traffic move one breaker per backend; /readyz names each backend's state truthfully."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx

from gateway.backends.base import Probe
from gateway.backends.local import LocalBackend
from gateway.backends.worker import WorkerBackend
from gateway.health import HealthBoard, probe_all
from inference.runner import GenerateParams, HiDreamRunner
from inference.serving import GenerationQueue
from inference.worker import create_worker_app
from tests.conftest import WORKER_TOKEN, Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.server import ServerThread


def _board(now: list[float]) -> HealthBoard:
    return HealthBoard(failure_threshold=3, open_seconds=30, clock=lambda: now[0], probe_seconds=2)


def test_probes_and_real_traffic_move_the_same_breaker() -> None:
    now = [0.0]
    board = _board(now)
    board.register("worker", max_in_flight=4)
    assert board.doubtful("worker")  # never probed: the prober's first round asks it

    board.probed("worker", Probe("loading"))
    assert board.status("worker") == "loading" and board.retry_after("worker") == 3  # the next probe, 2 s on

    board.probed("worker", Probe("down", "worker cannot be reached (ConnectError)."))
    assert board.status("worker") == "open" and not board.admits("worker")  # one failed probe: open at once
    assert board.snapshot()["worker"]["last_error"] == "worker cannot be reached (ConnectError)."
    assert board.retry_after("worker") == 3  # probed again in 2 s, long before the breaker's 30 s are up

    now[0] = 5.0
    board.probed("worker", Probe("up"))  # back: half-open now, not at 30 s
    assert board.status("worker") == "degraded" and board.admits("worker")
    with board.attempt("worker"):
        assert not board.admits("worker")  # one trial at a time
        assert board.retry_after("worker") == 6  # the trial's answer, at the guessed latency of 5 s
    board.success("worker", 1.0)
    assert board.status("worker") == "up" and not board.doubtful("worker")  # traffic watches it from here

    board.failure("worker", "worker answered 500")
    assert board.status("worker") == "degraded" and board.admits("worker")  # recent failures, still routed
    board.probed("worker", Probe("up"))
    assert board.status("worker") == "degraded"  # a good probe does not wipe out failures real traffic saw


def test_a_backend_without_a_health_check_waits_out_its_breaker() -> None:
    now = [0.0]
    board = _board(now)
    board.register("fal", max_in_flight=64)
    board.probed("fal", Probe("unchecked"))
    for _ in range(3):
        board.failure("fal", "fal answered 500")
    board.probed("fal", Probe("unchecked"))  # says nothing about a recovery: a probe must never cost a generation
    assert board.status("fal") == "open" and board.retry_after("fal") == 31
    now[0] = 30.0
    assert board.status("fal") == "degraded" and board.admits("fal")


def test_misconfigured_is_never_admitted_and_never_expected_back() -> None:
    now = [0.0]
    board = _board(now)
    board.register("replicate", max_in_flight=64, problem="replicate is enabled but REPLICATE_API_TOKEN is not set")
    board.register("worker", max_in_flight=4)
    board.probed("worker", Probe("down", "worker cannot be reached (ConnectError)."))

    assert board.status("replicate") == "misconfigured" and not board.admits("replicate")
    assert not board.doubtful("replicate")  # nothing to probe: only a restart with new settings changes it
    assert board.recovery_in("replicate") is None and board.soonest(["replicate", "worker"]) == 3
    assert board.describe(["replicate", "worker"]) == ("replicate is misconfigured; worker is open")


def _half_open_with_a_straggler(now: list[float]) -> tuple[HealthBoard, AbstractContextManager[bool]]:
    """A worker whose breaker is half-open, and an attempt (still running) admitted while it was closed."""
    board = HealthBoard(failure_threshold=1, open_seconds=5, clock=lambda: now[0], probe_seconds=2)
    board.register("worker", max_in_flight=8)
    straggler = board.attempt("worker")
    assert straggler.__enter__()  # admitted while closed; its job runs on
    board.failure("worker", "worker answered 500")  # another job's failure opens the breaker
    now[0] = 6.0
    assert board.status("worker") == "degraded" and board.admits("worker")  # half-open: one trial
    return board, straggler


def test_an_attempt_that_did_not_take_the_trial_never_frees_its_slot() -> None:
    now = [0.0]
    board, straggler = _half_open_with_a_straggler(now)
    with board.attempt("worker") as trial:
        assert trial
        straggler.__exit__(None, None, None)  # ends without a verdict (cancelled): the trial is not its to free
        with board.attempt("worker") as third:
            assert not third  # the trial still runs: no second one
    with board.attempt("worker") as after:
        assert after  # the trial ended without a verdict: its slot is free again


def test_a_throttled_attempt_that_is_not_the_trial_leaves_the_slot_taken() -> None:
    now = [0.0]
    board, straggler = _half_open_with_a_straggler(now)
    with board.attempt("worker") as trial:
        assert trial
        board.throttled("worker", 1)  # the straggler is answered 429
        straggler.__exit__(None, None, None)
        now[0] = 7.5  # past its Retry-After: only the trial holds other jobs back
        assert board.has_capacity("worker") and not board.admits("worker")
        with board.attempt("worker") as third:
            assert not third


def test_a_probe_seeing_the_backend_down_and_up_again_does_not_start_a_second_trial() -> None:
    now = [0.0]
    board, straggler = _half_open_with_a_straggler(now)
    straggler.__exit__(None, None, None)
    with board.attempt("worker") as trial:
        assert trial
        board.probed("worker", Probe("down", "worker cannot be reached (ConnectError)."))
        now[0] = 7.0
        board.probed("worker", Probe("up"))  # half-open again at once, but the first trial has not ended
        assert board.status("worker") == "degraded" and not board.admits("worker")
        with board.attempt("worker") as second:
            assert not second
    assert board.admits("worker")


def test_a_re_attached_job_neither_steals_nor_frees_a_trial_and_is_the_trial_when_the_slot_is_free() -> None:
    now = [0.0]
    board, straggler = _half_open_with_a_straggler(now)
    straggler.__exit__(None, None, None)
    with board.attempt("worker") as trial:
        assert trial
        with board.attempt("worker", admitted=True) as reattached:
            assert reattached  # a provider job already running is always waited on
        assert not board.admits("worker")  # ...but it did not free the trial it never took
    with board.attempt("worker", admitted=True) as reattached:
        assert reattached and not board.admits("worker")  # the slot was free: the re-attached job is the trial
    assert board.admits("worker")


def test_an_attempt_is_admitted_only_with_capacity_left() -> None:
    now = [0.0]
    board = HealthBoard(failure_threshold=3, open_seconds=30, clock=lambda: now[0])
    board.register("fal", max_in_flight=1)
    with board.attempt("fal") as first:
        # Routing saw room for both; the first took the one slot meanwhile.
        with board.attempt("fal") as second:
            assert first and not second and board.backends["fal"].in_flight == 1
        with board.attempt("fal", admitted=True) as reattached:
            assert reattached and board.backends["fal"].in_flight == 2  # already running there: always waited on
    board.throttled("fal", 3)
    with board.attempt("fal") as throttled:
        assert not throttled and board.backends["fal"].in_flight == 0
    now[0] = 3.0
    with board.attempt("fal") as later:
        assert later


def test_a_worker_probe_tells_loading_from_down_and_says_why() -> None:
    answers: dict[str, httpx.Response] = {
        "up": httpx.Response(200, json={"status": "ok", "ready": True}),
        "loading": httpx.Response(200, json={"status": "ok", "ready": False, "load_error": None}),
        "failed": httpx.Response(200, json={"ready": False, "load_error": "CUDA out of memory"}),
        "token": httpx.Response(401, json={"detail": "missing or wrong worker token"}),
        "broken": httpx.Response(200, text="<html>bad gateway</html>"),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "dead":
            raise httpx.ConnectError("connection refused", request=request)
        return answers[request.url.host]

    async def probe_each() -> dict[str, Probe]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            hosts = [*answers, "dead"]
            workers = [WorkerBackend(h, f"http://{h}:9000", client, variants=frozenset({"fast"})) for h in hosts]
            return {w.name: await w.probe() for w in workers}

    assert asyncio.run(probe_each()) == {
        "up": Probe("up"),
        "loading": Probe("loading"),
        "failed": Probe("down", "failed's model failed to load: CUDA out of memory"),
        "token": Probe("down", "token rejected the gateway's credentials (401)."),
        "broken": Probe("down", "broken's health check answered 200 without its JSON status."),
        "dead": Probe("down", "dead cannot be reached (ConnectError)."),
    }


def _ready(client: httpx.Client, expected: dict[str, str], *, timeout: float = 30) -> dict[str, str]:
    """Poll /readyz until its backends read ``expected`` (or give up and return what they read last)."""
    deadline = time.monotonic() + timeout
    while True:
        backends: dict[str, str] = client.get("/readyz").json()["checks"]["backends"]
        if backends == expected or time.monotonic() > deadline:
            return backends
        time.sleep(0.05)


def test_a_dead_worker_is_open_not_loading_costs_no_attempt_and_serves_once_back(
    make_gateway: GatewayFactory, sqlite_url: str, worker_app: ServerThread, fal: FakeFal
) -> None:
    worker_app.stop()
    gw = make_gateway(
        sqlite_url,
        from_settings=True,
        **fal_only(fal)
        | {"backends": ["worker", "fal"], "worker_urls": [worker_app.url], "worker_token": WORKER_TOKEN},
        breaker_open_seconds=60,
        health_interval_seconds=0.5,
    )
    ready = gw.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["backends"] == {"worker": "open", "fal": "up"}
    key = gw.create_tenant()["api_key"]
    served = gw.generate(key)  # the worker is cheaper, but known down: not even tried
    assert (served.headers["X-HDG-Backend"], served.headers["X-HDG-Attempts"]) == ("fal", "1")

    only_worker = gw.create_tenant("gpu-only", allowed_backends=["worker"])["api_key"]
    refused = gw.generate(only_worker)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "backend_unavailable"
    assert "worker is open" in refused.json()["error"]["message"]
    assert "ConnectError" not in refused.json()["error"]["message"]  # another job's failure is not this tenant's
    # When the next probe may find it back (0.5 s), rounded up with a second to spare; not the breaker's 60 s.
    assert refused.headers["Retry-After"] == "1"

    worker_app.start()
    time.sleep(1.5)  # a probe interval, and then some: a probe finds it and makes it half-open
    back = gw.generate(only_worker)
    assert back.status_code == 200 and back.headers["X-HDG-Backend"] == "worker"
    assert _ready(gw.client, {"worker": "up", "fal": "up"}) == {"worker": "up", "fal": "up"}


def test_a_worker_loading_its_model_is_loading_until_it_is_up(
    make_gateway: GatewayFactory, sqlite_url: str, runner: HiDreamRunner
) -> None:
    loaded = threading.Event()

    def slow_load() -> HiDreamRunner:
        loaded.wait(30)
        return runner

    queue = GenerationQueue(slow_load, queue_size=2)
    app = create_worker_app(queue, token=WORKER_TOKEN, variants=frozenset({"fast"}))
    with ServerThread(app) as worker:
        gw = make_gateway(
            sqlite_url,
            from_settings=True,
            backends=["worker"],
            worker_urls=[worker.url],
            worker_token=WORKER_TOKEN,
            worker_variants=["fast"],
            health_interval_seconds=0.1,
        )
        loading = gw.client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["checks"]["backends"] == {"worker": "loading"}
        loaded.set()
        assert _ready(gw.client, {"worker": "up"}) == {"worker": "up"}
        assert gw.client.get("/readyz").status_code == 200


class _GatedRunner:
    """The tiny runner, recording each generation's params and holding each until ``release`` is set."""

    def __init__(self, runner: HiDreamRunner) -> None:
        self.runner = runner
        self.release = threading.Event()
        self.calls: list[GenerateParams] = []

    def generate(self, params: GenerateParams) -> Any:
        self.calls.append(params)
        self.release.wait(30)
        return self.runner.generate(params)


def _loader(value: _GatedRunner) -> Callable[[], HiDreamRunner]:
    return lambda: value  # type: ignore[return-value]


def test_the_local_backend_warms_up_before_it_says_it_is_up(
    make_gateway: GatewayFactory, sqlite_url: str, runner: HiDreamRunner
) -> None:
    gated = _GatedRunner(runner)
    gw: Gateway = make_gateway(sqlite_url, backend=LocalBackend(_loader(gated), variants=frozenset({"fast"})))

    assert _ready(gw.client, {"local": "loading"}) == {"local": "loading"}  # loaded, warming up
    assert [(p.n, p.num_inference_steps) for p in gated.calls] == [(1, 1)]  # one small generation
    gated.release.set()
    assert _ready(gw.client, {"local": "up"}) == {"local": "up"}

    key = gw.create_tenant()["api_key"]
    assert gw.generate(key).status_code == 200
    assert len(gated.calls) == 2  # the warm-up, then the request: warmed once, not per request


def test_a_request_that_probes_leaves_a_backend_probed_within_the_interval_alone() -> None:
    """/readyz and the admin pages probe doubtful backends, but not one the prober (or another request) just
    probed: a flood of unauthenticated /readyz calls cannot turn into a flood of health checks on a down worker.
    """

    probes: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:  # a worker whose /health says it is down
        probes.append(request.url.path)
        return httpx.Response(503, json={"status": "error", "ready": False, "error": "CUDA out of memory"})

    now = [100.0]
    board = HealthBoard(clock=lambda: now[0], probe_seconds=2.0)
    board.register("worker", max_in_flight=1)

    async def requests_then_rounds(worker: WorkerBackend) -> None:
        await probe_all(board, [worker], fresh_seconds=board.probe_seconds)  # never probed: probed now
        for _ in range(50):
            await probe_all(board, [worker], fresh_seconds=board.probe_seconds)
        assert len(probes) == 1 and board.status("worker") == "open"
        await probe_all(board, [worker])  # the prober's own round always probes what is in doubt
        assert len(probes) == 2
        now[0] += 2.0  # one interval later a request may probe again
        await probe_all(board, [worker], fresh_seconds=board.probe_seconds)
        assert len(probes) == 3

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
            worker = WorkerBackend("worker", "http://gpu-1:8000", client, variants=frozenset({"fast"}))
            await requests_then_rounds(worker)

    asyncio.run(run())
