"""Webhook settings: the secret a tenant verifies our webhook signatures with (Replicate's endpoint)."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.deps import PrincipalDep, StateDep
from gateway.webhooks import tenant_secret

router = APIRouter(tags=["webhooks"])


@router.get("/v1/webhooks/default/secret")
async def default_secret(principal: PrincipalDep, state: StateDep) -> dict[str, str]:
    """The caller's signing secret, ``{"key": "whsec_..."}``; made on first request and the same thereafter."""
    async with state.sessions.begin() as session:
        return {"key": await tenant_secret(session, tenant_id=principal.tenant.id)}
