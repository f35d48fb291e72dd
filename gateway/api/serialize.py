"""JSON shapes shared by the API and the CLI. Money is a decimal string, so no cent is lost to floats."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator

from gateway.storage.models import ApiKey, Tenant, UsageEvent


def _no_nul(value: str) -> str:
    # PostgreSQL cannot store NUL in text, and no client text needs one.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
"""Client text that will be stored: any string without NUL."""

USAGE_FIELDS = (
    "id",
    "created_at",
    "tenant_id",
    "api_key_id",
    "prediction_id",
    "model",
    "width",
    "height",
    "images",
    "backend",
    "price_usd",
    "cost_usd",
    "attempts",
    "latency_ms",
    "status",
)


def usage_row(e: UsageEvent, *, with_cost: bool = True) -> dict[str, Any]:
    """One usage event as a flat dict (also the CSV row); a tenant's view leaves out what the backend cost us.

    Its id is derived from the (random) prediction id: the table's own sequence would tell every tenant how much
    traffic the whole gateway serves.
    """
    row = {
        "id": f"use_{e.prediction_id.removeprefix('gen_')}",
        "created_at": e.created_at.isoformat(),
        "tenant_id": e.tenant_id,
        "api_key_id": e.api_key_id,
        "prediction_id": e.prediction_id,
        "model": e.model,
        "width": e.width,
        "height": e.height,
        "images": e.images,
        "backend": e.backend,
        "price_usd": f"{e.price_usd:.6f}",
        "cost_usd": f"{e.cost_usd:.6f}",
        "attempts": e.attempts,
        "latency_ms": e.latency_ms,
        "status": e.status,
    }
    if not with_cost:
        del row["cost_usd"]
    return row


def usd_text(amount: Decimal | None) -> str | None:
    """A budget as written: exact, without trailing zeros, with at least cents (0.015, 10.00, 0.10).

    Still a string in JSON, so no client reads it through a float.
    """
    if amount is None:
        return None
    whole, _, fraction = format(amount, "f").partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def tenant_body(t: Tenant) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "status": t.status,
        "rpm": t.rpm,
        "monthly_budget_usd": usd_text(t.monthly_budget_usd),
        "max_in_flight": t.max_in_flight,
        "route": t.route,
        "allowed_backends": t.allowed_backends,
        "created_at": t.created_at.isoformat(),
    }


def key_body(k: ApiKey) -> dict[str, Any]:
    """A key as listed: only its display prefix, never the secret or its hash."""
    return {
        "id": k.id,
        "tenant_id": k.tenant_id,
        "display_prefix": k.display_prefix,
        "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        "rpm": k.rpm,
        "monthly_budget_usd": usd_text(k.monthly_budget_usd),
        "max_in_flight": k.max_in_flight,
    }
