"""Usage: what the caller has been billed for, as a report per day, model and backend, or as raw events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response

from gateway.api.deps import PrincipalDep, SessionDep
from gateway.api.serialize import usage_row
from gateway.storage import repo
from gateway.storage.models import UsageEvent
from gateway.usage import UsageReport, report_csv, report_json, resolve_period, to_utc, usage_report

router = APIRouter(tags=["usage"])

Since = Annotated[datetime | None, Query(description="ISO 8601 or unix seconds; naive times are UTC")]
Limit = Annotated[int, Query(ge=1, le=10_000)]
PeriodParam = Annotated[str | None, Query(description="a UTC calendar month, YYYY-MM; default: the current one")]
Format = Annotated[Literal["json", "csv"] | None, Query(alias="format", description="default json, or Accept")]
AcceptHeader = Annotated[str | None, Header(alias="accept")]
# Documents the CSV alternative in the OpenAPI schema.
REPORT_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"text/csv": {}}}}


def as_utc(value: datetime | None, *, param: str) -> datetime | None:
    """A client's time in UTC (naive is UTC already); one that falls outside the calendar is a 400."""
    return None if value is None else to_utc(value, param=param)


def usage_list(events: Sequence[UsageEvent], *, with_cost: bool) -> dict[str, Any]:
    """Events plus totals over the billed (succeeded) ones."""
    billed = [e for e in events if e.status == "succeeded"]
    return {
        "object": "list",
        "data": [usage_row(e, with_cost=with_cost) for e in events],
        "summary": {
            "requests": len(events),
            "images": sum(e.images for e in billed),
            "price_usd": f"{sum((e.price_usd for e in billed), Decimal(0)):.6f}",
        },
    }


def wants_csv(fmt: str | None, accept: str | None) -> bool:
    """``format`` decides; without it, an Accept header naming text/csv asks for CSV."""
    if fmt is not None:
        return fmt == "csv"
    return any(part.split(";", 1)[0].strip().lower() == "text/csv" for part in (accept or "").split(","))


def report_response(report: UsageReport, fmt: str | None, accept: str | None) -> Response:
    """The report as JSON, or as CSV when asked for."""
    if wants_csv(fmt, accept):
        return Response(report_csv(report), media_type="text/csv; charset=utf-8")
    return JSONResponse(report_json(report))


@router.get("/v1/usage", responses=REPORT_RESPONSES)
async def my_usage_report(
    principal: PrincipalDep,
    session: SessionDep,
    period: PeriodParam = None,
    since: Since = None,
    until: Since = None,
    fmt: Format = None,
    accept: AcceptHeader = None,
) -> Response:
    """The caller's billed usage per UTC day, model and backend, with totals (default: this UTC month)."""
    window = resolve_period(period=period, since=since, until=until)
    report = await usage_report(session, period=window, tenant_id=principal.tenant.id)
    return report_response(report, fmt, accept)


@router.get("/v1/usage/events")
async def my_usage_events(
    principal: PrincipalDep,
    session: SessionDep,
    since: Since = None,
    until: Since = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    """The caller's usage events (oldest first) and their totals."""
    events = await repo.list_usage(
        session,
        tenant_id=principal.tenant.id,
        since=as_utc(since, param="since"),
        until=as_utc(until, param="until"),
        limit=limit,
    )
    return usage_list(events, with_cost=False)  # what a backend costs us is ours to know
