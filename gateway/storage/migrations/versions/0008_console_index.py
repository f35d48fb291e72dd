"""console index: predictions by completed_at, for the console's backend statistics of the last day

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_predictions_completed_at"), "predictions", ["completed_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_predictions_completed_at"), table_name="predictions")
