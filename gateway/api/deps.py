"""FastAPI dependencies, as ``Annotated`` aliases so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.auth import Principal, check_admin_token
from gateway.state import AppState


async def get_state(request: Request) -> AppState:
    # async, though it awaits nothing: FastAPI runs a plain function dependency in a worker thread, a hand-off
    # per request for an attribute read.
    state: AppState = request.app.state.hdg
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_principal(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    return await state.authenticator.authenticate(state.sessions, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = state.settings.admin_token
    check_admin_token(token.get_secret_value() if token else None, authorization)


def public_base_url(request: Request, state: AppState) -> str:
    """Where clients reach this gateway: HDG_PUBLIC_URL, else the URL this request came in on."""
    return state.settings.public_url or str(request.base_url)
