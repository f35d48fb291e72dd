"""Repository functions: every query the gateway makes, keyword-only arguments, a session first."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.storage import ledger
from gateway.storage.models import (
    ApiKey,
    ConsoleSession,
    GatewaySecret,
    Prediction,
    StoredFile,
    Tenant,
    UsageEvent,
    is_id,
    row_values,
    utcnow,
)
from gateway.storage.writer import execute

# The tables themselves, for Core statements on the per-generation path.
PREDICTIONS = cast(Table, Prediction.__table__)
FILES = cast(Table, StoredFile.__table__)
USAGE_EVENTS = cast(Table, UsageEvent.__table__)
SECRETS = cast(Table, GatewaySecret.__table__)


async def create_tenant(
    session: AsyncSession, *, name: str, rpm: int | None = None, monthly_budget_usd: Decimal | None = None
) -> Tenant:
    tenant = Tenant(name=name, rpm=rpm, monthly_budget_usd=monthly_budget_usd, status="active")
    session.add(tenant)
    await session.flush()
    return tenant


async def get_tenant(session: AsyncSession, *, tenant_id: str) -> Tenant | None:
    return await session.get(Tenant, tenant_id)


async def find_tenant_by_name(session: AsyncSession, *, name: str) -> Tenant | None:
    """The tenant called ``name`` in any case: names are unique regardless of case (index uq_tenants_name_lower)."""
    # lower() on both sides, in the database, so the comparison is the one the unique index makes.
    result = await session.scalars(select(Tenant).where(func.lower(Tenant.name) == func.lower(name)))
    return result.first()


async def list_tenants(session: AsyncSession) -> Sequence[Tenant]:
    return (await session.scalars(select(Tenant).order_by(Tenant.created_at))).all()


async def add_key(session: AsyncSession, *, tenant_id: str, key_hash: str, display_prefix: str) -> ApiKey:
    key = ApiKey(tenant_id=tenant_id, key_hash=key_hash, display_prefix=display_prefix)
    session.add(key)
    await session.flush()
    return key


async def list_keys(session: AsyncSession, *, tenant_id: str) -> Sequence[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
    return (await session.scalars(stmt)).all()


async def get_key(session: AsyncSession, *, key_id: str) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def revoke_key(session: AsyncSession, *, key_id: str) -> ApiKey | None:
    """Mark a key revoked (idempotent: the first revocation time is kept)."""
    key = await session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


async def find_key_by_hash(session: AsyncSession, *, key_hash: str) -> tuple[ApiKey, Tenant] | None:
    stmt = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.key_hash == key_hash)
    row = (await session.execute(stmt)).first()
    return (row[0], row[1]) if row is not None else None


async def get_prediction(session: AsyncSession, *, tenant_id: str, prediction_id: str) -> Prediction | None:
    """A tenant's prediction; another tenant's id, or one that is not an id at all, reads as missing."""
    if not is_id(prediction_id, "gen"):  # checked before any query: client text never reaches the database
        return None
    stmt = select(Prediction).where(Prediction.id == prediction_id, Prediction.tenant_id == tenant_id)
    return (await session.scalars(stmt)).first()


# Core statements built once, executed with parameters: these run once per generation, and building a statement
# (and its cache key) costs more than executing it; the ORM's per-column work would cost more still.
_INSERT_USAGE = insert(USAGE_EVENTS)
_INSERT_FILES = insert(FILES)


@cache
def _settle_stmt(columns: tuple[str, ...], owned: bool, expected: int) -> Any:
    """The guarded update that ends a job: sets ``columns`` (and frees the lease) where the job is still in one of
    the ``expected`` states (bound as ``g_expected_0``, ...; an expanding IN would be rendered again on every call)
    and, if ``owned``, still held by the owner; returns its hold.
    """
    t = PREDICTIONS.c
    states: list[Any] = [bindparam(f"g_expected_{i}") for i in range(expected)]
    guard = [t.id == bindparam("g_id"), t.status.in_(states)]
    if owned:
        guard.append(t.lease_owner == bindparam("g_owner"))
    return (
        update(PREDICTIONS)
        .where(*guard)
        .values({name: bindparam(f"v_{name}") for name in columns} | {"lease_owner": None, "lease_expires_at": None})
        .returning(t.reserved_usd, t.reserved_month)
    )


def finish_prediction(
    conn: Connection,
    *,
    prediction: Prediction,
    status: str,
    backend: str | None,
    latency_ms: int,
    price_usd: Decimal,
    images: int,
    width: int,
    height: int,
    cost_usd: Decimal = Decimal(0),
    attempts: int = 1,
    error: str | None = None,
    error_code: str | None = None,
    files: Sequence[StoredFile] = (),
    expected: Sequence[str] = ("processing",),
    lease_owner: str | None = None,
    logs: str | None = None,
    attempt_log: list[dict[str, Any]] | None = None,
) -> bool:
    """Settle a prediction: mark it terminal and write its one usage event, in the caller's transaction.

    Only a prediction still in one of the ``expected`` states (and, given ``lease_owner``, still held by that
    runner) is settled, so a retried, concurrent or stale settle bills nothing twice; returns False when it
    did not win, and then nothing was written.
    """
    now = utcnow()
    values = {
        "error_code": error_code,
        "status": status,
        "backend": backend,
        "latency_ms": latency_ms,
        "error": error,
        "completed_at": now,
        "width": width,
        "height": height,
        "attempts": attempts,
        "attempt_log": attempt_log,
    }
    if logs is not None:
        values["logs"] = logs
    guard = {"g_id": prediction.id} | {f"g_expected_{i}": state for i, state in enumerate(expected)}
    if lease_owner is not None:
        guard["g_owner"] = lease_owner
    stmt = _settle_stmt(tuple(values), lease_owner is not None, len(expected))
    won = execute(conn, stmt, {f"v_{k}": v for k, v in values.items()} | guard).first()
    if won is None:
        return False
    held, held_month = won
    if held is not None:
        price_usd = min(price_usd, held)  # never more than was reserved (and so admitted by the budget)
    if files:
        execute(conn, _INSERT_FILES, [row_values(f) for f in files])
    ledger.settle(
        conn,
        tenant_id=prediction.tenant_id,
        key_id=prediction.api_key_id,
        month=month_key(now),
        charge=price_usd,
        held=held,
        held_month=held_month,
    )
    execute(
        conn,
        _INSERT_USAGE,
        {
            "prediction_id": prediction.id,
            "tenant_id": prediction.tenant_id,
            "api_key_id": prediction.api_key_id,
            "model": prediction.model,
            "width": width,
            "height": height,
            "images": images,
            "backend": backend,
            "price_usd": price_usd,
            "cost_usd": cost_usd,
            "attempts": attempts,
            "latency_ms": latency_ms,
            "status": status,
            "created_at": now,
        },
    )
    return True


async def list_files(session: AsyncSession, *, prediction_id: str) -> Sequence[StoredFile]:
    stmt = select(StoredFile).where(StoredFile.prediction_id == prediction_id).order_by(StoredFile.position)
    return (await session.scalars(stmt)).all()


async def get_file(session: AsyncSession, *, file_id: str, tenant_id: str | None = None) -> StoredFile | None:
    """A stored file; with ``tenant_id``, only that tenant's (another tenant's reads as missing)."""
    stmt = select(StoredFile).where(StoredFile.id == file_id)
    if tenant_id is not None:
        stmt = stmt.where(StoredFile.tenant_id == tenant_id)
    return (await session.scalars(stmt)).first()


async def list_usage(
    session: AsyncSession,
    *,
    tenant_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 1000,
) -> Sequence[UsageEvent]:
    """Usage events, oldest first."""
    stmt = select(UsageEvent).order_by(UsageEvent.created_at, UsageEvent.id).limit(limit)
    if tenant_id is not None:
        stmt = stmt.where(UsageEvent.tenant_id == tenant_id)
    if since is not None:
        stmt = stmt.where(UsageEvent.created_at >= since)
    if until is not None:
        stmt = stmt.where(UsageEvent.created_at < until)
    return (await session.scalars(stmt)).all()


def month_key(at: datetime) -> str:
    """The spend bucket of a moment: its UTC calendar month."""
    return at.astimezone(UTC).strftime("%Y-%m")


async def shared_secret(session: AsyncSession, *, name: str, candidate: str) -> str:
    """The secret called ``name``: the first ``candidate`` any process offered wins, and every process reads it."""
    dialect = session.get_bind().dialect.name
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await session.execute(
        insert_(SECRETS).values(name=name, value=candidate, created_at=utcnow()).on_conflict_do_nothing()
    )
    value = await session.scalar(select(GatewaySecret.value).where(GatewaySecret.name == name))
    assert value is not None  # inserted above, or by whoever won
    return value


async def add_console_session(
    session: AsyncSession,
    *,
    token_hash: str,
    role: str,
    expires_at: datetime,
    tenant_id: str | None = None,
    api_key_id: str | None = None,
    admin_fingerprint: str | None = None,
) -> ConsoleSession:
    """Record a console sign-in; the cookie itself is never stored, only its hash."""
    row = ConsoleSession(
        token_hash=token_hash,
        role=role,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        admin_fingerprint=admin_fingerprint,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(row)
    await session.flush()
    return row


async def find_console_session(
    session: AsyncSession, *, token_hash: str
) -> tuple[ConsoleSession, ApiKey | None, Tenant | None] | None:
    """A console session by its cookie's hash, with its key and tenant (None for an admin session)."""
    stmt = (
        select(ConsoleSession, ApiKey, Tenant)
        .outerjoin(ApiKey, ApiKey.id == ConsoleSession.api_key_id)
        .outerjoin(Tenant, Tenant.id == ConsoleSession.tenant_id)
        .where(ConsoleSession.token_hash == token_hash)
    )
    row = (await session.execute(stmt)).first()
    return (row[0], row[1], row[2]) if row is not None else None


async def delete_console_session(session: AsyncSession, *, session_id: str) -> None:
    await session.execute(delete(ConsoleSession).where(ConsoleSession.id == session_id))


async def purge_console_sessions(session: AsyncSession, *, now: datetime) -> int:
    """Delete the sessions that have expired; returns how many."""
    result = await session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)


async def delete_console_session_by_token(session: AsyncSession, *, token_hash: str) -> None:
    """Delete the session whose cookie hashes to ``token_hash`` (if there is one)."""
    await session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == token_hash))


async def trim_console_sessions(session: AsyncSession, *, role: str, api_key_id: str | None, keep: int) -> int:
    """Delete all but the newest ``keep`` sessions of one API key (or, for ``role="admin"``, of the admin)."""
    owner = ConsoleSession.role == "admin" if role == "admin" else ConsoleSession.api_key_id == api_key_id
    stale = (
        select(ConsoleSession.id)
        .where(owner)
        .order_by(ConsoleSession.created_at.desc(), ConsoleSession.id.desc())
        .offset(keep)
    )
    ids = list((await session.scalars(stale)).all())
    if ids:
        await session.execute(delete(ConsoleSession).where(ConsoleSession.id.in_(ids)))
    return len(ids)
