"""``hidream-gateway usage reconcile``: check that every balance is explained by the rows behind it.

Billing is exactly-once by construction (one usage event per prediction, enforced by a unique index; the spend and
reservation totals change only in the transactions that write those rows). This module checks that construction
from the outside, the way an auditor would, and names every row that disagrees.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, literal_column, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.storage.models import ApiKey, KeySpend, Prediction, StoredFile, Tenant, TenantSpend, UsageEvent
from gateway.storage.queue import ACTIVE, TERMINAL

ZERO = Decimal(0)


@dataclass
class ReconcileReport:
    """What was checked, and one line per disagreement (empty when the books balance)."""

    mismatches: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)


def month_of(column: Any, dialect: str) -> ColumnElement[str]:
    """The UTC calendar month (``YYYY-MM``) of a stored timestamp, in SQL."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), literal_column("'YYYY-MM'"))
    return func.substr(column, 1, 7)  # SQLite keeps UTC times as 'YYYY-MM-DD HH:MM:SS...' text


def _compare(report: ReconcileReport, what: str, recorded: dict[Any, Any], expected: dict[Any, Any], zero: Any) -> None:
    for k in sorted(set(recorded) | set(expected), key=str):
        have, want = recorded.get(k, zero), expected.get(k, zero)
        if have != want:
            report.mismatches.append(f"{what} {k}: recorded {have}, the rows behind it say {want}")


async def _pairs(session: AsyncSession, stmt: Any) -> dict[Any, Any]:
    rows: Iterable[Any] = await session.execute(stmt)
    return {tuple(row[:-1]) if len(row) > 2 else row[0]: row[-1] for row in rows}


async def reconcile(session: AsyncSession) -> ReconcileReport:
    """Check predictions against usage events, and spend, reservations and in-flight counts against both.

    Give it a session that has not run a query yet: on PostgreSQL it reads everything in one snapshot.
    """
    report = ReconcileReport()
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # Every query below sees one snapshot, so jobs starting and ending meanwhile can't look like mismatches.
        await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    p, u = Prediction, UsageEvent

    # 1. One usage event per finished prediction, agreeing on how it ended; none for unfinished ones.
    rows = (
        await session.execute(
            select(p.id, p.status, p.reserved_usd, u.status, u.images, u.price_usd).outerjoin(
                u, u.prediction_id == p.id
            )
        )
    ).all()
    report.checked["predictions"] = len(rows)
    files = await _pairs(session, select(StoredFile.prediction_id, func.count()).group_by(StoredFile.prediction_id))
    for pid, status, held, event_status, images, price in rows:
        if status in TERMINAL and event_status is None:
            report.mismatches.append(f"prediction {pid} is {status} but has no usage event")
        elif status in ACTIVE and event_status is not None:
            report.mismatches.append(f"prediction {pid} is {status} but already has a usage event")
        elif event_status is not None and event_status != status:
            report.mismatches.append(f"prediction {pid} is {status} but its usage event says {event_status}")
        elif status == "succeeded" and files.get(pid, 0) != images:
            report.mismatches.append(f"prediction {pid} billed {images} images but has {files.get(pid, 0)} files")
        elif status != "succeeded" and price:
            report.mismatches.append(f"prediction {pid} is {status} but was billed ${price}")
        elif held is not None and price is not None and price > held:
            report.mismatches.append(f"prediction {pid} was billed ${price}, more than the ${held} it reserved")
    orphans = (
        await session.execute(select(u.prediction_id).outerjoin(p, p.id == u.prediction_id).where(p.id.is_(None)))
    ).all()
    report.mismatches += [f"usage event for {pid} has no prediction" for (pid,) in orphans]
    report.checked["usage_events"] = int(await session.scalar(select(func.count()).select_from(u)) or 0)

    # 2. Monthly spend = the month's billed usage events; reservations = the holds of unfinished jobs;
    # 3. in-flight counters = the unfinished jobs holding a slot.
    for balance in await _balances(session, dialect):
        report.checked[balance.what] = len(balance.recorded)
        _compare(report, balance.what, balance.recorded, balance.expected, balance.zero)
    return report


