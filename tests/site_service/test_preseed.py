"""A backup restored as the replicas of a new VPG (issue 13, "restore to a new VPG's
replicas"): site B preseeds VPG g2 from a backup of g1, site A creates g2 over the same
VM with `initial_sync: delta` (both from the command line), and its delta sync sends only
what changed since the backup's checkpoint; B's journal then serves A's disk byte for
byte.  Two real site
processes; refusals are 4xx with the reason."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from helpers.backup import FAST_N
from helpers.cli import zcore_cmd
from helpers.failover import DISK, MiB, protect, qemu_io, tag, wait_task
from helpers.site import SiteProcess, ok, two_sites, wait_for

from zcore.backup import Repository, Secret


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    with two_sites(tmp_path) as pair:
        yield pair


def cli(site: SiteProcess, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(zcore_cmd(*args, "--site", site.api_url, "--token", site.token),
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_backup_preseeds_a_new_vpg_whose_protection_sends_only_what_differs(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    a, b = sites
    disk = tmp_path / "disk0.img"
    disk.write_bytes(os.urandom(DISK // 2) + bytes(DISK // 2))
    ca, cb = protect(a, b, disk)
    cid = tag(ca, cb, "preseed-me")
    repo = tmp_path / "repo"
    Repository.init(repo, Secret(passphrase="pw"), chunk_size=1 << 16, scrypt_n=FAST_N)
    ref = {"repository": str(repo), "passphrase": "pw"}
    backup = wait_task(cb, ok(cb.post("/vpgs/g1/backups", json=ref | {"checkpoint": cid}),
                              202))["result"]["backup"]
    alpha = next(p for p in ok(cb.get("/sites"))["peers"] if p["name"] == "alpha")

    # g1 goes (its journals at B stay until deleted there); the VM lives on at A
    wait_task(ca, ok(ca.delete("/vpgs/g1"), 202))
    for body, why in ((ref | {"vpg": "g2", "peer": "not-a-site"}, "not paired"),
                      (ref | {"vpg": "g1", "peer": alpha["site_id"]}, "exists"),
                      (ref | {"vpg": "../../b", "peer": alpha["site_id"]}, "not allowed")):
        refused = cb.post(f"/backups/{backup}/preseed", json=body)
        assert refused.status_code in (400, 409, 422) and why in refused.text, refused.text
    # from the command line, the peer by name (the passphrase from this shell's variable)
    done = json.loads(cli(b, "backup", "site", "preseed", str(repo), backup, "g2", "--peer",
                          "alpha", "--json", env={"ZCORE_BACKUP_PASSPHRASE": "pw"}))
    assert done["state"] == "succeeded", done
    assert done["result"]["volumes"] == ["vm1/disk0"] and \
        done["result"]["owner"] == alpha["site_id"], done

    # A changes the disk a little meanwhile, then protects it again, as g2, from the seed
    for i in range(4):
        with open(disk, "r+b") as f:
            f.seek(i * 3 * MiB)
            f.write(os.urandom(64 << 10))
    cli(a, "vpg", "create", "g2", "--vm", "vm1", "--peer", "beta", "--initial-sync", "delta",
        "--checkpoint-interval", "1s")
    def delta_said() -> str | None:
        events = ok(ca.get("/events", params={"vpg": "g2"}))["items"]
        return next((e["text"] for e in events if "bytes differed" in e["text"]), None)

    said = wait_for("the delta sync's event", delta_said)
    print(f"preseeded g2: {said}")
    differed, sent = int(said.split(" bytes differed")[0].split()[-1]), \
        int(said.split(" sent in")[0].split()[-1])
    assert 0 < differed <= 4 * (64 << 10) and sent < DISK // 8, said  # not the whole disk

    qemu_io(f"{a.nbd}/g2/vm1/disk0", "write -P 0x3c 9M 64k")
    last = tag(ca, cb, "after", vpg="g2")
    view = f"{b.nbd}/g2/vm1/disk0@{last}"
    got = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", view, str(disk)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    wait_for("g2 protecting", lambda: ok(ca.get("/vpgs/g2"))["state"] == "protecting")
