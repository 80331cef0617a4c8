"""A real VM recovered from ransomware through two real site services (issue 11).

A guest (Debian's cloud kernel, a busybox initramfs: tests/helpers/vm.py) boots under
QEMU on site A's NBD export of its protected disk, an ext4 filesystem, and writes its
files; a checkpoint is tagged and waited for at site B; the guest boots again and
"encrypts" them (overwrites them with random bytes), which replicates too.  Site B runs
a failover test at the tag (the VM boots on the test export, shows the files, and what it
writes is discarded at the stop), then fails the VPG over to the tag with the qemu
adapter: the recovered VM boots on B's failover export and its console shows the files as
they were before the encryption; it writes a file of its own; the commit stops it, folds
its writes into the replica and boots it again on the `recovered/...` export, where that
file is.  Then reverse protection (B protects the VPG back to A, whose disk becomes the
replica) and a failback: A protects it again from its original disk, byte-identical to
what the recovered VM wrote, and the guest booted there shows its files and the new one.
A second scenario boots the guest from a backup served for instant access (issue 13).

Bounded: every wait has a timeout and the whole scenario a budget (BUDGET_S); under TCG
each boot takes ~3 s.  In CI (CI=true) a missing tool or guest package fails the test
(.ci/run installs them); elsewhere it skips.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.site import SiteProcess, ok, wait_for
from helpers.vm import VMKit, make_ext4_image, read_ext4_file
from helpers.vmsite import BOOT_S, Budget, console_until, tag, wait_task

from zcore.adapters import QemuAdapter, VMState

pytestmark = pytest.mark.vm

MiB = 1 << 20
DISK = 32 * MiB
BUDGET_S = 600.0  # the whole scenario

FILES = {"ledger.txt": "quarterly figures: 42", "customers.txt": "alice bob carol"}

GUEST_WRITES = "".join(
    ["mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED\n", "mkdir -p /mnt/data\n",
     *(f"echo '{text}' > /mnt/data/{name}\n" for name, text in FILES.items()),
     "umount /mnt && sync && echo GUEST-WROTE\n"])

GUEST_ENCRYPTS = """\
mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED
for f in /mnt/data/*.txt; do dd if=/dev/urandom of=$f bs=64 count=1 2>/dev/null; done
umount /mnt && sync && echo GUEST-ENCRYPTED
"""

# the recovered VM: print every file, then leave one of its own (seen after the commit)
GUEST_PRINTS = """\
mount -t ext4 /dev/vda /mnt || echo GUEST-MOUNT-FAILED
for f in /mnt/data/*.txt; do echo "GUEST-FILE ${f##*/}: $(cat $f)"; done
[ -f /mnt/data/recovered.txt ] || echo 'written by the recovered VM' > /mnt/data/recovered.txt
umount /mnt && sync && echo GUEST-PRINTED
"""


def boot_at_a(kit: VMKit, script: str, uri: str, run_dir: Path, marker: str,
              budget: Budget) -> str:
    """Boot the guest with `script` on `uri` (the protected volume's export at A) and wait
    until it powered itself off; its console."""
    run_dir.mkdir(parents=True)
    adapter = QemuAdapter(run_dir, kit.qemu_config(script, run_dir))
    t0 = time.monotonic()
    adapter.start("vm1", [uri], None, timeout=budget.left(BOOT_S))
    try:
        console_until(adapter.console_path("vm1"), marker, budget)
        wait_for("the guest to power off", lambda: adapter.status("vm1") is VMState.STOPPED,
                 timeout=budget.left(60), interval=0.05)
    finally:
        adapter.stop("vm1", timeout=10)  # by now a no-op, unless the wait failed
    # read once it is off: the marker's read can come before the kit's "script exit" line
    console = adapter.console_path("vm1").read_text(errors="replace")
    print(f"guest {marker}: {time.monotonic() - t0:.1f} s from start to power-off")
    assert "GUEST-MOUNT-FAILED" not in console, console
    return console


def protect(a: SiteProcess, b: SiteProcess, disk: Path
            ) -> tuple[httpx.Client, httpx.Client, dict[str, Any]]:
    """Pair A with B and protect VM vm1 (its disk `disk`) in VPG g1; (A, B, the task)."""
    ca, cb = a.client(), b.client()
    token = ok(cb.post("/pairing/tokens"))["token"]
    beta = ok(ca.post("/pairing", json={"address": b.replication, "token": token}))
    ok(ca.post("/vms", json={"name": "vm1", "volumes": [
        {"name": "disk0", "size": DISK, "path": str(disk)}]}), 201)
    task = ok(ca.post("/vpgs", json={"name": "g1", "vms": ["vm1"], "peer": beta["site_id"],
                                     "settings": {"checkpoint_interval_seconds": 1}}), 202)
    return ca, cb, task


def test_ransomed_vm_fails_over_to_its_tag_boots_with_its_files_and_fails_back_home(
        kit: VMKit, sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    budget = Budget(BUDGET_S)
    a, b = sites
    disk = make_ext4_image(tmp_path / "vm1-disk0.img", {"README": b"zcore real-VM test\n"},
                           size_mib=DISK // MiB)
    ca, cb, task = protect(a, b, disk)
    wait_task(ca, task, budget)
    at_a = f"{a.nbd}/g1/vm1/disk0"

    console = boot_at_a(kit, GUEST_WRITES, at_a, tmp_path / "run-write", "GUEST-WROTE", budget)
    assert "ZCORE-KIT: script exit 0" in console, console
    assert read_ext4_file(disk, "/data/ledger.txt").decode() == FILES["ledger.txt"] + "\n"
    clean = tag(ca, cb, "before-ransomware", budget)

    boot_at_a(kit, GUEST_ENCRYPTS, at_a, tmp_path / "run-encrypt", "GUEST-ENCRYPTED", budget)
    assert read_ext4_file(disk, "/data/ledger.txt").decode(errors="replace") != \
        FILES["ledger.txt"] + "\n"  # the guest's disk at A is ransomed
    ransomed = tag(ca, cb, "after-ransomware", budget)  # B's latest is encrypted
    assert ransomed > clean

    ok(cb.patch("/vpgs/g1/recovery-settings", json={"adapter": "qemu", "qemu": {
        "kernel": str(kit.kernel), "initrd": str(kit.initrd), "memory_mib": 256,
        "append": kit.append(script=GUEST_PRINTS)}}))

    # a failover test at the clean tag first: the VM boots on the test export and shows
    # the files; what it writes there is discarded when the test stops
    began = wait_task(cb, ok(cb.post("/vpgs/g1/test", json={"checkpoint": f"id:{clean}"}),
                             202), budget)
    assert began["result"]["vms"] == ["vm1"], began
    console = console_until(b.root / "vms" / "test" / "g1" / "vm1" / "console.log",
                            "GUEST-PRINTED", budget)
    for name, text in FILES.items():
        assert f"GUEST-FILE {name}: {text}\n" in console, console
    wait_task(cb, ok(cb.post("/vpgs/g1/test/stop", json={"result": "passed"}), 202), budget)

    # fail over at B to the clean tag, the VM booted by the qemu adapter
    t0 = time.monotonic()
    started = wait_task(cb, ok(cb.post("/vpgs/g1/failover",
                                       json={"checkpoint": clean}), 202), budget)
    assert started["result"]["checkpoint_id"] == clean
    status = ok(cb.get("/vpgs/g1/failover"))
    assert status["exports"] == ["failover/g1/vm1/disk0"]
    assert status["vms"] == {"phase": "failover", "adapter": "qemu", "started": ["vm1"],
                             "error": None}, status
    console_log = b.root / "vms" / "failover" / "g1" / "vm1" / "console.log"
    console = console_until(console_log, "GUEST-PRINTED", budget)
    print(f"recovered VM printed its files {time.monotonic() - t0:.1f} s after the request")
    for name, text in FILES.items():
        assert f"GUEST-FILE {name}: {text}\n" in console, console
    assert "GUEST-FILE recovered.txt" not in console  # the test's write is gone

    # commit: the VM is stopped (it powered itself off already), the overlay folded into
    # the replica, and the VM booted again on the recovered export
    at_b = QemuAdapter(b.root / "vms" / "failover" / "g1")  # finds B's QEMU by its pid file
    wait_for("the recovered VM to power off", lambda: at_b.status("vm1") is VMState.STOPPED,
             timeout=budget.left(60))
    committed = wait_task(cb, ok(cb.post("/vpgs/g1/failover/commit"), 202), budget)
    assert committed["result"]["state"] == "committed"
    assert committed["result"]["exports"] == ["recovered/g1/vm1/disk0"]
    assert committed["result"]["vms"]["phase"] == "recovered"
    console = console_until(console_log, "GUEST-PRINTED", budget)
    assert "GUEST-FILE recovered.txt: written by the recovered VM" in console, console
    for name, text in FILES.items():
        assert f"GUEST-FILE {name}: {text}\n" in console, console

    # reverse protection: B protects g1 back to A (A's disk becomes its replica, a delta
    # sync sends what the recovered VM changed), then the failback moves it home
    wait_for("the recovered VM to power off", lambda: at_b.status("vm1") is VMState.STOPPED,
             timeout=budget.left(60))
    token = ok(ca.post("/pairing/tokens"))["token"]
    ok(cb.post("/pairing", json={"address": a.replication, "token": token}))  # B knows A
    reversed_ = wait_task(cb, ok(cb.post("/vpgs/g1/reverse"), 202), budget)
    assert not disk.exists(), reversed_  # A's disk is A's replica now, in its journal
    assert ok(ca.get("/vpgs/g1"))["role"] == "recovery"
    wait_for("the VM's reboot at B to power off", lambda: at_b.status("vm1")
             is VMState.STOPPED, timeout=budget.left(60))
    wait_task(cb, ok(cb.post("/vpgs/g1/failback"), 202), budget)
    wait_for("A protecting g1 again", lambda: ok(ca.get("/vpgs/g1"))["state"]
             == "protecting" and ok(ca.get("/vpgs/g1"))["role"] == "protected",
             timeout=budget.left(120))
    [replica_at_b] = (b.root / "vpgs" / "g1").rglob("replica-0000.img")
    assert disk.read_bytes() == replica_at_b.read_bytes()  # what the recovered VM wrote
    assert read_ext4_file(disk, "/data/recovered.txt").decode() == \
        "written by the recovered VM\n"
    console = boot_at_a(kit, GUEST_PRINTS, at_a, tmp_path / "run-home", "GUEST-PRINTED",
                        budget)
    assert "GUEST-FILE recovered.txt: written by the recovered VM" in console, console
    for name, text in FILES.items():
        assert f"GUEST-FILE {name}: {text}\n" in console, console


def test_a_vm_boots_from_a_backup_served_for_instant_access_and_writes_on_it(
        kit: VMKit, sites: tuple[SiteProcess, SiteProcess], tmp_path: Path) -> None:
    """Issue 13's instant access: site B backs the VPG up at a tag, then serves the backup
    writable on its NBD server; the guest boots on it, shows its files as they were at the
    tag and writes one of its own, which the scratch overlay keeps until the backup is
    unserved (the repository is only read: it still checks clean and serves the tag)."""
    from helpers.backup import FAST_N

    from zcore.backup import Repository, Secret

    budget = Budget(BUDGET_S)
    a, b = sites
    disk = make_ext4_image(tmp_path / "vm1-disk0.img", {
        f"data/{name}": f"{text}\n".encode() for name, text in FILES.items()},
        size_mib=DISK // MiB)
    ca, cb, task = protect(a, b, disk)
    wait_task(ca, task, budget)
    cid = tag(ca, cb, "backed-up", budget)
    repo = tmp_path / "repo"
    Repository.init(repo, Secret(passphrase="pw"), chunk_size=1 << 16, scrypt_n=FAST_N)
    ref = {"repository": str(repo), "passphrase": "pw"}
    done = wait_task(cb, ok(cb.post("/vpgs/g1/backups", json=ref | {"checkpoint": cid}),
                            202), budget)
    backup = done["result"]["backup"]
    served = ok(cb.post(f"/backups/{backup}/serve", json=ref | {"writable": True}), 201)
    assert [s["export"] for s in served] == [f"backup/{backup}/vm1/disk0"]

    console = boot_at_a(kit, GUEST_PRINTS, served[0]["uri"], tmp_path / "run-backup",
                        "GUEST-PRINTED", budget)
    for name, text in FILES.items():
        assert f"GUEST-FILE {name}: {text}\n" in console, console
    # the guest's own file is on the served disk until the backup is unserved
    assert "GUEST-FILE recovered.txt" not in console, console
    again = boot_at_a(kit, GUEST_PRINTS, served[0]["uri"], tmp_path / "run-backup-2",
                      "GUEST-PRINTED", budget)
    assert "GUEST-FILE recovered.txt: written by the recovered VM" in again, again
    ok(cb.delete(f"/backups/{backup}/serve"), 204)  # the guest's writes are discarded
    served = ok(cb.post(f"/backups/{backup}/serve", json=ref | {"writable": True}), 201)
    console = boot_at_a(kit, GUEST_PRINTS, served[0]["uri"], tmp_path / "run-backup-3",
                        "GUEST-PRINTED", budget)
    assert "GUEST-FILE recovered.txt" not in console, console
    ok(cb.delete(f"/backups/{backup}/serve"), 204)
    check = wait_task(cb, ok(cb.post("/backups/check", json=ref), 202), budget)
    assert check["result"]["ok"], check
