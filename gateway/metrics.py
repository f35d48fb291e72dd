"""Prometheus metrics: one ``Metrics`` per app, safe under ``serve --workers N``, with bounded label values.

Single process: the metrics live in the app's own ``CollectorRegistry`` (so tests can build many apps in one
process). Several processes (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start, as ``serve --workers N``
does): every process writes its values to files in that directory, and ``/metrics``, whichever worker answers it,
adds up every process's files.

Example::

    metrics = Metrics(max_tenants=100, redis=False, multiprocess_dir=os.environ.get(MULTIPROC_ENV))
    metrics.spend(tenant_id="ten_...", backend="fal", usd=Decimal("0.01"))
    body, content_type = metrics.render(accept="text/plain")
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
UNMATCHED = "unmatched"
# Error codes (gateway/errors.py) of the refusals worth an alert, by the reason label they are counted under.
REFUSALS = {
    "budget_exceeded": "budget",
    "rate_limit_exceeded": "rate_limit",
    "concurrency_limit_exceeded": "concurrency",
}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: from a fast health check to a full-quality generation that waits out a cold GPU.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BACKEND_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """Every metric the gateway exports, and the few calls that record them."""

    def __init__(self, *, max_tenants: int, redis: bool, multiprocess_dir: str | None = None) -> None:
        self.max_tenants = max_tenants
        self.multiprocess_dir = multiprocess_dir
        self._tenants: set[str] = set()
        # Each label set's child, as ``labels()`` made it: looked up on every request, where ``labels()`` checks
        # and joins the values and takes a lock each time.
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._attempts: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "hdg_http_requests", "HTTP requests answered, by route template.", ["route", "method", "status"], registry=r
        )
        self.http_duration = Histogram(
            "hdg_http_request_duration_seconds",
            "Time from a request to the start of its answer, by route template.",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        # Breakers are per process; the value is the verdict of the worker that last looked (at a scrape), which
        # is the freshest one: a worker whose breaker opened long ago and saw no scrape since cannot outvote it.
        self.backend_up = Gauge(
            "hdg_backend_up",
            "1 when the backend is ready and its circuit breaker is not open.",
            ["backend"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.backend_attempts = Counter(
            "hdg_backend_attempts", "Attempts on a backend, by how they ended.", ["backend", "outcome"], registry=r
        )
        self.backend_latency = Histogram(
            "hdg_backend_latency_seconds",
            "Time a backend took for an attempt that succeeded.",
            ["backend"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )
        self.spend_usd = Counter(
            "hdg_spend_usd",
            "What tenants were billed (USD), by the backend that served.",
            ["tenant", "backend"],
            registry=r,
        )
        # Each worker counts its own running jobs; the sum over live workers is the gateway's.
        self.jobs_in_flight = Gauge(
            "hdg_jobs_in_flight", "Jobs this gateway is running now.", multiprocess_mode="livesum", registry=r
        )
        self.refusals = Counter("hdg_refusals", "Requests refused by a limit.", ["reason"], registry=r)
        # Only with Redis configured: a constant 0 without it would look like an outage.
        self.redis_up: Gauge | None = None
        if redis:
            self.redis_up = Gauge(
                "hdg_redis_up",
                "1 when Redis answers; 0 while rate limits fall back to per-process counting.",
                multiprocess_mode="livemostrecent",
                registry=r,
            )

    def tenant_label(self, tenant_id: str) -> str:
        """The tenant's id for the first ``max_tenants`` tenants this process sees, then ``other``."""
        if tenant_id in self._tenants:
            return tenant_id
        if len(self._tenants) < self.max_tenants:
            self._tenants.add(tenant_id)
            return tenant_id
        return OTHER

    def request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        method = method if method in METHODS else OTHER  # a client's method is any token: bounded here
        key = (route, method, status)
        children = self._requests.get(key)
        if children is None:  # label values are bounded (route templates, methods, statuses): one entry each
            children = self._requests[key] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_duration.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def attempt(self, *, backend: str, outcome: str, seconds: float) -> None:
        """One attempt on a backend ended (succeeded, failed, busy, timeout, invalid_input, canceled, lease_lost)."""
        key = (backend, outcome)
        counted = self._attempts.get(key)
        if counted is None:
            counted = self._attempts[key] = self.backend_attempts.labels(backend, outcome)
        counted.inc()
        if outcome == "succeeded":
            timed = self._latencies.get(backend)
            if timed is None:
                timed = self._latencies[backend] = self.backend_latency.labels(backend)
            timed.observe(seconds)

    def spend(self, *, tenant_id: str, backend: str, usd: Decimal) -> None:
        """A tenant was billed ``usd`` for a job ``backend`` served."""
        self.spend_usd.labels(self.tenant_label(tenant_id), backend).inc(float(usd))

    def job_started(self) -> None:
        self.jobs_in_flight.inc()

    def job_ended(self) -> None:
        self.jobs_in_flight.dec()

    def refused(self, code: str | None) -> None:
        """Count an error answer if its code is a limit's refusal (others are not refusals)."""
        reason = REFUSALS.get(code or "")
        if reason is not None:
            self.refusals.labels(reason).inc()

    def set_backend_up(self, backend: str, up: bool) -> None:
        self.backend_up.labels(backend).set(1 if up else 0)

    def set_redis_up(self, up: bool) -> None:
        if self.redis_up is not None:
            self.redis_up.set(1 if up else 0)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (Prometheus text by default), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        if self.multiprocess_dir is None:
            return encode(self.registry), content_type
        _forget_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return encode(registry), content_type

    def close(self) -> None:
        """This process stops serving: its live gauges (jobs in flight, backend_up) stop counting."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def _forget_dead_processes(directory: str) -> None:
    """Drop the live gauges of workers that died without shutting down (killed, crashed); counters stay.

    The workers of one ``serve`` share a host, so a pid that no longer exists is a worker that is gone. This deletes
    the files ``multiprocess.mark_process_dead`` would, one at a time, because scrapes run at once (in several
    workers, or several in one) and find the same files: whichever deletes a file second finds it gone already.
    """
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = os.path.basename(path).removesuffix(".db").rsplit("_", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/predictions/{prediction_id}``), never the raw path.

    Anything answered without a route is ``unmatched`` (its status tells a 404 from a body over the size limit,
    which is refused before routing), so random URLs cannot grow the label set.
    """
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    """Count every HTTP request and time it to its answer's start, labelled by route template, method and status."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        counted = False

        async def send_counted(message: Message) -> None:
            nonlocal counted
            # Counted as the answer starts, before the client can read it: a scrape right after sees it.
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self._count(scope, message["status"], started)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not counted:  # the server answers it with a 500
                self._count(scope, 500, started)
            raise

    def _count(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.request(route=route_template(scope), method=scope["method"], status=status, seconds=seconds)
