"""A job row as the engine leaves it right after a claim: processing, leased to ``run_me``, due within a minute."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.backends.base import ImageJob
from gateway.storage import queue, repo
from gateway.storage.models import Prediction, new_id, utcnow


async def insert_held_job(sessions: async_sessionmaker[AsyncSession], job: ImageJob, *, n: int = 1) -> Prediction:
    """Make a tenant and key, and commit ``job`` (``n`` images) leased to ``run_me`` as if it had just been claimed."""
    async with sessions.begin() as session:
        tenant = await repo.create_tenant(session, name=f"acme-{new_id('t')}")  # names are unique
        key = await repo.add_key(session, tenant_id=tenant.id, key_hash="0" * 64, display_prefix="hdg_test")
        now = utcnow()
        p = Prediction(
            id=new_id("gen"),
            tenant_id=tenant.id,
            api_key_id=key.id,
            model="hidream-i1-fast",
            status="processing",
            prompt=job.prompt,
            params={},
            width=job.width,
            height=job.height,
            n=n,
            seed=job.seed,
            attempts=0,
            created_at=now,
            job=asdict(job),
            route="cheapest",
            available_at=now,
            deadline_at=now + timedelta(minutes=1),
            lease_owner="run_me",
            lease_expires_at=now + timedelta(minutes=1),
            started_at=now,
            cancel_requested=False,
            logs="",
        )
        await (await session.connection()).run_sync(queue.insert_job, p)
    return p
