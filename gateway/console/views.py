"""What the console's pages show, read from the same tables (and the same usage report) the JSON API reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from statistics import median
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.api.serialize import usd_text
from gateway.storage import repo
from gateway.storage.models import (
    ApiKey,
    KeySpend,
    Prediction,
    StoredFile,
    Tenant,
    TenantSpend,
    UsageEvent,
    UTCDateTime,
)
from gateway.usage import Period, usage_report

USAGE_DAYS = 30
RECENT = 50
STATS_HOURS = 24
LATENCY_SAMPLE = 1000  # the median latency is of each backend's latest this-many successes in the window
# Attempt outcomes that count against a backend: it was tried and did not deliver. Refusals (busy, unavailable),
# a client's bad input and cancels say nothing about its health.
ERROR_OUTCOMES = frozenset({"failed", "unauthorized", "unreachable", "timeout"})
JUDGED_OUTCOMES = ERROR_OUTCOMES | {"succeeded"}


# -- money ---------------------------------------------------------------------------------------------------------


def usd(amount: Decimal | int | None, *, micros: bool = False) -> str:
    """``$10.00``, ``$0.010486``: an amount as the API writes it (``usd_text``: exact, at least cents), with ``$``.

    Amounts are exact to the micro-dollar (the Money columns, or ``micros``), so nothing is rounded.
    """
    if amount is None:
        return ""
    value = Decimal(amount) / Decimal(1_000_000) if micros else Decimal(amount)
    return f"${usd_text(value)}"


# -- budget --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    spent: Decimal
    reserved: Decimal
    limit: Decimal | None

    @property
    def used(self) -> Decimal:
        """What counts against the limit now: billed plus held by unfinished jobs."""
        return self.spent + self.reserved


async def _month(
    session: AsyncSession,
    ledger: type[TenantSpend] | type[KeySpend],
    owner_id: str,
    limit: Decimal | None,
    now: datetime,
) -> Budget:
    """This UTC month's ledger row of a tenant or key (the row its budget is checked against) as a Budget."""
    row: TenantSpend | KeySpend | None = await session.get(ledger, (owner_id, repo.month_key(now)))
    if row is None:
        return Budget(spent=Decimal(0), reserved=Decimal(0), limit=limit)
    return Budget(spent=row.spent_usd, reserved=row.reserved_usd, limit=limit)


async def budget(session: AsyncSession, *, tenant: Tenant, now: datetime) -> Budget:
    """This UTC month's spend and holds of ``tenant``."""
    return await _month(session, TenantSpend, tenant.id, tenant.monthly_budget_usd, now)


async def key_budget(session: AsyncSession, *, key: ApiKey, now: datetime) -> Budget | None:
    """This UTC month's spend and holds of ``key`` against its own monthly budget; None when it has none."""
    if key.monthly_budget_usd is None:
        return None
    return await _month(session, KeySpend, key.id, key.monthly_budget_usd, now)


# -- usage per day -------------------------------------------------------------------------------------------------


@dataclass
class DailyUsage:
    """Images and spend (in micro-dollars) per UTC day and series (a model or a backend), oldest day first."""

    days: list[date]
    series: list[str]
    images: dict[tuple[date, str], int] = field(default_factory=dict)
    spend: dict[tuple[date, str], int] = field(default_factory=dict)

    @property
    def active_days(self) -> list[date]:
        """The days with anything billed, oldest first (the tables list only these; the charts show every day)."""
        return [day for day in self.days if self.images_on(day) or self.spend_on(day)]

    def images_on(self, day: date) -> int:
        return sum(self.images.get((day, s), 0) for s in self.series)

    def spend_on(self, day: date) -> int:
        return sum(self.spend.get((day, s), 0) for s in self.series)


