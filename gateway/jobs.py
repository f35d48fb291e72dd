"""Running one claimed job: route it, try backends in order, record the provider's job, store, settle once.

The engine (gateway/engine.py) claims a job and calls ``JobRunner.execute``; every write here is guarded by the
job's lease, so a runner that lost its lease (it stalled and another replica took over) changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import webhooks
from gateway.backends.base import Backend, BackendInputError, ImageJob, ImageResult, is_provider
from gateway.backends.remote import with_deadline
from gateway.errors import (
    BackendBusy,
    BackendFailed,
    BackendUnavailable,
    GatewayError,
    GenerationTimeout,
    InvalidRequest,
    phrase_for,
    redact_credentials,
)
from gateway.health import HealthBoard
from gateway.metering import backend_cost_usd, price_usd
from gateway.metrics import Metrics
from gateway.routing import BackendView, Route, plan
from gateway.settings import Cost
from gateway.storage import queue, repo
from gateway.storage.db import writing
from gateway.storage.files import FileStore, StorageUnavailable
from gateway.storage.models import Prediction, StoredFile, new_id, transient, utcnow
from gateway.storage.writer import transact

log = logging.getLogger("hidream_gateway.jobs")

# What a settle is retried on: the database or the connection to it failing, not the write itself being wrong.
TRANSIENT = (DBAPIError, SATimeoutError, OSError, TimeoutError)
SETTLED_FIELDS = (
    "status",
    "backend",
    "latency_ms",
    "attempts",
    "width",
    "height",
    "error",
    "error_code",
    "attempt_log",
)
# Retry-After for a 503 read back from a row: the replica that saw the refusal knew better, this one can only guess.
RETRY_AFTER_GUESS = 2
# Longest a job waits when every candidate refused it at its turn, before routing it again.
DEFER_SECONDS = 2.0

# Errors as stored (``error_code``) back to the error a waiting client is given, in any replica.
ERRORS: dict[str, type[GatewayError]] = {
    "backend_busy": BackendBusy,
    "backend_unavailable": BackendUnavailable,
    "backend_error": BackendFailed,
    "timeout": GenerationTimeout,
    "invalid_value": InvalidRequest,
    "storage_unavailable": StorageUnavailable,
}
Why = Literal["cancel", "lost", "shutdown"]
# The webhook events a settle writes with its state change: (event, body) each, rendered from the settled job.
OnSettle = Callable[[Prediction, Sequence[StoredFile]], list[tuple[str, dict[str, Any]]]]
OnLog = Callable[
    [AsyncSession, Prediction, str], Awaitable[None]
]  # logs were written (the new text), in that transaction


def error_from(prediction: Prediction) -> GatewayError:
    """The error a failed or canceled job reports, rebuilt from its stored code, message and attempts."""
    message = prediction.error or f"The prediction was {prediction.status}."
    attempts = list(prediction.attempt_log) if isinstance(prediction.attempt_log, list) else None
    if prediction.status == "canceled":
        return GatewayError(message, code="canceled", attempts=attempts)
    kind = ERRORS.get(prediction.error_code or "", BackendFailed)
    if issubclass(kind, BackendBusy | BackendUnavailable):
        return kind(message, retry_after=RETRY_AFTER_GUESS, attempts=attempts)
    return kind(message, attempts=attempts)


def phrase(error: GatewayError) -> str:
    """The tenant's words for how an attempt ended in ``error``: a fixed phrase, with the provider's status if any.

    An input error keeps its own text: it is about the tenant's input, and the tenant needs it to fix the request
    (the backends bound it to one short line; credentials are redacted here once more).
    """
    if error.outcome == "invalid_input":
        return redact_credentials(error.message)
    return phrase_for(error.outcome, error.upstream_status)


@dataclass
class Attempt:
    """One try of a job on one backend: how it ended, as the error and the prediction's ``attempts`` list it."""

    backend: str
    outcome: str = "running"  # then succeeded, canceled, or the error's outcome (unauthorized, timeout, busy...)
    error: GatewayError | None = None
    sent: bool = True  # False: skipped when it was its turn (full, throttled, its breaker): nothing was sent to it

    def end(self, outcome: str, error: GatewayError | None = None) -> None:
        self.outcome, self.error = outcome, error

    def as_json(self) -> dict[str, Any]:
        """``{"backend", "outcome", "status", "message", "detail"}``, as stored in ``predictions.attempt_log``.

        ``status`` is the provider's HTTP status, if any; ``message`` the tenant's fixed phrase; ``detail`` the
        backend's own words (capped, credentials redacted), for admins only: ``tenant_attempts`` drops it.
        """
        error = self.error
        return {
            "backend": self.backend,
            "outcome": self.outcome,
            "status": error.upstream_status if error is not None else None,
            "message": phrase(error) if error is not None else None,
            "detail": redact_credentials(error.message)[:500] if error is not None else None,
        }


