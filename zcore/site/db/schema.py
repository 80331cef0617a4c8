"""The site database's tables at the head revision, as SQLAlchemy Core `Table`s.

Sits under zcore.site.db.repo (which queries these tables) and beside the migrations
(zcore/site/db/migrations/versions), which build the same tables step by step; a test
compares a database migrated to head with this metadata, so the two cannot drift.

Times are float seconds since the epoch (UTC) in every backend, so SQLite and PostgreSQL
store and compare them the same way; JSON columns hold small documents (VPG settings,
task results), never data the journals own.
"""

from __future__ import annotations

import sqlalchemy as sa

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING)

site = sa.Table(
    "site",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

peers = sa.Table(
    "peers",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("address", sa.String(500), nullable=False),
    sa.Column("fingerprint", sa.String(200), nullable=False),
    sa.Column("paired_at", sa.Float, nullable=False),
)

vms = sa.Table(
    "vms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

volumes = sa.Table(
    "volumes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("path", sa.String(4096), nullable=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("vm_id", "name"),
)

vpgs = sa.Table(
    "vpgs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column(
        "peer_site_id",
        sa.String(64),
        sa.ForeignKey("peers.site_id", ondelete="RESTRICT"),
        nullable=True,
    ),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

vpg_members = sa.Table(
    "vpg_members",
    metadata,
    sa.Column("vpg_id", sa.Integer, sa.ForeignKey("vpgs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id", ondelete="RESTRICT"), primary_key=True),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
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
    sa.Index(None, "state"),
    sa.Index(None, "created_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("vpg", sa.String(200), nullable=True),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("code", sa.String(64), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Index(None, "time"),
    # revision 0002
    sa.Index(None, "vpg", "time"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("vpg", sa.String(200), nullable=True),
    sa.Column("code", sa.String(64), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("acknowledged", sa.Boolean, nullable=False),
    sa.Column("cleared", sa.Boolean, nullable=False),
    # revision 0002
    sa.Column("cleared_at", sa.Float, nullable=True),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    # revision 0002
    sa.Column("last_used_at", sa.Float, nullable=True),
)
