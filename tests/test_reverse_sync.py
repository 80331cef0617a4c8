"""Reverse protection's delta sync end to end over loopback TLS: the recovery site adopts
older copies of the volumes as its replicas (RecoverySite.adopt), the protected VPG
starts with `delta_sync=True`, and only the blocks that differ cross the link; writes
made meanwhile, restarts of the VPG mid-sync and refusals are covered."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import threading
import time
from pathlib import Path

import pytest
from helpers.replication import (
    KiB,
    MiB,
    catch_up,
    fast_timeouts,
    free_port,
    make_vpg,
    pair_sites,
    wait_until,
)

from zcore.errors import ConfigError, StateError
from zcore.fsutil import move_file
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.replication import ProtectedSite, RecoverySite, deltarecv
from zcore.vpg import VPG, VPGMode, VPGSettings

_names = itertools.count()
LAYOUT = {"vm1": [8 * MiB, 3 * MiB], "vm2": [5 * MiB]}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("rev")
    asyncio.run(pair_sites(root / "rs", root / "ps"))
    return root


def run(coro):
    async def main():
        with fast_timeouts():
            return await coro
    return asyncio.run(main())


def _random_volumes(rng: random.Random, sizes: list[int]) -> list[bytes]:
    return [rng.randbytes(size) for size in sizes]


def _differ(rng: random.Random, data: bytes, fraction: float) -> tuple[bytes, int]:
    """`data` changed in random 4 KiB-1 MiB blocks at 4 KiB offsets covering about
    `fraction` of it; returns it and the bytes that differ."""
    out = bytearray(data)
    changed = set()
    while len(changed) * 4 * KiB < fraction * len(data):
        length = rng.randrange(1, 257) * 4 * KiB
        offset = rng.randrange(0, (len(data) - length) // (4 * KiB) + 1) * 4 * KiB
        out[offset:offset + length] = rng.randbytes(length)
        changed.update(range(offset // (4 * KiB), (offset + length) // (4 * KiB)))
    return bytes(out), len(changed) * 4 * KiB


def _prepare(sites: Path, rs: RecoverySite, seed: int, fraction: float = 0.05
             ) -> tuple[VPG, list[bytes], int]:
    """A protected VPG over random volumes and the recovery site's VPG adopting copies
    that differ in random blocks; returns the VPG, its volumes' bytes and how many
    bytes differ."""
    rng = random.Random(seed)
    name = f"rev{next(_names)}"
    sizes = [s for vm in LAYOUT.values() for s in vm]
    protected = _random_volumes(rng, sizes)
    vpg = make_vpg(sites / name, name, LAYOUT, VPGSettings(checkpoint_interval=0.3),
                   contents=dict(enumerate(protected)))
    old_dir = sites / f"{name}-old"
    old_dir.mkdir()
    files, differing = {}, 0
    for vol in vpg.volumes.values():
        old, n = _differ(rng, protected[vol.id], fraction)
        differing += n
        path = old_dir / f"{vol.vm}-{vol.name}.img"
        path.write_bytes(old)
        files[(vol.vm, vol.name)] = path
    owner = ProtectedSite(sites / "ps").identity.site_id
    rs.adopt(name, owner, [(vm, vpg.journal_volumes(vm)) for vm in vpg.vms],
             vpg.settings.journal, files)
    return vpg, protected, differing


def _assert_latest_equals(rs: RecoverySite, vpg: VPG) -> None:
    for vm, journal in rs.journals(vpg.name).items():
        ckpt = journal.checkpoints()[-1]
        assert ckpt.consistent
        with journal.view(ckpt) as view:
            for vol in vpg.vms[vm].volumes:
                want = Path(vol.path).read_bytes()
                got = view.read(vol.id, 0, vol.size)
                assert got == want, f"{vm}/{vol.name} differs from the protected volume"


def test_delta_sync_sends_only_the_differing_blocks_and_the_view_matches(sites):
    async def main():
        # adopted by one recovery-site process, attached in the next
        vpg, _, differing = await asyncio.to_thread(_prepare, sites, RecoverySite(
            sites / "rs"), 1)
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg.start(delta_sync=True)
        assert vpg.mode == VPGMode.DELTA_SYNC
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await catch_up(vpg, rep, rs)
            report = rep.delta_report
            assert report is not None and report.differing_bytes == differing
            # bytes sent ~ the differing bytes: random data does not compress
            assert differing <= report.bytes_sent <= differing * 1.05 + 256 * KiB
            assert any("delta sync of 3 volumes" in e for e in vpg.events)
            assert vpg.status().delta_sync == report
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            for j in rs.journals(vpg.name).values():
                assert not (await asyncio.to_thread(j.scrub)).damage
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def _reopen(vpg: VPG) -> VPG:
    """A new VPG object over the same state directory and volumes (a restarted site)."""
    again = VPG(vpg.name, vpg.state_dir, vpg.settings)
    for vm in vpg.vms.values():
        again.add_vm(vm.name)
        for vol in vm.volumes:
            again.add_volume(vm.name, vol.name, vol.path, vol.size)
    return again


def _writer(vpg: VPG, rng: random.Random, stop: threading.Event) -> int:
    """Random writes to the protected volumes until `stop`; returns how many."""
    n = 0
    vols = list(vpg.volumes.values())
    while not stop.is_set():
        vol = rng.choice(vols)
        length = rng.randrange(1, 33) * 4 * KiB
        offset = rng.randrange(0, (vol.size - length) // 512 + 1) * 512
        vol.write(offset, rng.randbytes(length))
        n += 1
        if n % 16 == 0:
            time.sleep(0.001)
    return n


def test_writes_made_during_the_delta_sync_are_not_lost(sites):
    """The guest writes all through the delta sync (the VPG marks them dirty): after it,
    the bitmap sync sends them, and the first consistent checkpoint holds them all."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _ = await asyncio.to_thread(_prepare, sites, rs, 2, 0.2)
        vpg.start(delta_sync=True)
        ps = ProtectedSite(sites / "ps", rate_limit_bytes=8 * MiB)  # a sync of ~0.4 s
        stop = threading.Event()
        writes = asyncio.ensure_future(asyncio.to_thread(_writer, vpg, random.Random(3),
                                                         stop))
        await asyncio.sleep(0.05)
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: vpg.mode != VPGMode.DELTA_SYNC, 30, "the delta sync")
            await asyncio.sleep(0.1)  # writes while the bitmap sync runs too
            stop.set()
            assert await writes > 50
            await catch_up(vpg, rep, rs)
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            assert any("bitmap syncing complete" in e for e in vpg.events), vpg.events
        finally:
            stop.set()
            await asyncio.gather(writes, return_exceptions=True)
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