def attempt_log(attempts: Sequence[Attempt]) -> list[dict[str, Any]]:
    """Every attempt of a job, in order, as stored on its row (with each one's admin-only ``detail``)."""
    return [a.as_json() for a in attempts]


def final_error(attempts: Sequence[Attempt], *, out_of_time: bool) -> GatewayError:
    """The one error a tenant sees once no attempt succeeded; its status follows the rule the README states.

    The job's own time ran out: 504. Otherwise any attempt that failed upstream (credentials refused, unreachable,
    connection dropped, a 5xx, a malformed answer, a failed provider job): 502, and the message names the first of
    them. Otherwise attempts that ran past their time: 504. Otherwise every backend tried was at capacity,
    throttling or not ready: 503 with Retry-After. The error carries every attempt as stored; its body shows them in
    the tenant's view (each attempt's fixed phrase, never the backend's own words).
    """
    stored = attempt_log(attempts)
    failed = [a for a in attempts if a.error is not None]
    refused = [a for a in failed if isinstance(a.error, BackendBusy | BackendUnavailable)]
    timeouts = [a for a in failed if isinstance(a.error, GenerationTimeout)]
    upstream = [a for a in failed if a not in refused and a not in timeouts]
    if out_of_time:
        first = next(iter(upstream + timeouts + refused), None)
        reason = f" The first failure: {_said(first)}." if first is not None else ""
        return GenerationTimeout(f"No backend finished in time.{reason}", attempts=stored)
    if upstream:
        return BackendFailed(_naming(upstream[0], len(attempts)), attempts=stored)
    if timeouts:
        return GenerationTimeout(_naming(timeouts[0], len(attempts)), attempts=stored)
    if not refused:
        return GenerationTimeout("No time was left to try a backend.", attempts=stored)
    waits = [e.retry_after for a in refused if isinstance(e := a.error, BackendBusy | BackendUnavailable)]
    retry_after = min((w for w in waits if w), default=RETRY_AFTER_GUESS)
    kind = BackendBusy if any(isinstance(a.error, BackendBusy) for a in refused) else BackendUnavailable
    return kind(_naming(refused[0], len(attempts)), retry_after=retry_after, attempts=stored)


def _said(attempt: Attempt) -> str:
    """``fal: the backend answered 500``: an attempt in the tenant's words."""
    assert attempt.error is not None
    return f"{attempt.backend}: {phrase(attempt.error)}"


def _wait(attempt: Attempt) -> int:
    """Seconds a refused attempt's backend asked to be left alone for (RETRY_AFTER_GUESS if it did not say)."""
    error = attempt.error
    return (error.retry_after if isinstance(error, BackendBusy | BackendUnavailable) else None) or RETRY_AFTER_GUESS


def _naming(cause: Attempt, attempts: int) -> str:
    sentence = f"{_said(cause)}."
    if attempts <= 1:
        return sentence
    return f"{sentence} None of the {attempts} attempts succeeded; each is listed in attempts."


@dataclass
class Finished:
    """A job that reached a terminal state (or, with ``deferred``, went back to wait for capacity)."""

    prediction: Prediction
    files: list[StoredFile]
    images: list[bytes] | None = None  # the bytes, when this process made them
    error: GatewayError | None = None
    deferred: bool = False


class LeaseLost(Exception):
    """Another runner owns the job now; this one must stop without writing."""


