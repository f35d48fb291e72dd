"""Webhooks the Replicate way: an outbox of deliveries, signed the Standard Webhooks way, drained by a sender.

A delivery row is written in the same transaction as the state change it reports (``enqueue``), so an event is
never lost to a crash and never sent for a change that rolled back. ``WebhookSender`` claims due rows with a lease
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas share the work), posts them through the outbound
``NetworkPolicy`` and records each outcome; failures are retried on ``RETRY_SCHEDULE``.

Receivers verify ``webhook-signature`` with the tenant's ``whsec_`` secret (``GET /v1/webhooks/default/secret``)
and dedupe on ``webhook-id``, which stays the same across retries of one delivery.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import NotFound
from gateway.outbound import NetworkPolicy, UnsafeUrl
from gateway.storage.models import Prediction, Tenant, WebhookDelivery, new_id, utcnow

log = logging.getLogger("hidream_gateway.webhooks")

EVENTS = ("start", "output", "logs", "completed")
# Replicate's OpenAPI text: "By default, we will send requests to your webhook URL whenever there are new outputs
# or the prediction has finished", i.e. output + completed when no webhook_events_filter is given.
DEFAULT_EVENTS = ("output", "completed")
# Replicate sends output and logs events at most once per 500 ms; completed is never held back.
THROTTLED = frozenset({"output", "logs"})
THROTTLE = timedelta(milliseconds=500)

SECRET_PREFIX = "whsec_"  # noqa: S105 (the prefix of every secret, not a secret)
USER_AGENT = "hidream-gateway-webhooks/1"

# Seconds to wait after each failed attempt: 5 s doubling, each wait capped at 15 min. Twelve attempts in all,
# the last one 3975 s (about 66 min) after the first, so a receiver that is down for an hour still gets the event.
# Deterministic, without jitter, so a delivery's history can be read back from its row.
RETRY_SCHEDULE: tuple[float, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 900, 900, 900)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
GONE = 410  # the receiver says the endpoint is gone for good (as Standard Webhooks senders read it): stop retrying
MAX_ERROR_CHARS = 500


def wants(events: Sequence[str] | None, event: str) -> bool:
    """Whether a prediction with this ``webhook_events_filter`` (None: the default) asked for ``event``."""
    return event in (DEFAULT_EVENTS if events is None else events)


def next_wait(attempts: int) -> float | None:
    """Seconds to wait after the ``attempts``-th failed attempt, or None when the schedule is exhausted."""
    return RETRY_SCHEDULE[attempts - 1] if 1 <= attempts <= len(RETRY_SCHEDULE) else None


# -- secrets and signatures ---------------------------------------------------------------------------------------


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


async def tenant_secret(session: AsyncSession, *, tenant_id: str) -> str:
    """The tenant's webhook secret, made on first use; replicas racing to make it end up with the same one."""
    current = select(Tenant.webhook_secret).where(Tenant.id == tenant_id)
    secret = await session.scalar(current)
    if secret is None:
        # Guarded: only the first writer's secret lands. A concurrent writer's UPDATE waits for it, then matches no
        # row, and its re-read (a new statement, so it sees the committed row) returns the winner's secret.
        await session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
            .values(webhook_secret=new_secret())
            .execution_options(synchronize_session=False)
        )
        secret = await session.scalar(current)
    if secret is None:
        raise NotFound(f"Unknown tenant {tenant_id}.")
    return secret


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header a delivery carries, signature included."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


# -- the outbox ---------------------------------------------------------------------------------------------------


def enqueue(conn: Connection, *, prediction: Prediction, event: str, payload: dict[str, Any]) -> None:
    """Write one delivery in the caller's transaction, if the prediction has a webhook that wants ``event``.

    A sync connection: the transactions that write deliveries run through ``storage.writer.transact``.
    """
    if not prediction.webhook or not wants(prediction.webhook_events, event):
        return
    body = json.dumps(payload, separators=(",", ":"))
    now = utcnow()
    if event in THROTTLED:
        recent = conn.scalar(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.prediction_id == prediction.id,
                WebhookDelivery.event == event,
                WebhookDelivery.created_at > now - THROTTLE,
            )
            .limit(1)
        )
        if recent is not None:
            # Throttled. If the recent one is still unsent it carries this newer state instead, so the receiver
            # sees the latest output even when it asked for no completed event; a claimed one is left as sent.
            conn.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == recent,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.attempts == 0,
                    WebhookDelivery.lease_expires_at.is_(None),
                )
                .values(payload=body)
                .execution_options(synchronize_session=False)
            )
            return
    conn.execute(
        insert(WebhookDelivery).values(
            id=new_id("msg"),
            tenant_id=prediction.tenant_id,
            prediction_id=prediction.id,
            event=event,
            url=prediction.webhook,
            payload=body,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


async def claim_deliveries(
    session: AsyncSession, *, lease_seconds: float, limit: int, now: datetime | None = None
) -> Sequence[WebhookDelivery]:
    """Lease up to ``limit`` due deliveries: pending, due, and not leased (or leased by a sender that died).

    On PostgreSQL the candidates are locked with SKIP LOCKED, so concurrent senders take disjoint sets; SQLite
    runs the statement under its single writer lock. The new ``lease_expires_at`` is the claim's token.
    """
    now = now or utcnow()
    due = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(due.scalar_subquery()))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(WebhookDelivery)
        .execution_options(synchronize_session=False)
    )
    return (await session.scalars(stmt)).all()


