"""Authentication and hostile JSON against a real `zcore site serve` process (the app the
service builds, /metrics included, behind uvicorn), not the API double of
test_site_api_auth.py and test_site_api_hostile.py: the test walks the served OpenAPI
document so no endpoint is forgotten; without a token, with a wrong one and with a
revoked one every operation but GET health and GET openapi.json answers 401; hostile
bodies get a 4xx in the error shape and change nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.site import SiteProcess, init_site_dir, ok, zcore_cmd

V1 = "/api/v1"
PUBLIC = {("get", f"{V1}/health"), ("get", f"{V1}/openapi.json")}
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteProcess]:
    root = tmp_path_factory.mktemp("auth") / "s"
    init_site_dir(root, "sigma")
    proc = SiteProcess(root)
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture
def http(site: SiteProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.api_url, timeout=30) as client:
        yield client


def admin(site: SiteProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {site.token}"}


def operations(http: httpx.Client) -> list[tuple[str, str]]:
    doc = ok(http.get(f"{V1}/openapi.json"))
    ops = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            concrete = path
            for param in item[method].get("parameters", []):
                if param["in"] == "path":
                    value = "1" if param.get("schema", {}).get("type") == "integer" else "x"
                    concrete = concrete.replace("{" + param["name"] + "}", value)
            assert not re.search(r"{\w+}", concrete), path
            ops.append((method, concrete))
    return ops


def assert_401(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, (what, response.status_code, response.text[:300])
    assert response.json()["error"]["code"] == "unauthorized", what
    assert response.headers["www-authenticate"].startswith("Bearer"), what


def test_every_served_operation_and_metrics_refuse_missing_wrong_and_revoked_tokens(
        site: SiteProcess, http: httpx.Client) -> None:
    ops = operations(http)
    assert len(ops) >= 35
    created = ok(http.post(f"{V1}/tokens", json={"name": "old"}, headers=admin(site)), 201)
    ok(http.delete(f"{V1}/tokens/{created['token']['id']}", headers=admin(site)))
    revoked = created["secret"]
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer zc_not-a-token"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "not bearer": {"Authorization": f"Basic {site.token}"},
        "empty": {"Authorization": "Bearer"},  # h11 refuses a trailing space
    }
    # /metrics is served beside the API (not in its OpenAPI document), behind the same auth
    # `/` is the browser UI's page (public, it holds no data: tests/ui); beside it, 401
    for method, path in [*ops, ("get", "/metrics"), ("get", f"{V1}/no-such-thing"),
                         ("get", "/not-the-ui")]:
        for name, header in headers.items():
            response = http.request(method, path, headers=header, json={})
            if (method, path) in PUBLIC:
                assert response.status_code == 200, (method, path, name)
            else:
                assert_401(response, f"{method} {path} with {name} token")
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    metrics = http.get("/metrics", headers=admin(site))
    assert metrics.status_code == 200 and "zcore_nbd_connections" in metrics.text


def refused(response: httpx.Response, status: int | tuple[int, ...] = 422) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize("body", [
    {"name": 5},
    {"name": "vm1", "volumes": [{"name": "d0", "size": "big"}]},
    {"name": "vm1", "volumes": [{"name": "d0", "size": 10**30}]},
    {"name": "vm1", "volumes": [{"name": "d0", "size": 4096}], "owner": "me"},
    {"name": "../etc/passwd"},
])
def test_hostile_vm_bodies_are_refused_by_the_service_with_a_message(
        site: SiteProcess, http: httpx.Client, body: dict[str, Any]) -> None:
    error = refused(http.post(f"{V1}/vms", json=body, headers=admin(site)))
    assert error["code"] == "invalid_request"
    assert ok(http.get(f"{V1}/vms", headers=admin(site)))["items"] == []


def test_broken_deep_and_huge_json_is_refused_by_the_service(
        site: SiteProcess, http: httpx.Client) -> None:
    headers = {**admin(site), "Content-Type": "application/json"}
    refused(http.post(f"{V1}/vms", content=b'{"name": "vm1", ', headers=headers), (400, 422))
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    refused(http.post(f"{V1}/vms", content=deep, headers=headers), (400, 413, 422))
    huge = json.dumps({"name": "vm1", "volumes": [{"name": "d" * (8 << 20), "size": 512}]})
    error = refused(http.post(f"{V1}/vms", content=huge.encode(), headers=headers), 413)
    assert error["code"] == "body_too_large"
    assert ok(http.get(f"{V1}/vms", headers=admin(site)))["items"] == []
    assert ok(http.get(f"{V1}/health")) is not None  # and the service still answers


def test_an_unknown_vm_is_refused_with_the_names_that_exist_by_api_and_cli(
        site: SiteProcess, http: httpx.Client) -> None:
    ok(http.post(f"{V1}/vms", json={"name": "known-vm", "volumes": []}, headers=admin(site)),
       201)
    try:
        error = refused(http.get(f"{V1}/vms/nope", headers=admin(site)), 404)
        assert error["code"] == "vm_not_found" and error["details"]["known"] == ["known-vm"]
        done = subprocess.run(zcore_cmd("vm", "show", "nope", "--site", site.api_url,
                                        "--token", site.token),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "known-vm" in done.stderr and "zcore vm list" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        ok(http.delete(f"{V1}/vms/known-vm", headers=admin(site)), 204)
