"""The backup routes of the REST API (zcore.site.api.routes.backup) over a site whose
backend holds `BackupOps` on a recovery VPG: a backup, list, show and restore as tasks, a
check that reports a damaged chunk, a prune that keeps a locked backup; a wrong
passphrase is a clear error and the passphrase never appears in a task; file-level
restore from a backup and a checkpoint, and instant access on the site's NBD server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

import httpx
import pytest
from helpers.backup import FAST_N, flip, vpg_of
from helpers.nbd import build_journal

from zcore.backup import Repository, Secret
from zcore.backup.siteops import BackupOps
from zcore.site.api import DbSiteBackend, SiteContext, create_app
from zcore.site.db import SiteDB

pytestmark = pytest.mark.anyio
V1 = "/api/v1"
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def site(tmp_path):
    journal, snaps = build_journal(tmp_path / "vm1", sizes=(1 * MiB,), rounds=2, writes=20,
                                   promote_first=False)
    db = SiteDB.open(f"sqlite:///{tmp_path / 'site.db'}")
    db.init_site("site-b", "Site B")
    backend = DbSiteBackend(db)
    rvpg = vpg_of(journal, "g")
    backend.backups = ops = BackupOps(  # type: ignore[attr-defined]
        lambda name: rvpg, backend.runner)
    ops.start(tmp_path)
    app = create_app(SiteContext(db, backend))
    token = db.create_token("admin").secret
    Repository.init(tmp_path / "repo", Secret(passphrase="pw"), chunk_size=1 << 16,
                    scrypt_n=FAST_N)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://site",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, tmp_path, snaps, ops
    await ops.stop()
    await backend.runner.close()
    journal.close()
    db.close()


class _TaskResponse:
    """A 202 answer's shape, for a task started by a schedule tick."""

    status_code = 202

    def __init__(self, task_id: str) -> None:
        self.headers = {"location": f"{V1}/tasks/{task_id}"}
        self.text = task_id


