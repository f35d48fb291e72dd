"""operator: every attempt of a job kept on its row; tenant names unique regardless of case

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.add_column(sa.Column("attempt_log", sa.JSON(), nullable=True))
    # Names equal but for case, made before names were unique: the oldest keeps its name, the others get their id
    # added, so no tenant is lost and the index below can be built.
    op.execute(
        "UPDATE tenants SET name = substr(name, 1, 160) || ' (' || id || ')' WHERE EXISTS (SELECT 1 FROM tenants older "
        "WHERE lower(older.name) = lower(tenants.name) AND (older.created_at < tenants.created_at "
        "OR (older.created_at = tenants.created_at AND older.id < tenants.id)))"
    )
    op.create_index("uq_tenants_name_lower", "tenants", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index("uq_tenants_name_lower", table_name="tenants")
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_column("attempt_log")