def _outcome(attempts: int, code: int | None, error: str | None, now: datetime) -> dict[str, Any]:
    """The columns one attempt's result sets: delivered, pending with the next try, or failed."""
    values: dict[str, Any] = {"attempts": attempts, "last_status": code, "last_error": error, "lease_expires_at": None}
    if error is None:
        return values | {"status": "delivered", "delivered_at": now}
    wait = None if code == GONE else next_wait(attempts)
    if wait is None:
        return values | {"status": "failed"}
    return values | {"next_attempt_at": now + timedelta(seconds=wait)}


class WebhookSender:
    """Drains the outbox: claims due deliveries, signs and posts them, records what happened.

    Example::

        sender = WebhookSender(sessions=sessions, client=client, policy=NetworkPolicy(), owner="replica-1")
        task = asyncio.create_task(sender.run_forever())
        ...                    # enqueue(...) in a transaction, commit, then:
        sender.notify()        # send now rather than after the idle period
    """

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        client: httpx.AsyncClient,
        policy: NetworkPolicy,
        owner: str,
        batch: int = 50,
        lease_seconds: float = 30,
        timeout: float = 10,
    ) -> None:
        # Every post is cut off after ``timeout`` seconds in all, so a claim's lease outlives its sends and no
        # other sender can take a delivery that is still in flight.
        if lease_seconds <= timeout:
            raise ValueError("lease_seconds must be longer than timeout")
        self.sessions = sessions
        self.client = client
        self.policy = policy
        self.owner = owner
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.timeout = timeout
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Wake the sender: a delivery was just committed."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim the due deliveries (up to ``batch``), send them concurrently; returns how many were attempted."""
        async with self.sessions.begin() as session:
            claimed = await claim_deliveries(session, lease_seconds=self.lease_seconds, limit=self.batch)
        if not claimed:
            return 0
        async with self.sessions.begin() as session:
            keys = {t: await tenant_secret(session, tenant_id=t) for t in sorted({d.tenant_id for d in claimed})}
        ordered = sorted(claimed, key=lambda d: d.created_at)  # start before output before completed, usually
        results = await asyncio.gather(*(self._deliver(d, keys[d.tenant_id]) for d in ordered), return_exceptions=True)
        for delivery, result in zip(ordered, results, strict=True):
            if isinstance(result, Exception):
                # The lease runs out and another pass retries it; the receiver dedupes on webhook-id.
                log.error("recording webhook %s failed", delivery.id, exc_info=result)
        return len(claimed)

    async def run_forever(self, wake: asyncio.Event | None = None, idle_seconds: float = 1.0) -> None:
        """Send due deliveries until cancelled, waiting ``idle_seconds`` or until woken between passes."""
        if wake is not None:
            self._wake = wake  # the caller's event, so whoever holds it (or notify()) wakes this loop
        while True:
            self._wake.clear()  # before the pass: a wake during it makes the next wait return at once
            try:
                attempted = await self.run_once()
            except Exception:
                log.exception("webhook sender %s: a pass failed; retrying", self.owner)
                attempted = 0
            if attempted >= self.batch:
                continue  # a full batch: more are probably due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_seconds):
                    await self._wake.wait()

    async def _deliver(self, delivery: WebhookDelivery, secret: str) -> None:
        code, error = await self._post(delivery, secret)
        values = _outcome(delivery.attempts + 1, code, error, utcnow())
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery.id,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.lease_expires_at == delivery.lease_expires_at,
                )
                .values(values)
                .execution_options(synchronize_session=False)
            )
        won = getattr(result, "rowcount", 0) == 1
        # The URL and headers stay out of the log: a URL may carry the receiver's token, headers the signature.
        log.info(
            "webhook %s (%s, attempt %d) by %s: %s%s",
            delivery.id,
            delivery.event,
            values["attempts"],
            self.owner,
            values.get("status", "retry"),
            f" ({error})" if error else "",
        )
        if not won:
            log.warning("webhook %s: the lease ran out before its outcome was recorded", delivery.id)

    async def _post(self, delivery: WebhookDelivery, secret: str) -> tuple[int | None, str | None]:
        """One attempt: (HTTP status or None, error or None when delivered)."""
        body = delivery.payload.encode()
        # Signed at each attempt, so the timestamp is fresh enough for the receiver's replay window.
        signed = headers(secret, delivery.id, int(time.time()), body)
        try:
            # httpx's timeout is per phase (connect, each read); this bounds the whole post, DNS included.
            async with asyncio.timeout(self.timeout):
                resp = await self.policy.post(
                    self.client, delivery.url, content=body, headers=signed, timeout=self.timeout
                )
        except UnsafeUrl as exc:
            return None, f"address refused: {exc.message}"
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {self.timeout:g} s"
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return None, detail[:MAX_ERROR_CHARS]
        code = resp.status_code
        if 200 <= code < 300:
            return code, None
        if 300 <= code < 400:
            return code, f"answered {code}; redirects are not followed"
        if code == GONE:
            return code, "answered 410 Gone; not retried"
        return code, f"answered {code}"
