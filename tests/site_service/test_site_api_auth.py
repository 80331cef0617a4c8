"""Authentication on every endpoint: the test walks the OpenAPI document, so an endpoint
added later cannot be forgotten; without a token, with a wrong one and with a revoked one
every operation but GET health and GET openapi.json answers 401 in the error shape."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from site_service.apiclient import Api

pytestmark = pytest.mark.anyio
V1 = "/api/v1"
PUBLIC = {("get", f"{V1}/health"), ("get", f"{V1}/openapi.json")}
METHODS = ("get", "post", "put", "patch", "delete")


def _path_value(param: dict[str, Any]) -> str:
    schema = param.get("schema", {})
    return "1" if schema.get("type") == "integer" else "x"


async def operations(api: Api) -> list[tuple[str, str]]:
    doc = (await api.client.get(f"{V1}/openapi.json")).json()
    ops = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            concrete = path
            for param in item[method].get("parameters", []):
                if param["in"] == "path":
                    concrete = concrete.replace("{" + param["name"] + "}", _path_value(param))
            assert not re.search(r"{\w+}", concrete), path
            ops.append((method, concrete))
    return ops


def assert_401(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, (what, response.status_code, response.text)
    assert response.json()["error"]["code"] == "unauthorized", what
    assert response.headers["www-authenticate"].startswith("Bearer")


async def _revoked_token(api: Api) -> str:
    created = (await api.post(f"{V1}/tokens", json={"name": "old"})).json()
    assert (await api.delete(f"{V1}/tokens/{created['token']['id']}")).status_code == 200
    return str(created["secret"])


async def test_every_operation_refuses_missing_wrong_and_revoked_tokens(api: Api) -> None:
    ops = await operations(api)
    assert len(ops) >= 35
    revoked = await _revoked_token(api)
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer zc_not-a-token"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "not bearer": {"Authorization": f"Basic {api.token}"},
        "empty": {"Authorization": "Bearer "},
    }
    for method, path in ops:
        for name, header in headers.items():
            response = await api.client.request(method, path, headers=header, json={})
            if (method, path) in PUBLIC:
                assert response.status_code == 200, (method, path, name)
            else:
                assert_401(response, f"{method} {path} with {name} token")


async def test_unknown_paths_answer_401_without_a_token_and_404_with_one(api: Api) -> None:
    assert_401(await api.client.get(f"{V1}/no-such-thing"), "unknown path")
    assert_401(await api.client.get("/not-the-ui"), "unknown root path")
    page = await api.client.get("/")  # the browser UI's page: public, holds no data
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert_401(await api.client.post(f"{V1}/health"), "POST health")
    found = await api.get(f"{V1}/no-such-thing")
    assert found.status_code == 404 and found.json()["error"]["code"] == "not_found"
    wrong_method = await api.client.put(f"{V1}/vms", headers=api.auth)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_a_huge_body_without_a_token_is_refused_before_it_is_read(api: Api) -> None:
    response = await api.client.post(f"{V1}/vms", content=b"x" * (4 << 20))
    assert_401(response, "huge unauthenticated body")
