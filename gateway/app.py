"""``create_app(settings)``: the FastAPI gateway; its lifespan builds every shared resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api import admin, files, health, images, usage
from gateway.auth import ApiKeyAuthenticator
from gateway.backends.base import Backend
from gateway.backends.local import LocalBackend, local_loader
from gateway.errors import install_error_handlers
from gateway.jobs import ImageService
from gateway.metering import RateLimiter
from gateway.middleware import BodyLimitMiddleware, RequestIdMiddleware
from gateway.settings import Settings
from gateway.state import AppState
from gateway.storage.db import create_engine, session_factory, upgrade
from gateway.storage.files import FileStore, UrlSigner

log = logging.getLogger("hidream_gateway")


def build_backends(settings: Settings) -> list[Backend]:
    """The backends named in HDG_BACKENDS, in that order."""
    built: list[Backend] = []
    for name in settings.backends:
        if name == "local":
            loader = local_loader(
                settings.local_model,
                models_dir=settings.models_dir,
                llama_path=settings.local_llama_path,
                device=settings.local_device,
            )
            backend = LocalBackend(
                loader, variants=frozenset(settings.local_variants), queue_size=settings.local_queue_size
            )
            backend.start()
            built.append(backend)
    return built


def create_app(settings: Settings, *, backends: Sequence[Backend] | None = None) -> FastAPI:
    """The gateway app. Pass ``backends`` to use ones built elsewhere (they are then not closed here)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(settings.resolved_database_url)
        await upgrade(engine)
        owned = backends is None
        active = build_backends(settings) if backends is None else list(backends)
        sessions = session_factory(engine)
        file_store = FileStore(settings.files_dir)
        app.state.hdg = AppState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            files=file_store,
            signer=UrlSigner(settings.signing_key(), ttl_seconds=settings.url_ttl_seconds),
            backends=active,
            images=ImageService(
                sessions=sessions,
                backends=active,
                files=file_store,
                prices=settings.prices_usd_per_megapixel,
                timeout=settings.request_timeout_seconds,
            ),
            authenticator=ApiKeyAuthenticator(),
            rate_limiter=RateLimiter(),
        )
        try:
            yield
        finally:
            if owned:
                for backend in active:
                    await backend.aclose()
            await engine.dispose()

    app = FastAPI(title="hidream-gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (health, images, files, usage, admin):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
