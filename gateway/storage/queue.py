"""The job engine's queries: claim with a lease, renew, record the provider's job, release, cancel, list.

Every state change is a guarded ``UPDATE ... WHERE status = <expected> [AND lease_owner = <me>]`` that reports
whether it won, so two replicas (or a replica and a restarted one) never both move the same job.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.storage.models import IdempotencyKey, Prediction, row_values, utcnow
from gateway.storage.repo import PREDICTIONS
from gateway.storage.writer import execute

# The states and the moves between them; everything else is refused by the guarded updates below.
TRANSITIONS: dict[str, frozenset[str]] = {
    "starting": frozenset({"processing", "canceled", "failed"}),  # claimed, canceled before it ran, expired
    "processing": frozenset({"starting", "succeeded", "failed", "canceled"}),  # deferred (no capacity), or done
}
ACTIVE = tuple(TRANSITIONS)  # the states a job leaves; every guarded update below expects one of them
TERMINAL = frozenset().union(*TRANSITIONS.values()) - set(TRANSITIONS)


_INSERT_JOB = insert(PREDICTIONS)


def _won(result: Any) -> bool:
    return bool(getattr(result, "rowcount", 0) == 1)


def insert_job(conn: Connection, prediction: Prediction) -> None:
    """Insert a new job row (a Core insert: it is on every request's path)."""
    # One statement object for every job: its compiled form is cached per set of columns given.
    execute(conn, _INSERT_JOB, row_values(prediction))


async def find_idempotency(session: AsyncSession, *, tenant_id: str, key: str) -> IdempotencyKey | None:
    """The key's row, if any (fresh or not: the caller decides)."""
    return await session.get(IdempotencyKey, (tenant_id, key))


def drop_idempotency(conn: Connection, *, tenant_id: str, key: str, before: datetime) -> None:
    """Forget an expired key so it can be used again (only if it is still the expired row)."""
    conn.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key, IdempotencyKey.created_at < before
        )
    )


async def purge_idempotency(session: AsyncSession, *, before: datetime) -> int:
    """Delete keys older than ``before``; returns how many."""
    result = await session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)


