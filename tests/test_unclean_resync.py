"""The resync after an unclean protected-site restart: instead of resending every volume
whole, the restarted VPG compares its volumes with the recovery site's journals at
their newest state (keyed block hashes, the key picked by the protected side) and marks
what differs; the ordinary bitmap sync then sends it as writes into the journals, so
history is kept and the checkpoint after it is crash-consistent.  Two sites over
loopback TLS, plus the compare's state machines and the journal's head view alone."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import pytest
from helpers.replication import (
    KiB,
    MiB,
    catch_up,
    fast_timeouts,
    make_vpg,
    pair_sites,
    wait_until,
)

from zcore import wire
from zcore.deltasync import DeltaSource, DeltaTarget, run_source, run_target
from zcore.deltasync.hashing import ZERO_ENTRY, BlockHasher
from zcore.errors import CorruptRecordError, ProtocolError, StateError
from zcore.journal import Journal, VolumeSpec
from zcore.replication import ProtectedSite, RecoverySite, deltarecv
from zcore.vpg import VPG, VPGMode, VPGSettings

_names = itertools.count()
LAYOUT = {"vm1": [8 * MiB, 3 * MiB], "vm2": [5 * MiB]}
TOTAL = sum(s for vm in LAYOUT.values() for s in vm)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("resync")
    asyncio.run(pair_sites(root / "rs", root / "ps"))
    return root


def run(coro):
    async def main():
        with fast_timeouts():
            return await coro
    return asyncio.run(main())


def _reopen(vpg: VPG) -> VPG:
    """A new VPG object over the same state directory and volumes (a restarted site)."""
    again = VPG(vpg.name, vpg.state_dir, vpg.settings)
    for vm in vpg.vms.values():
        again.add_vm(vm.name)
        for vol in vm.volumes:
            again.add_volume(vm.name, vol.name, vol.path, vol.size)
    return again


def _scribble(vpg: VPG, rng: random.Random, n: int) -> int:
    """`n` random 4 KiB-aligned writes of 4-64 KiB through the VPG; their bytes."""
    total = 0
    vols = list(vpg.volumes.values())
    for _ in range(n):
        vol = rng.choice(vols)
        length = rng.randrange(1, 17) * 4 * KiB
        offset = rng.randrange(0, (vol.size - length) // (4 * KiB) + 1) * 4 * KiB
        vol.write(offset, rng.randbytes(length))
        total += length
    return total


def _assert_latest_equals(rs: RecoverySite, vpg: VPG) -> None:
    for vm, journal in rs.journals(vpg.name).items():
        ckpt = journal.checkpoints()[-1]
        assert ckpt.consistent
        with journal.view(ckpt) as view:
            for vol in vpg.vms[vm].volumes:
                assert view.read(vol.id, 0, vol.size) == Path(vol.path).read_bytes(), \
                    f"{vm}/{vol.name} differs from the protected volume"


def _images(vpg: VPG) -> dict[int, bytes]:
    return {vid: Path(v.path).read_bytes() for vid, v in vpg.volumes.items()}


async def _protected_and_crashed(sites: Path, rs: RecoverySite, host: str, port: int,
                                 seed: int, *, lost_writes: int = 20
                                 ) -> tuple[VPG, int, dict[int, bytes], int]:
    """A VPG over random volumes replicated to `rs` and caught up, a tagged checkpoint;
    then the link goes, `lost_writes` writes are captured but never delivered, a
    4 KiB write reaches a disk behind the capture, and the VPG dies.  Returns it
    restarted (not yet linked), the tagged checkpoint's seq, the images at that
    checkpoint, and an upper bound of the bytes that differ."""
    rng = random.Random(seed)
    name = f"rs{next(_names)}"
    sizes = [s for vm in LAYOUT.values() for s in vm]
    vpg = make_vpg(sites / name, name, LAYOUT, VPGSettings(checkpoint_interval=0.3),
                   contents={i: rng.randbytes(s) for i, s in enumerate(sizes)})
    vpg.start(initial_sync=True)
    ps = ProtectedSite(sites / "ps")
    rep = ps.protect(vpg, host, port)
    try:
        await catch_up(vpg, rep, rs)
        _scribble(vpg, rng, 30)  # delivered and acknowledged: never resent
        tagged = await catch_up(vpg, rep, rs)
        before = _images(vpg)
    finally:
        await ps.stop()
    differ = _scribble(vpg, rng, lost_writes)  # captured, never delivered
    vpg.abandon()
    vol = vpg.volumes[2]
    with open(vol.path, "r+b") as f:  # written, then the crash before the capture
        f.seek(vol.size - 4 * KiB)
        f.write(rng.randbytes(4 * KiB))
    again = _reopen(vpg)
    again.start()
    return again, tagged, before, differ + 4 * KiB


def test_an_unclean_restart_sends_only_the_blocks_the_journals_lack(sites):
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, tagged, before, differ = await _protected_and_crashed(sites, rs, host, port, 1)
        assert vpg.mode == VPGMode.RESYNC_COMPARE and vpg.resync_pending
        assert not any("every volume will be resent" in e for e in vpg.events)
        received = rs.receivers[vpg.name].stats.bytes
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await catch_up(vpg, rep, rs)
            report = rep.resync_report
            assert report is not None and report.compared_bytes == TOTAL
            assert 0 < report.differing_bytes <= differ
            assert vpg.status().resync == report
            assert any(f"resync compare with the recovery site: compared {TOTAL} bytes, "
                       f"{report.differing_bytes} bytes differ" in e for e in vpg.events)
            bundles = rs.receivers[vpg.name].stats.bytes - received
            # what crossed: the compare's frames and the differing blocks' records,
            # far below the volumes' size (random data does not compress)
            assert report.bytes_sent < TOTAL / 100
            assert bundles <= report.differing_bytes * 1.1 + 128 * KiB < TOTAL / 4
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            # history kept: the checkpoint before the crash still reads as it was
            for vm, journal in rs.journals(vpg.name).items():
                with journal.view(tagged) as view:
                    for vol in vpg.vms[vm].volumes:
                        assert view.read(vol.id, 0, vol.size) == before[vol.id]
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


class _LyingTarget(DeltaTarget):
    """A recovery site that lies about its hashes: every block zero, or nonsense."""

    def __init__(self, volumes, lie: str) -> None:
        super().__init__(volumes, compare=True)
        self.lie = lie

    def _offer_mode(self, msg) -> None:
        super()._offer_mode(msg)
        for vid, h in list(self.hashers.items()):
            self.hashers[vid] = _LyingHasher(h, self.lie)


class _LyingHasher(BlockHasher):
    def __init__(self, honest: BlockHasher, lie: str) -> None:
        super().__init__(honest.key, honest.volume_id, honest.volume)
        self.lie = lie

    def _hash(self, level, offset, length, data):
        if self.lie == "zeros":
            return ZERO_ENTRY
        return bytes([0]) + random.randbytes(16)

    def level0(self, offset, count):
        entries, children = super().level0(offset, count)
        if self.lie == "zeros":
            return [ZERO_ENTRY] * len(entries), [[ZERO_ENTRY] * len(k) for k in children]
        return entries, children

    def children(self, level, parent):
        kids = super().children(level, parent)
        return [ZERO_ENTRY] * len(kids) if self.lie == "zeros" else kids


@pytest.mark.parametrize("lie", ["zeros", "wrong"])
def test_a_recovery_site_lying_about_its_hashes_cannot_make_a_differing_block_skipped(
        sites, lie, monkeypatch):
    """The recovery site answers the compare with hashes of zeros, or wrong hashes: the
    protected side (which picked the key) marks at least every block that differs, so
    the checkpoint after the resync still equals the protected volumes."""
    def lying(receiver):
        honest = make_compare_target(receiver)
        return _LyingTarget(honest.volumes, lie)

    make_compare_target = deltarecv.make_compare_target
    monkeypatch.setattr(deltarecv, "make_compare_target", lying)
    from zcore.replication import receiver as receiver_mod
    monkeypatch.setattr(receiver_mod, "make_compare_target", lying)

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _, differ = await _protected_and_crashed(sites, rs, host, port, 2)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await catch_up(vpg, rep, rs)
            report = rep.resync_report
            assert report is not None
            # a lie can only make this side send more: the volumes are random, so "all
            # zero" and nonsense both mark (nearly) everything
            assert report.differing_bytes >= TOTAL - 64 * KiB > differ
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def _slow_hashing(monkeypatch, delay: float) -> None:
    """The recovery site hashes each batch `delay` seconds late (a slow compare)."""
    real = DeltaTarget.next_hashes

    def slow(self):
        import time
        time.sleep(delay)
        return real(self)
    monkeypatch.setattr(DeltaTarget, "next_hashes", slow)
    monkeypatch.setattr(deltarecv, "make_compare_target", _small_batches(
        deltarecv.make_compare_target))
    from zcore.replication import receiver as receiver_mod
    monkeypatch.setattr(receiver_mod, "make_compare_target", deltarecv.make_compare_target)


def _small_batches(make):
    def made(receiver):
        t = make(receiver)
        return DeltaTarget(t.volumes, compare=True, batch_blocks=1, window=1)
    return made


def test_writes_during_the_compare_are_not_lost(sites, monkeypatch):
    _slow_hashing(monkeypatch, 0.05)  # 16 batches: the compare lasts about 0.8 s

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _, _ = await _protected_and_crashed(sites, rs, host, port, 3)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: rep.connected, 10, "a session")
            rng = random.Random(33)
            for _ in range(5):  # while the compare runs: only marked dirty
                assert vpg.mode == VPGMode.RESYNC_COMPARE and rep.resync_report is None
                with pytest.raises(StateError):
                    vpg.checkpoint("mid-compare")
                await asyncio.to_thread(_scribble, vpg, rng, 4)
                await asyncio.sleep(0.02)
            await catch_up(vpg, rep, rs)
            assert rep.resync_report is not None
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


@pytest.mark.parametrize("crash", [False, True], ids=["clean-stop", "crash"])
def test_a_restart_mid_compare_compares_again(sites, crash, monkeypatch):
    """The VPG stops (cleanly, or dies again) while its compare runs: started again it
    compares again (blocks not compared yet were never marked), and the checkpoint
    after the resync equals the volumes."""
    _slow_hashing(monkeypatch, 0.1)  # 16 batches: the compare lasts about 1.6 s

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _, _ = await _protected_and_crashed(sites, rs, host, port, 4 + crash)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: vpg.status().sync_done_bytes > 0, 10, "compare begun")
            assert vpg.mode == VPGMode.RESYNC_COMPARE
            await asyncio.to_thread(_scribble, vpg, random.Random(9), 5)
            await ps.stop()
            if crash:
                vpg.abandon()
            else:
                vpg.close()
            vpg = _reopen(vpg)
            vpg.start()
            assert vpg.mode == VPGMode.RESYNC_COMPARE
            if not crash:
                assert any("compares again" in e for e in vpg.events)
            monkeypatch.undo()
            ps = ProtectedSite(sites / "ps")
            rep = ps.protect(vpg, host, port)
            await catch_up(vpg, rep, rs)
            assert rep.resync_report is not None
            assert rep.resync_report.compared_bytes == TOTAL
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


@pytest.mark.parametrize("where", ["head", "reads"])
def test_journals_the_recovery_site_cannot_read_make_every_volume_resent(sites, where,
                                                                       monkeypatch):
    """The recovery site cannot make its journals' head views (a commit fails), or its
    reads fail mid-compare: the compare fails with the reason, the protected site
    resends every volume whole, and the checkpoint after it equals the volumes."""
    def no_head(self):
        raise CorruptRecordError("segment 7 is damaged (test)")

    def no_read(self, offset, buf):
        raise CorruptRecordError("segment 7 is damaged (test)")

    from zcore.journal import HeadVolume
    if where == "head":
        monkeypatch.setattr(Journal, "head_view", no_head)
    else:
        monkeypatch.setattr(HeadVolume, "read_into", no_read)

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, _, _ = await _protected_and_crashed(sites, rs, host, port, 6)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await wait_until(lambda: not vpg.resync_pending, 20, "the compare to fail")
            assert any("it failed" in e and "every volume will be resent" in e
                       for e in vpg.events)
            monkeypatch.undo()
            await catch_up(vpg, rep, rs)
            assert rep.resync_report is None
            assert vpg.status().sync_total_bytes >= TOTAL  # everything, whole
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


# ---- the compare alone --------------------------------------------------------------


def _files(tmp_path: Path, datas: dict[int, bytes]):
    from zcore.deltasync import FileVolume
    out = {}
    for vid, data in datas.items():
        p = tmp_path / f"v{vid}.img"
        p.write_bytes(data)
        out[vid] = FileVolume(p)
    return out


async def _compare(source: DeltaSource, target: DeltaTarget) -> None:
    done = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        try:
            await run_target(reader, writer, target)
        except ProtocolError as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await run_source(reader, writer, source)
        await done
    finally:
        writer.close()
        server.close()


def test_a_compare_marks_exactly_the_differing_4k_blocks_and_writes_nothing(tmp_path):
    rng = random.Random(7)
    size = 5 * MiB + 512
    ours = bytearray(rng.randbytes(size))
    theirs = bytes(ours)
    changed = set()
    for _ in range(12):
        off = rng.randrange(0, size - 100)
        ours[off:off + 100] = rng.randbytes(100)
        changed.update(range(off // 4096, (off + 99) // 4096 + 1))
    ours[size - 10:] = bytes(10)  # the short last block differs too
    changed.add((size - 1) // 4096)
    (tmp_path / "s").mkdir()
    (tmp_path / "t").mkdir()
    src = _files(tmp_path / "s", {3: bytes(ours)})
    dst = _files(tmp_path / "t", {3: theirs})
    marked = []
    source = DeltaSource(dict(src), compare=True,
                         on_differ=lambda v, o, n: marked.append((v, o, n)))
    target = DeltaTarget(dict(dst), compare=True, batch_blocks=2)
    asyncio.run(_compare(source, target))
    blocks = {b for v, o, n in marked for b in range(o // 4096, (o + n - 1) // 4096 + 1)}
    assert blocks == changed and all(v == 3 for v, _, _ in marked)
    assert source.differing_bytes == sum(n for _, _, n in marked)
    assert target.bytes_written == 0 and target.compared_bytes == size
    assert (tmp_path / "t" / "v3.img").read_bytes() == theirs


def test_a_compare_target_refuses_data_and_verdicts(tmp_path):
    (tmp_path / "t").mkdir()
    vols = _files(tmp_path / "t", {0: bytes(MiB)})
    target = DeltaTarget(dict(vols), compare=True)
    key = bytes(32).hex()
    offer = wire.control(wire.DSYNC_OFFER, 0, protocol=1, volumes=[{"id": 0, "size": MiB}],
                         mode="compare", key=key)
    start = wire.parse_control(wire.FrameReader().feed(target.on_offer(
        wire.FrameReader().feed(offer)[0]))[0])
    assert start["key"] == "" and start["volumes"] == [{"id": 0, "size": MiB, "resume": 0}]
    data = wire.frame(wire.DSYNC_DATA, 0, bytes(8))
    with pytest.raises(ProtocolError, match="writes nothing"):
        target.on_frame(wire.FrameReader().feed(data)[0])
    bad = wire.control(wire.DSYNC_COMPARED, 0, batch=5)
    with pytest.raises(ProtocolError, match="not in flight"):
        target.on_frame(wire.FrameReader().feed(bad)[0])


def test_a_compare_offer_without_the_sources_key_or_of_the_other_mode_is_refused(tmp_path):
    (tmp_path / "t").mkdir()
    vols = _files(tmp_path / "t", {0: bytes(MiB)})
    vol = [{"id": 0, "size": MiB}]
    for target, offer, why in [
        (DeltaTarget(dict(vols), compare=True),
         wire.control(wire.DSYNC_OFFER, 0, protocol=1, volumes=vol, mode="compare"), "key"),
        (DeltaTarget(dict(vols), compare=True),
         wire.control(wire.DSYNC_OFFER, 0, protocol=1, volumes=vol), "mode"),
        (DeltaTarget(dict(vols)),
         wire.control(wire.DSYNC_OFFER, 0, protocol=1, volumes=vol, mode="compare",
                      key=bytes(32).hex()), "mode"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            target.on_offer(wire.FrameReader().feed(offer)[0])


def test_a_compare_source_refuses_a_target_that_picks_the_key_or_resumes(tmp_path):
    (tmp_path / "s").mkdir()
    vols = _files(tmp_path / "s", {0: bytes(MiB)})
    for fields, why in [({"key": "ab" * 32, "volumes": [{"id": 0, "size": MiB, "resume": 0}]},
                         "carries a key"),
                        ({"key": "", "volumes": [{"id": 0, "size": MiB, "resume": MiB}]},
                         "resumes")]:
        source = DeltaSource(dict(vols), compare=True, on_differ=lambda *a: None)
        source.offer()
        start = wire.control(wire.DSYNC_START, 0, batch=64, **fields)
        with pytest.raises(ProtocolError, match=why):
            source.on_frame(wire.FrameReader().feed(start)[0])


# ---- the journal's head view -----------------------------------------------------------


def test_a_head_view_reads_every_durable_record_and_nothing_appended_after(tmp_path):
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d", MiB)])
    try:
        j.append([(0, 0, b"a" * 4096)])
        j.checkpoint("one")
        j.append([(0, 8192, b"b" * 4096)])
        j.commit()
        head = j.head_view()
        assert head.seq == j.durable_seq + 1
        j.append([(0, 0, b"c" * 4096)])  # after the head view: not in it
        vol = head.volume(0)
        buf = bytearray(3 * 4096)
        vol.read_into(0, buf)
        assert bytes(buf) == b"a" * 4096 + bytes(4096) + b"b" * 4096
        assert head.read(0, 0, 4096) == b"a" * 4096 and vol.size == MiB
        with pytest.raises(StateError):
            vol.pwrite(0, b"x")
        assert j.head_view().read(0, 0, 4096) == b"a" * 4096  # not committed yet
        j.commit()
        assert j.head_view().read(0, 0, 4096) == b"c" * 4096
    finally:
        j.close()


class _HypervisorDisk:
    """A VolumeSource over a file standing for a hypervisor's disk: `guest_write` is a
    mirrored write (the disk, then the capture), `unmirrored` one the mirror missed;
    `lost` says its dirty bitmap is gone (`changed_extents` cannot tell)."""

    def __init__(self, path: Path, size: int, data: bytes) -> None:
        self.path, self._size = path, size
        path.write_bytes(data)
        self.marked: list[tuple[int, int]] = []
        self.lost = False

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        with open(self.path, "rb") as f:
            f.seek(offset)
            f.readinto(buf)

    def zero_extents(self) -> list[tuple[int, int]]:
        return []

    def changed_extents(self) -> list[tuple[int, int]] | None:
        return None if self.lost else list(self.marked)

    def unmirrored(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.marked.append((offset, len(data)))


def test_a_source_whose_bitmap_is_lost_mid_stream_is_compared_not_resent(sites):
    """A hypervisor's bitmaps go while the VPG streams (QEMU restarted without
    persistent bitmaps): the VPG asks for a compare, the sender starts a new session
    that runs it, and only what differs crosses; the newest checkpoint is the disk."""
    async def main():
        rng = random.Random(5)
        size = 6 * MiB
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = f"rs{next(_names)}"
        disk = _HypervisorDisk(sites / f"{name}.img", size, rng.randbytes(size))
        vpg = VPG(name, sites / name, VPGSettings(checkpoint_interval=0.3))
        vpg.add_vm("vm1")
        vol = vpg.add_volume("vm1", "disk0", None, size, source=disk)
        vpg.start(initial_sync=True)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await catch_up(vpg, rep, rs)
            for _ in range(10):  # mirrored: the disk, then the capture
                offset = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
                data = rng.randbytes(4 * KiB)
                disk.unmirrored(offset, data)
                vol.write(offset, data)
            await catch_up(vpg, rep, rs)
            sessions = rep.sessions
            missed = 0
            for _ in range(6):
                offset = rng.randrange(0, size // (8 * KiB)) * 8 * KiB
                disk.unmirrored(offset, rng.randbytes(8 * KiB))
                missed += 8 * KiB
            disk.lost = True
            await asyncio.to_thread(vpg.resync_from_sources, "QEMU restarted")
            assert vpg.resync_pending
            await catch_up(vpg, rep, rs)
            report = rep.resync_report
            assert report is not None and report.compared_bytes == size
            assert 0 < report.differing_bytes <= missed
            assert rep.sessions > sessions  # a new session ran the compare
            events = " ".join(vpg.events)
            assert "dirty bitmap is gone" in events and "every block" not in events
            journal = rs.journals(vpg.name)["vm1"]
            with journal.view(journal.checkpoints()[-1]) as view:
                assert view.read(vol.id, 0, size) == disk.path.read_bytes()
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())
