"""Error codes: every zcore error class has its own stable code and HTTP status; an error
nobody raised on purpose is a 500 "internal_error" without a traceback; a bootstrapped
site has exactly one token, valid, stored hashed."""

from __future__ import annotations

import inspect

import httpx
import pytest

from zcore import errors as zerr
from zcore.site.api import DbSiteBackend, SiteContext, create_app
from zcore.site.api.errors import http_status
from zcore.site.db import SiteDB, VpgRecord
from zcore.site.errors import ERROR_CODES, INTERNAL_ERROR, error_code

V1 = "/api/v1"


@pytest.fixture
def backend() -> str:
    """SQLite only: nothing here depends on the database backend."""
    return "sqlite"


def test_every_zcore_error_class_has_its_own_code() -> None:
    classes = [
        c for _, c in inspect.getmembers(zerr, inspect.isclass) if issubclass(c, zerr.ZcoreError)
    ]
    assert classes and all(c in ERROR_CODES for c in classes)
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (zerr.CheckpointNotFoundError("x"), 404, "checkpoint_not_found"),
        (zerr.ConfigError("x"), 422, "invalid_config"),
        (zerr.StateError("x"), 409, "invalid_state"),
        (zerr.ChecksumError("x"), 500, "checksum_mismatch"),
        (KeyError("x"), 500, INTERNAL_ERROR),
    ],
)
def test_error_classes_map_to_status_and_code(exc: Exception, status: int, code: str) -> None:
    assert (http_status(exc), error_code(exc)) == (status, code)


class Broken(DbSiteBackend):
    async def list_vpgs(self) -> list[VpgRecord]:
        raise RuntimeError("secret internals /etc/zcore")

    async def get_vpg(self, name: str) -> VpgRecord:
        raise zerr.CorruptRecordError("index entry 7 fails its checksum")


@pytest.mark.anyio
async def test_unexpected_errors_are_500_without_internals(db: SiteDB) -> None:
    token = db.create_token("t").secret
    app = create_app(SiteContext(db, Broken(db)))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://s") as c:
        crash = await c.get(f"{V1}/vpgs", headers=headers)
        corrupt = await c.get(f"{V1}/vpgs/g", headers=headers)
    assert crash.status_code == 500
    assert crash.json() == {
        "error": {"code": "internal_error", "message": "internal error", "details": None}
    }
    assert corrupt.status_code == 500
    assert corrupt.json()["error"]["code"] == "corrupt_record"


def test_bootstrap_creates_one_admin_token(tmp_path: object) -> None:
    with SiteDB.open(f"sqlite:///{tmp_path}/s.db") as db:
        admin = db.bootstrap("site-a", "Site A")
        assert db.get_site().name == "Site A"
        assert [t.name for t in db.list_tokens()] == ["admin"]
        assert db.verify_token(admin.secret) is not None
