"""The job engine's guarantees, driven directly: a settle that loses never reports success, leases fence runners."""

from __future__ import annotations

import asyncio
import io
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select, update

from gateway.backends.base import ImageJob, ImageResult
from gateway.engine import Engine
from gateway.health import HealthBoard
from gateway.jobs import JobRunner
from gateway.settings import default_backend_costs
from gateway.storage import queue, repo
from gateway.storage.db import open_database, session_factory
from gateway.storage.files import LocalFileStore, UrlSigner
from gateway.storage.models import Prediction, StoredFile, UsageEvent
from tests.held_job import insert_held_job

JOB = ImageJob(variant="fast", prompt="a fox", width=64, height=64, seed=1)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


class HeldBackend:
    """A backend whose one generation waits until the test lets it finish (a real PNG then)."""

    name = kind = "local"
    variants = frozenset({"fast"})

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        self.started.set()
        await self.finish.wait()
        return ImageResult([_png()], "image/png", 64, 64, job.seed)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def _setup(url: str, tmp: Path) -> tuple[Any, JobRunner, HeldBackend, Prediction]:
    engine_cm = open_database(url)
    engine = await engine_cm.__aenter__()
    sessions = session_factory(engine)
    p = await insert_held_job(sessions, JOB)
    backend = HeldBackend()
    health = HealthBoard()
    health.register(backend.name, max_in_flight=4)
    runner = JobRunner(
        sessions=sessions,
        backends=[backend],
        files=LocalFileStore(tmp / "files"),
        prices={"hidream-i1-fast": Decimal("0.01")},
        costs=default_backend_costs(),
        gpu_usd_per_second=Decimal("0.001"),
        health=health,
        attempt_timeout=30,
    )
    return engine_cm, runner, backend, p


def test_a_settle_that_loses_never_reports_success(database_url: str, tmp_path: Path) -> None:
    """Another runner settled the job while this one generated: no success, no files, no second usage event."""

    async def scenario() -> None:
        engine_cm, runner, backend, p = await _setup(database_url, tmp_path)
        try:
            running = asyncio.create_task(runner.execute(p, owner="run_me", allowed=None, why=lambda: None))
            await backend.started.wait()
            async with runner.sessions.begin() as session:  # e.g. a cancel, or a runner that took the lease over
                other = await queue.load(session, prediction_id=p.id)
                assert other is not None
                conn = await session.connection()
                assert await conn.run_sync(
                    lambda sync: repo.finish_prediction(
                        sync,
                        prediction=other,
                        status="canceled",
                        backend=None,
                        latency_ms=0,
                        price_usd=Decimal(0),
                        images=0,
                        width=64,
                        height=64,
                        expected=queue.ACTIVE,
                    )
                )
            backend.finish.set()
            finished = await running
            assert finished.prediction.status == "canceled" and finished.error is not None
            assert finished.files == [] and finished.images is None
            async with runner.sessions() as session:
                assert await session.scalar(select(func.count()).select_from(StoredFile)) == 0
                events = (await session.scalars(select(UsageEvent))).all()
            assert [(e.status, e.price_usd) for e in events] == [("canceled", Decimal(0))]
            assert not any((tmp_path / "files").rglob("*.png"))  # the image that lost is not left on disk
        finally:
            await engine_cm.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_a_runner_that_lost_its_lease_writes_nothing(sqlite_url: str, tmp_path: Path) -> None:
    """The lease moved to another runner mid-generation: this one's success is not recorded or billed."""

    async def scenario() -> None:
        engine_cm, runner, backend, p = await _setup(sqlite_url, tmp_path)
        try:
            running = asyncio.create_task(runner.execute(p, owner="run_me", allowed=None, why=lambda: None))
            await backend.started.wait()
            async with runner.sessions.begin() as session:  # run_me stalled; its lease ran out and run_b took it
                await session.execute(update(Prediction).where(Prediction.id == p.id).values(lease_owner="run_b"))
            backend.finish.set()
            finished = await running
            assert finished.prediction.status == "processing" and finished.prediction.lease_owner == "run_b"
            async with runner.sessions() as session:
                assert await session.scalar(select(func.count()).select_from(UsageEvent)) == 0
                assert await session.scalar(select(func.count()).select_from(StoredFile)) == 0
        finally:
            await engine_cm.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_the_heartbeat_stops_a_job_taken_over_but_not_one_that_just_settled(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job missing from the renewal was either settled by its own task a moment ago (left alone) or taken over by
    another runner, which may have finished it already (cancelled as lost, so it writes nothing more)."""

    async def scenario() -> None:
        engine_cm, runner, backend, p = await _setup(database_url, tmp_path)
        jobs = Engine(sessions=runner.sessions, runner=runner, signer=UrlSigner(b"k" * 32, ttl_seconds=60), timeout=60)
        jobs.owner = "run_me"  # insert_held_job's lease owner
        try:
            jobs._spawn(p)
            task = jobs._tasks[p.id]
            await backend.started.wait()
            jobs._spawned[p.id] -= 60  # running since before this heartbeat began

            async def set_row(**values: Any) -> None:
                async with runner.sessions.begin() as session:
                    await session.execute(update(Prediction).where(Prediction.id == p.id).values(**values))

            # Its own settle landed between the list of running jobs and the renewal: still finishing, not lost.
            runner.settling.add(p.id)
            await set_row(status="succeeded", lease_owner=None)
            await jobs.heartbeat()
            assert not task.cancelling() and p.id not in jobs._why
            assert "lost the lease" not in caplog.text

            # Another runner took it over and finished it: this task is stopped (its caller reads the row), and
            # the log says so.
            runner.settling.discard(p.id)
            with caplog.at_level(logging.WARNING, logger="hidream_gateway.engine"):
                await jobs.heartbeat()
            assert jobs._why.get(p.id) == "lost" and f"lost the lease on {p.id}" in caplog.text
            with pytest.raises(asyncio.CancelledError):
                await task
            async with runner.sessions() as session:
                row = await queue.load(session, prediction_id=p.id)
                assert row is not None and row.status == "succeeded"  # as the other runner left it
                assert await session.scalar(select(func.count()).select_from(UsageEvent)) == 0
        finally:
            backend.finish.set()
            await engine_cm.__aexit__(None, None, None)

    asyncio.run(scenario())
