"""`GET /status/vpgs`: the status of every VPG in one call (the browser UI's dashboard
polls it every 2 s instead of one request per VPG)."""

from __future__ import annotations

import asyncio

import pytest

from site_service.apiclient import Api

pytestmark = pytest.mark.anyio
V1 = "/api/v1"


async def make_vpg(api: Api, name: str, vm: str) -> None:
    r = await api.post(f"{V1}/vms", json={"name": vm, "volumes": [{"name": "d0", "size": 4096}]})
    assert r.status_code == 201, r.text
    r = await api.post(f"{V1}/vpgs", json={"name": name, "vms": [vm]})
    assert r.status_code == 202, r.text
    for _ in range(200):
        task = (await api.get(r.headers["location"])).json()
        if task["state"] in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.02)
    assert task["state"] == "succeeded", task


async def test_every_vpg_status_in_one_call_matches_each_vpgs_own(api: Api) -> None:
    assert (await api.get(f"{V1}/status/vpgs")).json() == []
    await make_vpg(api, "g2", "vm2")
    await make_vpg(api, "g1", "vm1")
    found = (await api.get(f"{V1}/status/vpgs")).json()
    assert [s["name"] for s in found] == ["g1", "g2"]
    for s in found:
        assert s == (await api.get(f"{V1}/vpgs/{s['name']}/status")).json()
    assert (await api.client.get(f"{V1}/status/vpgs")).status_code == 401
