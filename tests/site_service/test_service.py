"""Two site services as separate processes on loopback, driven through their REST APIs:
init, pair (both ways), a VM with a volume, a VPG, writes through NBD, tagged checkpoints
listed at the recovery site, kill -9 of each service and a restart, state and data intact.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.site import SiteProcess, init_site_dir, ok, two_sites, wait_for, zcore_cmd

from zcore.site.config import SiteDir, read_client

MiB = 1 << 20
DISK = 16 * MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")


def qemu_io(uri: str, command: str, readonly: bool = False) -> str:
    args = ["qemu-io", "-f", "raw", *(["-r"] if readonly else []), "-c", command, uri]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, (
        done.stdout + done.stderr)
    return done.stdout


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    with two_sites(tmp_path, "--log-json") as pair:
        yield pair


def tagged(client: httpx.Client, vpg: str, tag: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = ok(client.get(f"/vpgs/{vpg}/checkpoints",
                                                   params={"tag": tag}))["items"]
    return items


def wait_task(client: httpx.Client, task: dict[str, object]) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        t: dict[str, object] = ok(client.get(f"/tasks/{task['id']}"))
        return t if t["state"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, object] = wait_for("the task", done, timeout=60)
    assert result["state"] == "succeeded", result
    return result


def protecting(client: httpx.Client, vpg: str) -> bool:
    return bool(ok(client.get(f"/vpgs/{vpg}"))["state"] == "protecting")


def tag_when_streaming(client: httpx.Client, vpg: str, tag: str) -> dict[str, object]:
    """Tag once the VPG can take a checkpoint (not in bitmap mode after a restart)."""
    def attempt() -> dict[str, object] | None:
        r = client.post(f"/vpgs/{vpg}/checkpoints", json={"tag": tag})
        if r.status_code == 409:
            return None
        body: dict[str, object] = ok(r, 201)
        return body

    result: dict[str, object] = wait_for(f"tag {tag}", attempt, timeout=60, interval=0.5)
    return result


def test_two_sites_survive_kill_9_of_each_with_checkpoints_and_data_intact(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    ca, cb = a.client(), b.client()
    # pair a -> b, then b -> a: either site can protect to the other
    token = ok(cb.post("/pairing/tokens"))["token"]
    refused = ca.post("/pairing", json={"address": b.replication, "token": token + "x"})
    assert refused.status_code == 502 and "token" in refused.json()["error"]["message"]
    beta = ok(ca.post("/pairing", json={"address": b.replication, "token": token}))
    token = ok(ca.post("/pairing/tokens"))["token"]
    alpha = ok(cb.post("/pairing", json={"address": a.replication, "token": token}))
    assert [p["site_id"] for p in ok(ca.get("/sites"))["peers"]] == [beta["site_id"]]
    assert [p["address"] for p in ok(cb.get("/sites"))["peers"]] == [a.replication]
    assert alpha["name"] == "alpha"

    disk = tmp_path / "disk0.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
    ok(ca.post("/vms", json={"name": "vm1", "volumes": [
        {"name": "disk0", "size": DISK, "path": str(disk)}]}), 201)
    task = ok(ca.post("/vpgs", json={"name": "g1", "vms": ["vm1"], "peer": beta["site_id"],
                                     "settings": {"checkpoint_interval_seconds": 1}}), 202)
    wait_task(ca, task)
    assert protecting(ca, "g1")

    # a VPG over a volume whose backing file is missing is refused, and leaves nothing
    ok(ca.post("/vms", json={"name": "vm2", "volumes": [
        {"name": "d", "size": MiB, "path": str(tmp_path / "missing.img")}]}), 201)
    bad = ca.post("/vpgs", json={"name": "g2", "vms": ["vm2"], "peer": beta["site_id"]})
    assert bad.status_code in (404, 422), bad.text
    assert ca.get("/vpgs/g2").status_code == 404
    assert not (tmp_path / "a" / "protected" / "g2").exists()

    export = f"{a.nbd}/g1/vm1/disk0"
    qemu_io(export, "write -P 0xab 0 1M")
    t1 = ok(ca.post("/vpgs/g1/checkpoints", json={"tag": "t1"}), 201)
    assert wait_for("t1 at the recovery site", lambda: tagged(cb, "g1", "t1"))[0]["id"] == t1["id"]
    recovery = ok(cb.get("/vpgs/g1"))
    assert recovery["role"] == "recovery" and recovery["peer"] == alpha["site_id"]

    # and b protects a VPG of its own to a: one process, both roles
    disk_b = tmp_path / "diskb.img"
    with open(disk_b, "wb") as f:
        f.truncate(DISK)
    ok(cb.post("/vms", json={"name": "vmb", "volumes": [
        {"name": "disk0", "size": DISK, "path": str(disk_b)}]}), 201)
    wait_task(cb, ok(cb.post("/vpgs", json={"name": "h1", "vms": ["vmb"],
                                            "peer": alpha["site_id"]}), 202))
    qemu_io(f"{b.nbd}/h1/vmb/disk0", "write -P 0x77 0 64k")
    h1 = ok(cb.post("/vpgs/h1/checkpoints", json={"tag": "from-b"}), 201)
    wait_for("b's checkpoint at a", lambda: tagged(ca, "h1", "from-b"))
    qemu_io(f"{a.nbd}/h1/vmb/disk0@{h1['id']}", "read -P 0x77 0 64k", readonly=True)

    # the recovery site crashes and comes back: checkpoint listed, view reads the data
    b.kill()
    b.start()
    cb = b.client()
    assert [c["id"] for c in tagged(cb, "g1", "t1")] == [t1["id"]]
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t1['id']}", "read -P 0xab 0 1M", readonly=True)
    # ... and replication resumes into it
    qemu_io(export, "write -P 0xcd 1M 1M")
    t2 = tag_when_streaming(ca, "g1", "t2")
    wait_for("t2 at the recovery site", lambda: tagged(cb, "g1", "t2"))

    # the protected site crashes and comes back: the VPG resumes from its state
    a.kill()
    a.start()
    ca = a.client()
    assert ok(ca.get("/vpgs/g1"))["role"] == "protected"
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xef 2M 1M")
    t3 = tag_when_streaming(ca, "g1", "t3")
    wait_for("t3 at the recovery site", lambda: tagged(cb, "g1", "t3"), timeout=60)
    view = f"{b.nbd}/g1/vm1/disk0@{t3['id']}"
    for pattern, offset in (("0xab", "0"), ("0xcd", "1M"), ("0xef", "2M")):
        qemu_io(view, f"read -P {pattern} {offset} 1M", readonly=True)
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t2['id']}", "read -P 0 2M 1M", readonly=True)
    wait_for("the protected VPG protecting again", lambda: protecting(ca, "g1"), timeout=60)

    status = ok(cb.get("/vpgs/g1/status"))
    assert status["latest_checkpoint"] is not None and status["journal_bytes"] > 0
    # the protected side reports its link's adaptive compression: what it seals with now
    # and what the patterned (very compressible) writes since its restart saved
    protected = ok(ca.get("/vpgs/g1/status"))
    assert protected["compression"] in ("lz4", "none", "zstd-1", "zstd-3", "zstd-6"), protected
    assert protected["compression_use"]["lz4"]["bundles"] > 0, protected
    assert protected["compression_bytes_saved"] > 512 * 1024, protected
    events = ok(cb.get("/events"))["items"]
    assert any(e["code"] == "vpg_attached" for e in events)
    metrics = httpx.get(a.api_url + "/metrics", headers={"Authorization": f"Bearer {a.token}"})
    assert metrics.status_code == 200 and "zcore_nbd_connections" in metrics.text
    assert httpx.get(a.api_url + "/metrics").status_code == 401
    history = ok(cb.get("/metrics/history", params={"series": "journal_bytes", "vpg": "g1"}))
    assert history["series"] == "journal_bytes" and history["points"]  # sampled at start
    text = metrics.text
    assert 'zcore_vpg_rpo_seconds{role="protected",vpg="g1"}' in text, text
    # pause, resume, a forced sync, then delete at both sites
    assert ok(ca.post("/vpgs/g1/pause"))["state"] == "paused"
    assert ca.post("/vpgs/g1/checkpoints", json={"tag": "no"}).status_code == 409
    assert ok(ca.post("/vpgs/g1/resume"))["state"] == "protecting"
    wait_task(ca, ok(ca.post("/vpgs/g1/sync"), 202))
    assert cb.delete("/vpgs/g1").status_code == 409  # still replicating into b
    wait_task(ca, ok(ca.delete("/vpgs/g1"), 202))
    wait_for("b's VPG deletable", lambda: cb.delete("/vpgs/g1").status_code == 202)
    wait_for("b's VPG gone", lambda: cb.get("/vpgs/g1").status_code == 404)
    assert not (tmp_path / "b" / "vpgs" / "g1").exists()
    assert disk.stat().st_size == DISK  # the protected volume itself stays
    # the service raised its descriptor limit to the hard one
    assert a.proc is not None
    limits = Path(f"/proc/{a.proc.pid}/limits").read_text().splitlines()
    soft, hard = next(line for line in limits if "open files" in line).split()[3:5]
    assert soft == hard
    # a clean stop of both
    assert a.stop() == 0
    assert b.stop() == 0
    logged = [json.loads(line) for line in b.log.read_text().splitlines()]  # --log-json
    assert any(doc["message"].startswith("site beta serving") for doc in logged)


def test_init_refuses_an_existing_site_and_keeps_the_token_private(tmp_path: Path) -> None:
    out = init_site_dir(tmp_path / "s", "sigma")
    record = read_client(SiteDir(tmp_path / "s"))
    assert record.token in out
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "client.json").st_mode) == 0o600
    again = subprocess.run(zcore_cmd("site", "init", str(tmp_path / "s"), "--name", "x"),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "site directory" in again.stderr
    assert read_client(SiteDir(tmp_path / "s")) == record


def test_failed_init_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "bad"
    done = subprocess.run(
        zcore_cmd("site", "init", str(target), "--name", "x",
                  "--db", "postgresql://nobody@127.0.0.1:1/none"),
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert not target.exists()


def test_a_clean_restart_keeps_a_paused_vpg_paused_and_resumes_from_its_bitmaps(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    ca, cb = a.client(), b.client()
    token = ok(cb.post("/pairing/tokens"))["token"]
    beta = ok(ca.post("/pairing", json={"address": b.replication, "token": token}))
    disk = tmp_path / "disk0.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
    ok(ca.post("/vms", json={"name": "vm1", "volumes": [
        {"name": "disk0", "size": DISK, "path": str(disk)}]}), 201)
    wait_task(ca, ok(ca.post("/vpgs", json={"name": "g1", "vms": ["vm1"],
                                            "peer": beta["site_id"]}), 202))
    ok(ca.post("/vpgs/g1/pause"))
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0x5a 4M 1M")
    assert a.stop() == 0
    a.start()
    ca = a.client()
    assert ok(ca.get("/vpgs/g1"))["state"] == "paused"
    ok(ca.post("/vpgs/g1/resume"))
    t1 = tag_when_streaming(ca, "g1", "after-restart")
    wait_for("the tag at the recovery site", lambda: tagged(cb, "g1", "after-restart"))
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t1['id']}", "read -P 0x5a 4M 1M", readonly=True)
    texts = [e["text"] for e in ok(ca.get("/events", params={"vpg": "g1"}))["items"]]
    assert not any("unclean shutdown" in t for t in texts), texts


def test_a_site_on_postgresql_keeps_its_state_across_kill_9(tmp_path: Path, pg_url: str) -> None:
    root = tmp_path / "pg"
    done = subprocess.run(zcore_cmd("site", "init", str(root), "--name", "pgsite",
                                    "--db", pg_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (root / "site.db").exists()
    site = SiteProcess(root)
    try:
        c = site.start().client()
        ok(c.post("/vms", json={"name": "vm1", "volumes": [{"name": "d", "size": MiB}]}), 201)
        site.kill()
        c = site.start().client()
        assert [vm["name"] for vm in ok(c.get("/vms"))["items"]] == ["vm1"]
        assert ok(c.get("/sites"))["site"]["name"] == "pgsite"
        assert site.stop() == 0
    finally:
        site.close()
