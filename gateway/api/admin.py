"""Admin API: tenants, keys and everyone's usage. Every route needs HDG_ADMIN_TOKEN."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.deps import SessionDep, StateDep, require_admin
from gateway.api.images import resolve_route
from gateway.api.serialize import Text, key_body, tenant_body
from gateway.api.usage import (
    REPORT_RESPONSES,
    AcceptHeader,
    Format,
    Limit,
    PeriodParam,
    Since,
    as_utc,
    report_response,
    usage_list,
)
from gateway.auth import create_tenant_with_key, issue_key
from gateway.errors import InvalidRequest, NotFound
from gateway.health import SERVING, probe_all
from gateway.settings import Cost
from gateway.storage import repo
from gateway.usage import resolve_period, usage_report

VariantName = Literal["full", "dev", "fast"]
# Ids are checked for shape before any query: a malformed one (a NUL byte, say) never reaches the database.
TENANT_ID, KEY_ID = r"^ten_[0-9a-f]{24}$", r"^key_[0-9a-f]{24}$"
TenantId = Annotated[str, Path(pattern=TENANT_ID)]
KeyId = Annotated[str, Path(pattern=KEY_ID)]
INT32 = 2**31 - 1  # the columns are 32-bit integers
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=200)
    rpm: int | None = Field(default=None, ge=1, le=INT32)
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=14, decimal_places=6)
    max_in_flight: int | None = Field(default=None, ge=1, le=INT32)
    route: str | None = Field(default=None, max_length=200)
    allowed_backends: list[str] | None = None


class KeyLimits(BaseModel):
    """A key's own limits, on top of its tenant's; null (or left out at creation) means none."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, le=INT32)
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=14, decimal_places=6)
    max_in_flight: int | None = Field(default=None, ge=1, le=INT32)


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["active", "disabled"] | None = None
    rpm: int | None = Field(default=None, ge=1, le=INT32)
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=14, decimal_places=6)
    max_in_flight: int | None = Field(default=None, ge=1, le=INT32)
    route: str | None = Field(default=None, max_length=200)
    allowed_backends: list[str] | None = None


def _check_routing(state: StateDep, route: str | None, allowed: list[str] | None) -> None:
    """Refuse a route or allow-list naming backends this gateway does not have."""
    if route is not None:
        resolve_route(route, route, state)
    known = {b.name for b in state.backends} | {b.kind for b in state.backends}
    unknown = sorted(set(allowed or ()) - known)
    if unknown:
        raise InvalidRequest(f"Unknown backend(s) {unknown}; enabled: {sorted(known)}.", param="allowed_backends")


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, session: SessionDep, state: StateDep) -> dict[str, Any]:
    """Create a tenant and its first key; the key is in this response and nowhere else."""
    _check_routing(state, body.route, body.allowed_backends)
    async with session.begin():
        tenant, key, plaintext = await create_tenant_with_key(
            session, name=body.name, rpm=body.rpm, monthly_budget_usd=body.monthly_budget_usd
        )
        tenant.route, tenant.allowed_backends = body.route, body.allowed_backends
        tenant.max_in_flight = body.max_in_flight
    state.authenticator.clear()
    return {"tenant": tenant_body(tenant), "tenant_id": tenant.id, "key_id": key.id, "api_key": plaintext}


@router.get("/tenants")
async def list_tenants(session: SessionDep) -> dict[str, Any]:
    return {"object": "list", "data": [tenant_body(t) for t in await repo.list_tenants(session)]}


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: TenantId, body: TenantUpdate, session: SessionDep, state: StateDep
) -> dict[str, Any]:
    """Enable or disable a tenant, or change its limits and routing; fields left out stay as they are."""
    _check_routing(state, body.route, body.allowed_backends)
    async with session.begin():
        tenant = await repo.get_tenant(session, tenant_id=tenant_id)
        if tenant is None:
            raise NotFound(f"No tenant with id '{tenant_id}'.")
        if body.status is not None:
            tenant.status = body.status
        # For the limits, an explicit null removes the limit; a field left out keeps it.
        if "rpm" in body.model_fields_set:
            tenant.rpm = body.rpm
        if "monthly_budget_usd" in body.model_fields_set:
            tenant.monthly_budget_usd = body.monthly_budget_usd
        if "max_in_flight" in body.model_fields_set:
            tenant.max_in_flight = body.max_in_flight
        if "route" in body.model_fields_set:
            tenant.route = body.route
        if "allowed_backends" in body.model_fields_set:
            tenant.allowed_backends = body.allowed_backends
    state.authenticator.clear()
    return tenant_body(tenant)


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: TenantId, session: SessionDep, body: KeyLimits | None = None) -> dict[str, Any]:
    """Issue another key for a tenant, optionally with limits of its own."""
    async with session.begin():
        if await repo.get_tenant(session, tenant_id=tenant_id) is None:
            raise NotFound(f"No tenant with id '{tenant_id}'.")
        key, plaintext = await issue_key(session, tenant_id=tenant_id)
        if body is not None:
            key.rpm, key.monthly_budget_usd, key.max_in_flight = body.rpm, body.monthly_budget_usd, body.max_in_flight
    return {**key_body(key), "key_id": key.id, "api_key": plaintext}  # key_id: as tenant creation names it


