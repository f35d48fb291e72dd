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

from sqlalchemy import ColumnElement, func, literal_column, select
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
    """Check predictions against usage events, and spend, reservations and in-flight counts against both."""
    report = ReconcileReport()
    dialect = session.get_bind().dialect.name
    p, u = Prediction, UsageEvent

    # 1. One usage event per finished prediction, agreeing on how it ended; none for unfinished ones.
    rows = (
        await session.execute(
            select(p.id, p.status, u.status, u.images, u.price_usd).outerjoin(u, u.prediction_id == p.id)
        )
    ).all()
    report.checked["predictions"] = len(rows)
    files = await _pairs(session, select(StoredFile.prediction_id, func.count()).group_by(StoredFile.prediction_id))
    for pid, status, event_status, images, price in rows:
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
    orphans = (
        await session.execute(select(u.prediction_id).outerjoin(p, p.id == u.prediction_id).where(p.id.is_(None)))
    ).all()
    report.mismatches += [f"usage event for {pid} has no prediction" for (pid,) in orphans]
    report.checked["usage_events"] = int(await session.scalar(select(func.count()).select_from(u)) or 0)

    # 2. Monthly spend = the month's billed usage events; reservations = the holds of unfinished jobs.
    month = month_of(u.created_at, dialect)
    billed = u.status == "succeeded"
    for table, owner, event_owner, label in (
        (TenantSpend, TenantSpend.tenant_id, u.tenant_id, "tenant"),
        (KeySpend, KeySpend.api_key_id, u.api_key_id, "key"),
    ):
        ledger = (await session.execute(select(owner, table.month, table.spent_usd, table.reserved_usd))).all()
        report.checked[f"{label}_spend_rows"] = len(ledger)
        spent = {(o, m): Decimal(s) for o, m, s, _ in ledger if s}
        reserved = {(o, m): Decimal(r) for o, m, _, r in ledger if r}
        events = await _pairs(
            session, select(event_owner, month, func.sum(u.price_usd)).where(billed).group_by(event_owner, month)
        )
        _compare(report, f"{label} spend", spent, {k: Decimal(v) for k, v in events.items() if v}, ZERO)
        hold_owner = p.tenant_id if label == "tenant" else p.api_key_id
        holds = await _pairs(
            session,
            select(hold_owner, p.reserved_month, func.sum(p.reserved_usd))
            .where(p.status.in_(ACTIVE), p.reserved_usd.is_not(None))
            .group_by(hold_owner, p.reserved_month),
        )
        _compare(report, f"{label} reserved", reserved, {k: Decimal(v) for k, v in holds.items() if v}, ZERO)

    # 3. In-flight counters = the unfinished jobs holding a slot.
    for model, column in ((Tenant, p.tenant_id), (ApiKey, p.api_key_id)):
        counters = {k: v for k, v in (await _pairs(session, select(model.id, model.in_flight))).items() if v}
        running = await _pairs(
            session,
            select(column, func.count()).where(p.status.in_(ACTIVE), p.reserved_usd.is_not(None)).group_by(column),
        )
        _compare(report, f"{model.__tablename__[:-1]} in_flight", counters, running, 0)
    return report