class JobRunner:
    """Executes jobs on the backends: routing, failover within one deadline, storage and the one settle."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        backends: Sequence[Backend],
        files: FileStore,
        prices: Mapping[str, Decimal],
        costs: Mapping[str, Mapping[str, Cost]],
        gpu_usd_per_second: Decimal,
        health: HealthBoard,
        attempt_timeout: float,
        on_settle: OnSettle | None = None,
        on_log: OnLog | None = None,
        db_slots: int = 8,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        # At most this many of the runner's transactions at once: a burst of thousands of jobs ending together
        # then queues here, in order, instead of timing out on the connection pool (which requests share too).
        self._db = asyncio.Semaphore(db_slots)
        self.backends = {b.name: b for b in backends}
        self.files = files
        self.prices = prices
        # A copy per process, so the admin API can change prices at run time without touching settings.
        self.costs: dict[str, dict[str, Cost]] = {name: dict(book) for name, book in costs.items()}
        self.gpu_rate = gpu_usd_per_second
        # Estimates by (backend, variant, width, height, images): routing asks for every backend on every request,
        # and a job's shape takes few values. Emptied whenever a price book changes (set_costs).
        self._estimates: dict[tuple[str, str, int, int, int], Decimal] = {}
        self.health = health
        self.attempt_timeout = attempt_timeout
        self.on_settle = on_settle
        self.on_log = on_log
        # Jobs this process's runners are settling or have settled, until their tasks end: their leases are gone
        # from the rows by design, and the heartbeat must not take that for another runner's claim.
        self.settling: set[str] = set()
        self.metrics = metrics

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._db, writing(self.sessions) as session:
            yield session

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncSession]:
        async with self._db, self.sessions() as session:
            yield session

    def cost(self, backend: Backend, job: ImageJob, gpu_seconds: float | None = None) -> Decimal:
        """Our cost of ``job`` on ``backend`` (an estimate unless the backend measured GPU time)."""
        key = (backend.name, job.variant, job.width, job.height, job.n)
        if gpu_seconds is None and (known := self._estimates.get(key)) is not None:
            return known
        book = self.costs.get(backend.name) or self.costs.get(backend.kind) or {}
        cost = backend_cost_usd(
            book.get(job.variant),
            gpu_usd_per_second=self.gpu_rate,
            width=job.width,
            height=job.height,
            images=job.n,
            gpu_seconds=gpu_seconds,
        )
        if gpu_seconds is None:
            if len(self._estimates) >= 4096:  # sizes are bounded, but not small: keep the newest
                self._estimates.clear()
            self._estimates[key] = cost
        return cost

    def set_costs(self, backend: Backend, costs: Mapping[str, Cost]) -> dict[str, Cost]:
        """Change what ``backend`` costs per variant from now on (a provider changed its prices)."""
        book = self.costs.setdefault(backend.name, dict(self.costs.get(backend.kind, {})))
        book.update(costs)
        self._estimates.clear()
        return book

    def views(self, job: ImageJob) -> list[BackendView]:
        """Every backend's state right now, as routing sees it."""
        return [
            BackendView(
                name=b.name,
                kind=b.kind,
                variants=b.variants,
                admits=self.health.admits(b.name),
                has_capacity=self.health.has_capacity(b.name),
                cost_usd=self.cost(b, job),
                latency_s=self.health.backends[b.name].latency_s,
            )
            for b in self.backends.values()
        ]

    def candidates(self, job: ImageJob, route: Route, allowed: Sequence[str] | None) -> list[Backend]:
        """The backends to try in order; BackendBusy or BackendUnavailable when there are none right now."""
        views = self.views(job)
        names = plan(variant=job.variant, route=route, allowed=allowed, views=views)
        if not names:
            full = [replace(v, has_capacity=True) for v in views if not v.has_capacity]
            busy = plan(variant=job.variant, route=route, allowed=allowed, views=full)
            if busy:  # healthy backends exist but all are saturated or throttled: come back shortly
                raise BackendBusy(
                    "Every backend that can serve this request is at capacity; retry later.",
                    retry_after=self.health.soonest(busy),
                )
            # The ones that would serve it once recovered say why they cannot now, and when the soonest may.
            recovering = [replace(v, admits=True, has_capacity=True) for v in views]
            waiting = plan(variant=job.variant, route=route, allowed=allowed, views=recovering)
            raise BackendUnavailable(
                f"No backend can serve hidream-i1-{job.variant} right now (route {route}): "
                f"{self.health.describe(waiting) or 'none here serves it'}.",
                retry_after=self.health.soonest(waiting),
            )
        return [self.backends[n] for n in names]

    async def execute(
        self, p: Prediction, *, owner: str, allowed: Sequence[str] | None, why: Callable[[], Why | None]
    ) -> Finished:
        """Run a job this process holds the lease on, to its end; ``why`` says why it is being cancelled."""
        started = time.monotonic()
        try:
            job = ImageJob(**p.job)
            route = Route.parse(p.route)
        except (TypeError, ValueError) as exc:  # a row this version cannot read (a field renamed in a deploy)
            log.error("job %s cannot be rebuilt: %s", p.id, exc)
            return await self._fail(
                p, owner, started, "failed", BackendFailed("The job's stored input is invalid."), [], []
            )
        logs: list[str] = []
        attempts: list[Attempt] = []
        if p.cancel_requested:  # canceled while it waited to be claimed, or while its runner was dying
            await self._cancel_provider_job(p)
            return await self._fail(p, owner, started, "canceled", None, ["Canceled."], attempts)
        ends = [t for t in (p.deadline_at, p.cancel_at) if t is not None]
        end = min(ends) if ends else utcnow() + timedelta(days=1)
        try:
            async with asyncio.timeout(max(0.0, (end - utcnow()).total_seconds())):
                served, result = await self._run(p, job, route, allowed, owner, logs, attempts)
            return await self._succeed(p, owner, job, served, result, started, logs, attempts)
        except LeaseLost:
            return await self._current(p)
        except asyncio.CancelledError:
            if why() != "cancel":  # lost or shutting down: another runner continues it, re-attaching to the provider
                raise
            logs.append("Canceled.")
            await _finish_despite_cancels(self._cancel_and_settle(p, owner, started, logs, attempts))
            raise
        except TimeoutError:
            await asyncio.shield(self._cancel_provider_job(p))
            if p.cancel_at is not None and utcnow() >= p.cancel_at:
                logs.append("Canceled by Cancel-After.")
                return await self._fail(p, owner, started, "canceled", None, logs, attempts)
            for a in attempts:  # the one the deadline cut short
                if a.outcome == "running":
                    a.end("timeout", GenerationTimeout("The request's time ran out during this attempt."))
            error = final_error(attempts, out_of_time=True)
            return await self._fail(p, owner, started, "failed", error, logs, attempts)
        except Deferred as deferred:
            return deferred.finished
        except GatewayError as exc:
            return await self._fail(p, owner, started, "failed", exc, logs, attempts)
        except Exception as exc:
            log.exception("job %s raised", p.id)
            return await self._fail(p, owner, started, "failed", BackendFailed(type(exc).__name__), logs, attempts)

    async def _cancel_and_settle(
        self, p: Prediction, owner: str, started: float, logs: list[str], attempts: list[Attempt]
    ) -> None:
        await self._cancel_provider_job(p)
        await self._fail(p, owner, started, "canceled", None, logs, attempts)

    async def _run(
        self,
        p: Prediction,
        job: ImageJob,
        route: Route,
        allowed: Sequence[str] | None,
        owner: str,
        logs: list[str],
        attempts: list[Attempt],
    ) -> tuple[Backend, ImageResult]:
        skip: set[str] = set()
        attached = self.backends.get(p.provider_backend or "")
        if p.provider_ref is not None and is_provider(attached):
            # A previous runner had submitted it: wait on that job instead of paying for another.
            await self._log(p, owner, logs, f"Re-attached to the job on {attached.name}.")
            attempts.append(tried := Attempt(attached.name))
            with self.health.attempt(attached.name, admitted=True):
                outcome = await self._attempt(attached, job, p, owner, ref=p.provider_ref)
            if isinstance(outcome, ImageResult):
                tried.end("succeeded")
                return attached, outcome
            tried.end(outcome.outcome, outcome)
            skip.add(attached.name)
        try:
            candidates = [b for b in self.candidates(job, route, allowed) if b.name not in skip]
        except BackendBusy as exc:
            if attempts:
                raise final_error(attempts, out_of_time=False) from None
            raise Deferred(await self._defer(p, owner, exc.retry_after)) from None
        skipped: list[Attempt] = []
        for backend in candidates:
            # Admitted and its slot taken in one step (a half-open backend's single trial): the awaits below would
            # otherwise let another job pass the same check before this one takes the slot.
            with self.health.attempt(backend.name) as admitted:
                if not admitted:
                    # Routing chose it, but earlier attempts took time and it is now full, throttled, or no longer
                    # admitted by its breaker: listed as not taking the job, so the error names every backend and
                    # the status rule counts it (if every candidate was, the job is deferred and tried again).
                    attempts.append(refused := self._refused(backend.name))
                    skipped.append(refused)
                    await self._log(p, owner, logs, f"{backend.name} skipped: {phrase_for(refused.outcome, None)}.")
                    continue
                attempts.append(tried := Attempt(backend.name))
                await self._log(p, owner, logs, f"Attempt {sum(a.sent for a in attempts)} on {backend.name}.")
                outcome = await self._attempt(backend, job, p, owner, ref=None)  # an input error ends the job here
            if isinstance(outcome, ImageResult):
                tried.end("succeeded")
                return backend, outcome
            tried.end(outcome.outcome, outcome)
            # The job's logs are the tenant's to read: the fixed phrase, not the backend's words.
            await self._log(p, owner, logs, f"{backend.name} failed: {phrase(outcome)}.")
        if len(skipped) == len(attempts):  # not one tried: every candidate became ineligible since routing saw it
            # Tried again after the shortest Retry-After, but at most DEFER_SECONDS later: a slot often frees long
            # before a backend's estimate, and a synchronous caller is waiting.
            wait = min([DEFER_SECONDS, *(_wait(a) for a in skipped)])
            raise Deferred(await self._defer(p, owner, wait))
        raise final_error(attempts, out_of_time=False)

    def _refused(self, name: str) -> Attempt:
        """An attempt ``health.attempt`` did not admit, ended as what stopped it: busy (at capacity or throttled,
        with when it may take a job again) or unavailable (its breaker is open, or another job holds its trial).
        """
        wait = self.health.retry_after(name)
        if self.health.admits(name) and not self.health.has_capacity(name):
            error: GatewayError = BackendBusy(f"{name} is at capacity or throttled.", retry_after=wait)
        else:
            error = BackendUnavailable(f"{name} is not taking jobs now (its breaker).", retry_after=wait)
        refused = Attempt(name, sent=False)
        refused.end(error.outcome, error)
        return refused

    async def _attempt(
        self, backend: Backend, job: ImageJob, p: Prediction, owner: str, *, ref: dict[str, Any] | None
    ) -> ImageResult | GatewayError:
        """One try on one backend: its result, or the error to fail over with (health is updated either way).

        Called inside ``health.attempt`` (the caller took the slot). An input error is raised instead: it would fail
        the same way everywhere.
        """
        t0 = time.monotonic()
        timeout = self.attempt_timeout
        try:
            if is_provider(backend):
                if ref is None:
                    # The attempt's time covers the submit too: a provider that never answers it is a timeout.
                    ref = await with_deadline(
                        backend.submit(job, timeout=timeout), timeout=timeout, backend=backend.name
                    )
                    # Committed before waiting: a restart re-attaches to this job instead of submitting again.
                    await self._hold(p, owner, backend.name, ref)
                try:
                    left = max(0.0, timeout - (time.monotonic() - t0))
                    result = await backend.collect(job, ref, timeout=left)
                except GatewayError:
                    await backend.cancel(ref)  # it may still be running, and billing
                    await self._hold(p, owner, backend.name, None)
                    raise
            else:
                result = await backend.generate(job, timeout=timeout)
        except BackendInputError:
            self.health.success(backend.name, None)  # the backend is fine; the input is not
            self._count(backend, "invalid_input", t0)
            raise
        except BackendBusy as exc:
            self.health.throttled(backend.name, exc.retry_after)
            self._count(backend, "busy", t0)
            return exc
        except GatewayError as exc:
            log.warning("attempt on %s failed: %s", backend.name, redact_credentials(exc.message))
            self.health.failure(backend.name, exc.message)
            self._count(backend, "timeout" if isinstance(exc, GenerationTimeout) else "failed", t0)
            return exc
        except (LeaseLost, asyncio.CancelledError) as exc:
            # Cancelled: by the tenant, the job's deadline or a shutdown.
            self._count(backend, "lease_lost" if isinstance(exc, LeaseLost) else "canceled", t0)
            raise
        except Exception as exc:  # a bug or an answer no adapter anticipated: still fail over
            log.exception("attempt on %s raised", backend.name)
            self.health.failure(backend.name, type(exc).__name__)
            self._count(backend, "failed", t0)
            return BackendFailed(f"{backend.name} failed unexpectedly ({type(exc).__name__}).")
        self.health.success(backend.name, time.monotonic() - t0)
        self._count(backend, "succeeded", t0)
        return result

    def _count(self, backend: Backend, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.attempt(backend=backend.name, outcome=outcome, seconds=time.monotonic() - started)

    async def _log(self, p: Prediction, owner: str, logs: list[str], line: str) -> None:
        """Note a line for the job's logs: kept for the settle, or written now when a webhook wants ``logs``.

        Best effort: a database error here must not fail a job whose provider work is already running.
        """
        if self.on_log is not None and p.webhook and webhooks.wants(p.webhook_events, "logs"):
            try:
                async with self._transaction() as session:
                    if await queue.append_log(session, prediction_id=p.id, owner=owner, line=line):
                        await self.on_log(session, p, (p.logs or "") + line + "\n")
                        p.logs = (p.logs or "") + line + "\n"
                        return
            except Exception:
                log.warning("could not write a log line of %s now; it is kept for the end", p.id, exc_info=True)
        logs.append(line)

    async def _hold(self, p: Prediction, owner: str, backend: str, ref: dict[str, Any] | None) -> None:
        before = p.provider_backend, p.provider_ref
        # Known before the commit, so a cancel that lands during it still cancels this provider job.
        p.provider_backend, p.provider_ref = backend, ref

        async def record() -> bool:
            # Not behind the runner's database slots: the provider is already running (and billing) this job, so its
            # id must not wait behind a burst of settles, where a shutdown could catch it unrecorded.
            return await transact(
                self.sessions,
                lambda conn: queue.set_provider_job(conn, prediction_id=p.id, owner=owner, backend=backend, ref=ref),
            )

        try:
            # Shielded: once started, the write finishes even if this task is cancelled (shutdown, lost lease),
            # so whoever runs the job next finds the id and re-attaches instead of submitting again.
            held = await asyncio.shield(record())
        except Exception:
            held = False
            log.exception("could not record the provider job of %s", p.id)
        if not held:  # nobody could re-attach to it: stop it rather than pay for it
            p.provider_backend, p.provider_ref = before
            if ref is not None and is_provider(b := self.backends.get(backend)):
                await asyncio.shield(b.cancel(ref))
            raise LeaseLost(p.id)

    async def _cancel_provider_job(self, p: Prediction) -> None:
        backend = self.backends.get(p.provider_backend or "")
        if p.provider_ref is not None and is_provider(backend):
            await backend.cancel(p.provider_ref)

    async def _defer(self, p: Prediction, owner: str, seconds: float) -> Finished:
        until = utcnow() + timedelta(seconds=max(0.5, seconds))
        async with self._transaction() as session:
            await queue.defer(session, prediction_id=p.id, owner=owner, until=until)
        return Finished(p, [], deferred=True)

    async def _current(self, p: Prediction) -> Finished:
        async with self._reading() as session:
            row = await queue.load(session, prediction_id=p.id) or p
            files = list(await repo.list_files(session, prediction_id=p.id))
        return Finished(row, files, error=None if row.status == "succeeded" else error_from(row))

    async def _succeed(
        self,
        p: Prediction,
        owner: str,
        job: ImageJob,
        served: Backend,
        result: ImageResult,
        started: float,
        logs: list[str],
        attempts: list[Attempt],
    ) -> Finished:
        stored = await self._save_all(p, result)
        gpu_seconds = result.timings.get("inference_s") if served.kind == "worker" else None
        latency_ms = int((time.monotonic() - started) * 1000)
        logs.append(f"Succeeded on {served.name}.")
        price = price_usd(self.prices, model=p.model, width=result.width, height=result.height, images=len(stored))
        try:
            # Shielded: once the images exist, a cancellation must not stop their rows from landing.
            won = await asyncio.shield(
                self._settle_retrying(
                    p,
                    owner,
                    status="succeeded",
                    backend=served.name,
                    latency_ms=latency_ms,
                    price_usd=price,
                    cost_usd=self.cost(served, job, gpu_seconds),
                    attempts=p.attempts + sum(a.sent for a in attempts),
                    images=len(stored),
                    width=result.width,
                    height=result.height,
                    files=stored,
                    logs=logs,
                    attempt_log=attempt_log(attempts),
                )
            )
        except Exception:
            won = False
            log.exception("could not record the success of prediction %s", p.id)
        if not won:
            current = await self._current(p)
            landed = {f.id for f in current.files}
            for f in stored:  # files whose rows never landed go (a commit that errored may still have landed)
                if f.id not in landed:
                    try:
                        await self.files.delete(f.path)
                    except Exception:  # an orphaned object costs storage, not correctness: report the job as is
                        log.warning("could not delete %s, stored for %s", f.path, p.id, exc_info=True)
            if current.prediction.status == "succeeded" and landed & {f.id for f in stored}:
                self._count_spend(p, served, price)  # our commit landed after all
                return Finished(current.prediction, current.files, images=result.images)
            if current.prediction.status in queue.ACTIVE and current.prediction.lease_owner == owner:
                # Still ours, so the settle itself failed: record a failure (unbilled) instead.
                error = BackendFailed("The image was made but could not be stored; it is not billed.")
                return await self._fail(p, owner, started, "failed", error, logs, attempts)
            return current  # someone else settled it: report what they recorded, never a success we did not land
        self._count_spend(p, served, price)
        return Finished(p, stored, images=result.images)

    def _count_spend(self, p: Prediction, served: Backend, price: Decimal) -> None:
        if self.metrics is not None:  # what the settle billed: capped at the job's hold, as repo.finish_prediction does
            billed = price if p.reserved_usd is None else min(price, p.reserved_usd)
            self.metrics.spend(tenant_id=p.tenant_id, backend=served.name, usd=billed)

    async def _fail(
        self,
        p: Prediction,
        owner: str,
        started: float,
        status: str,
        error: GatewayError | None,
        logs: list[str],
        attempts: list[Attempt],
    ) -> Finished:
        for a in attempts:  # still running when the job ended: stopped by a cancel, or by what ended the job
            if a.outcome == "running" and error is None:
                a.end("canceled")
            elif a.outcome == "running" and error is not None:
                a.end(error.outcome, error)
        if error is not None and error.attempts is None:
            error.attempts = attempt_log(attempts)
        try:
            won = await self._settle_retrying(
                p,
                owner,
                status=status,
                backend=p.provider_backend or (attempts[-1].backend if attempts else None),
                latency_ms=int((time.monotonic() - started) * 1000),
                price_usd=Decimal(0),
                attempts=p.attempts + sum(a.sent for a in attempts),
                images=0,
                width=p.width,
                height=p.height,
                error=error.message[:2000] if error else None,
                error_code=error.code if error else None,
                logs=logs,
                attempt_log=attempt_log(attempts),
            )
        except Exception:
            log.exception("could not record the end of prediction %s", p.id)
            won = False
        if not won:
            return await self._current(p)
        return Finished(p, [], error=error or error_from(p))

    async def _settle_retrying(self, p: Prediction, owner: str | None, **fields: Any) -> bool:
        """``_settle``, tried again over about 15 s when the database fails: the outcome (and, for a success, the
        provider's bill) is already real, so a passing error must not turn it into something else.
        """
        for delay in (0.5, 1.0, 2.0, 4.0, 8.0):
            try:
                return await self._settle(p, owner, **fields)
            except TRANSIENT as exc:
                permanent = isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError | InterfaceError)
                if permanent and not exc.connection_invalidated:  # type: ignore[union-attr]
                    raise  # a constraint or a bug: the same write fails the same way again
                log.warning("settling %s failed; retrying in %.1f s", p.id, delay, exc_info=True)
                await asyncio.sleep(delay)
        return await self._settle(p, owner, **fields)  # a commit that errored but landed answers False here

    async def cancel_waiting(self, p: Prediction) -> bool:
        """Cancel a job no runner has claimed; False if one claimed it first (its runner cancels it then)."""
        return await self._settle(
            p,
            None,
            expected=("starting",),
            gated=False,  # called by a request that holds a pool connection: it must not queue behind runners
            logs=["Canceled before it started."],
            status="canceled",
            backend=None,
            latency_ms=0,
            price_usd=Decimal(0),
            images=0,
            width=p.width,
            height=p.height,
            attempts=p.attempts,
        )

    async def _settle(
        self,
        p: Prediction,
        owner: str | None,
        *,
        logs: list[str],
        expected: Sequence[str] = queue.ACTIVE,
        gated: bool = True,
        **fields: Any,
    ) -> bool:
        """The one guarded write that ends a job, with its usage event and webhook events, in one transaction."""
        text = (p.logs or "") + "".join(f"{line}\n" for line in logs)
        files: Sequence[StoredFile] = fields.get("files", ())
        changed = {k: v for k, v in fields.items() if k in SETTLED_FIELDS} | {
            "logs": text,
            "completed_at": utcnow(),
            "lease_owner": None,
        }
        before = {k: getattr(p, k) for k in changed}
        for key, value in changed.items():  # the webhook bodies render the settled job
            setattr(p, key, value)
        won = False
        try:
            events = self.on_settle(p, files) if self.on_settle is not None else []

            def settle(conn: Connection) -> bool:
                won = repo.finish_prediction(
                    conn, prediction=p, lease_owner=owner, expected=expected, logs=text, **fields
                )
                for event, body in events if won else ():
                    webhooks.enqueue(conn, prediction=p, event=event, payload=body)
                return won

            if owner is not None:
                self.settling.add(p.id)
            async with self._db if gated else contextlib.nullcontext():
                won = await transact(self.sessions, settle)
        finally:
            if not won:  # rolled back, or not ours to settle: so is the object, so a retry writes the same row
                self.settling.discard(p.id)
                for key, value in before.items():
                    setattr(p, key, value)
        return won

    async def _save_all(self, prediction: Prediction, result: ImageResult) -> list[StoredFile]:
        file_ids = [new_id("file") for _ in result.images]
        # All at once: to a bucket each save is a round trip, and n images should not take n of them. Each is waited
        # for, failed or not, so none is still being written while the others are cleaned up.
        outcomes = await asyncio.gather(
            *(
                self.files.save(
                    tenant_id=prediction.tenant_id, file_id=file_id, content_type=result.content_type, data=data
                )
                for file_id, data in zip(file_ids, result.images, strict=True)
            ),
            return_exceptions=True,
        )
        saved = [o for o in outcomes if not isinstance(o, BaseException)]
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            # The job fails without rows for any of them: the images that did land would be orphans in the store.
            removed = await asyncio.gather(*(self.files.delete(f.path) for f in saved), return_exceptions=True)
            for f, outcome in zip(saved, removed, strict=True):
                if isinstance(outcome, BaseException):
                    log.warning("could not delete %s, stored for %s", f.path, prediction.id, exc_info=outcome)
            raise errors[0]
        now = utcnow()
        return [
            transient(
                StoredFile,
                {
                    "id": file_id,
                    "tenant_id": prediction.tenant_id,
                    "prediction_id": prediction.id,
                    "position": position,
                    "content_type": result.content_type,
                    "size_bytes": f.size_bytes,
                    "sha256": f.sha256,
                    "path": f.path,
                    "width": result.width,
                    "height": result.height,
                    "created_at": now,
                },
            )
            for position, (file_id, f) in enumerate(zip(file_ids, saved, strict=True))
        ]


class Deferred(Exception):
    """No backend had room: the job went back to the queue (carries what to report)."""

    def __init__(self, finished: Finished) -> None:
        super().__init__("deferred")
        self.finished = finished


async def _finish_despite_cancels(work: Awaitable[None]) -> None:
    """Run clean-up to its end even if the caller is cancelled again meanwhile (one cancel is already handled)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
    task.result()