@router.patch("/keys/{key_id}")
async def update_key(key_id: KeyId, body: KeyLimits, session: SessionDep, state: StateDep) -> dict[str, Any]:
    """Change a key's own limits; fields left out stay as they are, an explicit null removes one."""
    async with session.begin():
        key = await repo.get_key(session, key_id=key_id)
        if key is None:
            raise NotFound(f"No key with id '{key_id}'.")
        for name in body.model_fields_set:
            setattr(key, name, getattr(body, name))
    state.authenticator.clear()
    return key_body(key)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: TenantId, session: SessionDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [key_body(k) for k in await repo.list_keys(session, tenant_id=tenant_id)],
    }


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: KeyId, session: SessionDep, state: StateDep) -> dict[str, Any]:
    async with session.begin():
        key = await repo.revoke_key(session, key_id=key_id)
        if key is None:
            raise NotFound(f"No key with id '{key_id}'.")
    state.authenticator.clear()
    return key_body(key)


@router.get("/backends")
async def backends(state: StateDep) -> dict[str, Any]:
    """Every backend: kind, variants, state (as /readyz names it), circuit, latency, in flight, last error."""
    # Only backends already in doubt are probed here: an unauthenticated flood of /readyz (or this) must not be able
    # to trip a healthy backend's breaker with a slow health check and send its traffic to a dearer provider.
    await probe_all(state.health, state.backends, fresh_seconds=state.health.probe_seconds)
    health = state.health.snapshot()
    data = [
        {
            "name": b.name,
            "kind": b.kind,
            "variants": sorted(b.variants),
            "ready": health[b.name]["state"] in SERVING,
            **health[b.name],
        }
        for b in state.backends
    ]
    return {"object": "list", "data": data}


@router.put("/backends/{name}/costs")
async def set_backend_costs(
    name: str, body: dict[Literal["full", "dev", "fast"], Cost], state: StateDep
) -> dict[str, Any]:
    """Change what a backend costs us per variant, effective immediately in this process."""
    backend = next((b for b in state.backends if b.name == name), None)
    if backend is None:
        raise NotFound(f"No backend named '{name}'.")
    book = state.runner.set_costs(backend, {str(variant): cost for variant, cost in body.items()})
    return {"name": name, "costs": {variant: cost.model_dump(mode="json") for variant, cost in book.items()}}


@router.get("/usage", responses=REPORT_RESPONSES)
async def all_usage_report(
    session: SessionDep,
    tenant_id: Annotated[str | None, Query(pattern=TENANT_ID)] = None,
    period: PeriodParam = None,
    since: Since = None,
    until: Since = None,
    fmt: Format = None,
    accept: AcceptHeader = None,
) -> Response:
    """Billed usage per tenant, UTC day, model and backend, with totals (default: this UTC month)."""
    window = resolve_period(period=period, since=since, until=until)
    report = await usage_report(session, period=window, tenant_id=tenant_id, by_tenant=True)
    return report_response(report, fmt, accept)


@router.get("/usage/events")
async def all_usage_events(
    session: SessionDep,
    tenant_id: Annotated[str | None, Query(pattern=TENANT_ID)] = None,
    since: Since = None,
    until: Since = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    """Everyone's usage events (oldest first) and their totals."""
    events = await repo.list_usage(
        session,
        tenant_id=tenant_id,
        since=as_utc(since, param="since"),
        until=as_utc(until, param="until"),
        limit=limit,
    )
    return usage_list(events, with_cost=True)
