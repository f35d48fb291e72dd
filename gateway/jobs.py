"""The generation lifecycle: record the prediction, run it on a backend, store the images, settle the bill."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.auth import Principal
from gateway.backends.base import Backend, BackendInputError, ImageJob, ImageResult
from gateway.errors import BackendBusy, BackendFailed, BackendUnavailable, GatewayError, GenerationTimeout
from gateway.health import HealthBoard
from gateway.metering import backend_cost_usd, check_budget, price_usd
from gateway.routing import BackendView, Route, plan
from gateway.settings import Cost
from gateway.storage import repo
from gateway.storage.files import FileStore, SavedFile
from gateway.storage.models import Prediction, StoredFile, new_id, utcnow

log = logging.getLogger("hidream_gateway.jobs")


@dataclass
class Completed:
    """A settled, successful generation."""

    prediction: Prediction
    files: list[StoredFile]
    result: ImageResult
    backend: str
    attempts: int


def final_error(errors: list[GatewayError], *, out_of_time: bool) -> GatewayError:
    """The one error a tenant sees after every attempt failed."""
    if not errors:
        return GenerationTimeout("No time was left to try a backend.")
    if len(errors) == 1 or all(type(e) is type(errors[0]) for e in errors):
        if all(isinstance(e, BackendBusy) for e in errors):
            return BackendBusy(errors[-1].message, retry_after=min(e.retry_after for e in errors))  # type: ignore[attr-defined]
        return errors[-1]
    if out_of_time:
        return GenerationTimeout(f"No backend finished in time after {len(errors)} attempts.")
    return BackendFailed(f"All {len(errors)} attempts failed; the last: {errors[-1].message}")


class ImageService:
    """Runs image jobs end to end: route, try candidates in order within one deadline, store, settle once.

    Routes call ``generate``; it raises GatewayError subclasses on failure.
    """

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
        timeout: float,
        attempt_timeout: float,
    ) -> None:
        self.sessions = sessions
        self.backends = {b.name: b for b in backends}
        self.files = files
        self.prices = prices
        # A copy per process, so the admin API can change prices at run time without touching settings.
        self.costs: dict[str, dict[str, Cost]] = {name: dict(book) for name, book in costs.items()}
        self.gpu_rate = gpu_usd_per_second
        self.health = health
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout

    def cost(self, backend: Backend, job: ImageJob, gpu_seconds: float | None = None) -> Decimal:
        """Our cost of ``job`` on ``backend`` (an estimate unless the backend measured GPU time)."""
        book = self.costs.get(backend.name) or self.costs.get(backend.kind) or {}
        return backend_cost_usd(
            book.get(job.variant),
            gpu_usd_per_second=self.gpu_rate,
            width=job.width,
            height=job.height,
            images=job.n,
            gpu_seconds=gpu_seconds,
        )

    def set_costs(self, backend: Backend, costs: Mapping[str, Cost]) -> dict[str, Cost]:
        """Change what ``backend`` costs per variant from now on (a provider changed its prices)."""
        book = self.costs.setdefault(backend.name, dict(self.costs.get(backend.kind, {})))
        book.update(costs)
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
        views = self.views(job)
        names = plan(variant=job.variant, route=route, allowed=allowed, views=views)
        if not names:
            full = [replace(v, has_capacity=True) for v in views if not v.has_capacity]
            busy = plan(variant=job.variant, route=route, allowed=allowed, views=full)
            if busy:  # healthy backends exist but all are saturated or throttled: come back shortly
                raise BackendBusy(
                    "Every backend that can serve this request is at capacity; retry later.",
                    retry_after=min(self.health.retry_after(name) for name in busy),
                )
            raise BackendUnavailable(
                f"No backend can serve hidream-i1-{job.variant} right now (route {route}): "
                "every eligible backend is down, throttled or at capacity."
            )
        return [self.backends[n] for n in names]

    async def generate(
        self, *, principal: Principal, model: str, job: ImageJob, params: dict[str, Any], route: Route
    ) -> Completed:
        """Run ``job`` for ``principal``; whatever happens, at most one usage event is billed."""
        candidates = self.candidates(job, route, principal.tenant.allowed_backends)
        async with self.sessions.begin() as session:
            # One transaction: the budget check and the record of the work it admits.
            await check_budget(session, tenant=principal.tenant, now=utcnow())
            prediction = await repo.create_prediction(
                session,
                tenant_id=principal.tenant.id,
                api_key_id=principal.key.id,
                model=model,
                prompt=job.prompt,
                params=params,
                width=job.width,
                height=job.height,
                n=job.n,
                seed=job.seed,
            )
        started = time.monotonic()
        tried: list[str] = []
        errors: list[GatewayError] = []
        served: Backend | None = None
        try:
            for backend in candidates:
                remaining = started + self.timeout - time.monotonic()
                if remaining <= 0 or not self.health.admits(backend.name):
                    continue
                tried.append(backend.name)
                result_or_error = await self._attempt(backend, job, min(remaining, self.attempt_timeout))
                if isinstance(result_or_error, ImageResult):
                    served, result = backend, result_or_error
                    break
                errors.append(result_or_error)
            if served is None:
                if not tried:  # every candidate became ineligible (e.g. another request took a trial slot)
                    raise BackendBusy("Every backend that can serve this request is busy; retry later.", retry_after=2)
                raise final_error(errors, out_of_time=time.monotonic() >= started + self.timeout)
            stored = await asyncio.to_thread(self._save_all, prediction, result)
        except BaseException as exc:
            status = "canceled" if isinstance(exc, asyncio.CancelledError) else "failed"
            # Only our own errors carry a message fit for the client; anything else is recorded by type.
            error = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            name = served.name if served else (tried[-1] if tried else None)
            # Shielded so a client hanging up cannot leave the prediction unsettled.
            await asyncio.shield(self._settle_failure(prediction, name, started, status, error, len(tried)))
            raise
        attempts = len(tried)
        latency_ms = int((time.monotonic() - started) * 1000)
        gpu_seconds = result.timings.get("inference_s") if served.kind == "worker" else None
        settle = self._settle_success(prediction, served, job, result, stored, model, attempts, latency_ms, gpu_seconds)
        try:
            # Shielded: once the images exist, a client hanging up must not stop their rows from landing.
            await asyncio.shield(settle)
        except Exception as exc:
            for f in stored:  # the rows never landed, so neither should the files
                self.files.delete(f.path)
            log.exception("could not record the success of prediction %s", prediction.id)
            await asyncio.shield(
                self._settle_failure(prediction, served.name, started, "failed", type(exc).__name__, attempts)
            )
            raise BackendFailed("The image was made but could not be stored; it is not billed.") from exc
        prediction.status, prediction.backend, prediction.attempts = "succeeded", served.name, attempts
        prediction.width, prediction.height, prediction.latency_ms = result.width, result.height, latency_ms
        return Completed(prediction, stored, result, served.name, attempts)

    async def reap_stale(self) -> int:
        """Settle predictions a crashed process left ``processing`` as failed (unbilled); returns how many.

        Nothing runs longer than the request timeout, so anything older is no one's: safe with replicas.
        """
        cutoff = utcnow() - timedelta(seconds=self.timeout + 60)
        async with self.sessions() as session:
            stale = await repo.stale_predictions(session, before=cutoff)
        for prediction in stale:
            await self._settle_failure(
                prediction, prediction.backend, time.monotonic(), "failed", "abandoned: the gateway stopped", 0
            )
        if stale:
            log.warning("settled %d abandoned predictions as failed", len(stale))
        return len(stale)

    async def _attempt(self, backend: Backend, job: ImageJob, timeout: float) -> ImageResult | GatewayError:
        """One try on one backend: its result, or the error to fail over with (health is updated either way).

        An input error is raised instead: it would fail the same way everywhere.
        """
        t0 = time.monotonic()
        try:
            with self.health.attempt(backend.name):
                result = await backend.generate(job, timeout=timeout)
        except BackendInputError:
            self.health.success(backend.name, None)  # the backend is fine; the input is not
            raise
        except BackendBusy as exc:
            self.health.throttled(backend.name, exc.retry_after)
            return exc
        except GatewayError as exc:
            log.warning("attempt on %s failed: %s", backend.name, exc.message)
            self.health.failure(backend.name, exc.message)
            return exc
        except Exception as exc:  # a bug or an answer no adapter anticipated: still fail over
            log.exception("attempt on %s raised", backend.name)
            self.health.failure(backend.name, type(exc).__name__)
            return BackendFailed(f"{backend.name} failed unexpectedly ({type(exc).__name__}).")
        self.health.success(backend.name, time.monotonic() - t0)
        return result

    async def _settle_success(
        self,
        prediction: Prediction,
        served: Backend,
        job: ImageJob,
        result: ImageResult,
        stored: list[StoredFile],
        model: str,
        attempts: int,
        latency_ms: int,
        gpu_seconds: float | None,
    ) -> None:
        async with self.sessions.begin() as session:
            await repo.finish_prediction(
                session,
                prediction=prediction,
                status="succeeded",
                backend=served.name,
                latency_ms=latency_ms,
                price_usd=price_usd(
                    self.prices, model=model, width=result.width, height=result.height, images=len(stored)
                ),
                cost_usd=self.cost(served, job, gpu_seconds),
                attempts=attempts,
                images=len(stored),
                width=result.width,
                height=result.height,
                files=stored,
            )

    def _save_all(self, prediction: Prediction, result: ImageResult) -> list[StoredFile]:
        stored: list[StoredFile] = []
        for position, data in enumerate(result.images):
            file_id = new_id("file")
            saved: SavedFile = self.files.save(
                tenant_id=prediction.tenant_id, file_id=file_id, content_type=result.content_type, data=data
            )
            stored.append(
                StoredFile(
                    id=file_id,
                    tenant_id=prediction.tenant_id,
                    prediction_id=prediction.id,
                    position=position,
                    content_type=result.content_type,
                    size_bytes=saved.size_bytes,
                    sha256=saved.sha256,
                    path=saved.path,
                    width=result.width,
                    height=result.height,
                    created_at=utcnow(),
                )
            )
        return stored

    async def _settle_failure(
        self, prediction: Prediction, backend: str | None, started: float, status: str, error: str, attempts: int
    ) -> None:
        try:
            async with self.sessions.begin() as session:
                await repo.finish_prediction(
                    session,
                    prediction=prediction,
                    status=status,
                    backend=backend,
                    latency_ms=int((time.monotonic() - started) * 1000),
                    price_usd=Decimal(0),
                    attempts=attempts,
                    images=0,
                    width=prediction.width,
                    height=prediction.height,
                    error=error[:2000],
                )
        except Exception:
            log.exception("could not record the failure of prediction %s", prediction.id)
