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

from zcore.site.api import DbSiteBackend, SiteContext, create_app
from zcore.site.db import SiteDB

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
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
    return server


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


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url("postgres").replace("postgresql://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'site.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db(db_url: str) -> Iterator[SiteDB]:
    site_db = SiteDB.open(db_url)
    site_db.init_site("site-a", "Site A")
    try:
        yield site_db
    finally:
        site_db.close()


@dataclass
class Api:
    client: httpx.AsyncClient
    db: SiteDB
    backend: DbSiteBackend
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, path: str, **kw: object) -> httpx.Response:
        return await self.client.get(path, headers=self.auth, **kw)  # type: ignore[arg-type]

    async def post(self, path: str, **kw: object) -> httpx.Response:
        return await self.client.post(path, headers=self.auth, **kw)  # type: ignore[arg-type]

    async def patch(self, path: str, **kw: object) -> httpx.Response:
        return await self.client.patch(path, headers=self.auth, **kw)  # type: ignore[arg-type]

    async def delete(self, path: str) -> httpx.Response:
        return await self.client.delete(path, headers=self.auth)


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
