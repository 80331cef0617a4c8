"""Schema migrations on SQLite and PostgreSQL: an empty database reaches head and then
matches the tables the code queries; a database at the previous revision keeps its rows
across the upgrade; opening a database at head again changes nothing."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from zcore.site.db import SiteDB, current_revision, downgrade, head_revision, migrate, schema


def _diff(db: SiteDB) -> list[object]:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, schema.metadata))


def test_empty_database_migrates_to_head_matching_the_schema(db_url: str) -> None:
    with SiteDB.open(db_url) as db:
        assert current_revision(db.engine) == head_revision() == "0002"
        assert _diff(db) == []


def test_previous_revision_upgrades_with_rows_kept(db_url: str) -> None:
    with SiteDB.open(db_url, revision="0001") as old:
        assert current_revision(old.engine) == "0001"
        with old.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO site (id, name, created_at) VALUES ('s', 'S', 1)"))
            conn.execute(
                sa.text(
                    "INSERT INTO alerts (time, vpg, code, severity, text, acknowledged, cleared)"
                    " VALUES (5, 'g', 'rpo', 'warning', 'late', :f, :t)"
                ),
                {"f": False, "t": True},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO api_tokens (id, name, token_hash, created_at)"
                    " VALUES ('t1', 'admin', :h, 2)"
                ),
                {"h": "0" * 64},
            )
        columns = {c["name"] for c in sa.inspect(old.engine).get_columns("alerts")}
        assert "cleared_at" not in columns
    with SiteDB.open(db_url) as db:
        assert current_revision(db.engine) == "0002"
        assert _diff(db) == []
        assert db.get_site().name == "S"
        (alert,) = db.list_alerts()
        assert alert.cleared and alert.cleared_at == 5.0
        token = db.get_token("t1")
        assert token.name == "admin" and token.last_used_at is None


def test_reopening_at_head_changes_nothing(db_url: str) -> None:
    with SiteDB.open(db_url) as db:
        db.init_site("s", "S")
        db.create_vm("vm1")
    with SiteDB.open(db_url) as db:
        assert [v.name for v in db.list_vms()] == ["vm1"]
        assert current_revision(db.engine) == "0002"


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: object) -> None:
    with SiteDB.open(f"sqlite:///{tmp_path}/s.db") as db, db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


def test_downgrade_steps_back_to_base_and_up_again(db_url: str) -> None:
    with SiteDB.open(db_url) as db:
        downgrade(db.engine, "0001")
        assert current_revision(db.engine) == "0001"
        columns = {c["name"] for c in sa.inspect(db.engine).get_columns("api_tokens")}
        assert "last_used_at" not in columns
        downgrade(db.engine, "base")
        assert current_revision(db.engine) is None
        assert set(sa.inspect(db.engine).get_table_names()) <= {"alembic_version"}
        migrate(db.engine)
        assert _diff(db) == []
