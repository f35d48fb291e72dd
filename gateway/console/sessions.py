"""Console sessions: sign-in exchanges an API key or the admin token for a cookie; every request re-checks it.

The cookie is 32 random bytes; the database keeps only its SHA-256, so a leaked table signs nobody in. A session
is looked up afresh on every request (never through the API's key cache): revoking its key, disabling its tenant
or changing HDG_ADMIN_TOKEN ends it on the very next page. Forms carry a CSRF token derived from the cookie.

Example::

    cookie, row = await start_tenant_session(session, key=key, hours=12)
    viewer = await resolve(session, cookie=cookie, admin_token=None)  # a Viewer, or raises SessionEnded
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.storage import repo
from gateway.storage.models import ApiKey, ConsoleSession, Tenant, utcnow

COOKIE = "hdg_console"
COOKIE_PATH = "/console"

# Why a session ended, as the sign-in page says it (the reason travels as this word in the query string).
ENDED = {
    "revoked": "Your session ended: this key was revoked.",
    "disabled": "Your session ended: this tenant is disabled.",
    "admin": "Your session ended: the admin token changed.",
    "expired": "Your session expired. Sign in again.",
    "signed-out": "You have signed out.",
}


class SessionEnded(Exception):
    """The cookie names no usable session; ``reason`` (a key of ENDED) says why, None when there never was one."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "no session")
        self.reason = reason


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the console: a tenant (with the key it signed in with) or the admin."""

    row: ConsoleSession
    cookie: str
    tenant: Tenant | None = None
    key: ApiKey | None = None

    @property
    def is_admin(self) -> bool:
        return self.row.role == "admin"


def digest(value: str) -> str:
    """SHA-256, hex: how cookies and the admin token are kept (both carry enough randomness for a fast hash)."""
    return hashlib.sha256(value.encode()).hexdigest()


def csrf_token(key: bytes, cookie: str) -> str:
    """The hidden ``csrf`` field of every form: an HMAC of the cookie, so a page of another site cannot know it."""
    return hmac.new(key, f"console-csrf:{cookie}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, cookie: str, given: str | None) -> bool:
    """Whether ``given`` is this cookie's CSRF token (compared in constant time)."""
    return given is not None and hmac.compare_digest(csrf_token(key, cookie).encode(), given.encode())


def is_admin_token(given: str, configured: str | None) -> bool:
    """Whether ``given`` is HDG_ADMIN_TOKEN; constant time, so timing tells nothing about how much matched."""
    return configured is not None and hmac.compare_digest(given.encode(), configured.encode())


async def _start(
    session: AsyncSession,
    *,
    hours: float,
    role: str,
    tenant_id: str | None = None,
    api_key_id: str | None = None,
    admin_fingerprint: str | None = None,
) -> tuple[str, ConsoleSession]:
    now = utcnow()
    await repo.purge_console_sessions(session, now=now)  # opportunistic: sign-ins are rare, expired rows few
    cookie = secrets.token_urlsafe(32)
    row = await repo.add_console_session(
        session,
        token_hash=digest(cookie),
        role=role,
        expires_at=now + timedelta(hours=hours),
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        admin_fingerprint=admin_fingerprint,
    )
    return cookie, row


async def start_tenant_session(session: AsyncSession, *, key: ApiKey, hours: float) -> tuple[str, ConsoleSession]:
    """A new session for ``key``'s tenant; returns the cookie value (which exists nowhere else) and the row."""
    return await _start(session, hours=hours, role="tenant", tenant_id=key.tenant_id, api_key_id=key.id)


async def start_admin_session(session: AsyncSession, *, admin_token: str, hours: float) -> tuple[str, ConsoleSession]:
    """A new admin session, tied to the admin token it was made with."""
    return await _start(session, hours=hours, role="admin", admin_fingerprint=digest(admin_token))


async def resolve(session: AsyncSession, *, cookie: str | None, admin_token: str | None) -> Viewer:
    """The viewer behind ``cookie``, checked now; raises SessionEnded (having deleted an ended session's row)."""
    if not cookie:
        raise SessionEnded(None)
    found = await repo.find_console_session(session, token_hash=digest(cookie))
    if found is None:
        raise SessionEnded(None)
    row, key, tenant = found
    reason: str | None = None
    if row.expires_at <= utcnow():
        reason = "expired"
    elif row.role == "admin":
        fingerprint = row.admin_fingerprint or ""
        if admin_token is None or not hmac.compare_digest(digest(admin_token), fingerprint):
            reason = "admin"
    elif key is None or tenant is None or key.revoked_at is not None:
        reason = "revoked"
    elif tenant.status != "active":
        reason = "disabled"
    if reason is not None:
        await repo.delete_console_session(session, session_id=row.id)
        await session.commit()
        raise SessionEnded(reason)
    return Viewer(row=row, cookie=cookie, tenant=tenant, key=key)


class FailedSignIns:
    """Failed sign-ins per client address in a sliding minute, in this process: guessing keys gets slow.

    Per process on purpose: a key has 256 random bits, so this only stops noise and admin-token guessing, and a
    shared window would need Redis for a page that must work without it.
    """

    def __init__(self, limit: int, window_seconds: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def blocked_for(self, client: str, *, now: float | None = None) -> int:
        """Seconds ``client`` must wait before trying again (0: it may try now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.limit:
                return 0
            return max(1, int(times[0] + self.window - now) + 1)

    def failed(self, client: str, *, now: float | None = None) -> None:
        """Count one failed sign-in of ``client``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) >= self.max_clients:  # bounded: forget the clients whose window is empty
                for stale in [c for c, t in self._failures.items() if not t or t[-1] <= now - self.window]:
                    del self._failures[stale]
            self._recent(client, now).append(now)
