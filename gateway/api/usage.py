"""Usage: what the caller has been billed for."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query

from gateway.api.deps import PrincipalDep, SessionDep
from gateway.api.serialize import usage_row
from gateway.storage import repo
from gateway.storage.models import UsageEvent

router = APIRouter(tags=["usage"])

Since = Annotated[datetime | None, Query(description="ISO 8601 or unix seconds; naive times are UTC")]
Limit = Annotated[int, Query(ge=1, le=10_000)]


def as_utc(value: datetime | None) -> datetime | None:
    """Naive datetimes from clients are taken as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def usage_list(events: Sequence[UsageEvent]) -> dict[str, Any]:
    """Events plus totals over the billed (succeeded) ones."""
    billed = [e for e in events if e.status == "succeeded"]
    return {
        "object": "list",
        "data": [usage_row(e) for e in events],
        "summary": {
            "requests": len(events),
            "images": sum(e.images for e in billed),
            "price_usd": f"{sum((e.price_usd for e in billed), Decimal(0)):.6f}",
        },
    }


@router.get("/v1/usage")
async def my_usage(
    principal: PrincipalDep,
    session: SessionDep,
    since: Since = None,
    until: Since = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    """The caller's usage events (oldest first) and their totals."""
    events = await repo.list_usage(
        session, tenant_id=principal.tenant.id, since=as_utc(since), until=as_utc(until), limit=limit
    )
    return usage_list(events)
