"""Console sessions: sign-in exchanges an API key or the admin token for a cookie; every request re-checks it.

The cookie is 32 random bytes; the database keeps only its SHA-256, so a leaked table signs nobody in. A session
is looked up afresh on every request (never through the API's key cache): revoking its key, disabling its tenant
or changing HDG_ADMIN_TOKEN ends it on the very next page. Forms carry a CSRF token derived from the cookie. A
key, and the admin, keep at most MAX_SESSIONS sessions (the oldest go first).

Example::

    cookie, row = await start_tenant_session(session, key=key, hours=12, replacing=None)
    viewer = await resolve(session, cookie=cookie, admin_fingerprint=None)  # a Viewer, or raises SessionEnded
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.storage import repo
from gateway.storage.models import ApiKey, ConsoleSession, Tenant, utcnow

COOKIE = "hdg_console"
COOKIE_PATH = "/console"
MAX_SESSIONS = 20  # per API key, and for the admin: signing in again and again cannot fill the table
# The cost of one admin-token guess against a leaked console_sessions table: scrypt with ~16 MiB of memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

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

    @property
    def can_manage_keys(self) -> bool:
        """Whether this viewer may create and revoke keys: only with an unrestricted key, the tenant's own.

        A key with limits of its own (rpm, monthly budget, max in flight) was handed out to be limited; letting it
        mint keys without those limits, or revoke the keys the admin issued, would undo the point of them.
        """
        key = self.key
        return key is not None and key.rpm is None and key.monthly_budget_usd is None and key.max_in_flight is None


def digest(value: str) -> str:
    """SHA-256, hex: how cookies are kept (32 random bytes need no slow hash)."""
    return hashlib.sha256(value.encode()).hexdigest()


def admin_fingerprint(admin_token: str, key: bytes) -> str:
    """What an admin session keeps of the admin token: scrypt, salted with the console's key, so a leaked table
    costs an scrypt per guess of a weak token. Slow on purpose: compute it once per process (AppState has it).
    """
    derived = hashlib.scrypt(
        admin_token.encode(), salt=b"hdg-console-admin:" + key, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return derived.hex()


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
    replacing: str | None,
    tenant_id: str | None = None,
    api_key_id: str | None = None,
    admin_fingerprint: str | None = None,
) -> tuple[str, ConsoleSession]:
    now = utcnow()
    await repo.purge_console_sessions(session, now=now)  # opportunistic: sign-ins are rare, expired rows few
    if replacing:  # the session this browser had before: it is replaced, not left behind
        await repo.delete_console_session_by_token(session, token_hash=digest(replacing))
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
    await repo.trim_console_sessions(session, role=role, api_key_id=api_key_id, keep=MAX_SESSIONS)
    return cookie, row


async def start_tenant_session(
    session: AsyncSession, *, key: ApiKey, hours: float, replacing: str | None
) -> tuple[str, ConsoleSession]:
    """A new session for ``key``'s tenant, in place of the browser's old one (``replacing``, its cookie, if any);
    returns the cookie value (which exists nowhere else) and the row.
    """
    return await _start(
        session, hours=hours, role="tenant", replacing=replacing, tenant_id=key.tenant_id, api_key_id=key.id
    )


async def start_admin_session(
    session: AsyncSession, *, fingerprint: str, hours: float, replacing: str | None
) -> tuple[str, ConsoleSession]:
    """A new admin session, tied to the admin token it was made with (by its ``admin_fingerprint``)."""
    return await _start(session, hours=hours, role="admin", replacing=replacing, admin_fingerprint=fingerprint)


async def resolve(session: AsyncSession, *, cookie: str | None, admin_fingerprint: str | None) -> Viewer:
    """The viewer behind ``cookie``, checked now; raises SessionEnded (having deleted an ended session's row).

    ``admin_fingerprint`` is the configured admin token's (None: no admin token, so no admin session is valid).
    """
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
        kept = row.admin_fingerprint or ""
        if admin_fingerprint is None or not hmac.compare_digest(kept.encode(), admin_fingerprint.encode()):
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

    An attempt is counted *before* its credentials are checked (``attempt``) and forgiven once they prove right
    (``forgive``), so many sign-ins sent at once cannot all slip through while the first ones are being looked
    up. At most ``max_clients`` addresses are remembered, the least recently seen forgotten first; every call is
    O(1).
    """

    def __init__(self, limit: int, window_seconds: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many client addresses are remembered now."""
        return len(self._failures)

    def attempt(self, client: str, *, now: float | None = None) -> int:
        """Count a sign-in of ``client`` as failed until ``forgive`` says otherwise; returns 0 when it may go
        ahead, else the seconds it must wait (and nothing is counted).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                times = self._failures[client] = deque()
                if len(self._failures) > self.max_clients:
                    self._failures.popitem(last=False)  # the least recently seen address
            else:
                self._failures.move_to_end(client)
                while times and times[0] <= now - self.window:
                    times.popleft()
                if len(times) >= self.limit:
                    return max(1, int(times[0] + self.window - now) + 1)
            times.append(now)
            return 0

    def forgive(self, client: str) -> None:
        """Take back one attempt of ``client``: its credentials were right (or it sent none)."""
        with self._lock:
            times = self._failures.get(client)
            if times:
                times.pop()
            if times is not None and not times:
                del self._failures[client]
