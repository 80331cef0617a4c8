"""Opening a site database: URL rules, connection settings per backend, migration to head.

Sits under zcore.site.db.repo.SiteDB.open.  Two backends share one schema and one chain of
migrations (zcore/site/db/migrations): SQLite, embedded, by default (a file URL
`sqlite:///PATH`; WAL journal, foreign keys on, a busy timeout so a second connection waits
for a writer instead of failing), and PostgreSQL for large sites (`postgresql://...`, driven
by psycopg 3, imported only when such a URL is opened).

Every function here blocks (disk or network I/O): call it from a worker thread in the
service, never on the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from zcore.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 10_000
MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "head"


def normalize_url(url: str | URL) -> URL:
    """The SQLAlchemy URL for a site database URL: `postgresql://` and `postgres://` select
    psycopg 3; `sqlite:///PATH` stays; anything else is a ConfigError."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return parsed
    raise ConfigError(f"unsupported database {backend!r}: use sqlite:///PATH or postgresql://...")


WRITE_OPTION = "zcore_write"  # execution option: this transaction will write


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own BEGIN handling is off; _sqlite_on_begin issues every BEGIN
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    # A writer takes the write lock at BEGIN (IMMEDIATE), so it waits its turn under the
    # busy timeout; a deferred transaction that reads and then writes would instead fail
    # at once with SQLITE_BUSY when another writer committed after its read.
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def create_site_engine(url: str | URL) -> Engine:
    """An Engine for `url` with the backend's settings applied to every connection.
    Blocks only on first use (engines connect lazily)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool
        else:
            Path(parsed.database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = HEAD) -> None:
    """Upgrade the database to `revision` (default: the newest), in one transaction per
    step.  Blocks."""
    from alembic import command

    with (
        engine.connect() as connection,
        connection.execution_options(**{WRITE_OPTION: True}).begin(),
    ):
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Step the schema back to `revision` ("base": no tables).  For tests and for a
    rollback an operator chooses; the service never downgrades.  Blocks."""
    from alembic import command

    with (
        engine.connect() as connection,
        connection.execution_options(**{WRITE_OPTION: True}).begin(),
    ):
        command.downgrade(_alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database).  Blocks."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision the shipped migrations define."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head
