"""`zcore backup ...` on a journal directory and a repository path: init, run (full then
incremental), list, show, restore byte-exact, check finding a damaged chunk with the
backup it affects, prune, and the exit statuses of a wrong passphrase and a lock."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from click.testing import CliRunner
from helpers.nbd import build_journal

from zcore.backup import format as fmt
from zcore.cli import main

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path, monkeypatch):
    journal, snaps = build_journal(tmp_path / "vm1", sizes=(1 * MiB, 512 * 1024), rounds=2,
                                   writes=20, promote_first=False)
    journal.close()
    monkeypatch.setenv("ZCORE_BACKUP_PASSPHRASE", "pw")
    runner = CliRunner()
    repo = str(tmp_path / "repo")
    r = runner.invoke(main, ["backup", "init", repo, "--chunk-size", "65536"])
    assert r.exit_code == 0, r.output
    return runner, repo, tmp_path, snaps


def run(runner, *args, code=0):
    r = runner.invoke(main, ["backup", *map(str, args)])
    assert r.exit_code == code, r.output
    return r.output


def test_cli_backs_up_lists_shows_restores_and_checks(setup):
    runner, repo, tmp, snaps = setup
    j = tmp / "vm1"
    first = json.loads(run(runner, "run", repo, "--journal", j, "--vpg", "v",
                           "--checkpoint", snaps[0][0].id, "--json"))
    second = json.loads(run(runner, "run", repo, "--journal", j, "--vpg", "v", "--json"))
    assert (first["mode"], second["mode"]) == ("full", "incremental")
    assert second["checkpoint"] == snaps[1][0].id and second["parent"] == first["backup"]
    listed = json.loads(run(runner, "list", repo, "--json"))
    assert [b["backup"] for b in listed] == [first["backup"], second["backup"]]
    assert "disk0" in run(runner, "show", repo, first["backup"])
    out = run(runner, "restore", repo, first["backup"], tmp / "out")
    assert {p.rsplit("/", 1)[1] for p in out.split()} == {"disk0.img", "disk1.img"}
    for name, data in snaps[0][1].items():
        assert (tmp / "out" / "vm1" / f"{name}.img").read_bytes() == data
    assert json.loads(run(runner, "check", repo, "--json"))["ok"]


def test_cli_check_names_the_backup_a_damaged_chunk_affects(setup):
    runner, repo, tmp, _ = setup
    name = json.loads(run(runner, "run", repo, "--journal", tmp / "vm1", "--json"))["backup"]
    chunk = next(p for p in (tmp / "repo" / "chunks").rglob("*") if p.is_file())
    os.chmod(chunk, 0o644)
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 1
    chunk.write_bytes(bytes(data))
    out = run(runner, "check", repo, code=1)
    assert f"chunk {chunk.name} damaged: affects {name}" in out
    run(runner, "restore", repo, name, tmp / "out", code=1)
    assert not any(p.is_file() for p in (tmp / "out").rglob("*"))


def test_cli_wrong_passphrase_and_locked_delete_exit_2(setup, monkeypatch):
    runner, repo, tmp, _ = setup
    name = json.loads(run(runner, "run", repo, "--journal", tmp / "vm1", "--retain", "1d",
                          "--json"))["backup"]
    assert "locked until" in run(runner, "delete", repo, name, code=2)
    pruned = json.loads(run(runner, "prune", repo, "--daily", "0", "--weekly", "0",
                            "--monthly", "0", "--last", "0", "--json"))
    assert list(pruned["locked"]) == [name] and pruned["deleted"] == []
    assert (tmp / "repo" / fmt.manifest_name(name)).exists()
    monkeypatch.setenv("ZCORE_BACKUP_PASSPHRASE", "nope")
    assert "wrong passphrase" in run(runner, "list", repo, code=2)


def test_cli_prune_deletes_what_retention_expires(setup):
    runner, repo, tmp, snaps = setup
    for c, _ in snaps:
        run(runner, "run", repo, "--journal", tmp / "vm1", "--checkpoint", c.id)
    out = run(runner, "prune", repo, "--daily", "1", "--weekly", "0", "--monthly", "0")
    assert out.startswith("deleted 1 backups, kept 1")
    assert len(json.loads(run(runner, "list", repo, "--json"))) == 1


def test_cli_serve_gives_instant_access_over_nbd(setup):
    import signal
    import subprocess

    from conftest import require_tool
    from helpers.cli import zcore_cmd

    qemu_img = require_tool("qemu-img")
    runner, repo, tmp, snaps = setup
    name = json.loads(run(runner, "run", repo, "--journal", tmp / "vm1", "--json"))["backup"]
    (tmp / "model.img").write_bytes(snaps[-1][1]["disk1"])
    proc = subprocess.Popen(zcore_cmd("backup", "serve", repo, name, "--port", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ZCORE_BACKUP_PASSPHRASE": "pw"})
    try:
        uris = dict(reversed(line.split("\t")[0].rsplit("/", 1)) for line in
                    (proc.stdout.readline() for _ in range(2)))
        uri = f"{uris['vm1-disk1']}/vm1-disk1"
        done = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", uri,
                               str(tmp / "model.img")], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# ---- zcore backup site ...: through a site's REST API ------------------------------------


@pytest.fixture
def api_site(tmp_path, monkeypatch):
    """A site API served by uvicorn in a thread (over the database-backed test double with
    BackupOps on recovery VPGs g, of random data, and fs, VM vm2 of one ext4 volume, and an
    NBD server), and g's journal's snapshots."""
    import asyncio
    import socket
    import threading

    import uvicorn
    from helpers.backup import FAST_N, ext4_journal, vpg_of

    from zcore.backup import Repository, Secret
    from zcore.backup.schedule import ScheduleBook
    from zcore.backup.siteops import BackupOps
    from zcore.journal import Journal
    from zcore.nbd import NBDServer
    from zcore.site.api import DbSiteBackend, SiteContext, create_app
    from zcore.site.db import SiteDB

    ext4 = Journal.open(ext4_journal(tmp_path, vm="vm2")[0])
    journal, snaps = build_journal(tmp_path / "vm1", sizes=(1 * MiB,), rounds=2, writes=20,
                                   promote_first=False)
    Repository.init(tmp_path / "repo", Secret(passphrase="pw"), chunk_size=1 << 16,
                    scrypt_n=FAST_N)
    db = SiteDB.open(f"sqlite:///{tmp_path / 'site.db'}")
    token = db.bootstrap("site-b", "Site B").secret
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    made = {}
    ready = threading.Event()

    async def serve():
        backend = DbSiteBackend(db)
        nbd = made["nbd"] = NBDServer()
        await nbd.start_tcp("127.0.0.1", 0)
        vpgs = {"g": vpg_of(journal, "g"), "fs": vpg_of(ext4, "fs", "vm2")}
        backend.backups = BackupOps(vpgs.__getitem__, backend.runner, nbd=nbd, uri=nbd.uri)
        backend.backups.book = ScheduleBook(tmp_path)
        made["server"] = uvicorn.Server(uvicorn.Config(
            create_app(SiteContext(db, backend)), log_level="warning", lifespan="off"))
        ready.set()
        try:
            await made["server"].serve(sockets=[sock])
        finally:
            await backend.backups.stop()
            await nbd.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    for _ in range(200):
        if made["server"].started:
            break
        threading.Event().wait(0.05)
    monkeypatch.setenv("ZCORE_SITE", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setenv("ZCORE_TOKEN", token)
    monkeypatch.setenv("ZCORE_BACKUP_PASSPHRASE", "pw")
    yield tmp_path, snaps
    made["server"].should_exit = True
    thread.join(10)
    db.close()
    journal.close()
    ext4.close()


def test_cli_site_runs_lists_restores_checks_prunes_and_schedules(api_site):
    tmp, snaps = api_site
    runner = CliRunner()
    repo = str(tmp / "repo")
    first = json.loads(run(runner, "site", "run", "g", repo, "--checkpoint", snaps[0][0].id,
                           "--json"))
    assert first["state"] == "succeeded" and first["result"]["mode"] == "full", first
    second = json.loads(run(runner, "site", "run", "g", repo, "--json"))
    assert second["result"]["mode"] == "incremental"
    listed = json.loads(run(runner, "site", "list", repo, "--json"))
    assert [b["backup"] for b in listed] == [first["result"]["backup"],
                                             second["result"]["backup"]]
    assert "disk0" in run(runner, "site", "show", repo, listed[0]["backup"])
    restored = json.loads(run(runner, "site", "restore", repo, listed[0]["backup"],
                              str(tmp / "out"), "--json"))
    assert restored["state"] == "succeeded", restored
    assert (tmp / "out" / "vm1" / "disk0.img").read_bytes() == snaps[0][1]["disk0"]
    assert json.loads(run(runner, "site", "check", repo, "--json"))["result"]["ok"]
    pruned = json.loads(run(runner, "site", "prune", repo, "--daily", "0", "--weekly", "0",
                            "--monthly", "0", "--json"))
    assert pruned["result"]["deleted"] == [listed[0]["backup"]]
    shown = json.loads(run(runner, "site", "schedule", "g", repo, "--window", "22-4",
                           "--json"))
    assert (shown["window_start"], shown["window_hours"]) == (22, 6)
    assert "window_start" in run(runner, "site", "schedule", "g")
    assert "stopped" in run(runner, "site", "schedule", "g", "--delete")


def test_cli_site_serves_a_backup_and_restores_files_from_a_backup_and_a_checkpoint(
        api_site):
    from conftest import require_tool
    from helpers.backup import MOTD

    qemu_img = require_tool("qemu-img")
    tmp, snaps = api_site
    runner = CliRunner()
    repo = str(tmp / "repo")
    g = json.loads(run(runner, "site", "run", "g", repo, "--checkpoint", snaps[0][0].id,
                       "--json"))["result"]["backup"]
    (served,) = json.loads(run(runner, "site", "serve", repo, g, "--json"))
    model = tmp / "model.img"
    model.write_bytes(snaps[0][1]["disk0"])
    done = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", served["uri"],
                           str(model)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already" in run(runner, "site", "serve", repo, g, code=1)
    assert "no longer served" in run(runner, "site", "unserve", g)
    assert "not served" in run(runner, "site", "unserve", g, code=1)

    fs = json.loads(run(runner, "site", "run", "fs", repo, "--json"))["result"]
    listed = json.loads(run(runner, "site", "files", fs["backup"], "vm2", "disk0", "/",
                            "--repository", repo, "--json"))
    assert {"etc", "notes.txt"} <= {e["name"] for e in listed}
    assert "motd" in run(runner, "site", "files", "fs", "vm2", "disk0", "/etc",
                         "--checkpoint", fs["checkpoint"])
    (tmp / "got").mkdir()
    got = json.loads(run(runner, "site", "files", "fs", "vm2", "disk0", "/etc/motd",
                         "--checkpoint", fs["checkpoint"], "--extract", str(tmp / "got"),
                         "--json"))
    assert got["state"] == "succeeded" and (tmp / "got" / "motd").read_text() == MOTD
    assert "--repository" in run(runner, "site", "files", "fs", "vm2", "disk0", code=2)


def test_cli_files_lists_and_extracts_from_an_ext4_volume_in_a_backup(tmp_path, monkeypatch):
    import shutil

    from helpers.backup import MOTD, ext4_journal

    from zcore.backup.files import list_files, view_image
    from zcore.journal import Journal

    path, _, c = ext4_journal(tmp_path)
    with Journal.open(path) as j, j.view(c) as view, view_image(view, "disk0") as copy:
        # from a journal checkpoint
        assert {e.name for e in list_files(copy, "/")} >= {"etc", "notes.txt", "lost+found"}
    monkeypatch.setenv("ZCORE_BACKUP_PASSPHRASE", "pw")
    runner = CliRunner()
    repo = str(tmp_path / "repo")
    run(runner, "init", repo, "--chunk-size", "65536")
    name = json.loads(run(runner, "run", repo, "--journal", tmp_path / "vm1", "--json"))[
        "backup"]
    listed = json.loads(run(runner, "files", repo, name, "vm1", "disk0", "/", "--json"))
    sizes = {e["name"]: e["size"] for e in listed}
    assert sizes["notes.txt"] == 5000 and "etc" in sizes
    (tmp_path / "got").mkdir()
    run(runner, "files", repo, name, "vm1", "disk0", "/etc/motd", "--extract",
        tmp_path / "got")
    assert (tmp_path / "got" / "motd").read_text() == MOTD
    run(runner, "files", repo, name, "vm1", "disk0", "/etc", "--extract", tmp_path / "got2",
        code=2)  # no such directory to extract into
    (tmp_path / "got2").mkdir()
    run(runner, "files", repo, name, "vm1", "disk0", "/etc", "--extract", tmp_path / "got2")
    assert (tmp_path / "got2" / "etc" / "motd").exists()
    assert "not found" in run(runner, "files", repo, name, "vm1", "disk0", "/nope",
                                      "--extract", tmp_path / "got2", code=2)
    shutil.rmtree(tmp_path / "got2")


@pytest.mark.parametrize("args", [
    ["backup", "prune", "REPO", "--daily", "-1"],
    ["backup", "site", "prune", "REPO", "--last", "-3"],
    ["backup", "site", "schedule", "g1", "REPO", "--monthly", "-12"],
])
def test_a_negative_retention_count_is_a_usage_error_before_anything_runs(tmp_path, args):
    done = CliRunner().invoke(main, [a.replace("REPO", str(tmp_path / "repo")) for a in args])
    assert done.exit_code == 2, done.output
    assert "x>=0" in done.output or "0<=x" in done.output, done.output
    assert not (tmp_path / "repo").exists()