@dataclass
class Balance:
    """One kind of running total: what its rows say (``recorded``) and what the rows behind them add up to."""

    what: str  # e.g. "tenant reserved"
    table: Any
    column: str
    recorded: dict[Any, Any]
    expected: dict[Any, Any]
    zero: Any


async def _balances(session: AsyncSession, dialect: str) -> list[Balance]:
    p, u = Prediction, UsageEvent
    month = month_of(u.created_at, dialect)
    open_holds = (p.status.in_(ACTIVE), p.reserved_usd.is_not(None))
    out: list[Balance] = []
    for table, owner, event_owner, hold_owner, label in (
        (TenantSpend, TenantSpend.tenant_id, u.tenant_id, p.tenant_id, "tenant"),
        (KeySpend, KeySpend.api_key_id, u.api_key_id, p.api_key_id, "key"),
    ):
        ledger = (await session.execute(select(owner, table.month, table.spent_usd, table.reserved_usd))).all()
        events = await _pairs(
            session,
            select(event_owner, month, func.sum(u.price_usd))
            .where(u.status == "succeeded")
            .group_by(event_owner, month),
        )
        holds = await _pairs(
            session,
            select(hold_owner, p.reserved_month, func.sum(p.reserved_usd))
            .where(*open_holds)
            .group_by(hold_owner, p.reserved_month),
        )
        for column, recorded, expected in (
            ("spent_usd", {(o, m): Decimal(s) for o, m, s, _ in ledger if s}, events),
            ("reserved_usd", {(o, m): Decimal(r) for o, m, _, r in ledger if r}, holds),
        ):
            what = f"{label} {column.removesuffix('_usd').replace('spent', 'spend')}"
            nonzero = {k: Decimal(v) for k, v in expected.items() if v}
            out.append(Balance(what, table, column, recorded, nonzero, ZERO))
    for model, holder in ((Tenant, p.tenant_id), (ApiKey, p.api_key_id)):
        counters = {k: v for k, v in (await _pairs(session, select(model.id, model.in_flight))).items() if v}
        running = await _pairs(session, select(holder, func.count()).where(*open_holds).group_by(holder))
        out.append(Balance(f"{model.__tablename__[:-1]} in_flight", model, "in_flight", counters, running, 0))
    return out


async def repair(session: AsyncSession) -> list[str]:
    """Set every running total to what its rows add up to, in the caller's transaction; one line per change.

    For what an older gateway version or a hand edit left behind. Safe while serving: it first locks every ledger
    row and counter (in the order submits and settles take them), so no job can start or end while it counts.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # Waiting long for a lock would hold every paid request behind it: give up instead, and say so.
        await session.execute(text("SET LOCAL lock_timeout = '5s'"))
        for table in (TenantSpend, KeySpend, Tenant, ApiKey):
            await session.execute(text(f"LOCK TABLE {table.__tablename__} IN SHARE ROW EXCLUSIVE MODE"))
    else:
        # SQLite begins a transaction at the first write: write (nothing) first, so no other process can commit
        # between the counting below and the writes it leads to.
        await session.execute(update(Tenant).where(Tenant.id.is_(None)).values(in_flight=Tenant.in_flight))
    changes: list[str] = []
    for balance in await _balances(session, dialect):
        for k in sorted(set(balance.recorded) | set(balance.expected), key=str):
            have, want = balance.recorded.get(k, balance.zero), balance.expected.get(k, balance.zero)
            if have == want:
                continue
            changes.append(f"{balance.what} {k}: {have} -> {want}")
            if balance.column == "in_flight":
                table = balance.table
                await session.execute(update(table).where(table.id == k).values(in_flight=want))
            else:
                owner, month = k
                key_column = "tenant_id" if balance.table is TenantSpend else "api_key_id"
                values = {key_column: owner, "month": month, "spent_usd": 0, "reserved_usd": 0, balance.column: want}
                stmt = _upsert(session, balance.table, values, balance.column)
                await session.execute(stmt)
    return changes


def _upsert(session: AsyncSession, table: Any, values: dict[str, Any], column: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).values(values)
    return stmt.on_conflict_do_update(index_elements=[*values][:2], set_={column: values[column]})
