"""Move, reverse protection and failback through two real site services: a planned move
loses nothing written before it, the reversed VPG replicates back with a delta sync that
sends about what differs, and a failback leaves the VPG protected from its first site on
its original disk, byte-identical to what was written at the other site.  Also the
refusals: each operation in a state that does not allow it answers 409 with the reason."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import require_tool
from helpers.cli import zcore_cmd
from helpers.failover import DISK, MiB, pair, protect, qemu_io, tag, wait_task
from helpers.site import SiteProcess, ok, two_sites, wait_for


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    require_tool("qemu-io")
    require_tool("qemu-img")
    with two_sites(tmp_path) as pair:
        yield pair


def vpg(client: httpx.Client) -> dict:
    found: dict = ok(client.get("/vpgs/g1"))
    return found


def same_bytes(image: Path, expect: bytes, tmp_path: Path) -> None:
    (tmp_path / "expect.img").write_bytes(expect)
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
                           str(tmp_path / "expect.img")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def cli(site: SiteProcess, *args: str) -> str:
    done = subprocess.run(zcore_cmd(*args, "--site", site.api_url, "--token", site.token),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_move_reverse_and_failback_end_where_they_began_with_nothing_lost(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    disk = tmp_path / "disk0.img"
    ca, cb = protect(a, b, disk)
    pair(b, a)  # B learns A's address: it protects back to A after the move
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xab 0 1M")
    t1 = tag(ca, cb, "t1")

    # refusals, each with the reason
    for client, path, why in ((cb, "/vpgs/g1/move", "recovery VPG"),
                              (cb, "/vpgs/g1/reverse", "reverse is not allowed"),
                              (ca, "/vpgs/g1/failback", "not protected here by reverse"),
                              (ca, "/vpgs/g1/reverse", "protected at this site")):
        refused = client.post(path)
        assert refused.status_code == 409 and why in refused.text, (path, refused.text)

    # the last write before the move is acknowledged and not yet checkpointed
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xcd 2M 64k")
    moved = wait_task(ca, ok(ca.post("/vpgs/g1/move"), 202), timeout=180)["result"]
    assert moved["reversed"] and moved["checkpoint_id"] > t1, moved
    assert vpg(ca)["role"] == "recovery" and not disk.exists()
    wait_for("B protecting g1", lambda: vpg(cb)["role"] == "protected"
             and vpg(cb)["state"] == "protecting", timeout=120)
    # the moved volume is served by B, read-write and captured; nothing was lost
    served = f"{b.nbd}/g1/vm1/disk0"
    qemu_io(served, "read -P 0xab 0 1M", "read -P 0xcd 2M 64k", "read -P 0 3M 1M")
    events = str(ok(cb.get("/events", params={"vpg": "g1"})))
    assert "delta sync" in events, events
    qemu_io(served, "write -P 0x5a 8M 1M")
    tag(cb, ca, "t2")  # B protects to A now: A lists B's checkpoints

    # failback from the command line: A protects g1 again, from its original disk
    cli(b, "failback", "g1")
    wait_for("A protecting g1 again", lambda: vpg(ca)["role"] == "protected"
             and vpg(ca)["state"] == "protecting", timeout=120)
    assert vpg(cb)["role"] == "recovery"
    expect = bytearray(DISK)
    expect[0:MiB] = b"\xab" * MiB
    expect[2 * MiB : 2 * MiB + 65536] = b"\xcd" * 65536
    expect[8 * MiB : 9 * MiB] = b"\x5a" * MiB
    same_bytes(disk, bytes(expect), tmp_path)
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "read -P 0x5a 8M 1M", "write -P 0x77 12M 64k")
    tag(ca, cb, "t3")  # and it replicates to B again
    kinds = {e["code"] for e in ok(ca.get("/events", params={"vpg": "g1"}))["items"]}
    assert {"vpg_moved", "vpg_reversed"} <= kinds, kinds


def test_failover_with_a_force_shutdown_stops_the_protected_side_until_it_is_resumed(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    ca, cb = protect(a, b, tmp_path / "disk0.img")
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xab 0 1M")
    t1 = tag(ca, cb, "t1")
    wait_task(cb, ok(cb.post("/vpgs/g1/failover", json={
        "checkpoint": t1, "shutdown_policy": "force"}), 202))
    # the protected site heard of it: its volumes take no more writes, the VPG stopped
    wait_for("A stopped by the shutdown policy", lambda: vpg(ca)["state"] == "moved")
    gone = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k",
                           f"{a.nbd}/g1/vm1/disk0"], capture_output=True, text=True,
                          timeout=60)
    assert gone.returncode != 0 or "failed" in gone.stdout + gone.stderr
    events = str(ok(ca.get("/events", params={"vpg": "g1"})))
    assert f"to checkpoint {t1}; shutdown policy force" in events, events
    # rolled back at B, resumed at A: protected again from its saved bitmaps
    wait_task(cb, ok(cb.post("/vpgs/g1/failover/rollback"), 202))
    ok(ca.post("/vpgs/g1/resume"))
    assert vpg(ca)["state"] == "protecting"
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "read -P 0xab 0 1M", "write -P 0xcd 1M 64k")
    t2 = tag(ca, cb, "t2")
    qemu_io(f"{b.nbd}/g1/vm1/disk0@{t2}", "read -P 0xcd 1M 64k", readonly=True)