@pytest.mark.parametrize("crash", [False, True], ids=["clean-stop", "crash"])
def test_a_restart_mid_delta_sync_resumes_the_delta_sync_not_a_full_resend(sites, crash,
                                                                         monkeypatch):
    """The protected VPG stops (cleanly, or dies) while its delta sync runs: started
    again it is still in DELTA_SYNC, and what crosses the link stays near the differing
    bytes (a full resend would send every volume whole)."""
    monkeypatch.setattr(deltarecv, "PROGRESS_BYTES", 1)  # progress durable per batch

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, differing = await asyncio.to_thread(_prepare, sites, rs, 4, 0.1)
        vpg.start(delta_sync=True)
        ps = ProtectedSite(sites / "ps", rate_limit_bytes=2 * MiB)
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: rep.connected, 10, "a session")
            await asyncio.sleep(0.3)
            assert vpg.mode == VPGMode.DELTA_SYNC and rep.delta_report is None
            await ps.stop()
            state_dir = vpg.state_dir
            if crash:
                vpg.abandon()
            else:
                vpg.close()
            vpg = _reopen(vpg)
            vpg.start(delta_sync=False)  # the state file decides
            assert vpg.state_dir == state_dir
            assert vpg.mode == VPGMode.DELTA_SYNC
            assert not any("every volume will be resent" in e for e in vpg.events)
            if crash:
                assert any("delta sync: it starts over" in e for e in vpg.events)
            ps = ProtectedSite(sites / "ps", rate_limit_bytes=64 * MiB)
            rep = ps.protect(vpg, host, port)
            await catch_up(vpg, rep, rs)
            report = rep.delta_report
            assert report is not None
            total = sum(v.size for v in vpg.volumes.values())
            assert report.bytes_sent <= differing * 1.05 + 256 * KiB < total / 2
            if not crash:  # verified batches were not compared again
                assert report.differing_bytes < differing
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            for j in rs.journals(vpg.name).values():
                assert not (await asyncio.to_thread(j.scrub)).damage
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_a_recovery_site_restart_mid_delta_sync_resumes_after_the_verified_batches(
        sites, monkeypatch):
    """The recovery site stops while the delta sync runs and comes back on the same port:
    the next session resumes after what its progress file says was verified, and the
    replicas end equal to the protected volumes, their sums clean."""
    monkeypatch.setattr(deltarecv, "PROGRESS_BYTES", 1)

    async def main():
        port = free_port()
        rs = RecoverySite(sites / "rs")
        await rs.start("127.0.0.1", port)
        vpg, _, differing = await asyncio.to_thread(_prepare, sites, rs, 8, 0.1)
        vpg.start(delta_sync=True)
        ps = ProtectedSite(sites / "ps", rate_limit_bytes=2 * MiB)
        rep = ps.protect(vpg, "127.0.0.1", port)
        try:
            await wait_until(lambda: rep.connected, 10, "a session")
            await asyncio.sleep(0.4)
            assert vpg.mode == VPGMode.DELTA_SYNC
            st = vpg.status()  # the delta sync reports its progress
            assert st.sync_done_bytes < st.sync_total_bytes == sum(
                v.size for v in vpg.volumes.values())
            await rs.stop()
            ps.throttle.set_rate(None)
            rs = RecoverySite(sites / "rs")
            await rs.start("127.0.0.1", port)
            await catch_up(vpg, rep, rs)
            assert rep.sessions >= 2 and rep.delta_report is not None
            assert rep.delta_report.differing_bytes < differing  # resumed, not redone
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            for j in rs.journals(vpg.name).values():
                assert not (await asyncio.to_thread(j.scrub)).damage
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_a_delta_sync_into_a_journal_with_records_is_refused(sites):
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _ = await asyncio.to_thread(_prepare, sites, rs, 5)
        with Journal.open(rs.vpgs_dir / vpg.name / "vm2") as j:
            j.append([(2, 0, b"x" * 4096)])
        vpg.start(delta_sync=True)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: any("holds records" in r for r in rs.refused), 10,
                             "the refusal")
            assert vpg.mode == VPGMode.DELTA_SYNC and rep.delta_report is None
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