async def finished(client: httpx.AsyncClient, r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 202, r.text
    for _ in range(1000):
        task = (await client.get(r.headers["location"])).json()
        if task["state"] in ("succeeded", "failed", "cancelled"):
            return dict(task)
        await asyncio.sleep(0.01)
    raise AssertionError("task never ended")


async def test_api_backs_up_lists_shows_restores_and_checks(site):
    client, tmp, snaps, _ = site
    ref = {"repository": str(tmp / "repo"), "passphrase": "pw"}
    t1 = await finished(client, await client.post(
        f"{V1}/vpgs/g/backups", json=ref | {"checkpoint": snaps[0][0].id}))
    t2 = await finished(client, await client.post(f"{V1}/vpgs/g/backups", json=ref))
    assert t1["state"] == t2["state"] == "succeeded", (t1, t2)
    assert (t1["result"]["mode"], t2["result"]["mode"]) == ("full", "incremental")
    assert "pw" not in str(t1) and "pw" not in str(t2)
    listed = (await client.post(f"{V1}/backups/list", json=ref)).json()
    assert [b["backup"] for b in listed] == [t1["result"]["backup"], t2["result"]["backup"]]
    shown = (await client.post(f"{V1}/backups/{listed[0]['backup']}/show", json=ref)).json()
    assert shown["checkpoint"]["id"] == snaps[0][0].id
    assert shown["vms"][0]["volumes"][0]["name"] == "disk0"
    t3 = await finished(client, await client.post(
        f"{V1}/backups/{listed[0]['backup']}/restore", json=ref | {"dest": str(tmp / "out")}))
    assert t3["state"] == "succeeded", t3
    assert (tmp / "out" / "vm1" / "disk0.img").read_bytes() == snaps[0][1]["disk0"]
    t4 = await finished(client, await client.post(f"{V1}/backups/check", json=ref))
    assert t4["result"]["ok"] and t4["result"]["backups"] == 2


async def test_api_check_reports_damage_and_prune_keeps_a_locked_backup(site):
    client, tmp, snaps, _ = site
    ref = {"repository": str(tmp / "repo"), "passphrase": "pw"}
    locked = await finished(client, await client.post(
        f"{V1}/vpgs/g/backups", json=ref | {"checkpoint": snaps[0][0].id, "retain_days": 1}))
    await finished(client, await client.post(f"{V1}/vpgs/g/backups", json=ref))
    pruned = await finished(client, await client.post(
        f"{V1}/backups/prune", json=ref | {"daily": 0, "weekly": 0, "monthly": 0}))
    assert list(pruned["result"]["locked"]) == [locked["result"]["backup"]]
    chunk = next(p for p in (tmp / "repo" / "chunks").rglob("*") if p.is_file())
    flip(chunk)
    report = (await finished(client, await client.post(f"{V1}/backups/check",
                                                       json=ref)))["result"]
    assert not report["ok"] and chunk.name in report["damaged"]


async def test_api_repair_heals_a_damaged_chunk_from_the_sites_journals(site):
    client, tmp, snaps, _ = site
    ref = {"repository": str(tmp / "repo"), "passphrase": "pw"}
    done = await finished(client, await client.post(f"{V1}/vpgs/g/backups", json=ref))
    chunk = next(p for p in (tmp / "repo" / "chunks").rglob("*") if p.is_file())
    flip(chunk)
    fixed = await finished(client, await client.post(f"{V1}/backups/check",
                                                     json=ref | {"repair": True}))
    assert fixed["kind"] == "backup_repair" and fixed["result"]["ok"], fixed
    assert list(fixed["result"]["healed"]) == [chunk.name]
    again = await finished(client, await client.post(f"{V1}/backups/check", json=ref))
    assert again["result"]["ok"], again
    t = await finished(client, await client.post(
        f"{V1}/backups/{done['result']['backup']}/restore", json=ref | {"dest": str(tmp / "o")}))
    assert (tmp / "o" / "vm1" / "disk0.img").read_bytes() == snaps[-1][1]["disk0"], t


async def test_api_wrong_passphrase_is_a_clear_error(site):
    client, tmp, _, _ = site
    r = await client.post(f"{V1}/backups/list",
                          json={"repository": str(tmp / "repo"), "passphrase": "nope"})
    assert r.status_code in (400, 409, 422), r.text
    assert "wrong passphrase" in r.json()["error"]["message"]


async def test_api_schedule_backs_up_once_a_day_inside_its_window_and_prunes(site):
    client, tmp, _, ops = site
    body = {"repository": str(tmp / "repo"), "daily": 1, "weekly": 0, "monthly": 0}
    os.environ["ZCORE_BACKUP_PASSPHRASE"] = "pw"
    try:
        put = await client.put(f"{V1}/vpgs/g/backup-schedule", json=body)
        assert put.status_code == 200, put.text
        got = (await client.get(f"{V1}/vpgs/g/backup-schedule")).json()
        assert got["repository"] == body["repository"] and got["window_hours"] == 24
        assert "pw" not in (tmp / "backup-schedules.json").read_text()
        now = time.time()
        first = await ops.tick(now)
        assert len(first) == 1
        task = await finished(client, _TaskResponse(first[0].id))
        assert task["state"] == "succeeded" and task["result"]["mode"] == "full", task
        assert await ops.tick(now) == []  # one a day
        # two days on: the first backup is stamped when it ended, on the next UTC date
        # if midnight fell while it ran
        second = await ops.tick(now + 2 * 86400)
        task = await finished(client, _TaskResponse(second[0].id))
        assert task["result"]["mode"] == "incremental" and len(task["result"]["pruned"]) == 1
        repo = Repository.open(tmp / "repo", Secret(passphrase="pw"))
        assert len(repo.backups()) == 1
        gone = await client.delete(f"{V1}/vpgs/g/backup-schedule")
        assert gone.status_code == 204
        assert (await client.get(f"{V1}/vpgs/g/backup-schedule")).status_code == 404
    finally:
        del os.environ["ZCORE_BACKUP_PASSPHRASE"]


def test_schedule_is_due_once_a_day_inside_its_window():
    from zcore.backup.schedule import Schedule

    noon = 1_800_000_000 - 1_800_000_000 % 86400 + 12 * 3600  # 12:00 UTC
    s = Schedule("g", "/r", window_start=22, window_hours=4)  # 22:00-02:00
    assert not s.in_window(noon) and s.in_window(noon + 11 * 3600)
    assert s.in_window(noon + 13.5 * 3600) and not s.in_window(noon + 14 * 3600)
    s = Schedule("g", "/r")
    assert s.due(None, noon) and not s.due(int(noon * 1e9) - 3600 * 10**9, noon)
    assert s.due(int((noon - 86400) * 1e9), noon)
    with pytest.raises(Exception, match="window"):
        Schedule("g", "/r", window_hours=0)


async def test_damaged_schedules_file_is_refused_not_read_as_empty(tmp_path):
    from zcore.backup.schedule import SCHEDULES_NAME
    from zcore.errors import StateError
    from zcore.site.tasks import TaskRunner

    (tmp_path / SCHEDULES_NAME).write_text('{"meta": {}, "crc32c": 1}')
    db = SiteDB.open(f"sqlite:///{tmp_path / 'site.db'}")
    ops = BackupOps(lambda name: None, TaskRunner(db))  # type: ignore[arg-type,return-value]
    ops.start(tmp_path)
    with pytest.raises(StateError, match="checksum"):
        ops.schedules()
    assert (tmp_path / SCHEDULES_NAME).read_text() == '{"meta": {}, "crc32c": 1}'
    await ops.stop()
    db.close()


@pytest.fixture
async def ext4_site(tmp_path):
    """A site whose recovery VPG g holds an ext4 volume (helpers.backup.ext4_journal) and
    whose BackupOps serve on an NBD server of the test's loop; one full backup made."""
    from helpers.backup import ext4_journal

    from zcore.journal import Journal
    from zcore.nbd import NBDServer

    path, made, cid = ext4_journal(tmp_path)
    journal = Journal.open(path)
    db = SiteDB.open(f"sqlite:///{tmp_path / 'site.db'}")
    db.init_site("site-b", "Site B")
    backend = DbSiteBackend(db)
    rvpg = vpg_of(journal, "g")
    nbd = NBDServer()
    await nbd.start_tcp("127.0.0.1", 0)
    backend.backups = ops = BackupOps(  # type: ignore[attr-defined]
        lambda name: rvpg, backend.runner, nbd=nbd, uri=nbd.uri)
    app = create_app(SiteContext(db, backend))
    token = db.create_token("admin").secret
    Repository.init(tmp_path / "repo", Secret(passphrase="pw"), chunk_size=1 << 16,
                    scrypt_n=FAST_N)
    ref = {"repository": str(tmp_path / "repo"), "passphrase": "pw"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://site",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        done = await finished(client, await client.post(f"{V1}/vpgs/g/backups", json=ref))
        assert done["state"] == "succeeded", done
        yield client, tmp_path, ref, done["result"]["backup"], made, cid
    await ops.stop()
    await nbd.close()
    await backend.runner.close()
    journal.close()
    db.close()


async def _tool(*args: object) -> str:
    done = await asyncio.to_thread(subprocess.run, [str(a) for a in args],
                                   capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_api_files_lists_and_extracts_from_a_backup_and_a_checkpoint(ext4_site):
    from helpers.backup import MOTD

    client, tmp, ref, backup, _, cid = ext4_site
    at = {"vm": "vm1", "volume": "disk0"}
    listed = (await client.post(f"{V1}/backups/{backup}/files", json=ref | at)).json()
    assert {(e["name"], e["type"]) for e in listed} >= {("etc", "dir"), ("notes.txt", "file")}
    assert next(e["size"] for e in listed if e["name"] == "notes.txt") == 5000
    (tmp / "got").mkdir()
    t = await finished(client, await client.post(
        f"{V1}/backups/{backup}/files/extract",
        json=ref | at | {"path": "/etc/motd", "dest": str(tmp / "got")}))
    assert t["state"] == "succeeded", t
    assert (tmp / "got" / "motd").read_text() == MOTD and "pw" not in str(t)

    etc = (await client.get(f"{V1}/vpgs/g/checkpoints/{cid}/files",
                            params=at | {"path": "/etc"})).json()
    assert [e["name"] for e in etc] == ["motd"], etc
    (tmp / "got2").mkdir()
    t = await finished(client, await client.post(
        f"{V1}/vpgs/g/checkpoints/{cid}/files/extract",
        json=at | {"path": "/etc", "dest": str(tmp / "got2")}))
    assert t["state"] == "succeeded", t
    assert (tmp / "got2" / "etc" / "motd").read_text() == MOTD

    # refusals: a relative path, a missing VM, a destination that is no directory, a
    # checkpoint the journal does not hold, unknown fields
    for r in (await client.post(f"{V1}/backups/{backup}/files",
                                json=ref | at | {"path": "etc"}),
              await client.post(f"{V1}/backups/{backup}/files",
                                json=ref | {"vm": "vm9", "volume": "disk0"}),
              await client.post(f"{V1}/backups/{backup}/files/extract",
                                json=ref | at | {"path": "/etc", "dest": str(tmp / "no")}),
              await client.get(f"{V1}/vpgs/g/checkpoints/{cid + 999}/files", params=at),
              await client.post(f"{V1}/vpgs/g/checkpoints/{cid}/files/extract",
                                json=at | {"path": "/", "dest": str(tmp), "x": 1})):
        assert 400 <= r.status_code < 500, r.text


async def test_api_serves_a_backup_for_instant_access_read_only_and_writable(ext4_site):
    from conftest import require_tool

    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    client, _, ref, backup, made, _ = ext4_site
    r = await client.post(f"{V1}/backups/{backup}/serve", json=ref)
    assert r.status_code == 201, r.text
    (served,) = r.json()
    assert served["export"] == f"backup/{backup}/vm1/disk0" and not served["writable"]
    assert (await client.post(f"{V1}/backups/{backup}/serve", json=ref)).status_code == 409
    listed = (await client.get(f"{V1}/backups/served")).json()
    assert [e["uri"] for e in listed[backup]] == [served["uri"]]
    await _tool(qemu_img, "compare", "-f", "raw", "-F", "raw", served["uri"], made)
    # block status: the backup's zero chunks are holes, so sparse copies skip them
    extents = json.loads(await _tool(qemu_img, "map", "--output=json", "-f", "raw",
                                     served["uri"]))
    holes = sum(e["length"] for e in extents if e["zero"] and not e["data"])
    assert holes >= 1 << 20 and sum(e["length"] for e in extents) == len(made.read_bytes())
    refused = await asyncio.to_thread(
        subprocess.run, [qemu_io, "-f", "raw", "-c", "write 0 4k", served["uri"]],
        capture_output=True, text=True)
    assert refused.returncode or "failed" in refused.stdout + refused.stderr
    assert (await client.delete(f"{V1}/backups/{backup}/serve")).status_code == 204
    assert (await client.delete(f"{V1}/backups/{backup}/serve")).status_code == 404

    # writable: a VM may write (into a scratch overlay); the repository never changes
    r = await client.post(f"{V1}/backups/{backup}/serve", json=ref | {"writable": True})
    (served,) = r.json()
    assert served["writable"]
    await _tool(qemu_io, "-f", "raw", "-c", "write -P 0x5a 1M 64k", served["uri"])
    await _tool(qemu_io, "-f", "raw", "-c", "read -P 0x5a 1M 64k", served["uri"])
    await client.delete(f"{V1}/backups/{backup}/serve")
    r = await client.post(f"{V1}/backups/{backup}/serve", json=ref)
    await _tool(qemu_img, "compare", "-f", "raw", "-F", "raw", r.json()[0]["uri"], made)
    await client.delete(f"{V1}/backups/{backup}/serve")
    for bad in ({"vms": ["vm9"]}, {"scratch_limit_bytes": -1}, {"writable": [1]}):
        r = await client.post(f"{V1}/backups/{backup}/serve", json=ref | bad)
        assert 400 <= r.status_code < 500, (bad, r.text)
    check = await finished(client, await client.post(f"{V1}/backups/check", json=ref))
    assert check["result"]["ok"], check
