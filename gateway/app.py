"""``create_app(settings)``: the FastAPI gateway; its lifespan builds every shared resource."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.api import admin, console, files, health, images, predictions, usage, webhooks
from gateway.auth import ApiKeyAuthenticator
from gateway.backends.base import Backend
from gateway.backends.config import Misconfigured, misconfigured, variants_of
from gateway.backends.fal import FalBackend
from gateway.backends.local import LocalBackend
from gateway.backends.replicate import ReplicateBackend
from gateway.backends.transport import AiohttpClient
from gateway.backends.worker import WorkerBackend
from gateway.console.pages import ConsoleHeadersMiddleware
from gateway.console.sessions import FailedSignIns, admin_fingerprint
from gateway.engine import Engine
from gateway.errors import install_error_handlers
from gateway.health import HealthBoard, probe_forever
from gateway.jobs import JobRunner
from gateway.limits import RateLimits
from gateway.metrics import MULTIPROC_ENV, Metrics, MetricsMiddleware
from gateway.middleware import BodyLimitMiddleware, DirectRoutes, RequestIdMiddleware
from gateway.outbound import NetworkPolicy
from gateway.settings import Settings
from gateway.state import AppState
from gateway.storage import repo
from gateway.storage.db import create_engine, session_factory, upgrade
from gateway.storage.files import UrlSigner, build_file_store
from gateway.webhooks import WebhookSender
from inference.serving import model_loader

log = logging.getLogger("hidream_gateway")


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def build_backends(
    settings: Settings, client: httpx.AsyncClient, *, skip: dict[str, str] | None = None
) -> list[Backend]:
    """The backends named in HDG_BACKENDS, in that order; remote ones share ``client``.

    A kind in ``skip`` (an optional backend's problem, from ``misconfigured``) stands in as ``Misconfigured``.
    """
    built: list[Backend] = []
    for kind in settings.backends:
        if kind in (skip or {}):
            built.append(Misconfigured(kind, problem=(skip or {})[kind], variants=variants_of(kind, settings)))
        elif kind == "local":
            loader = model_loader(
                settings.local_model,
                cache_dir=settings.models_dir,
                llama_path=settings.local_llama_path,
                device=settings.local_device,
            )
            local = LocalBackend(
                loader, variants=frozenset(settings.local_variants), queue_size=settings.local_queue_size
            )
            local.start()
            built.append(local)
        elif kind == "worker":
            urls = settings.worker_urls
            for i, url in enumerate(urls, start=1):
                built.append(
                    WorkerBackend(
                        "worker" if len(urls) == 1 else f"worker-{i}",
                        url,
                        client,
                        variants=frozenset(settings.worker_variants),
                        token=_secret(settings.worker_token),
                        modal_key=_secret(settings.modal_key),
                        modal_secret=_secret(settings.modal_secret),
                    )
                )
        elif kind == "replicate":
            built.append(
                ReplicateBackend(
                    client,
                    token=_secret(settings.replicate_api_token) or "",
                    models=settings.replicate_models,
                    base_url=settings.replicate_base_url,
                    poll_seconds=settings.provider_poll_seconds,
                    output_hosts=settings.replicate_output_hosts,
                    max_bytes=settings.output_max_bytes,
                    output_timeout=settings.output_timeout_seconds,
                )
            )
        elif kind == "fal":
            built.append(
                FalBackend(
                    client,
                    key=_secret(settings.fal_key) or "",
                    apps=settings.fal_apps,
                    base_url=settings.fal_base_url,
                    poll_seconds=settings.provider_poll_seconds,
                    output_hosts=settings.fal_output_hosts,
                    max_bytes=settings.output_max_bytes,
                    output_timeout=settings.output_timeout_seconds,
                )
            )
    return built


async def url_signing_key(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> bytes:
    """HDG_URL_SIGNING_SECRET, else the key every process and replica shares through the database.

    Whichever process comes first makes it; the others read that one, so a URL signed by one replica verifies on
    every other. A key file an older version left in the data dir is adopted, so the URLs it signed stay valid.
    """
    if settings.url_signing_secret is not None:
        return settings.url_signing_secret.get_secret_value().encode()
    legacy = settings.data_dir / "url-signing.key"
    candidate = legacy.read_text().strip() if legacy.exists() else ""
    if len(candidate) < 32:  # absent, or too short to trust: make a good one
        candidate = secrets.token_urlsafe(32)
    async with sessions.begin() as session:
        return (await repo.shared_secret(session, name="url_signing_key", candidate=candidate)).encode()


def max_in_flight(backend: Backend, settings: Settings) -> int:
    """How many jobs the gateway sends a backend at once before routing looks elsewhere."""
    if isinstance(backend, LocalBackend):
        return backend.capacity
    if backend.kind == "worker":
        return settings.worker_max_in_flight
    return settings.provider_max_in_flight


def create_app(settings: Settings, *, backends: Sequence[Backend] | None = None, freeze_gc: bool = False) -> FastAPI:
    """The gateway app. Pass ``backends`` to use ones built elsewhere (they are then not closed here).

    ``freeze_gc``: once started, move everything start-up made out of the cycle collector's sight (``gc.freeze``),
    as a process that serves this one app wants: those objects live as long as the process, and walking them again
    and again was several % of the event loop under load. Not for a process that makes many apps (tests): cycles
    among a stopped app's objects would then never be collected.

    Raises ConfigurationError, before anything starts, when an enabled backend's settings cannot work.
    """
    problems = misconfigured(settings) if backends is None else {}
    # One per app, not per module: tests build many apps in one process. Under ``serve --workers N`` the CLI has
    # set PROMETHEUS_MULTIPROC_DIR, and every worker's values go to files there (gateway/metrics.py).
    metrics = Metrics(
        max_tenants=settings.metrics_max_tenants,
        redis=settings.redis_url is not None,
        multiprocess_dir=os.environ.get(MULTIPROC_ENV) or None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(settings.resolved_database_url)
        await upgrade(engine)
        owned = backends is None
        # One pooled HTTP client for every remote backend; timeouts are set per call.
        client = AiohttpClient(max_connections=256, timeout=httpx.Timeout(30.0, connect=5.0))
        active = build_backends(settings, client, skip=problems) if backends is None else list(backends)
        health = HealthBoard(
            failure_threshold=settings.breaker_failures,
            open_seconds=settings.breaker_open_seconds,
            probe_seconds=settings.health_interval_seconds,
        )
        for backend in active:
            problem = backend.problem if isinstance(backend, Misconfigured) else None
            health.register(backend.name, max_in_flight=max_in_flight(backend, settings), problem=problem)
        sessions = session_factory(engine)
        file_store = build_file_store(settings)
        signing_key = await url_signing_key(settings, sessions)
        signer = UrlSigner(signing_key, ttl_seconds=settings.url_ttl_seconds)
        runner = JobRunner(
            sessions=sessions,
            backends=active,
            files=file_store,
            prices=settings.prices_usd_per_megapixel,
            costs=settings.backend_costs,
            gpu_usd_per_second=settings.worker_gpu_usd_per_second,
            health=health,
            attempt_timeout=settings.attempt_timeout_seconds,
            metrics=metrics,
        )
        jobs = Engine(
            sessions=sessions,
            runner=runner,
            signer=signer,
            timeout=settings.request_timeout_seconds,
            lease_seconds=settings.job_lease_seconds,
            poll_seconds=settings.job_poll_seconds,
            concurrency=settings.job_concurrency,
        )
        outbound = NetworkPolicy(settings.webhook_allowed_networks)
        limits = RateLimits(_secret(settings.redis_url))
        # Webhooks have a client of their own, on httpx's transport: posts go to a checked IP with the TLS server
        # name set (sni_hostname), which the backends' aiohttp transport cannot do.
        hooks_client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        sender = WebhookSender(sessions=sessions, client=hooks_client, policy=outbound, owner=jobs.owner)
        # A key of its own for the console's CSRF tokens: an HMAC of the shared URL-signing key, so a token can
        # never double as a file signature, and every replica computes the same one.
        console_key = hmac.new(signing_key, b"hdg-console-csrf", hashlib.sha256).digest()
        admin_token = _secret(settings.admin_token)
        # An scrypt, once per process (it is slow on purpose); admin sessions are checked against it.
        fingerprint = await asyncio.to_thread(admin_fingerprint, admin_token, console_key) if admin_token else None
        app.state.hdg = AppState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            files=file_store,
            signer=signer,
            backends=active,
            health=health,
            runner=runner,
            jobs=jobs,
            authenticator=ApiKeyAuthenticator(cache_seconds=settings.auth_cache_seconds),
            limits=limits,
            outbound=outbound,
            metrics=metrics,
            console_key=console_key,
            admin_fingerprint=fingerprint,
            sign_ins=FailedSignIns(settings.console_sign_in_failures),
        )
        await jobs.start()
        if freeze_gc:
            gc.collect()
            gc.freeze()
        delivering = asyncio.create_task(sender.run_forever(jobs.webhook_wake), name="webhook deliveries")
        # Health probes move breakers too: a backend that is back is half-open (tried) within one interval.
        probing = asyncio.create_task(probe_forever(health, active), name="health probes")
        try:
            yield
        finally:
            await jobs.stop()
            delivering.cancel()
            probing.cancel()
            await asyncio.gather(delivering, probing, return_exceptions=True)
            if owned:
                for backend in active:
                    await backend.aclose()
            await client.aclose()
            await hooks_client.aclose()
            await limits.aclose()
            await file_store.aclose()
            await engine.dispose()
            metrics.close()

    # FastAPI looks up the OpenTelemetry providers on every request (a few % of the event loop) unless told not to;
    # the gateway's own metrics are Prometheus' (/metrics), so its OpenTelemetry is opt-in.
    off: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="hidream-gateway", version="0.1.0", lifespan=lifespan, telemetry=None if settings.otel else off)
    install_error_handlers(app)
    for module in (health, images, predictions, webhooks, files, usage, admin):
        app.include_router(module.router)
    console.install(app)
    if not settings.otel:  # FastAPI's tracing names a request's span in its router: with it on, the router does
        hot = [r for r in images.router.routes if isinstance(r, APIRoute) and r.endpoint is images.create_image]
        app.add_middleware(DirectRoutes, routes=hot, handlers=app.exception_handlers)  # inside the body limit
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ConsoleHeadersMiddleware)  # outside the body limit: its 413 pages get the headers too
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it times and counts every answer, 413s too
    return app


def app_from_env() -> FastAPI:
    """The app configured from the environment, for ASGI servers: ``uvicorn --factory gateway.app:app_from_env``."""
    return create_app(Settings(), freeze_gc=True)
