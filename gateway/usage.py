"""Usage reports: billed usage per UTC day, model and backend (and tenant), summed in SQL, as JSON or CSV.

A report counts events by how they ended: ``images``, ``megapixels``, ``price_usd`` and ``requests`` cover the
succeeded (billed) ones only; ``unbilled_requests`` counts the failed and canceled ones, which are never charged,
so a group can show up with nothing billed. Example::

    period = resolve_period(period="2026-12", since=None, until=None)
    report = await usage_report(session, period=period, tenant_id=tenant.id)
    report_csv(report)  # "date,model,backend,images,megapixels,price_usd,requests,unbilled_requests\\n2026-12-01,..."
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Date, case, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from gateway.errors import InvalidRequest
from gateway.storage.models import UsageEvent

MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class Period:
    """A half-open UTC interval ``[start, end)``; a missing bound is open."""

    start: datetime | None
    end: datetime | None


def month_period(value: str) -> Period:
    """The UTC calendar month named ``YYYY-MM``."""
    match = MONTH.fullmatch(value)
    try:
        if match is None:
            raise ValueError
        year, month = int(match[1]), int(match[2])
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(
            f"Invalid period {value!r}: expected a UTC calendar month as YYYY-MM, e.g. 2026-12.", param="period"
        ) from None
    return Period(start, end)


def to_utc(value: datetime, *, param: str) -> datetime:
    """A client's time in UTC; a naive one is taken as UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00 would fall before year 1
        raise InvalidRequest(f"'{param}' is out of range.", param=param) from None


def resolve_period(
    *, period: str | None, since: datetime | None, until: datetime | None, now: datetime | None = None
) -> Period:
    """A month, or since/until, or (given neither) the current UTC month."""
    if period is not None:
        if since is not None or until is not None:
            raise InvalidRequest("Give either 'period' or 'since'/'until', not both.", param="period")
        return month_period(period)
    if since is None and until is None:
        return month_period((now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m"))
    start = None if since is None else to_utc(since, param="since")
    end = None if until is None else to_utc(until, param="until")
    if start is not None and end is not None and start > end:
        raise InvalidRequest("'until' must not be before 'since'.", param="until")
    return Period(start, end)


@dataclass(frozen=True)
class UsageLine:
    """One group of the report: a UTC day, a model and a backend (and a tenant, across tenants)."""

    date: date
    tenant_id: str | None
    model: str
    backend: str | None
    images: int
    pixels: int
    price_micros: int  # millionths of a dollar: integers sum exactly on every database
    requests: int
    unbilled_requests: int


@dataclass(frozen=True)
class UsageReport:
    period: Period
    by_tenant: bool
    lines: list[UsageLine]


def _utc_day(dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of an event, computed by the database."""
    if dialect == "postgresql":
        # A timestamptz's date depends on the session's TimeZone, which nothing guarantees is UTC: convert first.
        # The zone is a literal so that SELECT and GROUP BY render the same expression (bound $n would differ).
        return cast(func.timezone(literal_column("'UTC'"), UsageEvent.created_at), Date)
    # SQLite keeps UTCDateTime as UTC text ('2026-12-06 23:59:59.000000'); date() takes its day (and would turn a
    # value carrying an offset suffix into UTC first).
    return func.date(UsageEvent.created_at)


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


async def usage_report(
    session: AsyncSession, *, period: Period, tenant_id: str | None = None, by_tenant: bool = False
) -> UsageReport:
    """Usage events in ``period`` grouped per UTC day x model x backend (x tenant when ``by_tenant``)."""
    day = _utc_day(session.get_bind().dialect.name)
    keys: list[ColumnElement[Any] | QueryableAttribute[Any]] = [day, UsageEvent.model, UsageEvent.backend]
    if by_tenant:
        keys.append(UsageEvent.tenant_id)
    billed = UsageEvent.status == "succeeded"
    pixels = cast(UsageEvent.width, BigInteger) * UsageEvent.height * UsageEvent.images
    micros = cast(func.round(UsageEvent.price_usd * literal_column("1000000")), BigInteger)
    stmt = select(
        *keys,
        func.sum(case((billed, UsageEvent.images), else_=0)),
        func.sum(case((billed, pixels), else_=0)),
        func.sum(case((billed, micros), else_=0)),
        func.sum(case((billed, 1), else_=0)),
        func.sum(case((billed, 0), else_=1)),
    ).group_by(*keys)
    if tenant_id is not None:
        stmt = stmt.where(UsageEvent.tenant_id == tenant_id)
    if period.start is not None:
        stmt = stmt.where(UsageEvent.created_at >= period.start)
    if period.end is not None:
        stmt = stmt.where(UsageEvent.created_at < period.end)
    lines = []
    for row in await session.execute(stmt):
        day_value, model, backend, *rest = row
        tenant = rest.pop(0) if by_tenant else None
        images, pix, price, requests, unbilled = (int(v or 0) for v in rest)
        lines.append(UsageLine(_as_date(day_value), tenant, model, backend, images, pix, price, requests, unbilled))
    # Sorted here rather than in SQL: the databases disagree on where a NULL backend goes.
    lines.sort(key=lambda ln: (ln.tenant_id or "", ln.date, ln.model, ln.backend or ""))
    return UsageReport(period=period, by_tenant=by_tenant, lines=lines)


def money(micros: int) -> str:
    """Millionths of a dollar as the exact decimal string the usage reports show (``0.010486``)."""
    return f"{Decimal(micros) * MICRO:.6f}"


def _megapixels(pixels: int) -> str:
    return f"{Decimal(pixels) * MICRO:.6f}"


def _amounts(images: int, pixels: int, micros: int, requests: int, unbilled: int) -> dict[str, Any]:
    return {
        "images": images,
        "megapixels": _megapixels(pixels),
        "price_usd": money(micros),
        "requests": requests,
        "unbilled_requests": unbilled,
    }


def report_rows(report: UsageReport) -> list[dict[str, Any]]:
    """One flat dict per group, in report order (the JSON ``data`` and the CSV rows)."""
    return [
        {
            **({"tenant_id": ln.tenant_id} if report.by_tenant else {}),
            "date": ln.date.isoformat(),
            "model": ln.model,
            "backend": ln.backend,
            **_amounts(ln.images, ln.pixels, ln.price_micros, ln.requests, ln.unbilled_requests),
        }
        for ln in report.lines
    ]


def report_json(report: UsageReport) -> dict[str, Any]:
    """The JSON body: the period, one entry per group, and the totals."""
    lines = report.lines
    return {
        "object": "usage.report",
        "period": {
            "start": report.period.start.isoformat() if report.period.start else None,
            "end": report.period.end.isoformat() if report.period.end else None,
        },
        "data": report_rows(report),
        "total": _amounts(
            sum(ln.images for ln in lines),
            sum(ln.pixels for ln in lines),
            sum(ln.price_micros for ln in lines),
            sum(ln.requests for ln in lines),
            sum(ln.unbilled_requests for ln in lines),
        ),
    }


def report_fields(report: UsageReport) -> list[str]:
    """The CSV header."""
    amounts = ["images", "megapixels", "price_usd", "requests", "unbilled_requests"]
    return [*(["tenant_id"] if report.by_tenant else []), "date", "model", "backend", *amounts]


def report_csv(report: UsageReport) -> str:
    """The report as CSV: a header row, then one row per group (an empty backend is a job no backend served)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=report_fields(report), lineterminator="\n")
    writer.writeheader()
    writer.writerows(report_rows(report))
    return out.getvalue()
