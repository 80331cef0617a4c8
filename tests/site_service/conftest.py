"""Fixtures of the site-service tests: a site database on each backend (SQLite in a temp
dir; PostgreSQL: one real server per session, started here, a fresh database per test),
and an API client over httpx's ASGI transport.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
(runuser); it listens on a free TCP port on 127.0.0.1 and a unix socket in its temp dir,
and is stopped at the end of the session.  A missing PostgreSQL skips, except in CI
(CI=true), where .ci/run installs it and its absence fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import IN_CI

from site_service.apiclient import Api
from zcore.site.api import DbSiteBackend, SiteContext, create_app
from zcore.site.db import SiteDB

BACKENDS = ["sqlite", "postgresql"]


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    as_postgres: bool

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def url(self, database: str) -> str:
        return f"postgresql://zcore@127.0.0.1:{self.port}/{database}"


def _start_pg(bindir: Path) -> PgServer:
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="zcore-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    server = PgServer(bindir, root, _free_port(), as_postgres)
    try:
        _init_and_start(server)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def _init_and_start(server: PgServer) -> None:
    bindir, root = server.bindir, server.root
    done = server.run(
        str(bindir / "initdb"),
        "-D",
        str(server.data),
        "-U",
        "zcore",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        "--no-instructions",
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr}")
    options = (
        f"-k {root} -p {server.port} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    done = server.run(
        str(bindir / "pg_ctl"),
        "-D",
        str(server.data),
        "-l",
        str(root / "log"),
        "-o",
        options,
        "-w",
        "-t",
        "60",
        "start",
    )
    if done.returncode != 0:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {done.stderr} {log}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        _missing("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    assert bindir is not None
    server = _start_pg(bindir)
    try:
        yield server
    finally:
        server.run(str(bindir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop")
        shutil.rmtree(server.root, ignore_errors=True)


def _pg_admin(server: PgServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql)


def _pg_database(server: PgServer, template: str | None = None) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    _pg_admin(server, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield server.url(name)
    finally:
        _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    yield from _pg_database(pg_server)


@pytest.fixture(scope="session")
def pg_head_template(pg_server: PgServer) -> str:
    """A database migrated to head once per session, copied by each test that needs one
    (CREATE DATABASE ... TEMPLATE): migrating every test's database costs a second."""
    name = "zcore_head_template"
    _pg_admin(pg_server, f'CREATE DATABASE "{name}"')
    SiteDB.open(pg_server.url(name)).close()
    return name


@pytest.fixture(scope="session")
def sqlite_head_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "head.db"
    SiteDB.open(f"sqlite:///{path}").close()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each database backend in turn: "sqlite", "postgresql"."""
    return str(request.param)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'site.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[SiteDB]:
    """A site database at head holding the identity of "Site A" (copied from a template
    migrated once per session; SiteDB.open still checks the revision)."""
    if backend == "sqlite":
        shutil.copyfile(request.getfixturevalue("sqlite_head_template"), tmp_path / "site.db")
        site_db = SiteDB.open(f"sqlite:///{tmp_path / 'site.db'}")
    else:
        server = request.getfixturevalue("pg_server")
        template = request.getfixturevalue("pg_head_template")
        gen = _pg_database(server, template)
        request.addfinalizer(lambda: next(gen, None))
        site_db = SiteDB.open(next(gen))
    site_db.init_site("site-a", "Site A")
    try:
        yield site_db
    finally:
        site_db.close()


@pytest.fixture
async def api(db: SiteDB) -> AsyncIterator[Api]:
    backend = DbSiteBackend(db)
    app = create_app(SiteContext(db, backend))
    admin = db.create_token("admin")
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://site") as client:
        yield Api(client, db, backend, admin.secret)
    await backend.runner.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
