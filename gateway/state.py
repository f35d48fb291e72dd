"""The shared resources one gateway process holds, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.auth import ApiKeyAuthenticator
from gateway.backends.base import Backend
from gateway.console.sessions import FailedSignIns
from gateway.engine import Engine
from gateway.health import HealthBoard
from gateway.jobs import JobRunner
from gateway.limits import RateLimits
from gateway.metrics import Metrics
from gateway.outbound import NetworkPolicy
from gateway.settings import Settings
from gateway.storage.files import FileStore, UrlSigner


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    files: FileStore
    signer: UrlSigner
    backends: list[Backend]
    health: HealthBoard
    runner: JobRunner
    jobs: Engine
    authenticator: ApiKeyAuthenticator
    limits: RateLimits
    outbound: NetworkPolicy
    metrics: Metrics
    # The web console: the key its CSRF tokens are made with (derived from the URL-signing key, so every replica
    # has it), the configured admin token's fingerprint (None: no admin token), failed sign-ins per address.
    console_key: bytes
    admin_fingerprint: str | None
    sign_ins: FailedSignIns
