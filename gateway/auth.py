"""API keys: generation, hashing, and resolving a request's bearer token to a tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import AuthenticationFailed, PermissionDenied, TenantExists
from gateway.storage import repo
from gateway.storage.models import ApiKey, Tenant

KEY_PREFIX = "hdg_"
DISPLAY_CHARS = 12


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: ``plaintext`` is shown once and never stored."""

    plaintext: str
    key_hash: str
    display_prefix: str


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the key they used."""

    tenant: Tenant
    key: ApiKey


def hash_key(plaintext: str) -> str:
    """SHA-256 of the key.

    A fast hash is enough because keys carry 256 random bits: nobody can brute-force them, so a slow
    password hash would only add latency to every request.
    """
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> NewKey:
    """A new key: recognisable prefix plus 32 random bytes (URL-safe base64)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(plaintext, hash_key(plaintext), plaintext[:DISPLAY_CHARS])


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer ...`` header, or 401."""
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
    return token.strip()


class ApiKeyAuthenticator:
    """Resolves a bearer token to a Principal; raises 401 for unknown keys, 403 for revoked or disabled ones.

    Successful lookups are cached for ``cache_seconds`` so the hot path skips the database. Changes made
    through this process's admin API clear the cache at once; changes made elsewhere (another replica, the
    CLI) take effect within ``cache_seconds``.

    Example: ``principal = await ApiKeyAuthenticator(cache_seconds=5).authenticate(sessions, "Bearer hdg_...")``.
    """

    def __init__(self, *, cache_seconds: float = 0.0, max_entries: int = 10_000) -> None:
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._generation = 0  # bumped by clear(): a lookup that began before a change is not cached after it

    def clear(self) -> None:
        """Forget every cached key (after a key, tenant or limit changes)."""
        self._generation += 1
        self._cache.clear()

    async def authenticate(self, sessions: async_sessionmaker[AsyncSession], authorization: str | None) -> Principal:
        """The caller's Principal: from the cache, else read (a session is opened only then)."""
        token = bearer_token(authorization)
        digest = hash_key(token)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        generation = self._generation
        async with sessions() as session:
            principal = await lookup_key(session, digest)
        if generation != self._generation:  # changed while it was read: serve it this once, do not keep it
            return principal
        if self.cache_seconds > 0:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()  # crude but bounded; a full cache only costs one lookup per key
            self._cache[digest] = (time.monotonic() + self.cache_seconds, principal)
        return principal


async def lookup_key(session: AsyncSession, digest: str) -> Principal:
    """The key with SHA-256 ``digest`` and its tenant, read now (no cache); 401 if unknown, 403 if revoked or disabled
    (``api_key_revoked``, ``tenant_disabled``).
    """
    found = await repo.find_key_by_hash(session, key_hash=digest)
    # The lookup is by hash, so timing reveals nothing about the plaintext; compare again in
    # constant time so a future change to the lookup cannot turn this into an oracle.
    if found is None or not hmac.compare_digest(found[0].key_hash, digest):
        raise AuthenticationFailed("Incorrect API key provided.")
    key, tenant = found
    if key.revoked_at is not None:
        raise PermissionDenied("This API key has been revoked.", code="api_key_revoked")
    if tenant.status != "active":
        raise PermissionDenied("This tenant is disabled.", code="tenant_disabled")
    return Principal(tenant=tenant, key=key)


def check_admin_token(expected: str | None, authorization: str | None) -> None:
    """Admin endpoints need HDG_ADMIN_TOKEN; without one configured they are closed."""
    if expected is None:
        raise PermissionDenied("The admin API is disabled: set HDG_ADMIN_TOKEN to enable it.")
    token = bearer_token(authorization)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationFailed("Incorrect admin token.", code="invalid_admin_token")


async def issue_key(session: AsyncSession, *, tenant_id: str) -> tuple[ApiKey, str]:
    """Create a key for a tenant; returns the row and the plaintext, which exists nowhere else."""
    new = generate_key()
    key = await repo.add_key(session, tenant_id=tenant_id, key_hash=new.key_hash, display_prefix=new.display_prefix)
    return key, new.plaintext


async def create_tenant_with_key(
    session: AsyncSession, *, name: str, rpm: int | None = None, monthly_budget_usd: Decimal | None = None
) -> tuple[Tenant, ApiKey, str]:
    """Create a tenant and its first key, in the caller's transaction; TenantExists if the name is taken (any case)."""
    existing = await repo.find_tenant_by_name(session, name=name)
    if existing is not None:
        raise TenantExists(
            f"A tenant named '{existing.name}' already exists (id {existing.id}); names are unique regardless of case.",
            param="name",
        )
    try:
        tenant = await repo.create_tenant(session, name=name, rpm=rpm, monthly_budget_usd=monthly_budget_usd)
    except IntegrityError as exc:
        # Another transaction created the name between the check and the insert: the unique index is the judge.
        if "uq_tenants_name_lower" not in str(exc.orig):
            raise
        raise TenantExists(
            f"A tenant named '{name}' already exists; names are unique regardless of case.", param="name"
        ) from exc
    key, plaintext = await issue_key(session, tenant_id=tenant.id)
    return tenant, key, plaintext