# ---- adoption and moving files ------------------------------------------------------------

def test_an_adopted_replica_reads_back_through_a_view_and_scrubs_clean(tmp_path):
    data = random.Random(6).randbytes(2 * MiB)
    src = tmp_path / "old.img"
    src.write_bytes(data)
    specs = [VolumeSpec(0, "d0", 2 * MiB), VolumeSpec(1, "d1", 1 * MiB)]
    with Journal.create(tmp_path / "j", specs, settings=JournalSettings(),
                        replica_files={0: src}) as j:
        assert not src.exists()
        j.append([(0, 4096, b"y" * 4096)])
        ckpt = j.checkpoint()
        with j.view(ckpt) as view:
            assert view.read(0, 0, 2 * MiB) == data[:4096] + b"y" * 4096 + data[8192:]
            assert view.read(1, 0, 1 * MiB) == bytes(1 * MiB)
        assert not j.scrub().damage


def test_an_adopted_file_of_the_wrong_size_is_refused_untouched(tmp_path):
    src = tmp_path / "old.img"
    src.write_bytes(b"z" * (1 * MiB + 512))
    with pytest.raises(ConfigError, match="refused, nothing moved"):
        Journal.create(tmp_path / "j", [VolumeSpec(0, "d0", 1 * MiB)],
                       replica_files={0: src})
    assert src.read_bytes() == b"z" * (1 * MiB + 512)
    assert not (tmp_path / "j").exists()


def test_adopt_refuses_a_vpg_that_already_holds_its_journals(sites):
    rs = RecoverySite(sites / "rs")
    vpg, _, _ = _prepare(sites, rs, 7)
    with pytest.raises(StateError, match="already holds"):
        rs.adopt(vpg.name, "x", [(vm, vpg.journal_volumes(vm)) for vm in vpg.vms],
                 vpg.settings.journal, {})
    vpg.close()


def test_move_file_refuses_an_existing_destination(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        move_file(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"


def test_move_file_across_file_systems_copies_sparsely_and_removes_the_source(
        tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(b"q" * 12345)
    want = src.read_bytes()

    real_link = os.link
    calls = []

    def link(a, b):  # the move's first link crosses file systems; the temp file's does not
        calls.append((a, b))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "cross-device link")
        return real_link(a, b)
    monkeypatch.setattr(os, "link", link)
    dst = tmp_path / "sub" / "dst.img"
    dst.parent.mkdir()
    move_file(src, dst)
    assert not src.exists() and dst.read_bytes() == want
    assert os.stat(dst).st_blocks * 512 < 2 * MiB  # holes stayed holes


def test_a_create_interrupted_after_adopting_a_file_loses_nothing_and_resumes(
        tmp_path, monkeypatch):
    """A crash between moving the adopted file in and writing journal.meta: the file is
    at its replica name, the directory holds no journal, and the same create resumes."""
    import zcore.journal.core as core
    data = random.Random(9).randbytes(1 * MiB)
    src = tmp_path / "old.img"
    src.write_bytes(data)
    specs = [VolumeSpec(0, "d0", 1 * MiB), VolumeSpec(1, "d1", 1 * MiB)]

    def crash(*args):
        raise OSError("power lost")
    real = core.write_new_manifest
    monkeypatch.setattr(core, "write_new_manifest", crash)
    with pytest.raises(OSError, match="power lost"):
        Journal.create(tmp_path / "j", specs, replica_files={0: src})
    assert not src.exists() and (tmp_path / "j" / "replica-0000.img").read_bytes() == data
    with pytest.raises(ConfigError, match="holds no journal"):
        Journal.open(tmp_path / "j")
    monkeypatch.setattr(core, "write_new_manifest", real)
    with Journal.create(tmp_path / "j", specs, replica_files={0: src}) as j:
        ckpt = j.checkpoint()
        with j.view(ckpt) as view:
            assert view.read(0, 0, 1 * MiB) == data
        assert not j.scrub().damage
