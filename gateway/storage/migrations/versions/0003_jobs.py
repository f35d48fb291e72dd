"""jobs: the durable job engine (leases, provider refs, cancel), idempotency keys, webhook deliveries

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.storage.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("webhook_secret", sa.String(length=64), nullable=True))
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.add_column(sa.Column("api", sa.String(length=16), server_default="openai", nullable=False))
        batch_op.add_column(sa.Column("job", sa.JSON(), server_default="{}", nullable=False))
        batch_op.add_column(sa.Column("route", sa.String(length=200), server_default="cheapest", nullable=False))
        batch_op.add_column(
            sa.Column("available_at", UTCDateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False)
        )
        batch_op.add_column(sa.Column("deadline_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("cancel_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("started_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("cancel_requested", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("provider_backend", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("provider_ref", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("error_code", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("logs", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("webhook", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
        batch_op.create_index("ix_predictions_status_available", ["status", "available_at"], unique=False)
    # Rows a pre-engine process left running have no job to resume (no lease, no stored input): end them, unbilled,
    # as the reaper this engine replaces would have.
    op.execute(
        "UPDATE predictions SET status = 'failed', error = 'abandoned: the gateway stopped', "
        "completed_at = CURRENT_TIMESTAMP WHERE status = 'processing'"
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("prediction_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_idempotency_keys_prediction_id_predictions")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_idempotency_keys_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False)

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("prediction_id", sa.String(length=40), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_webhook_deliveries_prediction_id_predictions")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_deliveries_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        "ix_webhook_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"], unique=False
    )
    op.create_index(op.f("ix_webhook_deliveries_prediction_id"), "webhook_deliveries", ["prediction_id"], unique=False)


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_index("ix_predictions_status_available")
        for column in (
            "webhook_events",
            "webhook",
            "logs",
            "error_code",
            "provider_ref",
            "provider_backend",
            "cancel_requested",
            "started_at",
            "lease_expires_at",
            "lease_owner",
            "cancel_at",
            "deadline_at",
            "available_at",
            "route",
            "job",
            "api",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("webhook_secret")
