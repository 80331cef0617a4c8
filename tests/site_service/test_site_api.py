"""The REST API end to end over httpx's ASGI transport, on SQLite and PostgreSQL: every
area answers with its documented shapes, long operations return a task at once, and
errors carry stable codes and list what exists."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from site_service.apiclient import Api

pytestmark = pytest.mark.anyio
V1 = "/api/v1"
SEC = 1_000_000_000


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return dict(body["error"])


async def finished(api: Api, response: httpx.Response) -> dict[str, Any]:
    """Poll the task a 202 answered with until it ends."""
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert location == f"{V1}/tasks/{response.json()['id']}"
    for _ in range(500):
        task = (await api.get(location)).json()
        if task["state"] in ("succeeded", "failed", "cancelled"):
            return dict(task)
        await asyncio.sleep(0.01)
    raise AssertionError(f"task never ended: {task}")


async def make_vpg(api: Api, name: str = "g", vms: tuple[str, ...] = ("vm1",)) -> None:
    for vm in vms:
        r = await api.post(
            f"{V1}/vms", json={"name": vm, "volumes": [{"name": "d0", "size": 4096}]}
        )
        assert r.status_code == 201, r.text
    task = await finished(api, await api.post(f"{V1}/vpgs", json={"name": name, "vms": list(vms)}))
    assert task["state"] == "succeeded", task


async def test_health_needs_no_token(api: Api) -> None:
    r = await api.client.get(f"{V1}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_sites_and_pairing(api: Api) -> None:
    sites = (await api.get(f"{V1}/sites")).json()
    assert sites == {"site": sites["site"], "peers": []}
    assert sites["site"]["name"] == "Site A"
    token = await api.post(f"{V1}/pairing/tokens")
    assert token.status_code == 201 and token.json()["token"]
    peer = await api.post(f"{V1}/pairing", json={"address": "10.0.0.2:9000", "token": "zp_x"})
    assert peer.status_code == 201, peer.text
    peers = (await api.get(f"{V1}/sites")).json()["peers"]
    assert [p["address"] for p in peers] == ["10.0.0.2:9000"]
    again = await api.post(f"{V1}/pairing", json={"address": "10.0.0.2:9000", "token": "zp_x"})
    assert again.status_code == 409 and error_of(again)["code"] == "already_exists"
    gone = await api.delete(f"{V1}/pairing/{peers[0]['site_id']}")
    assert gone.status_code == 204
    assert (await api.get(f"{V1}/sites")).json()["peers"] == []


async def test_vm_lifecycle_and_unknown_vm_lists_known(api: Api) -> None:
    body = {"name": "vm1", "volumes": [{"name": "d0", "size": 1 << 20, "path": "/v/d0"}]}
    created = await api.post(f"{V1}/vms", json=body)
    assert created.status_code == 201
    assert created.headers["location"] == f"{V1}/vms/vm1"
    assert created.json()["volumes"][0]["path"] == "/v/d0"
    assert (await api.get(f"{V1}/vms/vm1")).json() == created.json()
    missing = await api.get(f"{V1}/vms/vm2")
    assert missing.status_code == 404
    assert error_of(missing) == {
        "code": "vm_not_found",
        "message": "no VM named 'vm2'",
        "details": {"known": ["vm1"]},
    }
    dup = await api.post(f"{V1}/vms", json=body)
    assert dup.status_code == 409 and error_of(dup)["code"] == "already_exists"
    assert (await api.delete(f"{V1}/vms/vm1")).status_code == 204
    assert (await api.get(f"{V1}/vms")).json() == {"items": [], "next_cursor": None}


async def test_vm_list_pages_with_a_cursor(api: Api) -> None:
    for i in range(12):
        assert (await api.post(f"{V1}/vms", json={"name": f"vm{i:02d}"})).status_code == 201
    names: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["after"] = cursor
        page = (await api.get(f"{V1}/vms", params=params)).json()
        names += [v["name"] for v in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == [f"vm{i:02d}" for i in range(12)]
    everything = (await api.get(f"{V1}/vms", params={"limit": 5000})).json()
    assert len(everything["items"]) == 12 and everything["next_cursor"] is None


async def test_volumes_nested_under_vms(api: Api) -> None:
    await api.post(f"{V1}/vms", json={"name": "vm1"})
    r = await api.post(
        f"{V1}/vms/vm1/volumes", json={"name": "d1", "size": 8192, "role": "replica"}
    )
    assert r.status_code == 201 and r.json()["role"] == "replica"
    assert [v["name"] for v in (await api.get(f"{V1}/volumes")).json()] == ["d1"]
    assert [v["name"] for v in (await api.get(f"{V1}/volumes", params={"vm": "vm1"})).json()] == [
        "d1"
    ]
    assert (await api.get(f"{V1}/vms/vm1/volumes/d1")).json()["size"] == 8192
    missing = await api.get(f"{V1}/vms/vm1/volumes/d9")
    assert error_of(missing)["code"] == "volume_not_found"
    assert error_of(missing)["details"] == {"known": ["d1"]}
    odd = await api.post(f"{V1}/vms/vm1/volumes", json={"name": "d2", "size": 1000})
    assert odd.status_code == 422 and error_of(odd)["code"] == "invalid_request"
    assert (await api.delete(f"{V1}/vms/vm1/volumes/d1")).status_code == 204
    assert (await api.get(f"{V1}/vms/vm1/volumes")).json() == []


async def test_vpg_create_returns_a_task_and_protects(api: Api) -> None:
    await make_vpg(api)
    vpg = (await api.get(f"{V1}/vpgs/g")).json()
    assert vpg["state"] == "protecting" and vpg["vms"] == ["vm1"]
    assert vpg["settings"]["history_seconds"] == 86_400
    assert [v["name"] for v in (await api.get(f"{V1}/vpgs")).json()] == ["g"]
    in_use = await api.delete(f"{V1}/vms/vm1")
    assert in_use.status_code == 409 and error_of(in_use)["code"] == "in_use"


async def test_vpg_settings_patch_merges_and_validates_the_whole(api: Api) -> None:
    await make_vpg(api)
    r = await api.patch(f"{V1}/vpgs/g", json={"settings": {"history_seconds": 3600}})
    assert r.status_code == 200, r.text
    settings = r.json()["settings"]
    assert settings["history_seconds"] == 3600 and settings["rpo_alert_seconds"] == 300
    bad = await api.patch(f"{V1}/vpgs/g", json={"settings": {"compression": None}})
    assert bad.status_code == 422 and error_of(bad)["code"] == "invalid_config"
    assert "compression" in error_of(bad)["message"]
    unknown = await api.patch(f"{V1}/vpgs/g", json={"settings": {"histroy_seconds": 1}})
    assert unknown.status_code == 422


async def test_pause_resume_and_sync_follow_the_state(api: Api) -> None:
    await make_vpg(api)
    assert (await api.post(f"{V1}/vpgs/g/pause")).json()["state"] == "paused"
    refused = await api.post(f"{V1}/vpgs/g/sync")
    assert refused.status_code == 409 and error_of(refused)["code"] == "invalid_state"
    assert (await api.post(f"{V1}/vpgs/g/resume")).json()["state"] == "protecting"
    task = await finished(api, await api.post(f"{V1}/vpgs/g/sync"))
    assert task["state"] == "succeeded" and task["progress"] == 1.0
    assert task["kind"] == "vpg_sync" and task["vpg"] == "g"
    assert (await api.get(f"{V1}/vpgs/g")).json()["state"] == "protecting"


async def test_vpg_delete_is_a_task_then_the_vpg_is_gone(api: Api) -> None:
    await make_vpg(api)
    task = await finished(api, await api.delete(f"{V1}/vpgs/g"))
    assert task["state"] == "succeeded"
    gone = await api.get(f"{V1}/vpgs/g")
    assert gone.status_code == 404 and error_of(gone)["code"] == "vpg_not_found"
    assert (await api.get(f"{V1}/vms/vm1")).status_code == 200


def _feed(api: Api, count: int) -> None:
    for i in range(count):
        tag = f"t{i}" if i % 10 == 0 else None
        api.backend.add_checkpoint("g", (1000 + i) * SEC, tag=tag, consistent=i % 3 != 0)


async def test_checkpoints_filter_and_page_each_once(api: Api) -> None:
    await make_vpg(api)
    _feed(api, 100)
    base = f"{V1}/vpgs/g/checkpoints"
    ids: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 30, "order": "oldest"}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get(base, params=params)).json()
        ids += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == sorted(set(ids)) and len(ids) == 100
    newest = (await api.get(base, params={"limit": 1})).json()["items"][0]
    assert newest["id"] == ids[-1]
    window = (await api.get(base, params={"start": 1010, "end": 1020})).json()["items"]
    assert len(window) == 10 and all(1010 * SEC <= c["time_ns"] < 1020 * SEC for c in window)
    tagged = (await api.get(base, params={"kind": "tagged"})).json()["items"]
    assert len(tagged) == 10 and all(c["tag"] for c in tagged)
    assert [c["tag"] for c in (await api.get(base, params={"tag": "t50"})).json()["items"]] == [
        "t50"
    ]
    inconsistent = (await api.get(base, params={"consistent": "false"})).json()["items"]
    assert len(inconsistent) == 34


async def test_checkpoint_buckets_count_every_checkpoint(api: Api) -> None:
    await make_vpg(api)
    _feed(api, 100)
    r = await api.get(
        f"{V1}/vpgs/g/checkpoints/buckets", params={"bucket_seconds": 25, "start": 1000}
    )
    body = r.json()
    assert [b["count"] for b in body["buckets"]] == [25, 25, 25, 25]
    assert [b["tagged"] for b in body["buckets"]] == [3, 2, 3, 2]
    assert body["buckets"][1]["start"] == 1025


async def test_tag_checkpoint_then_list_it(api: Api) -> None:
    await make_vpg(api)
    r = await api.post(f"{V1}/vpgs/g/checkpoints", json={"tag": "before upgrade"})
    assert r.status_code == 201 and r.json()["kind"] == "tagged"
    listed = (await api.get(f"{V1}/vpgs/g/checkpoints", params={"tag": "before upgrade"})).json()
    assert [c["id"] for c in listed["items"]] == [r.json()["id"]]
    status = (await api.get(f"{V1}/vpgs/g/status")).json()
    assert status["latest_checkpoint"] == r.json() and status["state"] == "protecting"
    missing = await api.post(f"{V1}/vpgs/nope/checkpoints", json={"tag": "x"})
    assert missing.status_code == 404 and error_of(missing)["details"] == {"known": ["g"]}


async def test_events_alerts_and_acknowledge(api: Api) -> None:
    await make_vpg(api)
    for i in range(5):
        api.db.add_event("note", f"note {i}", vpg="g")
    page = (await api.get(f"{V1}/events", params={"vpg": "g", "limit": 3})).json()
    assert [e["text"] for e in page["items"]] == ["note 4", "note 3", "note 2"]
    rest = (
        await api.get(f"{V1}/events", params={"vpg": "g", "cursor": page["next_cursor"]})
    ).json()
    assert [e["text"] for e in rest["items"]] == ["note 1", "note 0", "VPG g created"]
    alert = api.db.raise_alert("rpo_exceeded", "RPO 400 s over 300 s", vpg="g")
    listed = (await api.get(f"{V1}/alerts", params={"active": "true"})).json()
    assert [a["id"] for a in listed] == [alert.id] and not listed[0]["acknowledged"]
    acked = await api.post(f"{V1}/alerts/{alert.id}/acknowledge")
    assert acked.json()["acknowledged"] is True
    missing = await api.post(f"{V1}/alerts/999/acknowledge")
    assert missing.status_code == 404 and error_of(missing)["code"] == "alert_not_found"


async def test_tasks_list_get_and_cancel(api: Api) -> None:
    await make_vpg(api)
    tasks = (await api.get(f"{V1}/tasks", params={"vpg": "g"})).json()
    assert [t["kind"] for t in tasks] == ["vpg_create"]
    assert (await api.get(f"{V1}/tasks/{tasks[0]['id']}")).json() == tasks[0]
    missing = await api.get(f"{V1}/tasks/nope")
    assert missing.status_code == 404 and error_of(missing)["code"] == "task_not_found"
    api.backend.step_delay_s = 5.0
    started = await api.post(f"{V1}/vpgs/g/sync")
    cancelled = await api.post(f"{V1}/tasks/{started.json()['id']}/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"


async def test_metric_history_downsamples(api: Api) -> None:
    await make_vpg(api)
    for i in range(60):
        api.backend.add_metric_point("rpo_seconds", "g", 600.0 + i, float(i))
    raw = await api.get(f"{V1}/metrics/history", params={"series": "rpo_seconds", "vpg": "g"})
    assert len(raw.json()["points"]) == 60
    coarse = await api.get(
        f"{V1}/metrics/history",
        params={"series": "rpo_seconds", "vpg": "g", "resolution": 30, "start": 600},
    )
    assert coarse.json()["points"] == [[600.0, 14.5], [630.0, 44.5]]
    unknown = await api.get(f"{V1}/metrics/history", params={"series": "nope"})
    assert unknown.status_code == 422 and error_of(unknown)["code"] == "invalid_config"


async def test_tokens_created_listed_without_secret_and_revoked(api: Api) -> None:
    created = await api.post(f"{V1}/tokens", json={"name": "ci"})
    assert created.status_code == 201
    secret = created.json()["secret"]
    other = {"Authorization": f"Bearer {secret}"}
    assert (await api.client.get(f"{V1}/vms", headers=other)).status_code == 200
    listed = (await api.get(f"{V1}/tokens")).text
    assert secret not in listed and '"ci"' in listed
    revoked = await api.delete(f"{V1}/tokens/{created.json()['token']['id']}")
    assert revoked.json()["revoked_at"] is not None
    assert (await api.client.get(f"{V1}/vms", headers=other)).status_code == 401
