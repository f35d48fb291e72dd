"""ledger: reserved budgets, in-flight caps, per-key limits and spend, the shared URL-signing secret

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.storage.models import Money, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("monthly_budget_usd", Money, nullable=True))
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.add_column(sa.Column("reserved_usd", Money, nullable=True))
        batch_op.add_column(sa.Column("reserved_month", sa.String(length=7), nullable=True))
    with op.batch_alter_table("tenant_spend") as batch_op:
        batch_op.add_column(sa.Column("reserved_usd", Money, server_default="0", nullable=False))
    op.create_table(
        "key_spend",
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("spent_usd", Money, nullable=False),
        sa.Column("reserved_usd", Money, server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_key_spend_api_key_id_api_keys")),
        sa.PrimaryKeyConstraint("api_key_id", "month", name=op.f("pk_key_spend")),
    )
    # What keys spent before this revision, so a per-key budget set now counts this month's earlier usage.
    if op.get_bind().dialect.name == "postgresql":
        month = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM')"
    else:  # SQLite stores UTC times as text, 'YYYY-MM-DD HH:MM:SS...'
        month = "substr(created_at, 1, 7)"
    op.execute(
        f"INSERT INTO key_spend (api_key_id, month, spent_usd, reserved_usd) SELECT api_key_id, {month}, "  # noqa: S608
        f"SUM(price_usd), 0 FROM usage_events WHERE status = 'succeeded' AND price_usd > 0 GROUP BY api_key_id, {month}"
    )
    # Months billed before revision 0002 kept their totals only in usage events: give them their rows, so every
    # month's spend is on the ledger (and `usage reconcile` has nothing to report about them).
    op.execute(
        f"INSERT INTO tenant_spend (tenant_id, month, spent_usd, reserved_usd) SELECT u.tenant_id, {month}, "  # noqa: S608
        f"SUM(u.price_usd), 0 FROM usage_events u WHERE u.status = 'succeeded' AND u.price_usd > 0 AND NOT EXISTS "
        f"(SELECT 1 FROM tenant_spend s WHERE s.tenant_id = u.tenant_id AND s.month = {month}) "
        f"GROUP BY u.tenant_id, {month}"
    )
    op.create_table(
        "gateway_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_gateway_secrets")),
    )


def downgrade() -> None:
    op.drop_table("gateway_secrets")
    op.drop_table("key_spend")
    with op.batch_alter_table("tenant_spend") as batch_op:
        batch_op.drop_column("reserved_usd")
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_column("reserved_month")
        batch_op.drop_column("reserved_usd")
    with op.batch_alter_table("api_keys") as batch_op:
        for column in ("in_flight", "max_in_flight", "monthly_budget_usd", "rpm"):
            batch_op.drop_column(column)
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("in_flight")
        batch_op.drop_column("max_in_flight")
