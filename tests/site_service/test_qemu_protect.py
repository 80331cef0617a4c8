"""Protection in the hypervisor through two real site services (issue 15): a
qemu-storage-daemon's block node added to site A's inventory as a `qemu:` volume,
protected to site B through the REST API while a guest (qemu-io through the daemon's
own NBD export) writes; B's tagged checkpoints are read over B's NBD server and compared
with a model of what the guest wrote.  Then a kill -9 of site A while the guest writes:
the guest's writes go on succeeding (the mirror's target error ends the job, QEMU's dirty
bitmaps record them), site A restarts, restarts the mirror and resends what the bitmaps
name (said in the events: no compare, no full resync), and the next checkpoint is exact.
Likewise after a clean stop of site A, a mirror ended in QEMU behind the site's back and
a restart of QEMU itself (qcow2: persistent bitmaps); deleting the VPG leaves nothing of
zcore's in QEMU.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import require_tool
from helpers.failover import pair, tag, wait_task
from helpers.qsd import Guest, QemuStorageDaemon, close_daemon
from helpers.site import SiteProcess, ok, two_sites, wait_for

from zcore.hypervisor import QemuAddress
from zcore.nbd.client import NBDClient

MiB = 1 << 20
SIZE = 16 * MiB
GRANULE = 64 << 10  # zcore.hypervisor.QemuDisk's bitmap granularity


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[QemuStorageDaemon]:
    require_tool("qemu-storage-daemon")
    require_tool("qemu-io")
    d = QemuStorageDaemon(tmp_path / "qsd", tmp_path / "disk.qcow2", fmt="qcow2",
                          size=SIZE, export="guest")
    yield d
    close_daemon(d)


def granules(writes: list[tuple[int, int]]) -> int:
    """The bytes QEMU's dirty bitmaps (64 KiB granules) mark for `writes`."""
    return GRANULE * len({g for offset, length in writes
                          for g in range(offset // GRANULE, (offset + length - 1) // GRANULE + 1)})


def generations(daemon: QemuStorageDaemon) -> list[int]:
    """The numbers of zcore's dirty bitmap generations on the daemon's node."""
    prefix = QemuAddress.prefix_for("g1", "vm1", "disk0") + "."
    [node] = [n for n in daemon.qmp("query-named-block-nodes", flat=True)
              if n["node-name"] == daemon.node]
    # the mirror job's own bitmap has no name
    names = [str(b.get("name", "")) for b in node.get("dirty-bitmaps", ())]
    return sorted(int(n.removeprefix(prefix)) for n in names if n.startswith(prefix))


def checkpoint_image(b: SiteProcess, checkpoint: int) -> bytes:
    """The VM's disk at `checkpoint`, read from B's read-only NBD view of it."""
    host, _, port = b.nbd.removeprefix("nbd://").rpartition(":")
    with NBDClient.connect_tcp(host, int(port), f"g1/vm1/disk0@{checkpoint}") as client:
        return client.read(0, SIZE)


def vpg_events(client: httpx.Client, after: int = 0) -> list[dict[str, Any]]:
    """The VPG's events with an id above `after`, oldest first."""
    items: list[dict[str, Any]] = ok(client.get("/events", params={"vpg": "g1",
                                                                   "limit": 500}))["items"]
    return sorted((e for e in items if e["id"] > after), key=lambda e: e["id"])


def texts(events: list[dict[str, Any]]) -> str:
    return "\n".join(e["text"] for e in events)


def protect(a: SiteProcess, b: SiteProcess, daemon: QemuStorageDaemon,
            sockets: tuple[Path, Path] | None = None) -> tuple[httpx.Client, httpx.Client]:
    """VM vm1 at A, its disk0 the daemon's node, protected to B as VPG g1 (A and B's
    clients, once the initial sync is done and the mirror runs).  `sockets`: the QMP
    and NBD sockets the inventory names, the daemon's own by default."""
    ca, cb = a.client(), b.client()
    beta = pair(a, b)
    qmp, nbd = sockets or (daemon.qmp_path, daemon.nbd_path)
    vm = ok(ca.post("/vms", json={"name": "vm1", "volumes": [  # its size is QEMU's
        {"name": "disk0", "qmp": str(qmp), "node": daemon.node, "nbd": str(nbd)}]}), 201)
    assert vm["volumes"][0]["size"] == SIZE
    assert vm["volumes"][0]["path"] == f"qemu:{qmp}?node={daemon.node}&nbd={nbd}"
    wait_task(ca, ok(ca.post("/vpgs", json={
        "name": "g1", "vms": ["vm1"], "peer": beta["site_id"],
        "settings": {"checkpoint_interval_seconds": 1}}), 202))
    assert mirror(daemon)["status"] == "ready"
    disks = ok(ca.get("/vpgs/g1/status"))["hypervisor_disks"]
    assert [(d["volume"], d["node"], d["state"]) for d in disks] == [
        ("disk0", daemon.node, "mirroring")], disks
    return ca, cb


def mirror(daemon: QemuStorageDaemon) -> dict[str, Any]:
    """The daemon's one block job: zcore's mirror."""
    [job] = daemon.qmp("query-block-jobs")
    assert job["type"] == "mirror", job
    return job


def guest_image(daemon: QemuStorageDaemon) -> bytes:
    with NBDClient.connect_unix(daemon.nbd_path, daemon.export) as client:
        return client.read(0, SIZE)


class Fio:
    """A guest writing 4 KiB-64 KiB random blocks through the daemon until `stop`."""

    def __init__(self, daemon: QemuStorageDaemon, out: Path, seed: int) -> None:
        self.out = out
        with open(out, "wb") as f:
            self.proc = subprocess.Popen(
                [require_tool("fio"), "--name=guest", "--ioengine=nbd",
                 f"--uri={daemon.nbd_uri}", "--rw=randwrite", "--bsrange=4k-64k",
                 "--iodepth=4", f"--size={SIZE}", "--time_based", "--runtime=120",
                 f"--randseed={seed}", "--refill_buffers", "--norandommap"],
                stdout=f, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """Stop it (SIGINT: its in-flight writes complete first); its report must say
        that no write failed."""
        assert self.proc.poll() is None, self.out.read_text()  # it wrote throughout
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        report = self.out.read_text()
        assert "err= 0" in report, report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_a_qemu_node_protected_through_the_site_survives_a_kill_of_the_site(
        tmp_path: Path, daemon: QemuStorageDaemon) -> None:
    guest = Guest(daemon, SIZE, seed=15)
    guest.write(6)  # before protection: the initial sync reads it from QEMU
    with two_sites(tmp_path) as (a, b):
        ca, cb = protect(a, b, daemon)

        guest.write(20)  # mirrored: each write reaches site A before qemu-io sees it done
        assert checkpoint_image(b, tag(ca, cb, "mirrored")) == guest.image()
        # clear-on-ack: a new bitmap generation (every 10 s while streaming), the older
        # one dropped once B holds every write it recorded
        assert generations(daemon) == [1]
        wait_for("the first bitmap generation dropped", lambda: (g := generations(daemon))
                 and g[0] > 1 and g, timeout=20, interval=0.2)
        released = guest.count  # QEMU's bitmaps record no write before this one

        # site A dies while the guest writes: every write still completes
        before = vpg_events(ca)[-1]["id"]
        writer = threading.Thread(target=guest.write, args=(25,))
        writer.start()
        wait_for("writes under way", lambda: guest.count > released + 4, timeout=20,
                 interval=0.02)
        a.kill()
        at_kill = guest.count
        writer.join(60)
        assert not writer.is_alive()
        assert guest.count == released + 25 and at_kill < guest.count, (at_kill, guest.count)
        # ended by its target's error: QEMU's job notices the failed forward on its next
        # pass (about every 100 ms), after the guest's write completed
        wait_for("the mirror ended by its target's error",
                 lambda: mirror(daemon)["status"] == "concluded", timeout=10, interval=0.05)
        guest.write(5)

        a.start()
        ca = a.client()
        wait_for("the bitmap sync after the restart", lambda: "complete: consistent "
                 "checkpoint emitted" in texts(vpg_events(ca, before)), timeout=30)
        assert checkpoint_image(b, tag(ca, cb, "after the kill")) == guest.image()
        # one bitmap sync, of what QEMU's bitmaps name (read after the mirror started):
        # every write since the kill, nothing before the generation dropped, no compare
        # with B's journals, no full resync
        said = texts(vpg_events(ca, before))
        named = [int(n) for n in re.findall(r"dirty bitmaps name (\d+) bytes", said)]
        synced = [int(n) for n in re.findall(r"bitmap syncing of (\d+) bytes started", said)]
        assert named and synced == named[-1:], said
        since_kill, since_release = guest.writes[at_kill:], guest.writes[released:]
        assert granules(since_kill) <= synced[0] <= granules(since_release), (
            granules(since_kill), granules(since_release), said)
        for full in ("compared", "every block", "initial sync", "delta sync"):
            assert full not in said, said
        assert mirror(daemon)["status"] == "ready"

        guest.write(5)  # mirrored again
        assert checkpoint_image(b, tag(ca, cb, "mirrored again")) == guest.image()


def test_a_guest_writing_throughout_protection_and_a_kill_is_captured_exactly(
        tmp_path: Path, daemon: QemuStorageDaemon) -> None:
    """fio writes while the VPG is created (its initial sync reads QEMU's disk under the
    guest's writes) and while site A is killed and restarted: B's checkpoint after it is
    the guest's disk."""
    require_tool("fio")
    with two_sites(tmp_path) as (a, b):
        guest = Fio(daemon, tmp_path / "fio.out", seed=3)
        try:
            ca, cb = protect(a, b, daemon)
            before = vpg_events(ca)[-1]["id"]
            time.sleep(0.5)
            a.kill()
            time.sleep(0.5)  # the guest writes on into QEMU's bitmaps only
            a.start()
            ca = a.client()
            wait_for("the mirror again", lambda: mirror(daemon)["status"] == "ready",
                     timeout=20)
            time.sleep(0.5)  # mirrored again
            guest.stop()
        finally:
            guest.kill()
        assert checkpoint_image(b, tag(ca, cb, "after the guest")) == guest_image(daemon)
        said = texts(vpg_events(ca, before))
        assert "after an unclean shutdown, the hypervisor's dirty bitmaps name" in said, said
        assert "compared" not in said and "every block" not in said, said
        assert "failed" not in said, said  # a write racing a sync's start is no failure


def test_a_clean_stop_and_a_mirror_ended_under_the_site_resend_what_the_bitmaps_name(
        tmp_path: Path, daemon: QemuStorageDaemon) -> None:
    """A SIGTERM of site A (its mirrors stopped, the VPG's bitmaps kept) while the guest
    writes on; then the mirror job cancelled in QEMU behind site A's back: its watch
    restarts it and the bitmap sync resends what was written meanwhile; then the VPG
    deleted."""
    guest = Guest(daemon, SIZE, seed=5)
    with two_sites(tmp_path) as (a, b):
        ca, cb = protect(a, b, daemon)
        guest.write(5)
        before = vpg_events(ca)[-1]["id"]
        assert a.stop() == 0
        assert daemon.qmp("query-block-jobs") == []  # a clean stop ends the mirror
        guest.write(5)
        a.start()
        ca = a.client()
        wait_for("the bitmap sync after the stop", lambda: "complete: consistent "
                 "checkpoint emitted" in texts(vpg_events(ca, before)), timeout=30)
        assert checkpoint_image(b, tag(ca, cb, "after the stop")) == guest.image()
        said = texts(vpg_events(ca, before))
        assert "after a clean stop, the hypervisor's dirty bitmaps name" in said, said
        assert "compared" not in said and "every block" not in said, said

        before = vpg_events(ca)[-1]["id"]
        daemon.qmp("block-job-cancel", device=mirror(daemon)["device"], force=True)
        guest.write(5)
        wait_for("the mirror restarted", lambda: "restarted" in texts(vpg_events(ca, before))
                 and mirror(daemon)["status"] == "ready", timeout=20)
        guest.write(3)
        assert checkpoint_image(b, tag(ca, cb, "after the mirror's end")) == guest.image()
        said = texts(vpg_events(ca, before))
        assert "the mirror of node disk0 ended" in said, said
        assert "dirty bitmaps name" in said and "every block" not in said, said

        # deleting the VPG leaves nothing of zcore's in QEMU (its bitmaps are persistent)
        assert generations(daemon) != []
        wait_task(ca, ok(ca.delete("/vpgs/g1"), 202))
        assert daemon.qmp("query-block-jobs") == [] and generations(daemon) == []
        assert [e["id"] for e in daemon.qmp("query-block-exports")] == ["guest-export"]
        assert [n["node-name"] for n in daemon.qmp("query-named-block-nodes", flat=True)
                ] == [daemon.node, f"{daemon.node}-file"]


def test_a_restart_of_qemu_resends_what_its_persistent_bitmaps_name(
        tmp_path: Path, daemon: QemuStorageDaemon) -> None:
    """The hypervisor stops cleanly (qcow2 keeps zcore's bitmaps in the image) and
    starts again on the same image and sockets: site A's watch finds it, starts the
    mirror again and resends what the bitmaps name; no full resync.  Then it is killed
    (its persistent bitmaps come back inconsistent): every block is resent."""
    vm = tmp_path / "vm"
    vm.mkdir()
    qmp, nbd = vm / "qmp.sock", vm / "nbd.sock"  # where the VM's sockets are: links here
    qmp.symlink_to(daemon.qmp_path)
    nbd.symlink_to(daemon.nbd_path)
    guest = Guest(daemon, SIZE, seed=9)
    running = [daemon]

    def restart(ca: httpx.Client, *, kill: bool) -> str:
        """QEMU stopped (or killed) and started again on its image, the guest writing
        before the mirror is back; the events since, once the bitmap sync is done."""
        before = vpg_events(ca)[-1]["id"]
        old = running[-1]
        old.kill() if kill else old.close()
        new = QemuStorageDaemon(tmp_path / f"qsd-{len(running)}", old.image, fmt="qcow2",
                                export="guest")
        running.append(new)
        for link, target in ((qmp, new.qmp_path), (nbd, new.nbd_path)):
            link.unlink()
            link.symlink_to(target)
        guest.daemon = new
        guest.write(5)  # before the mirror is back: in the bitmaps only
        wait_for("the mirror on the restarted QEMU", lambda: new.qmp("query-block-jobs")
                 and mirror(new)["status"] == "ready", timeout=20)
        wait_for("the bitmap sync", lambda: "complete: consistent checkpoint emitted"
                 in texts(vpg_events(ca, before)), timeout=30)
        return texts(vpg_events(ca, before))

    with two_sites(tmp_path) as (a, b):
        try:
            ca, cb = protect(a, b, daemon, (qmp, nbd))
            guest.write(5)
            assert checkpoint_image(b, tag(ca, cb, "before")) == guest.image()

            said = restart(ca, kill=False)
            guest.write(3)
            assert checkpoint_image(b, tag(ca, cb, "after a stop")) == guest.image()
            assert "restarted, the hypervisor's dirty bitmaps name" in said, said
            assert "gone" not in said and "every block" not in said, said
            assert "reading its source for the sync failed" not in said, said  # reconnected

            said = restart(ca, kill=True)
            guest.write(3)
            assert checkpoint_image(b, tag(ca, cb, "after a kill")) == guest.image()
            assert "its source's dirty bitmap is gone" in said, said
            # a compare over a new replication session; only what differs is resent
            assert "compared with the recovery site's journals" in said, said
            assert "every block" not in said and f"compared {SIZE} bytes" in said, said

            # site A dies and comes back while QEMU is down: the VPG starts anyway (its
            # disk probed later), waits, and once QEMU is back compares, resends no block
            before = vpg_events(ca)[-1]["id"]
            a.kill()
            running[-1].close()
            a.start()
            ca = a.client()
            wait_for("the VPG running without its QEMU", lambda: "cannot start" in texts(
                vpg_events(ca, before)), timeout=30)
            assert ok(ca.get("/vpgs/g1"))["state"] != "error"
            disks = ok(ca.get("/vpgs/g1/status"))["hypervisor_disks"]
            assert [d["state"] for d in disks] == ["tracking"] and disks[0]["error"], disks
            restart(ca, kill=False)
            guest.write(3)
            assert checkpoint_image(b, tag(ca, cb, "after QEMU was away")) == guest.image()
            said = texts(vpg_events(ca, before))
            assert "its source cannot be asked what changed" in said, said
            assert "every block" not in said and f"compared {SIZE} bytes" in said, said
        finally:
            for d in running[1:]:
                close_daemon(d)
