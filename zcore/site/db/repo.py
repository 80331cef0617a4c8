"""SiteDB: the one data-access layer of a site's database, a typed repository over
SQLAlchemy Core.

Sits under the site service, its REST API (zcore.site.api) and its task runner
(zcore.site.tasks); above zcore.site.db.engine (URLs, connections, migrations).  Holds
definitions, roles, tasks, events, alerts and tokens; the journals and bitmaps stay the
source of truth for data.  Every method blocks (SQL on disk or over the network): the
service calls them from worker threads (`asyncio.to_thread`), never on its event loop.
Methods are safe to call from several threads at once (the engine pools connections).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from zcore.site.db import schema as t
from zcore.site.db.activity import ActivityRepository
from zcore.site.db.base import now
from zcore.site.db.engine import HEAD, create_site_engine, migrate
from zcore.site.db.inventory import InventoryRepository
from zcore.site.db.records import NewToken, PeerRecord, SiteRecord, TokenRecord
from zcore.site.errors import (
    AlreadyExistsError,
    InUseError,
    PeerNotFoundError,
    SiteNotInitializedError,
    TokenNotFoundError,
)

TOKEN_PREFIX = "zc_"
TOKEN_BYTES = 32
TOKEN_USE_RESOLUTION_S = 60.0  # last_used_at is this coarse


def hash_token(secret: str) -> str:
    """The SHA-256 (hex) under which a token is stored; the secret itself never is."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _token(row: sa.Row[Any]) -> TokenRecord:
    return TokenRecord(row.id, row.name, row.created_at, row.revoked_at, row.last_used_at)


class SiteDB(InventoryRepository, ActivityRepository):
    """A site's database.  `SiteDB.open(url)` connects and upgrades the schema to head."""

    @classmethod
    def open(cls, url: str | URL, *, revision: str = HEAD) -> SiteDB:
        """Open the database at `url` (sqlite:///PATH or postgresql://...), creating or
        upgrading its schema to `revision` (the newest by default; tests pass an older one).
        Blocks."""
        engine = create_site_engine(url)
        try:
            migrate(engine, revision)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @classmethod
    def from_engine(cls, engine: Engine) -> SiteDB:
        """Wrap an engine whose database is already at head (no migration)."""
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection.  Blocks."""
        self._engine.dispose()

    def __enter__(self) -> SiteDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    # -- this site -------------------------------------------------------------------------

    def init_site(self, site_id: str, name: str) -> SiteRecord:
        """Record this site's identity, once; AlreadyExistsError if one is recorded.
        Blocks."""
        with self._write("site identity") as conn:
            if conn.scalar(sa.select(sa.func.count()).select_from(t.site)):
                raise AlreadyExistsError("this database already holds a site identity")
            conn.execute(sa.insert(t.site).values(id=site_id, name=name, created_at=now()))
        return self.get_site()

    def bootstrap(self, site_id: str, name: str, token_name: str = "admin") -> NewToken:
        """What `zcore site init` does in the database: record the site identity and create
        its first API token, whose secret is in the result only (print it once).  Blocks."""
        self.init_site(site_id, name)
        return self.create_token(token_name)

    def get_site(self) -> SiteRecord:
        """This site's identity; SiteNotInitializedError before init_site.  Blocks."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.site)).first()
        if row is None:
            raise SiteNotInitializedError("the site database holds no site identity yet")
        return SiteRecord(row.id, row.name, row.created_at)

    # -- peers -----------------------------------------------------------------------------

    def add_peer(self, site_id: str, name: str, address: str, fingerprint: str) -> PeerRecord:
        """Record a pairing with another site.  Blocks."""
        with self._write(f"peer {site_id!r}") as conn:
            if conn.scalar(sa.select(t.peers.c.site_id).where(t.peers.c.site_id == site_id)):
                raise AlreadyExistsError(f"site {site_id!r} is already paired")
            conn.execute(
                sa.insert(t.peers).values(
                    site_id=site_id,
                    name=name,
                    address=address,
                    fingerprint=fingerprint,
                    paired_at=now(),
                )
            )
        return self.get_peer(site_id)

    def get_peer(self, site_id: str) -> PeerRecord:
        """One paired site.  Blocks."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.peers).where(t.peers.c.site_id == site_id)).first()
        if row is None:
            raise PeerNotFoundError(f"no paired site {site_id!r}")
        return PeerRecord(row.site_id, row.name, row.address, row.fingerprint, row.paired_at)

    def list_peers(self) -> list[PeerRecord]:
        """Every paired site, by name.  Blocks."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t.peers).order_by(t.peers.c.name, t.peers.c.site_id))
            return [
                PeerRecord(r.site_id, r.name, r.address, r.fingerprint, r.paired_at) for r in rows
            ]

    def remove_peer(self, site_id: str) -> None:
        """Forget a pairing; InUseError while a VPG replicates with that site.  Blocks."""
        self.get_peer(site_id)
        with self._write(f"peer {site_id!r}") as conn:
            vpgs = list(
                conn.scalars(sa.select(t.vpgs.c.name).where(t.vpgs.c.peer_site_id == site_id))
            )
            if vpgs:
                raise InUseError(f"site {site_id!r} is the peer of VPG {vpgs[0]!r}", {"vpgs": vpgs})
            conn.execute(sa.delete(t.peers).where(t.peers.c.site_id == site_id))

    # -- API tokens ------------------------------------------------------------------------

    def create_token(self, name: str) -> NewToken:
        """A new random API token; its secret is in the result only, the database keeps its
        SHA-256.  Blocks."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        token_id = uuid.uuid4().hex
        with self._write(f"token {name!r}") as conn:
            conn.execute(
                sa.insert(t.api_tokens).values(
                    id=token_id, name=name, token_hash=hash_token(secret), created_at=now()
                )
            )
        return NewToken(self.get_token(token_id), secret)

    def get_token(self, token_id: str) -> TokenRecord:
        """One token's record (never its secret).  Blocks."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.api_tokens).where(t.api_tokens.c.id == token_id)).first()
        if row is None:
            raise TokenNotFoundError(f"no API token {token_id!r}")
        return _token(row)

    def list_tokens(self) -> list[TokenRecord]:
        """Every token, revoked ones included, oldest first.  Blocks."""
        with self._engine.connect() as conn:
            query = sa.select(t.api_tokens).order_by(t.api_tokens.c.created_at, t.api_tokens.c.id)
            return [_token(r) for r in conn.execute(query)]

    def verify_token(self, secret: str) -> TokenRecord | None:
        """The unrevoked token whose secret this is, or None.  A read; its use is written
        (last_used_at) at most once a minute per token, so requests do not queue on the
        write lock.  Blocks."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
            return None
        digest = hash_token(secret)
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(t.api_tokens).where(t.api_tokens.c.token_hash == digest)
            ).first()
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.token_hash, digest):
            return None
        stamp = now()
        if row.last_used_at is None or stamp - row.last_used_at > TOKEN_USE_RESOLUTION_S:
            with self._write("token use") as conn:
                conn.execute(
                    sa.update(t.api_tokens)
                    .where(t.api_tokens.c.id == row.id)
                    .values(last_used_at=stamp)
                )
        return _token(row)

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent); it is refused from then on.  Blocks."""
        with self._write(f"token {token_id!r}") as conn:
            done = conn.execute(
                sa.update(t.api_tokens)
                .where(t.api_tokens.c.id == token_id, t.api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
        if done.rowcount == 0:
            self.get_token(token_id)
        return self.get_token(token_id)
