"""When an alert cleared, when a token was last used, and events indexed per VPG.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("cleared_at", sa.Float, nullable=True))
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("last_used_at", sa.Float, nullable=True))
    op.create_index("ix_events_vpg_time", "events", ["vpg", "time"])
    # alerts cleared before this revision: their clear time is unknown, take the raise time
    op.execute("UPDATE alerts SET cleared_at = time WHERE cleared")


def downgrade() -> None:
    op.drop_index("ix_events_vpg_time", table_name="events")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("last_used_at")
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("cleared_at")
