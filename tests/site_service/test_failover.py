"""Live failover through the REST API of two real site services: fail over to a tagged
checkpoint, read and write the recovered volume over NBD, kill -9 of the recovery site
(flushed writes kept), rollback (history kept, a second failover to a later checkpoint),
commit (replica = recovered image, history after the checkpoint gone, plain exports);
and a failover whose VM's start script fails (the task fails, the failover stays served
with the error in its status, the rollback stops the VMs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import require_tool
from helpers.failover import DISK, MiB, protect, qemu_io, tag, wait_task
from helpers.site import SiteProcess, ok, two_sites, wait_for


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    require_tool("qemu-io")
    require_tool("qemu-img")
    with two_sites(tmp_path, "--log-json") as pair:
        yield pair


def test_failover_commit_rollback_and_a_recovery_site_crash_through_the_api(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    a, b = sites
    ca, cb = protect(a, b, tmp_path / "disk0.img")
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xab 0 1M")
    t1 = tag(ca, cb, "t1")
    qemu_io(f"{a.nbd}/g1/vm1/disk0", "write -P 0xcd 0 512k")
    t2 = tag(ca, cb, "t2")

    refused = cb.post("/vpgs/g1/failover/commit")
    assert refused.status_code == 409 and "no recovery operation running" in refused.text
    assert ca.post("/vpgs/g1/failover", json={}).status_code == 409  # the protected side

    # a rollback policy of 0 minutes acts at once
    ok(cb.post("/vpgs/g1/failover", json={"checkpoint": t1, "commit_policy": "rollback",
                                          "commit_after_minutes": 0}), 202)
    wait_for("the automatic rollback",
             lambda: ok(cb.get("/vpgs/g1/failover"))["state"] is None and "rolled back" in
             str(ok(cb.get("/events", params={"vpg": "g1"}))), timeout=30)
    bad = cb.post("/vpgs/g1/failover", json={"commit_policy": "commit"})
    assert bad.status_code == 422 and "commit_after_minutes" in bad.text, bad.text

    task = ok(cb.post("/vpgs/g1/failover", json={"checkpoint": t1}), 202)
    again = cb.post("/vpgs/g1/failover", json={"checkpoint": t1})
    assert again.status_code == 409, again.text
    wait_task(cb, task)
    status = ok(cb.get("/vpgs/g1/failover"))
    assert status["state"] == "failed_over" and status["checkpoint_id"] == t1
    assert status["exports"] == ["failover/g1/vm1/disk0"]
    served = f"{b.nbd}/failover/g1/vm1/disk0"
    qemu_io(served, "read -P 0xab 0 1M", "read -P 0 1M 1M")
    qemu_io(served, "write -P 0x11 2M 64k", "flush")

    # the recovery site crashes: the flushed write is there after the restart
    b.kill()
    b.start()
    cb = b.client()
    assert ok(cb.get("/vpgs/g1/failover"))["state"] == "failed_over"
    qemu_io(served, "read -P 0xab 0 1M", "read -P 0x11 2M 64k")
    wait_for("the ATTACH refused with its reason",
             lambda: "failed over at its recovery site" in b.log.read_text(), timeout=30)

    # rollback: the overlay goes, t1 and t2 stay, a failover to t2 works
    wait_task(cb, ok(cb.post("/vpgs/g1/failover/rollback"), 202))
    assert ok(cb.get("/vpgs/g1/failover"))["state"] is None
    ids = [c["id"] for c in ok(cb.get("/vpgs/g1/checkpoints"))["items"]]
    assert t1 in ids and t2 in ids
    wait_task(cb, ok(cb.post("/vpgs/g1/failover", json={"checkpoint": "latest_tagged"}),
                     202))
    assert ok(cb.get("/vpgs/g1/failover"))["checkpoint_id"] == t2
    qemu_io(served, "read -P 0xcd 0 512k", "read -P 0xab 512k 512k", "read -P 0 2M 64k")
    qemu_io(served, "write -P 0x22 4M 64k", "flush")

    # commit: replica = the recovered image, no history after t2, plain exports
    wait_task(cb, ok(cb.post("/vpgs/g1/failover/commit"), 202))
    status = ok(cb.get("/vpgs/g1/failover"))
    assert status["state"] == "committed"
    assert status["exports"] == ["recovered/g1/vm1/disk0"]
    expect = bytearray(DISK)
    expect[0:MiB] = b"\xab" * MiB
    expect[0 : MiB // 2] = b"\xcd" * (MiB // 2)
    expect[4 * MiB : 4 * MiB + 65536] = b"\x22" * 65536
    (tmp_path / "expect.img").write_bytes(bytes(expect))
    [replica] = (tmp_path / "b").rglob("replica-0000.img")
    for image in (str(replica), f"{b.nbd}/recovered/g1/vm1/disk0"):
        done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", image,
                               str(tmp_path / "expect.img")], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    assert ok(cb.get("/vpgs/g1/checkpoints"))["items"] == []
    late = cb.post("/vpgs/g1/failover/rollback")
    assert late.status_code == 409 and "committed" in late.text
    kinds = [e["code"] for e in ok(cb.get("/events", params={"vpg": "g1"}))["items"]]
    assert {"failover_started", "failover_rolled_back", "failover_committed"} <= set(kinds)


def commanded(sites: tuple[SiteProcess, SiteProcess], tmp_path: Path,
              commands: dict[str, Any]) -> tuple[httpx.Client, int]:
    """VPG g1 protected from A to B with checkpoint t1 tagged, its recovered VMs run by
    the command adapter with `commands`; B's client and t1's id."""
    a, b = sites
    ca, cb = protect(a, b, tmp_path / "disk0.img")
    t1 = tag(ca, cb, "t1")
    ok(cb.patch("/vpgs/g1/recovery-settings", json={"adapter": "command", **commands}))
    return cb, t1


def test_failover_whose_vm_does_not_start_stays_started_with_the_error_and_rolls_back(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    b = sites[1]
    log = tmp_path / "vms.log"
    record = f"sh -c 'echo $ZCORE_PURPOSE $ZCORE_VM $ZCORE_NBD_DISK0 >> {log}'"
    cb, t1 = commanded(sites, tmp_path, {
        "start_command": "sh -c 'echo no hypervisor; exit 4'",
        "stop_command": record.replace("echo", "echo stop"),
        "pre_scripts": [f"sh -c 'echo pre $ZCORE_OPERATION $ZCORE_VPG $ZCORE_VMS >> {log}'"]})
    task = ok(cb.post("/vpgs/g1/failover", json={"checkpoint": t1}), 202)
    failed = wait_for("the start task", lambda: (t := ok(cb.get(f"/tasks/{task['id']}")))
                      ["state"] in ("failed", "succeeded") and t, timeout=60)
    assert failed["state"] == "failed", failed
    assert "exited with status 4" in failed["error"]["message"], failed
    # the failover stays: its exports are served, the error is in its status
    status = ok(cb.get("/vpgs/g1/failover"))
    assert status["state"] in ("promoting", "failed_over"), status
    assert status["exports"] == ["failover/g1/vm1/disk0"]
    assert status["vms"]["started"] == [] and "no hypervisor" in status["vms"]["error"]
    qemu_io(f"{b.nbd}/failover/g1/vm1/disk0", "read 0 4k")
    events = ok(cb.get("/events", params={"vpg": "g1"}))["items"]
    assert any(e["code"] == "failover_vms_failed" for e in events)

    # rollback stops the VPG's VMs first, then replicates again
    wait_task(cb, ok(cb.post("/vpgs/g1/failover/rollback"), 202))
    assert ok(cb.get("/vpgs/g1/failover"))["state"] is None
    uri = f"nbd://{b.nbd.split('://', 1)[1]}/failover/g1/vm1/disk0"
    assert log.read_text().splitlines() == ["pre failover g1 vm1", f"stop failover vm1 {uri}"]


def test_a_rollback_during_the_boot_waits_for_it_and_a_commit_at_once_boots_only_after_it(
        sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    log = tmp_path / "vms.log"
    cb, t1 = commanded(sites, tmp_path, {
        "start_command": f"sh -c 'echo begin $ZCORE_PURPOSE >> {log}; sleep 2; "
                         f"echo end $ZCORE_PURPOSE >> {log}'",
        "stop_command": f"sh -c 'echo stop $ZCORE_PURPOSE >> {log}'"})

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    # a rollback while the start's VM is booting: the rollback stops it once it has started
    # (a stop before the start ended left a VM running behind the rollback)
    start = ok(cb.post("/vpgs/g1/failover", json={"checkpoint": t1}), 202)
    wait_for("the boot", lambda: lines() == ["begin failover"], timeout=30)
    wait_task(cb, ok(cb.post("/vpgs/g1/failover/rollback"), 202))
    wait_task(cb, start)  # its boot stopped by the rollback is no failure
    assert lines() == ["begin failover", "end failover", "stop failover"]
    assert not [e for e in ok(cb.get("/events", params={"vpg": "g1"}))["items"]
                if e["code"] == "failover_vms_failed"]

    # committed at once (a move's failover): the VMs boot once, on the replicas, after the
    # commit's stop of any that ran (a boot on the failover exports raced the commit that
    # unexported them)
    log.unlink()
    wait_task(cb, ok(cb.post("/vpgs/g1/failover", json={
        "checkpoint": t1, "commit_policy": "commit", "commit_after_minutes": 0}), 202))
    status = wait_for("the commit and its boot", lambda: (s := ok(cb.get("/vpgs/g1/failover")))
                      ["state"] == "committed" and s["vms"] and s["vms"]["started"] and s,
                      timeout=60)
    assert status["vms"]["phase"] == "recovered", status
    assert lines() == ["stop failover", "begin recovered", "end recovered"]