def usage_window(now: datetime, days: int = USAGE_DAYS) -> tuple[list[date], Period]:
    """The last ``days`` UTC days, today included, and the period they span (open at the end)."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    return [first + timedelta(days=i) for i in range(days)], Period(start, None)


async def daily_usage(session: AsyncSession, *, tenant_id: str, by: str, now: datetime) -> DailyUsage:
    """Billed images and the tenant's price per day of the last 30, by ``model`` or ``backend``: /v1/usage's numbers."""
    days, period = usage_window(now)
    report = await usage_report(session, period=period, tenant_id=tenant_id)
    out = DailyUsage(days=days, series=[])
    totals: dict[str, int] = defaultdict(int)
    for line in report.lines:
        name = line.model if by == "model" else (line.backend or "none")
        cell = (line.date, name)
        out.images[cell] = out.images.get(cell, 0) + line.images
        out.spend[cell] = out.spend.get(cell, 0) + line.price_micros
        totals[name] += line.images + line.price_micros
    out.series = sorted(name for name, total in totals.items() if total > 0)  # failed-only series bill nothing
    return out


# -- keys and predictions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    key: ApiKey
    last_used: datetime | None


async def keys_with_last_use(session: AsyncSession, *, tenant_id: str) -> list[KeyRow]:
    """The tenant's keys, oldest first, each with the time of its latest prediction."""
    keys = await repo.list_keys(session, tenant_id=tenant_id)
    stmt = (
        select(Prediction.api_key_id, func.max(Prediction.created_at))
        .where(Prediction.tenant_id == tenant_id)
        .group_by(Prediction.api_key_id)
    )
    last = {key_id: at for key_id, at in await session.execute(stmt)}
    return [KeyRow(key=k, last_used=_aware(last.get(k.id))) for k in keys]


def _aware(value: Any) -> datetime | None:
    """An aggregate's datetime: SQLite gives it back as text or naive, so it is read here as UTC."""
    if value is None:
        return None
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(at, datetime)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PredictionRow:
    prediction: Prediction
    thumbnail: StoredFile | None  # its first image, when it succeeded
    tenant_name: str | None = None


async def _first_files(session: AsyncSession, predictions: Sequence[Prediction]) -> dict[str, StoredFile]:
    ids = [p.id for p in predictions if p.status == "succeeded"]
    if not ids:
        return {}
    stmt = select(StoredFile).where(StoredFile.prediction_id.in_(ids), StoredFile.position == 0)
    return {f.prediction_id: f for f in await session.scalars(stmt)}


