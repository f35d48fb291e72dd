"""The generation lifecycle: record the prediction, run it on a backend, store the images, settle the bill."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.auth import Principal
from gateway.backends.base import Backend, ImageJob, ImageResult
from gateway.errors import BackendUnavailable, GatewayError
from gateway.metering import price_usd
from gateway.storage import repo
from gateway.storage.files import FileStore, SavedFile
from gateway.storage.models import Prediction, StoredFile, new_id

log = logging.getLogger("hidream_gateway.jobs")


@dataclass
class Completed:
    """A settled, successful generation."""

    prediction: Prediction
    files: list[StoredFile]
    result: ImageResult
    backend: str


class ImageService:
    """Runs image jobs end to end. Routes call ``generate``; it raises GatewayError subclasses on failure."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        backends: Sequence[Backend],
        files: FileStore,
        prices: Mapping[str, Decimal],
        timeout: float,
    ) -> None:
        self.sessions = sessions
        self.backends = list(backends)
        self.files = files
        self.prices = prices
        self.timeout = timeout

    def pick_backend(self, variant: str) -> Backend:
        """The first configured backend that serves the variant (cost-based routing comes with more backends)."""
        for backend in self.backends:
            if variant in backend.variants:
                return backend
        raise BackendUnavailable(f"No enabled backend serves hidream-i1-{variant}.")

    async def generate(self, *, principal: Principal, model: str, job: ImageJob, params: dict[str, Any]) -> Completed:
        """Run ``job`` for ``principal``; bill exactly one usage event whatever happens."""
        backend = self.pick_backend(job.variant)
        async with self.sessions.begin() as session:
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
        try:
            result = await backend.generate(job, timeout=self.timeout)
            stored = await asyncio.to_thread(self._save_all, prediction, result)
        except BaseException as exc:
            status = "canceled" if isinstance(exc, asyncio.CancelledError) else "failed"
            # Only our own errors carry a message fit for the client; anything else is recorded by type.
            error = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            # Shielded so a client hanging up cannot leave the prediction unsettled.
            await asyncio.shield(self._settle_failure(prediction, backend.name, started, status, error))
            raise
        latency_ms = int((time.monotonic() - started) * 1000)
        try:
            async with self.sessions.begin() as session:
                await repo.finish_prediction(
                    session,
                    prediction=prediction,
                    status="succeeded",
                    backend=backend.name,
                    latency_ms=latency_ms,
                    price_usd=price_usd(
                        self.prices, model=model, width=result.width, height=result.height, images=len(stored)
                    ),
                    images=len(stored),
                    width=result.width,
                    height=result.height,
                    files=stored,
                )
        except BaseException:
            for f in stored:  # the rows never landed, so neither should the files
                self.files.delete(f.path)
            raise
        prediction.status, prediction.backend = "succeeded", backend.name
        prediction.width, prediction.height, prediction.latency_ms = result.width, result.height, latency_ms
        return Completed(prediction, stored, result, backend.name)

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
                )
            )
        return stored

    async def _settle_failure(
        self, prediction: Prediction, backend: str, started: float, status: str, error: str
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
                    images=0,
                    width=prediction.width,
                    height=prediction.height,
                    error=error[:2000],
                )
        except Exception:
            log.exception("could not record the failure of prediction %s", prediction.id)
