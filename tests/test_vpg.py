"""VPG behaviour, one scenario at a time: definition and settings, checkpoints, bitmap
mode after a link outage or a buffer overflow, bitmap and initial syncs, clean and
unclean restarts, persisted bitmaps that are damaged or missing, failed backing writes.

Each scenario ends the same way: drain the stream into the journals through a LocalLink
and check that the newest crash-consistent checkpoint holds the backing stores byte for
byte.  tests/test_vpg_model.py runs the same path under a randomized program.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from zcore.bitmap import DirtyBitmap
from zcore.capture import ProtectedVolume
from zcore.errors import (
    AlignmentError,
    ConfigError,
    CorruptRecordError,
    FormatVersionError,
    NativeIOError,
    StateError,
)
from zcore.fsutil import write_state
from zcore.journal import JournalSettings
from zcore.records import Checkpoint, CheckpointKind
from zcore.vpg import (
    STATE_FORMAT,
    STATE_NAME,
    VPG,
    CheckpointState,
    LocalLink,
    VPGMode,
    VPGSettings,
    read_vpg_state,
)

KiB, MiB = 1 << 10, 1 << 20

LAYOUT = {"vm1": [("a", 2 * MiB), ("b", 1 * MiB)], "vm2": [("c", 1 * MiB + 512 * KiB)]}


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Site:
    """Disks, a VPG over them and one journal per VM, fed by a LocalLink."""

    def __init__(self, root: Path, settings: VPGSettings | None = None,
                 layout=LAYOUT, fill: bool = False) -> None:
        self.root = root
        self.layout = layout
        self.settings = settings or VPGSettings(checkpoint_interval=3600)
        self.paths: list[Path] = []
        rng = random.Random(5)
        for vm, vols in layout.items():
            for name, size in vols:
                path = root / f"{vm}-{name}.img"
                with open(path, "wb") as f:
                    if fill:  # half random, half zero, in 64 KiB stripes
                        for at in range(0, size, 64 * KiB):
                            f.write(rng.randbytes(64 * KiB) if (at // (64 * KiB)) % 2 == 0
                                    else bytes(64 * KiB))
                    f.truncate(size)
                self.paths.append(path)
        self.journals = None
        self.vpg = self._make()
        self.link: LocalLink | None = None

    def _make(self) -> VPG:
        vpg = VPG("g", self.root / "state", self.settings)
        for vm, vols in self.layout.items():
            vpg.add_vm(vm)
            for name, _ in vols:
                vpg.add_volume(vm, name, self.root / f"{vm}-{name}.img")
        return vpg

    @property
    def volumes(self):
        return [self.vpg.volumes[i] for i in range(len(self.vpg.volumes))]

    @property
    def total_bytes(self) -> int:
        return sum(size for vols in self.layout.values() for _, size in vols)

    def start(self, *, link: bool = True, **kw) -> None:
        min_seq = max((j.last_seq for j in self.journals.values()), default=0) \
            if self.journals else 0
        self.vpg.start(min_seq=min_seq, **kw)
        if self.journals is None:
            self.journals = LocalLink.create_journals(self.vpg, self.root / "journals")
        self.link = LocalLink(self.vpg, self.journals)
        if link:
            self.link.start()

    def stop_link(self) -> None:
        if self.link is not None:
            self.link.stop()

    def restart(self, **kw) -> None:
        """Clean: stop the link and the VPG, then a new VPG over the same state."""
        self.stop_link()
        self.vpg.close()
        self.vpg = self._make()
        self.start(**kw)

    def crash(self) -> None:
        """Unclean: the stream thread stops and the process "dies" without stop(): no fold,
        no persisted bitmaps, the state file still says running."""
        self.stop_link()
        self.vpg.abandon()

    def drain(self, timeout: float = 30.0) -> int:
        self.stop_link()
        self.vpg.link_up()
        return self.link.drain(timeout)

    def image(self, vid: int) -> bytes:
        return self.paths[vid].read_bytes()

    def check_latest(self) -> None:
        """A fresh checkpoint, drained: every journal's newest consistent checkpoint holds
        every volume of its VM exactly as its backing store."""
        self.drain()
        seq = self.vpg.checkpoint("check").seq
        self.drain()
        for vm, j in self.journals.items():
            ckpt = j.latest_checkpoint()
            assert ckpt.seq == seq and ckpt.consistent
            with j.view(ckpt) as view:
                for vol in self.vpg.vms[vm].volumes:
                    assert view.read(vol.id, 0, vol.size) == self.image(vol.id), \
                        f"{vm}/{vol.name} differs at checkpoint {ckpt}"

    def sync_started(self) -> list[str]:
        return [e for e in self.vpg.status().events if "syncing of" in e or
                "initial sync of" in e]

    def close(self) -> None:
        try:
            self.stop_link()
        finally:
            self.vpg.close()
            for j in (self.journals or {}).values():
                j.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def scribble(site: Site, n: int, seed: int, *, size: int = 64 * KiB, span: int | None = None):
    rng = random.Random(seed)
    for _ in range(n):
        vol = rng.choice(site.volumes)
        length = rng.randrange(1, size // 512 + 1) * 512
        top = min(vol.size, span or vol.size)
        off = rng.randrange(0, (top - length) // 512 + 1) * 512
        vol.write(off, rng.randbytes(length) if rng.random() < 0.8 else bytes(length))


# ---- definition and settings ----------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(checkpoint_interval=0.01),
    dict(lz4_min_saving=1.0),
    dict(buffer_bytes=2 * MiB),
    dict(buffer_bytes=4 * MiB + 64),
    dict(bundle_bytes=32 * KiB),
    dict(buffer_bytes=4 * MiB, bundle_bytes=2 * MiB),
    dict(bundle_age=0),
    dict(priority="urgent"),
    dict(rpo_alert_seconds=0),
    dict(sync_chunk_bytes=1000),
    dict(sync_chunk_bytes=64 * MiB),
    dict(journal=JournalSettings(history_seconds=1)),
])
def test_settings_outside_their_range_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError):
        VPG("g", tmp_path, VPGSettings(**bad))


def test_a_sync_chunk_that_cannot_fit_the_capture_buffer_is_refused(tmp_path):
    """A sync record larger than the ring can never be captured: the bitmap sync would
    retry it forever and never finish."""
    with pytest.raises(ConfigError):
        VPG("g", tmp_path, VPGSettings(buffer_bytes=4 * MiB, sync_chunk_bytes=4 * MiB))
    VPG("g", tmp_path, VPGSettings(buffer_bytes=4 * MiB, sync_chunk_bytes=1 * MiB))


def test_vms_and_volumes_are_defined_once_and_only_while_stopped(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 * MiB))
    vpg = VPG("g", tmp_path / "state")
    with pytest.raises(ConfigError):
        vpg.start()  # protects nothing
    vpg.add_vm("vm")
    for bad in ("", "vm"):
        with pytest.raises(ConfigError):
            vpg.add_vm(bad)
    with pytest.raises(ConfigError):
        vpg.add_volume("nope", "a", disk)
    vol = vpg.add_volume("vm", "a", disk)
    assert vol.size == 1 * MiB and vol.id == 0
    with pytest.raises(ConfigError):
        vpg.add_volume("vm", "a", disk)
    with pytest.raises(ConfigError):
        vpg.add_volume("vm", "big", disk, size=2 * MiB)
    with pytest.raises(StateError):
        vpg.checkpoint()
    vpg.start()
    try:
        with pytest.raises(StateError):
            vpg.add_vm("vm2")
        with pytest.raises(StateError):
            vpg.add_volume("vm", "b", disk)
        with pytest.raises(StateError):
            vpg.start()
    finally:
        vpg.close()
    vpg.stop()  # stopping twice is harmless
    assert vol.closed


def test_a_link_needs_a_journal_for_every_vm(site):
    site.start(link=False)
    with pytest.raises(ConfigError):
        LocalLink(site.vpg, {"vm1": site.journals["vm1"]})


# ---- streaming and checkpoints --------------------------------------------------------


def test_tagged_and_automatic_checkpoints_reach_every_journal(site):
    site.start()
    scribble(site, 50, 1)
    t = site.vpg.checkpoint("after-50").seq
    scribble(site, 50, 2)
    a = site.vpg.checkpoint().seq
    site.drain()
    for j in site.journals.values():
        got = {c.seq: c for c in j.checkpoints()}
        assert got[t].tag == "after-50" and got[t].kind == "tagged" and got[t].consistent
        assert got[a].tag is None and got[a].kind == "auto" and got[a].consistent
    site.check_latest()
    st = site.vpg.status()
    assert st.mode == "streaming" and st.acked_seq == st.last_seq
    assert st.writes == 100 and st.dirty_bytes == 0


def test_the_stream_cuts_automatic_checkpoints_on_its_own(tmp_path):
    s = Site(tmp_path, VPGSettings(checkpoint_interval=0.1))
    try:
        s.start()
        scribble(s, 20, 3)
        wait_for(lambda: len(s.journals["vm1"].checkpoints()) >= 3, what="3 checkpoints")
        assert all(c.kind == "auto" for c in s.journals["vm1"].checkpoints())
        s.check_latest()
    finally:
        s.close()


def test_on_checkpoint_reports_each_sealed_marker(site):
    seen = []
    site.vpg.on_checkpoint = seen.append
    site.start()
    seq = site.vpg.checkpoint("x").seq
    site.drain()
    assert [(c.seq, c.tag, c.consistent) for c in seen] == [(seq, "x", True)]


def test_checkpoint_returns_the_checkpoint_every_journal_holds(site):
    """VPG.checkpoint() and Journal.checkpoints() hand out one Checkpoint type: what the
    protected site returns is what the recovery site lists, field for field."""
    site.start()
    scribble(site, 10, 21)
    taken = [site.vpg.checkpoint("tagged-one"), site.vpg.checkpoint()]
    site.drain()
    for j in site.journals.values():
        for c in taken:
            held = j.checkpoint_by_id(c.id)
            assert isinstance(c, Checkpoint) and c.id == c.seq == held.seq
            assert (c.kind, c.tag, c.consistent) == (held.kind, held.tag, held.consistent)
            assert abs(c.time_ns - held.time_ns) < 1_000_000_000
    assert taken[0].kind == CheckpointKind.TAGGED and taken[1].kind == CheckpointKind.AUTO


def test_a_mode_still_compares_equal_to_its_bare_string(site):
    """Callers (replication, the CLI, the demo) compare modes with strings."""
    assert site.vpg.mode == VPGMode.STOPPED == "stopped"
    site.start()
    st = site.vpg.status()
    assert st.mode is VPGMode.STREAMING and st.mode == "streaming"
    assert f"{st.mode}" == "streaming" and json.dumps(st.mode) == '"streaming"'
    site.vpg.link_down()
    assert site.vpg.mode in ("bitmap", "bitmap_syncing")
    assert {m.value for m in VPGMode} == {"stopped", "streaming", "bitmap", "bitmap_syncing",
                                          "initial_sync", "delta_sync", "resync_compare"}


# ---- bitmap mode ----------------------------------------------------------------------


def test_link_down_folds_into_bitmaps_and_link_up_syncs_them(site):
    site.start()
    scribble(site, 30, 4)
    site.vpg.checkpoint("before")
    site.drain()
    site.link.start()
    site.vpg.link_down("maintenance")
    st = site.vpg.status()
    assert st.mode == "bitmap" and not st.link_up
    assert any("bitmap mode: maintenance" in e for e in st.events)
    with pytest.raises(StateError, match="bitmap mode"):
        site.vpg.checkpoint("impossible")
    vol = site.volumes[0]
    vol.write(512 * KiB, b"\x11" * 8192)
    vol.write(1 * MiB, bytes(4096))
    assert site.vpg.status().dirty_bytes >= 12 * KiB
    site.vpg.link_up()
    site.check_latest()
    st = site.vpg.status()
    assert st.mode == "streaming" and st.dirty_bytes == 0
    # the sync sent the dirty blocks only
    assert 12 * KiB <= st.sync_total_bytes < site.total_bytes // 4
    assert any("bitmap syncing complete" in e for e in st.events)


SMALL = VPGSettings(checkpoint_interval=3600, buffer_bytes=4 * MiB, bundle_bytes=256 * KiB,
                    sync_chunk_bytes=64 * KiB)
BIG_LAYOUT = {"vm1": [("a", 8 * MiB)], "vm2": [("b", 1 * MiB)]}


def dirty_everything(s: Site) -> None:
    """Rewrite every volume whole with random data (in bitmap mode: all of it dirty, more
    than a 4 MiB buffer can hold)."""
    rng = random.Random(99)
    for vol in s.volumes:
        for at in range(0, vol.size, 1 * MiB):
            vol.write(at, rng.randbytes(min(1 * MiB, vol.size - at)))


def test_checkpoints_during_a_bitmap_sync_are_flagged_not_consistent(tmp_path):
    s = Site(tmp_path, SMALL, layout=BIG_LAYOUT)
    try:
        s.start(link=False)
        s.vpg.link_down()
        dirty_everything(s)  # more than the buffer takes: the sync waits for the link
        s.vpg.link_up()
        wait_for(lambda: s.vpg.mode == "bitmap_syncing", what="the sync")
        seq = s.vpg.checkpoint("mid-sync").seq
        s.drain()
        for j in s.journals.values():
            c = j.checkpoint_by_id(seq)
            assert c.tag == "mid-sync" and not c.consistent
        s.check_latest()
    finally:
        s.close()


def test_a_buffer_overflow_folds_into_bitmaps_then_syncs(tmp_path):
    s = Site(tmp_path, VPGSettings(checkpoint_interval=3600, buffer_bytes=4 * MiB,
                                   bundle_bytes=256 * KiB))
    try:
        s.start(link=False)  # nothing drains: the buffer must overflow
        scribble(s, 200, 6)  # ~6.5 MiB of writes
        wait_for(lambda: any("buffer overflow" in e for e in s.vpg.status().events),
                 what="the overflow")
        s.check_latest()
        assert s.vpg.status().mode == "streaming"
    finally:
        s.close()


def test_a_tagged_checkpoint_folded_before_delivery_is_journaled_after_the_sync(site):
    """Sealed but unacknowledged at the fold: carried through the bitmap sync and
    journaled after every sync record, flagged not crash-consistent (its image also
    holds later writes), never silently dropped."""
    site.start(link=False)
    scribble(site, 5, 7)
    ckpt = site.vpg.checkpoint("carried")
    site.vpg.flush()
    site.vpg.link_down()
    assert site.vpg.checkpoint_state(ckpt).state == CheckpointState.PENDING
    site.check_latest()
    report = site.vpg.checkpoint_state(ckpt)
    assert report.state == CheckpointState.DURABLE and not report.consistent
    for j in site.journals.values():
        (held,) = j.checkpoints(tag="carried")
        assert held.seq == report.journal_seq > ckpt.seq and not held.consistent
        syncs = [c for c in j.checkpoints() if c.consistent and c.seq < held.seq]
        assert not syncs or syncs[-1].seq < ckpt.seq  # no consistent one between
    assert any("'carried'" in e and "not crash-consistent" in e for e in site.vpg.events)


def test_an_overflow_while_the_link_holds_unacked_bundles_does_not_resync_into_it(tmp_path):
    """Issue 9 finding 15: the bitmap sync began the moment an overflow's fold ended, into
    a link that had acknowledged nothing since it stalled; the sync filled the buffer it
    did not drain and the VPG folded again (8 folds in one 13 s drop).  The sync waits
    for the ack of what the link took (or for link_up), then runs once."""
    s = Site(tmp_path, VPGSettings(checkpoint_interval=3600, buffer_bytes=4 * MiB,
                                   bundle_bytes=256 * KiB))
    try:
        s.start(link=False)
        scribble(s, 10, 8)
        taken = s.vpg.wait_bundles(0, 5.0)  # a link takes them, and then stalls
        assert taken
        scribble(s, 200, 6)  # ~6.5 MiB of writes: the buffer overflows
        wait_for(lambda: any("buffer overflow" in e for e in s.vpg.events),
                 what="the overflow")
        time.sleep(0.3)
        assert s.vpg.mode == "bitmap", s.vpg.events
        assert not s.sync_started(), s.vpg.events
        assert sum(e.split(" ", 1)[1].startswith("bitmap mode:") for e in s.vpg.events) == 1
        s.vpg.ack(taken[-1].last_seq)  # the link delivers after all
        wait_for(lambda: s.sync_started(), what="the sync after the ack")
        s.check_latest()
        assert len(s.sync_started()) == 1, s.vpg.events
    finally:
        s.close()


def test_a_tagged_checkpoint_in_the_ring_at_an_overflow_is_not_dropped_unseen(tmp_path):
    """The pending bound is reached first, so the marker waits in the ring when it
    overflows: the ring's discard used to skip it with no event, and acked_seq later
    passed its seq.  It must reach the journals (or be reported lost), and the VPG says
    which."""
    s = Site(tmp_path, VPGSettings(checkpoint_interval=3600, buffer_bytes=4 * MiB,
                                   bundle_bytes=256 * KiB))
    try:
        s.start(link=False)
        vols = s.volumes
        for i in range(48):  # 3 MiB: the pending bound (2 MiB) fills, the ring holds the rest
            vols[i % 3].write((i // 3) * 64 * KiB, random.Random(i).randbytes(64 * KiB))
        wait_for(lambda: (lambda st: st.buffer_used - st.ring_used >= 2 * MiB)(
            s.vpg.status()), what="the pending bound")
        ckpt = s.vpg.checkpoint("kept")
        for i in range(32):  # 2 MiB more: the ring overflows with the marker in it
            vols[i % 3].write((i // 3) * 64 * KiB, random.Random(100 + i).randbytes(64 * KiB))
        wait_for(lambda: any("buffer overflow" in e for e in s.vpg.events),
                 what="the overflow")
        s.check_latest()
        held = [c for j in s.journals.values() for c in j.checkpoints(tag="kept")]
        lost = [e for e in s.vpg.events if "'kept'" in e and "lost" in e]
        assert held or lost, "tagged checkpoint neither journaled nor reported lost"
        assert s.vpg.acked_seq > ckpt.seq
        report = s.vpg.checkpoint_state(ckpt)
        assert report.state == CheckpointState.DURABLE
        assert len(held) == len(s.journals) and {c.seq for c in held} == {report.journal_seq}
        assert not report.consistent and report.checkpoint == ckpt
        assert s.vpg.status().checkpoints_pending == 0
    finally:
        s.close()


def test_a_tagged_checkpoint_undelivered_at_stop_is_reported_lost(site):
    site.start(link=False)
    scribble(site, 5, 8)
    ckpt = site.vpg.checkpoint("unsent")
    site.vpg.flush()
    assert site.vpg.status().checkpoints_pending == 1
    site.vpg.stop()
    report = site.vpg.checkpoint_state(ckpt)
    assert report.state == CheckpointState.LOST and report.journal_seq is None
    assert any("'unsent'" in e and "lost" in e for e in site.vpg.events)
    assert site.vpg.status().checkpoints_lost == 1


def test_a_delivered_tagged_checkpoint_is_durable_only_once_acknowledged(site):
    site.start(link=False)
    scribble(site, 3, 9)
    ckpt = site.vpg.checkpoint("ok")
    site.vpg.flush()
    report = site.vpg.checkpoint_state(ckpt)
    assert report.state == CheckpointState.PENDING and report.journal_seq == ckpt.seq
    site.drain()
    report = site.vpg.checkpoint_state(ckpt)
    assert report.state == CheckpointState.DURABLE and report.consistent
    assert report.journal_seq == ckpt.seq
    auto = site.vpg.checkpoint()
    assert site.vpg.checkpoint_state(auto) is None  # only tagged ones are promises


def test_rpo_after_a_fold_is_not_reset_before_the_sync_is_acknowledged(site):
    """The sync's finish used to reset the unsynced-since time when the dirty blocks were
    read into the ring: RPO read near 0 while nothing of them was durable."""
    site.start(link=False)
    scribble(site, 5, 3)
    written = time.time()
    site.vpg.link_down()
    time.sleep(0.5)
    site.vpg.link_up()
    wait_for(lambda: site.vpg.mode == "streaming", what="the sync")
    site.vpg.flush()
    assert site.vpg.status().pending_bundles  # the sync's data is sealed, unacknowledged
    true_rpo = time.time() - written
    assert site.vpg.rpo_seconds() >= true_rpo
    assert site.vpg.status().rpo_seconds >= true_rpo
    site.drain()
    assert site.vpg.rpo_seconds() < 0.5


@pytest.mark.parametrize("bad", [True, 0.0, 512.0])
def test_a_bool_or_float_offset_or_length_is_refused_and_nothing_written(site, bad):
    site.start()
    vol = site.volumes[0]
    before = site.image(0)
    calls = [lambda: vol.write(bad, bytes(512)), lambda: vol.write_zeroes(bad, 512),
             lambda: vol.write_zeroes(0, bad), lambda: vol.read(bad, 512),
             lambda: vol.read(0, bad), lambda: vol.read_into(bad, bytearray(512))]
    for call in calls:
        with pytest.raises((ConfigError, AlignmentError)):
            call()
    assert site.vpg.status().writes == 0
    assert site.image(0) == before


@pytest.mark.parametrize("bad", [True, 0.0, 512.0])
def test_a_bool_or_float_volume_id_or_size_is_refused(tmp_path, bad):
    path = tmp_path / "v.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(ConfigError):
        ProtectedVolume("vm", bad, "v", path, 4096)
    if bad != 0.0:
        with pytest.raises(ConfigError):
            ProtectedVolume("vm", 0, "v", path, bad)
    vpg = VPG("g", tmp_path / "state")
    with pytest.raises(ConfigError):
        vpg.bitmap_path(bad)


def test_a_failed_backing_write_is_raised_and_its_range_resent(site):
    site.start()
    vol = site.volumes[1]
    vol.write(0, b"\x22" * 8192)
    good = os.dup(vol.fd)
    ro = os.open(vol.path, os.O_RDONLY)
    os.dup2(ro, vol.fd)  # the next write's pwrite fails (EBADF)
    try:
        with pytest.raises(NativeIOError):
            vol.write(4096, b"\x33" * 4096)
    finally:
        os.dup2(good, vol.fd)
        os.close(good)
        os.close(ro)
    wait_for(lambda: any("writes failed" in e for e in site.vpg.status().events),
             what="the failed write to be noticed")
    vol.write(64 * KiB, b"\x44" * 4096)
    site.check_latest()


# ---- syncs: initial, and after an initial sync was interrupted ------------------------


def test_initial_sync_copies_the_volumes_before_the_first_consistent_checkpoint(tmp_path):
    s = Site(tmp_path, fill=True)
    try:
        s.start(initial_sync=True)
        assert any("initial sync of every volume" in e for e in s.vpg.status().events)
        scribble(s, 30, 8)  # writes racing the sync
        s.check_latest()
        st = s.vpg.status()
        assert st.sync_total_bytes == s.total_bytes
        for j in s.journals.values():
            assert j.checkpoints(consistent=True)[0].seq > 1
    finally:
        s.close()


def test_a_held_sync_begins_only_once_released(tmp_path):
    """start(hold_sync=True): the initial sync waits for release_sync (a hypervisor's
    mirror must forward every later write first); writes meanwhile are only marked."""
    s = Site(tmp_path, fill=True)
    try:
        s.start(initial_sync=True, hold_sync=True)
        scribble(s, 10, 9)
        time.sleep(0.3)  # many stream rounds (bundle_age is milliseconds)
        st = s.vpg.status()
        assert st.mode == VPGMode.BITMAP and not any("bytes started" in e for e in st.events)
        assert st.pending_bundles == 0 and s.journals["vm1"].last_seq == 0
        s.vpg.release_sync()
        wait_for(lambda: s.vpg.status().mode == VPGMode.STREAMING, what="the initial sync")
        assert sum("bytes started" in e for e in s.vpg.status().events) == 1
        s.check_latest()
    finally:
        s.close()


def _interrupted_initial_sync(tmp_path) -> Site:
    """An initial sync of striped data through a 4 MiB buffer: part of it is journaled,
    the rest waits for the link."""
    s = Site(tmp_path, SMALL, layout={"vm1": [("a", 8 * MiB)]}, fill=True)
    s.start(link=False, initial_sync=True)
    wait_for(lambda: s.vpg.status().pending_bundles > 0, what="sealed sync bundles")
    assert s.link.pump() > 0  # the start of the volume is journaled
    j = s.journals["vm1"]
    assert j.last_seq > 0
    return s


def test_blocks_zeroed_after_an_interrupted_initial_sync_are_resent(tmp_path):
    """Zero blocks may be skipped only while the replica still holds nothing of them:
    once part of the initial sync is journaled, a block zeroed during an outage must be
    sent as zeros, or the replica keeps its old data."""
    s = _interrupted_initial_sync(tmp_path)
    try:
        s.vpg.link_down("outage during the initial sync")
        s.volumes[0].write_zeroes(0, 64 * KiB)  # was random, and is journaled
        s.vpg.link_up()
        s.check_latest()
    finally:
        s.close()


def test_blocks_zeroed_before_a_restart_that_resumes_an_initial_sync_are_resent(tmp_path):
    s = _interrupted_initial_sync(tmp_path)
    try:
        s.volumes[0].write_zeroes(0, 64 * KiB)
        s.restart()
        s.check_latest()
    finally:
        s.close()


def test_blocks_zeroed_before_a_crash_during_an_initial_sync_are_resent(tmp_path):
    s = _interrupted_initial_sync(tmp_path)
    try:
        s.volumes[0].write_zeroes(0, 64 * KiB)
        s.crash()
        s.vpg = s._make()
        s.start()
        s.check_latest()
    finally:
        s.close()


# ---- restarts -------------------------------------------------------------------------


def _dirty_then_stop(site: Site) -> int:
    """Stream some writes, then leave a few dirty blocks and stop cleanly; returns the
    dirty bytes the persisted bitmaps hold."""
    site.start()
    scribble(site, 40, 9)
    site.vpg.checkpoint("streamed")
    site.drain()
    site.link.start()
    site.vpg.link_down()
    scribble(site, 10, 10, size=8 * KiB, span=256 * KiB)
    site.stop_link()
    site.vpg.close()
    dirty = 0
    for vid, vol in site.vpg.volumes.items():
        path = site.vpg.bitmap_path(vid)
        assert path.exists()
        dirty += DirtyBitmap.load(path, volume_size=vol.size, volume_id=vid).dirty_bytes
    assert read_vpg_state(site.root / "state" / STATE_NAME)["clean"] is True
    return dirty


def test_a_clean_restart_resumes_the_bitmap_sync_from_persisted_bitmaps(site):
    dirty = _dirty_then_stop(site)
    assert 0 < dirty < site.total_bytes // 8
    site.vpg = site._make()
    site.start()
    wait_for(lambda: site.vpg.mode == "streaming", what="the resumed sync to end")
    st = site.vpg.status()
    assert st.sync_total_bytes == dirty
    assert any(f"bitmap syncing of {dirty} bytes" in e for e in st.events)
    # the journals kept their seqs; new seqs continue above them
    assert st.last_seq > max(j.last_seq for j in site.journals.values()) - 1
    site.check_latest()
    for vid in site.vpg.volumes:  # a completed sync removes the bitmap files
        assert not site.vpg.bitmap_path(vid).exists()


def test_a_sync_stalled_on_an_unacknowledging_link_waits_instead_of_spinning(tmp_path):
    """Ring full and pending bound reached: the stream thread must sleep until an ack,
    not spin through rounds that cannot make progress (it burnt half a core)."""
    s = Site(tmp_path, SMALL, layout=BIG_LAYOUT)
    try:
        s.start(link=False)
        s.vpg.link_down()
        dirty_everything(s)
        s.vpg.link_up()
        wait_for(lambda: s.vpg.mode == "bitmap_syncing" and
                 s.vpg.status().pending_bundles > 0, what="the stalled sync")
        time.sleep(0.1)
        before = s.vpg.stream_rounds
        time.sleep(0.5)
        # bundle_age (20 ms) between idle rounds: ~25; a spinning thread does thousands
        assert s.vpg.stream_rounds - before < 100
        s.check_latest()
    finally:
        s.close()


def test_a_sync_leaves_room_in_the_buffer_for_the_guests_writes(tmp_path):
    """A sync stalled on the link (ring and pending bound full of sync data) must not
    have filled the ring to the brim: a guest write then overflows it, and the fold
    throws the sync's progress away, again and again under a steady trickle."""
    s = Site(tmp_path, SMALL, layout=BIG_LAYOUT)
    try:
        s.start(link=False)
        s.vpg.link_down()
        dirty_everything(s)
        s.vpg.link_up()
        def stalled() -> bool:
            st = s.vpg.status()
            return (st.mode == "bitmap_syncing" and st.pending_bundles > 0 and
                    st.ring_used > st.ring_bytes // 2)

        wait_for(stalled,
                 what="the sync to stall on the link")
        time.sleep(0.1)  # the sync took all the room it will take
        rng = random.Random(17)
        for k in range(8):  # 256 KiB of guest writes between two seals
            s.volumes[0].write(k * 32 * KiB, rng.randbytes(32 * KiB))
        time.sleep(0.05)
        assert not any("overflow" in e for e in s.vpg.status().events)
        assert s.vpg.mode == "bitmap_syncing"
        s.check_latest()
    finally:
        s.close()


def test_a_restart_while_syncing_resumes_what_is_left(tmp_path):
    s = Site(tmp_path, SMALL, layout=BIG_LAYOUT)
    try:
        s.start(link=False)
        s.vpg.link_down()
        dirty_everything(s)
        s.vpg.link_up()
        wait_for(lambda: s.vpg.mode == "bitmap_syncing" and
                 s.vpg.status().pending_bundles > 0, what="sync bundles")
        assert s.link.pump() > 0  # part of the sync is journaled
        s.restart(link=False)
        assert s.vpg.mode == "bitmap"
        wait_for(lambda: s.vpg.mode != "bitmap", what="the resumed sync")
        resumed = s.vpg.status().sync_total_bytes
        assert 0 < resumed < s.total_bytes
        s.check_latest()
        assert any("bitmap syncing complete" in e for e in s.vpg.status().events)
    finally:
        s.close()


def test_a_corrupt_persisted_bitmap_resends_its_whole_volume(site):
    dirty = _dirty_then_stop(site)
    path = site.vpg.bitmap_path(1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    site.vpg = site._make()
    site.start()
    wait_for(lambda: site.vpg.mode == "streaming", what="the resumed sync to end")
    st = site.vpg.status()
    assert any("bitmap of volume b is unreadable" in e and "whole volume" in e
               for e in st.events)
    assert dirty < st.sync_total_bytes
    assert st.sync_total_bytes >= site.vpg.volumes[1].size
    site.check_latest()


def test_a_missing_persisted_bitmap_resends_its_whole_volume(site):
    """After a clean stop every volume has a bitmap file; one that is gone cannot be read
    as "nothing dirty"."""
    _dirty_then_stop(site)
    site.vpg.bitmap_path(2).unlink()
    site.vpg = site._make()
    site.start()
    wait_for(lambda: site.vpg.mode == "streaming", what="the resumed sync to end")
    st = site.vpg.status()
    assert st.sync_total_bytes >= site.vpg.volumes[2].size
    assert any("volume c" in e and "whole volume" in e for e in st.events)
    site.check_latest()


def test_an_unclean_restart_resends_only_what_the_journals_lack(site):
    """After a crash the volumes are compared with the journals (the link compares in
    process): writes that never reached the journals are resent, nothing else."""
    site.start()
    scribble(site, 40, 12)
    site.vpg.checkpoint("before-crash")
    site.stop_link()  # these never reach the journals
    scribble(site, 40, 13)
    site.crash()
    site.vpg = site._make()
    site.start()
    st = site.vpg.status()
    assert any("unclean shutdown" in e for e in st.events)
    report = st.resync
    assert report is not None and report.compared_bytes == site.total_bytes
    assert 0 < report.differing_bytes <= 40 * 68 * KiB < site.total_bytes
    assert any(f"compared {site.total_bytes} bytes, {report.differing_bytes} bytes differ"
               in e for e in st.events)
    wait_for(lambda: site.vpg.mode == "streaming", what="the resync")
    assert site.vpg.status().sync_total_bytes == report.differing_bytes
    site.check_latest()


def test_a_write_racing_stop_is_refused_not_lost(site):
    """A writer that looked the ring up just before stop() detached it, and calls it just
    after stop() folded the ring into the bitmaps: its write must be refused before it
    reaches the backing store.  Were it written, nothing would record it dirty and the
    restart would never resend it."""
    site.start()
    vol = site.volumes[0]
    late = vol.ring.write  # preempted between the lookup and the call
    site.stop_link()
    site.vpg.stop()
    with pytest.raises(StateError):
        late(vol.fd, vol.id, vol.size, 64 * KiB, b"\x5a" * 4096)
    assert site.image(vol.id)[64 * KiB:68 * KiB] == bytes(4096)
    site.vpg.close()
    site.vpg = site._make()
    site.start()
    site.check_latest()


def test_seqs_after_a_restart_stay_above_what_the_journals_hold(site):
    site.start()
    scribble(site, 10, 14)
    site.drain()
    held = max(j.last_seq for j in site.journals.values())
    site.restart()
    seq = site.volumes[0].write(0, b"\x01" * 512)
    assert seq > held
    site.check_latest()


def test_a_state_file_for_other_volumes_or_damaged_is_refused(tmp_path):
    s = Site(tmp_path)
    s.start(link=False)
    s.close()
    other = VPG("g", tmp_path / "state")
    other.add_vm("vm1")
    other.add_volume("vm1", "a", tmp_path / "vm1-a.img")
    with pytest.raises(ConfigError, match="other volumes"):
        other.start()
    state = tmp_path / "state" / STATE_NAME
    meta = read_vpg_state(state)
    write_state(state, STATE_FORMAT, 99, meta)
    with pytest.raises(FormatVersionError):
        Site(tmp_path).vpg.start()
    write_state(state, "something-else", 2, meta)
    with pytest.raises(CorruptRecordError):
        Site(tmp_path).vpg.start()
    doc = json.loads(state.read_text())  # a flipped field fails the checksum
    doc["meta"]["seq_reserved"] += 1
    state.write_text(json.dumps(doc))
    with pytest.raises(CorruptRecordError):
        Site(tmp_path).vpg.start()
    for v1 in (dict(meta, version=99), dict(meta, version=1, format="something-else")):
        state.write_text(json.dumps(v1))  # the plain JSON of version 1
        with pytest.raises((FormatVersionError, CorruptRecordError)):
            Site(tmp_path).vpg.start()
    state.write_text("{ not json")
    with pytest.raises(CorruptRecordError):
        Site(tmp_path).vpg.start()


V1_STATE = Path(__file__).parent / "data" / "vpg-state-v1"


def test_a_version_1_state_directory_still_resumes_its_bitmap_sync(tmp_path):
    """tests/data/vpg-state-v1 was written by the VPG of format version 1 (plain JSON
    vpg.json): VPG "golden", VM vm1 with volume a of 1 MiB, stopped cleanly in bitmap mode
    after an 8 KiB write at 64 KiB.  It loads, resumes the bitmap sync of exactly those
    blocks, and is rewritten as version 2."""
    state = tmp_path / "state"
    state.mkdir()
    for f in V1_STATE.iterdir():
        (state / f.name).write_bytes(f.read_bytes())
    assert json.loads((state / STATE_NAME).read_text())["version"] == 1
    v1 = read_vpg_state(state / STATE_NAME)
    assert v1["clean"] and v1["seq_reserved"] == 16777217
    (tmp_path / "disk.img").write_bytes(bytes(1 * MiB))
    vpg = VPG("golden", state, VPGSettings(checkpoint_interval=3600))
    vpg.add_vm("vm1")
    vpg.add_volume("vm1", "a", tmp_path / "disk.img")
    try:
        vpg.start()
        wait_for(lambda: vpg.mode == VPGMode.STREAMING, what="the resumed sync to end")
        assert vpg.status().sync_total_bytes == 8 * KiB
        assert vpg.volumes[0].write(0, bytes(512)) >= v1["seq_reserved"]
        v2 = json.loads((state / STATE_NAME).read_text())
        assert v2["meta"]["version"] == 2 and not read_vpg_state(state / STATE_NAME)["clean"]
    finally:
        vpg.close()


def test_status_reports_buffer_rpo_and_progress(site):
    site.start(link=False)
    scribble(site, 20, 15)
    site.vpg.flush()
    st = site.vpg.status()
    assert st.pending_bundles > 0 and st.buffer_used > 0
    assert st.buffer_bytes == site.settings.buffer_bytes
    assert st.last_seq > st.acked_seq
    assert st.rpo_seconds >= 0
    site.drain()
    st = site.vpg.status()
    assert st.acked_seq == st.last_seq and st.pending_bundles == 0
