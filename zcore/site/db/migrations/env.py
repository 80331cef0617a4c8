"""Alembic environment of the site database: always online, on the connection that
zcore.site.db.migrate passes in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context

from zcore.site.db.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
