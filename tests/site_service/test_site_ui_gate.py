"""The browser UI's gate over the ASGI app (no browser): the page and its files are
served from the installed package, a login makes an HttpOnly SameSite=Strict session
cookie, the session reaches the API, a state-changing request without the session's CSRF
token is a 403, a login from another origin or not in JSON is refused, logout ends it."""

from __future__ import annotations

import re

import pytest

from site_service.apiclient import Api
from zcore.site.ui.gate import CSRF_HEADER, static_files

pytestmark = pytest.mark.anyio
V1 = "/api/v1"


def test_every_module_the_page_imports_is_shipped() -> None:
    files = static_files()
    assert {"index.html", "app.css", "js/app.js"} <= set(files)
    for name, path in files.items():
        if not name.endswith(".js"):
            continue
        folder = name.rpartition("/")[0]
        for target in re.findall(r'from "(\.[^"]+)"', path.read_text()):
            parts = [*folder.split("/"), *target.split("/")]
            resolved: list[str] = []
            for part in parts:
                if part == "..":
                    resolved.pop()
                elif part not in (".", ""):
                    resolved.append(part)
            assert "/".join(resolved) in files, (name, target)


async def _login(api: Api, token: str | None = None) -> str:
    r = await api.client.post("/ui/login", json={"token": token or api.token})
    assert r.status_code == 201, r.text
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    return str(r.json()["csrf_token"])


async def test_the_page_and_its_files_are_served_without_a_token(api: Api) -> None:
    page = await api.client.get("/")
    assert page.status_code == 200 and 'src="/ui/static/js/app.js"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    js = await api.client.get("/ui/static/js/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("/ui/static/../gate.py", "/ui/static/%2e%2e/gate.py", "/ui/static/nope.js"):
        assert (await api.client.get(bad)).status_code == 404, bad
    assert (await api.client.get("/ui/session")).json() == {"logged_in": False}


async def test_a_wrong_token_is_refused_and_makes_no_session(api: Api) -> None:
    r = await api.client.post("/ui/login", json={"token": "zc_not-a-token"})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert r.json()["error"]["code"] == "unauthorized"
    assert (await api.client.get(f"{V1}/vpgs")).status_code == 401


async def test_a_login_not_in_json_or_from_another_origin_is_refused(api: Api) -> None:
    form = await api.client.post("/ui/login", data={"token": api.token})
    assert form.status_code == 415 and "set-cookie" not in form.headers
    other = await api.client.post("/ui/login", json={"token": api.token},
                                  headers={"Origin": "http://evil.example"})
    assert other.status_code == 403 and "set-cookie" not in other.headers


async def test_a_session_reaches_the_api_and_needs_its_csrf_token_to_change_state(
        api: Api) -> None:
    csrf = await _login(api)
    assert (await api.client.get(f"{V1}/vpgs")).status_code == 200
    assert (await api.client.get("/ui/session")).json()["csrf_token"] == csrf
    body = {"name": "vm1"}
    missing = await api.client.post(f"{V1}/vms", json=body)
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf_failed"
    wrong = await api.client.post(f"{V1}/vms", json=body, headers={CSRF_HEADER: "x" + csrf})
    assert wrong.status_code == 403
    assert (await api.client.get(f"{V1}/vms/vm1")).status_code == 404  # nothing was made
    done = await api.client.post(f"{V1}/vms", json=body, headers={CSRF_HEADER: csrf})
    assert done.status_code == 201, done.text


async def test_logout_and_a_revoked_token_end_the_session(api: Api) -> None:
    made = (await api.post(f"{V1}/tokens", json={"name": "browser"})).json()
    csrf = await _login(api, made["secret"])
    assert (await api.client.get(f"{V1}/vpgs")).status_code == 200
    assert (await api.delete(f"{V1}/tokens/{made['token']['id']}")).status_code == 200
    assert (await api.client.get(f"{V1}/vpgs")).status_code == 401
    csrf = await _login(api)
    assert (await api.client.post("/ui/logout")).status_code == 403  # no CSRF token
    assert (await api.client.post("/ui/logout", headers={CSRF_HEADER: csrf})).status_code == 204
    assert (await api.client.get(f"{V1}/vpgs")).status_code == 401
    assert (await api.client.get("/ui/session")).json() == {"logged_in": False}
