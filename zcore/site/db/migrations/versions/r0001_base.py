"""Base schema: site, peers, vms, volumes, vpgs, vpg_members, tasks, events, alerts,
api_tokens.

The tables are written out here as they were at this revision, not imported from
zcore.site.db.schema (which moves with head): a migration must keep meaning what it meant
when it was released, so its lines repeat the schema's on purpose.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    _inventory()
    _activity()


def _inventory() -> None:
    op.create_table(
        "site",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_site"),
    )
    op.create_table(
        "peers",
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("address", sa.String(500), nullable=False),
        sa.Column("fingerprint", sa.String(200), nullable=False),
        sa.Column("paired_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("site_id", name="pk_peers"),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_vms"),
        sa.UniqueConstraint("name", name="uq_vms_name"),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("vm_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("path", sa.String(4096), nullable=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_volumes"),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name="fk_volumes_vm_id_vms", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("vm_id", "name", name="uq_volumes_vm_id_name"),
    )
    op.create_table(
        "vpgs",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("peer_site_id", sa.String(64), nullable=True),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_vpgs"),
        sa.ForeignKeyConstraint(
            ["peer_site_id"],
            ["peers.site_id"],
            name="fk_vpgs_peer_site_id_peers",
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("name", name="uq_vpgs_name"),
    )
    op.create_table(
        "vpg_members",
        sa.Column("vpg_id", sa.Integer, nullable=False),
        sa.Column("vm_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("vpg_id", "vm_id", name="pk_vpg_members"),
        sa.ForeignKeyConstraint(
            ["vpg_id"], ["vpgs.id"], name="fk_vpg_members_vpg_id_vpgs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name="fk_vpg_members_vm_id_vms", ondelete="RESTRICT"
        ),
    )


def _activity() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    op.create_index("ix_tasks_state", "tasks", ["state"])
    op.create_index("ix_tasks_created_at", "tasks", ["created_at"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("vpg", sa.String(200), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_time", "events", ["time"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("vpg", sa.String(200), nullable=True),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("acknowledged", sa.Boolean, nullable=False),
        sa.Column("cleared", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )


def downgrade() -> None:
    for table in ("api_tokens", "alerts", "events", "tasks", "vpg_members", "vpgs"):
        op.drop_table(table)
    for table in ("volumes", "vms", "peers", "site"):
        op.drop_table(table)
