"""routing: tenant route and allowed backends, attempts, provider cost; monthly spend totals

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Money = sa.Numeric(precision=14, scale=6)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("route", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("allowed_backends", sa.JSON(), nullable=True))
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("usage_events") as batch_op:
        batch_op.add_column(sa.Column("cost_usd", Money, server_default="0", nullable=False))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="1", nullable=False))

    op.create_table(
        "tenant_spend",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("spent_usd", Money, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_spend_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "month", name=op.f("pk_tenant_spend")),
    )


def downgrade() -> None:
    op.drop_table("tenant_spend")
    with op.batch_alter_table("usage_events") as batch_op:
        batch_op.drop_column("attempts")
        batch_op.drop_column("cost_usd")
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_column("attempts")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("allowed_backends")
        batch_op.drop_column("route")