async def claim_due(
    session: AsyncSession, *, owner: str, lease_seconds: float, limit: int, now: datetime | None = None
) -> Sequence[Prediction]:
    """Take up to ``limit`` due jobs: waiting ones, and running ones whose owner stopped renewing its lease.

    On PostgreSQL the candidate rows are locked with SKIP LOCKED, so concurrent claimers take disjoint sets;
    SQLite serialises writers (and the embedded mode is one process).
    """
    now = now or utcnow()
    is_due = or_(
        and_(Prediction.status == "starting", Prediction.available_at <= now),
        and_(Prediction.status == "processing", Prediction.lease_expires_at < now),
    )
    # A read first: an idle poll then takes no write lock (SQLite has one writer, shared with every request).
    if await session.scalar(select(Prediction.id).where(is_due).limit(1)) is None:
        return []
    due = (
        select(Prediction.id)
        .where(is_due)
        .order_by(Prediction.available_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(Prediction)
        .where(Prediction.id.in_(due.scalar_subquery()))
        .values(
            status="processing",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=func.coalesce(Prediction.started_at, now),
        )
        .returning(Prediction)
        .execution_options(synchronize_session=False)
    )
    return (await session.scalars(stmt)).all()


async def renew_leases(
    session: AsyncSession, *, owner: str, ids: Sequence[str], lease_seconds: float, now: datetime | None = None
) -> dict[str, bool]:
    """Extend the leases ``owner`` holds on the jobs it is running (``ids``); returns {job id: cancel requested}.

    Only jobs with a live task are renewed: a row whose task ended without settling it (a bug, a disk error) then
    expires and is taken over, instead of being held for as long as this process lives.
    """
    now = now or utcnow()
    held: dict[str, bool] = {}
    for start in range(0, len(ids), 1000):  # bounded statements, whatever the concurrency
        stmt = (
            update(Prediction)
            .where(
                Prediction.id.in_(ids[start : start + 1000]),
                Prediction.lease_owner == owner,
                Prediction.status == "processing",
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(Prediction.id, Prediction.cancel_requested)
            .execution_options(synchronize_session=False)
        )
        held |= {row[0]: bool(row[1]) for row in (await session.execute(stmt)).all()}
    return held


def _held(prediction_id: str, owner: str) -> Any:
    return and_(Prediction.id == prediction_id, Prediction.status == "processing", Prediction.lease_owner == owner)


def set_provider_job(
    conn: Connection, *, prediction_id: str, owner: str, backend: str, ref: dict[str, Any] | None
) -> bool:
    """Record which backend runs the job and the provider's job reference; False if the lease was lost."""
    result = conn.execute(
        update(Prediction)
        .where(_held(prediction_id, owner))
        .values(provider_backend=backend, provider_ref=ref, backend=backend)
        .execution_options(synchronize_session=False)
    )
    return _won(result)


async def append_log(session: AsyncSession, *, prediction_id: str, owner: str, line: str) -> bool:
    """Add a line to the job's logs (what Replicate clients read as ``logs``)."""
    result = await session.execute(
        update(Prediction)
        .where(_held(prediction_id, owner))
        .values(logs=Prediction.logs + line + "\n")
        .execution_options(synchronize_session=False)
    )
    return _won(result)


async def defer(session: AsyncSession, *, prediction_id: str, owner: str, until: datetime) -> bool:
    """Give a job back to the queue until ``until`` (no backend had room); False if the lease was lost."""
    result = await session.execute(
        update(Prediction)
        .where(_held(prediction_id, owner))
        .values(status="starting", lease_owner=None, lease_expires_at=None, available_at=until)
        .execution_options(synchronize_session=False)
    )
    return _won(result)


async def release(session: AsyncSession, *, owner: str, ids: Sequence[str]) -> int:
    """Let another process take these running jobs now (a clean shutdown): their leases expire at once."""
    if not ids:
        return 0
    result = await session.execute(
        update(Prediction)
        .where(Prediction.id.in_(ids), Prediction.lease_owner == owner, Prediction.status == "processing")
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def request_cancel(session: AsyncSession, *, tenant_id: str, prediction_id: str) -> bool:
    """Flag an active job for cancellation (its runner sees the flag); False if it is already terminal."""
    result = await session.execute(
        update(Prediction)
        .where(
            Prediction.id == prediction_id,
            Prediction.tenant_id == tenant_id,
            Prediction.status.in_(ACTIVE),
        )
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    return _won(result)


async def load(session: AsyncSession, *, prediction_id: str) -> Prediction | None:
    """The job as stored now (bypassing the session's identity map)."""
    stmt = select(Prediction).where(Prediction.id == prediction_id).execution_options(populate_existing=True)
    return (await session.scalars(stmt)).first()


async def list_page(
    session: AsyncSession,
    *,
    tenant_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
    after: tuple[datetime, str] | None = None,
) -> Sequence[Prediction]:
    """A page of a tenant's predictions, newest first, by keyset on (created_at, id).

    ``before`` walks to older rows, ``after`` to newer ones (returned newest first as well).
    """
    stmt = select(Prediction).where(Prediction.tenant_id == tenant_id)
    if before is not None:
        at, pid = before
        stmt = stmt.where(or_(Prediction.created_at < at, and_(Prediction.created_at == at, Prediction.id < pid)))
        stmt = stmt.order_by(Prediction.created_at.desc(), Prediction.id.desc())
    elif after is not None:
        at, pid = after
        stmt = stmt.where(or_(Prediction.created_at > at, and_(Prediction.created_at == at, Prediction.id > pid)))
        stmt = stmt.order_by(Prediction.created_at.asc(), Prediction.id.asc())
    else:
        stmt = stmt.order_by(Prediction.created_at.desc(), Prediction.id.desc())
    rows = list((await session.scalars(stmt.limit(limit))).all())
    if after is not None:
        rows.reverse()
    return rows
