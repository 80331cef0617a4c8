"""Hostile requests: wrong types, unknown fields, huge and endless bodies, deep nesting,
broken JSON and odd query values each get a 4xx in the error shape with a message that
says what was wrong, never a traceback, and change nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from site_service.apiclient import Api

pytestmark = pytest.mark.anyio
V1 = "/api/v1"


@pytest.fixture
def backend() -> str:
    """SQLite only: these requests are refused before any database call (the API suite
    runs on both backends)."""
    return "sqlite"


JSON = {"Content-Type": "application/json"}


def refused(response: httpx.Response, status: int | tuple[int, ...] = 422) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize(
    "body",
    [
        {"name": 5},
        {"name": None},
        {"name": ["vm"]},
        {"name": "vm1", "volumes": "d0"},
        {"name": "vm1", "volumes": [{"name": "d0", "size": "big"}]},
        {"name": "vm1", "volumes": [{"name": "d0", "size": 4096.5}]},
        {"name": "vm1", "volumes": [{"name": "d0", "size": 10**30}]},
        {"name": "vm1", "volumes": [{"name": "d0", "size": -512}]},
        {"name": "vm1", "volumes": [{"name": "d0", "size": 4096, "role": "boss"}]},
        {"name": "../etc/passwd"},
        {"name": "vm\u0000"},
        {"name": "x" * 500},
        {"name": ""},
    ],
)
async def test_wrong_types_and_bad_values_are_422(api: Api, body: dict[str, Any]) -> None:
    error = refused(await api.post(f"{V1}/vms", json=body))
    assert error["code"] == "invalid_request"
    assert error["details"] and all("loc" in p for p in error["details"])
    assert (await api.get(f"{V1}/vms")).json()["items"] == []


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/vms", {"name": "vm1", "admin": True}, "admin"),
        ("/vms", {"name": "vm1", "volumes": [{"name": "d0", "size": 512, "x": 1}]}, "x"),
        ("/vpgs", {"name": "g", "settings": {"history_seconds": 60, "evil": 1}}, "evil"),
        ("/tokens", {"name": "t", "secret": "mine"}, "secret"),
        ("/pairing", {"address": "h:1", "token": "t", "trust": "all"}, "trust"),
    ],
)
async def test_unknown_fields_are_422_naming_the_field(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    error = refused(await api.post(V1 + path, json=body))
    assert error["code"] == "invalid_request"
    assert any(p["loc"][-1] == field for p in error["details"]), error


async def test_a_body_over_the_limit_is_413(api: Api) -> None:
    big = {"name": "vm1", "volumes": [{"name": "d0", "size": 512, "path": "p" * 4000}] * 300}
    error = refused(await api.post(f"{V1}/vms", json=big), 413)
    assert error["code"] == "body_too_large" and error["details"] == {"limit": 1 << 20}


async def test_a_streamed_body_without_length_stops_at_the_limit(api: Api) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b" " * 65536
        for _ in range(64):  # 4 MiB
            sent += len(chunk)
            yield chunk

    error = refused(await api.post(f"{V1}/vms", content=endless(), headers=JSON), 413)
    assert error["code"] == "body_too_large"
    assert sent <= (1 << 20) + 65536


async def test_a_lying_content_length_is_refused(api: Api) -> None:
    headers = {**api.auth, **JSON, "Content-Length": "not-a-number"}
    response = await api.client.post(f"{V1}/vms", content=b"{}", headers=headers)
    refused(response, (400, 413))


async def test_deep_nesting_is_a_4xx(api: Api) -> None:
    depth = 200_000
    body = '{"name": ' + "[" * depth + "]" * depth + "}"
    error = refused(await api.post(f"{V1}/vms", content=body, headers=JSON), (400, 422))
    assert "nested too deeply" in error["message"]
    nested: Any = 1
    for _ in range(200):
        nested = {"a": nested}
    settings = {"name": "g", "settings": {"history_seconds": nested}}
    refused(await api.post(f"{V1}/vpgs", json=settings))
    assert (await api.get(f"{V1}/vpgs")).json() == []


@pytest.mark.parametrize(
    "content",
    [b"{", b"not json", b"[]", b"null", b'"vm1"', b"\xff\xfe\x00", b'{"name": NaN}'],
)
async def test_broken_or_non_object_json_is_4xx(api: Api, content: bytes) -> None:
    refused(await api.post(f"{V1}/vms", content=content, headers=JSON), (400, 422))


@pytest.mark.parametrize(
    "path",
    [
        "/vms?limit=-1",
        "/vms?limit=abc",
        "/vms?limit=99999999999999999999",
        "/vpgs/g/checkpoints?cursor=1%20OR%201=1",
        "/vpgs/g/checkpoints?kind=sometimes",
        "/vpgs/g/checkpoints?start=yesterday",
        "/tasks?state=exploded",
        "/metrics/history",
        "/vpgs/g/checkpoints/buckets?bucket_seconds=0",
    ],
)
async def test_bad_query_values_are_422(api: Api, path: str) -> None:
    error = refused(await api.get(V1 + path))
    assert error["code"] == "invalid_request"


async def test_a_json_body_where_none_is_expected_is_ignored_not_fatal(api: Api) -> None:
    await api.post(f"{V1}/vms", json={"name": "vm1"})
    response = await api.delete(f"{V1}/vms/vm1", headers=JSON, content=json.dumps({"x": 1}))
    assert response.status_code == 204