async def recent_predictions(session: AsyncSession, *, tenant_id: str, limit: int = RECENT) -> list[PredictionRow]:
    """The tenant's latest predictions from either API, newest first, with a thumbnail for each that succeeded."""
    stmt = (
        select(Prediction)
        .where(Prediction.tenant_id == tenant_id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    )
    predictions = (await session.scalars(stmt)).all()
    files = await _first_files(session, predictions)
    return [PredictionRow(p, files.get(p.id)) for p in predictions]


async def recent_failures(session: AsyncSession, *, limit: int = RECENT) -> list[PredictionRow]:
    """Every tenant's latest failed predictions, newest first, with the tenant's name."""
    stmt = (
        select(Prediction, Tenant.name)
        .join(Tenant, Tenant.id == Prediction.tenant_id)
        .where(Prediction.status == "failed")
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    )
    return [PredictionRow(p, None, name) for p, name in await session.execute(stmt)]


def attempt_lines(p: Prediction) -> list[str]:
    """Each attempt of a failed job in full, for the admin: the raw upstream ``detail`` where it was kept."""
    lines = []
    entries = p.attempt_log if isinstance(p.attempt_log, list) else []
    for entry in (e for e in entries if isinstance(e, dict)):
        status = f" ({entry['status']})" if entry.get("status") is not None else ""
        text = entry.get("detail") or entry.get("message") or ""
        lines.append(f"{entry.get('backend')}: {entry.get('outcome')}{status}{': ' + text if text else ''}")
    return lines


# -- admin: tenants and backends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRow:
    tenant: Tenant
    spent: Decimal
    reserved: Decimal
    active_keys: int


async def tenants_overview(session: AsyncSession, *, now: datetime) -> list[TenantRow]:
    """Every tenant with this month's spend and holds and its count of active keys."""
    tenants = await repo.list_tenants(session)
    spend_rows = await session.execute(
        select(TenantSpend.tenant_id, TenantSpend.spent_usd, TenantSpend.reserved_usd).where(
            TenantSpend.month == repo.month_key(now)
        )
    )
    spend = {tenant_id: (spent, reserved) for tenant_id, spent, reserved in spend_rows}
    keys = await session.execute(
        select(ApiKey.tenant_id, func.count()).where(ApiKey.revoked_at.is_(None)).group_by(ApiKey.tenant_id)
    )
    active = {tenant_id: int(n) for tenant_id, n in keys}
    zero = (Decimal(0), Decimal(0))
    return [TenantRow(t, *spend.get(t.id, zero), active.get(t.id, 0)) for t in tenants]


@dataclass(frozen=True)
class BackendStats:
    latency_p50_ms: int | None
    attempts: int
    errors: int
    spend_micros: int  # what it cost us this month
    latency_sample: int = 0  # how many of the latest successes the median is of (at most LATENCY_SAMPLE)

    @property
    def error_rate(self) -> float | None:
        return None if self.attempts == 0 else self.errors / self.attempts


# Every attempt of each job completed since :since, as (backend, outcome, count): the attempt lists are unnested
# and counted by the database, so a page load reads a handful of rows, not a day of jobs. Written per dialect
# (SQLite's json_each, PostgreSQL's json_array_elements); a log that is not a list, or an entry that is not an object,
# counts as no attempt.
ATTEMPT_COUNTS = {
    "sqlite": """
        SELECT json_extract(entry.value, '$.backend') AS backend, json_extract(entry.value, '$.outcome') AS outcome,
               count(*) AS n
        FROM predictions
        JOIN json_each(CASE WHEN json_type(predictions.attempt_log) = 'array'
                            THEN predictions.attempt_log ELSE '[]' END) AS entry
        WHERE predictions.completed_at >= :since AND entry.type = 'object'
        GROUP BY 1, 2
    """,
    "postgresql": """
        SELECT entry ->> 'backend' AS backend, entry ->> 'outcome' AS outcome, count(*) AS n
        FROM predictions
        CROSS JOIN LATERAL json_array_elements(CASE WHEN json_typeof(predictions.attempt_log) = 'array'
                                                    THEN predictions.attempt_log ELSE '[]'::json END) AS entry
        WHERE predictions.completed_at >= :since AND json_typeof(entry) = 'object'
        GROUP BY 1, 2
    """,
}


async def backend_stats(session: AsyncSession, *, names: Iterable[str], now: datetime) -> dict[str, BackendStats]:
    """Per backend: the error rate of every attempt of the jobs completed in the last STATS_HOURS (counted by the
    database), the median latency of its latest LATENCY_SAMPLE successes in that window, and what it cost this
    month. Reads use the index on ``predictions.completed_at``.
    """
    names = list(names)
    since = now - timedelta(hours=STATS_HOURS)
    dialect = session.get_bind().dialect.name
    counts = text(ATTEMPT_COUNTS[dialect]).bindparams(bindparam("since", type_=UTCDateTime()))
    attempts: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    for backend, outcome, n in await session.execute(counts, {"since": since}):
        if outcome in JUDGED_OUTCOMES and isinstance(backend, str):
            attempts[backend] += int(n)
            errors[backend] += int(n) if outcome in ERROR_OUTCOMES else 0
    latencies: dict[str, list[int]] = {}
    for name in names:
        sample = (
            select(Prediction.latency_ms)
            .where(
                Prediction.completed_at >= since,
                Prediction.backend == name,
                Prediction.status == "succeeded",
                Prediction.latency_ms.is_not(None),
            )
            .order_by(Prediction.completed_at.desc())
            .limit(LATENCY_SAMPLE)
        )
        latencies[name] = [ms for ms in await session.scalars(sample) if ms is not None]
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    micros = func.round(UsageEvent.cost_usd * 1_000_000)
    spend_rows = await session.execute(
        select(UsageEvent.backend, func.sum(micros))
        .where(UsageEvent.created_at >= month_start, UsageEvent.status == "succeeded")
        .group_by(UsageEvent.backend)
    )
    spend = {backend: int(total or 0) for backend, total in spend_rows}
    return {
        name: BackendStats(
            latency_p50_ms=round(median(latencies[name])) if latencies[name] else None,
            attempts=attempts[name],
            errors=errors[name],
            spend_micros=spend.get(name, 0),
            latency_sample=len(latencies[name]),
        )
        for name in names
    }
