"""Database tables. Changing one means adding an Alembic migration in storage/migrations/versions/."""

from __future__ import annotations

import functools
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id(prefix: str) -> str:
    """A random, URL-safe identifier with a type prefix, e.g. ``gen_3f9c...``."""
    return f"{prefix}_{secrets.token_hex(12)}"


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of an id made by ``new_id(prefix)`` (checked before any query)."""
    head, _, tail = value.partition("_")
    return head == prefix and len(tail) == 24 and all(c in "0123456789abcdef" for c in tail)


M = TypeVar("M")


def transient(cls: type[M], values: dict[str, Any]) -> M:
    """``cls(**values)`` for a row object that no session will add (the hot path writes rows with Core): its values
    go straight into the object's dict, as when SQLAlchemy loads a row, instead of through each attribute's
    instrumentation (a third of building a job's ``Prediction``). Changes made to it afterwards are tracked as usual.
    """
    obj: M = cls._sa_class_manager.new_instance()  # type: ignore[attr-defined]
    obj.__dict__.update(values)
    return obj


def row_values(obj: Any) -> dict[str, Any]:
    """A row object's column values that are not None, by column key, as a Core insert takes them: read from the
    object's ``__dict__`` (its instrumented attributes cost several times more per read). An attribute missing there
    is None on an object not loaded from a row (as getattr says), and loaded through the attribute on one that was.
    """
    held = obj.__dict__
    loaded = obj._sa_instance_state.key is not None
    values = {}
    for key in _column_keys(obj.__table__):
        value = held[key] if key in held else getattr(obj, key) if loaded else None
        if value is not None:
            values[key] = value
    return values


@functools.cache  # one entry per table
def _column_keys(table: Any) -> tuple[str, ...]:
    return tuple(c.key for c in table.columns)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores timezone-aware UTC datetimes; SQLite drops the zone, so it is put back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


Money = Numeric(14, 6)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | disabled
    rpm: Mapped[int | None] = mapped_column(Integer)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)  # jobs queued or running at once; None: no cap
    # Jobs holding a slot now (see gateway/ledger.py): changed only with the jobs that take and give back slots.
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    route: Mapped[str | None] = mapped_column(String(200))  # default routing policy; None: the gateway's
    allowed_backends: Mapped[list[str] | None] = mapped_column(JSON)  # None: every backend
    # The key webhooks to this tenant are signed with (``whsec_...``); made on first use. It must be readable to
    # sign with, unlike an API key, so it is a secret of the same standing as the URL-signing key.
    webhook_secret: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# Tenant names are unique regardless of case (the CLI and the admin API refuse a second "Acme").
Index("uq_tenants_name_lower", func.lower(Tenant.name), unique=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Limits of this key alone, on top of its tenant's (None: only the tenant's apply).
    rpm: Mapped[int | None] = mapped_column(Integer)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Prediction(Base):
    """One image job, from either API: its input, where it runs, and how it ended (see gateway/jobs.py)."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_tenant_created", "tenant_id", "created_at"),
        # The runner's claim: due jobs of a status, oldest first.
        Index("ix_predictions_status_available", "status", "available_at"),
        # The console's backend statistics: the jobs completed in the last day.
        Index("ix_predictions_completed_at", "completed_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("gen"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # starting | processing | succeeded | failed | canceled
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    backend: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The job engine's columns.
    api: Mapped[str] = mapped_column(String(16), default="openai", server_default="openai")  # openai | replicate
    job: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the ImageJob, as the runner rebuilds it
    route: Mapped[str] = mapped_column(String(200), default="cheapest", server_default="cheapest")
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # not claimed before this
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # fails (or, with cancel_at, cancels) after
    cancel_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # Cancel-After: canceled, not failed
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # The provider's own job, committed before the gateway waits on it, so a restart re-attaches to it.
    provider_backend: Mapped[str | None] = mapped_column(String(32))
    provider_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(32))
    logs: Mapped[str] = mapped_column(Text, default="", server_default="")
    webhook: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    # The hold this job took when it was created (gateway/ledger.py): its maximum price, reserved against the
    # budgets of this month, and one in-flight slot of its tenant and key. None: no limit applied, nothing held.
    reserved_usd: Mapped[Decimal | None] = mapped_column(Money)
    reserved_month: Mapped[str | None] = mapped_column(String(7))
    # Every attempt on a backend, as reported to clients: [{"backend", "outcome", "status", "message"}, ...].
    attempt_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(300))  # relative to the files directory
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsageEvent(Base):
    """One row per finished prediction; the unique prediction_id is what makes billing exactly-once."""

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_events_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str | None] = mapped_column(String(32))
    price_usd: Mapped[Decimal] = mapped_column(Money)  # what the tenant pays
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")  # what we pay
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    latency_ms: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # succeeded | failed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TenantSpend(Base):
    """A tenant's month (UTC): what it was billed, and what its open jobs have reserved (gateway/ledger.py).

    Both change only in the transactions that create and settle jobs, so ``spent_usd`` always equals the month's
    usage events and ``reserved_usd`` the holds of its unfinished jobs; a budget is one guarded update of this row.
    """

    __tablename__ = "tenant_spend"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    spent_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")


class KeySpend(Base):
    """The same ledger per API key, for per-key budgets."""

    __tablename__ = "key_spend"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")


class GatewaySecret(Base):
    """Secrets every replica must share and none may invent alone (the URL-signing key): made once, first wins."""

    __tablename__ = "gateway_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key``: the first request's fingerprint and the prediction it made (kept 24 h)."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the endpoint and the canonical body
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class WebhookDelivery(Base):
    """One webhook event to send: written with the state change it reports (an outbox), retried until delivered."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))  # webhook-id
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    event: Mapped[str] = mapped_column(String(16))  # start | output | logs | completed
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, frozen when the event happened
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a sender holds it until then
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsoleSession(Base):
    """A signed-in browser of the web console: a tenant's key or the admin token, exchanged for a cookie.

    Only the cookie's SHA-256 is stored. Every console request re-reads the row (and, for a tenant, its key and
    tenant), so a session works on every replica and ends at once when its key is revoked or the admin token changes.
    """

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cs"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(8))  # tenant | admin
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    # An scrypt of the admin token signed in with (sessions.admin_fingerprint): it ends when HDG_ADMIN_TOKEN changes.
    admin_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
