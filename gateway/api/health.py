"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from gateway.api.deps import StateDep
from gateway.auth import bearer_token
from gateway.errors import AuthenticationFailed
from gateway.health import SERVING, probe_all
from gateway.state import AppState
from gateway.storage.files import StorageUnavailable

router = APIRouter(tags=["health"])

REDIS_DOWN = "unreachable: rate limits are per-process until it is back"


async def backend_checks(state: AppState) -> dict[str, str]:
    """Each backend's state, after probing the ones already in doubt (never a healthy one: see /admin/backends).

    ``up``, ``degraded`` (recent failures, or half-open: the next request is its trial), ``open`` (down, or failing:
    not routed to until it recovers), ``loading`` (answers, model not loaded yet) or ``misconfigured``.
    """
    await probe_all(state.health, state.backends, fresh_seconds=state.health.probe_seconds)
    return {backend.name: state.health.status(backend.name) for backend in state.backends}


async def redis_check(state: AppState) -> str:
    """``ok``, ``not configured``, or unreachable (the gateway keeps serving, with per-process rate limits)."""
    if not state.limits.configured:
        return "not configured"
    return "ok" if await state.limits.ping() else REDIS_DOWN


async def database_check(state: AppState) -> str:
    try:
        async with asyncio.timeout(5), state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


async def storage_check(state: AppState) -> str:
    """``ok``, or ``error: <reason>`` when the image store cannot take writes (no bucket, no answer, no permission)."""
    try:
        async with asyncio.timeout(5):
            await state.files.check()
    except TimeoutError:
        return "error: no answer within 5 s"
    except StorageUnavailable as exc:
        return f"error: {exc.reason}"
    return "ok"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 as soon as the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """200 when the database and the image store answer and at least one backend is up or degraded; 503 otherwise.

    Redis is shown but does not decide: without it the gateway keeps serving, with per-process rate limits.
    """
    database, backends, redis, storage = await asyncio.gather(
        database_check(state), backend_checks(state), redis_check(state), storage_check(state)
    )
    checks: dict[str, Any] = {"database": database, "backends": backends, "redis": redis, "storage": storage}
    # A gateway that cannot store what it makes is not ready: every job would fail after the backend did the work.
    ok = database == "ok" and storage == "ok" and any(check in SERVING for check in backends.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: StateDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus exposition of every worker's metrics; needs ``Bearer HDG_METRICS_TOKEN`` when that is set."""
    expected = state.settings.metrics_token
    # Compared in constant time, so response timing does not reveal how much of a guess was right.
    if expected is not None and not hmac.compare_digest(
        bearer_token(authorization).encode(), expected.get_secret_value().encode()
    ):
        raise AuthenticationFailed("Incorrect metrics token.", code="invalid_metrics_token")
    # Gauges of state this process holds are read now, not on every request.
    backends, redis = await asyncio.gather(backend_checks(state), redis_check(state))
    for name, check in backends.items():
        state.metrics.set_backend_up(name, check in SERVING)
    if redis != "not configured":
        state.metrics.set_redis_up(redis == "ok")
    body, content_type = state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
