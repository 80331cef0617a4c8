"""VPG-wide history retention (zcore.site.retention): every journal promoted to the same
usable checkpoint, history kept, data unchanged, a pinned journal skipped, and a stopped
stream with a lagging journal never left without a usable checkpoint."""

from __future__ import annotations

import asyncio
import os

from zcore import records
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.site.recovery_vpg import RecoveryVPG
from zcore.site.retention import apply_retention, retention_target, run_retention

VOLUME = 256 << 10
HOUR = 3600
BASE_NS = 1_800_000_000 * 10**9
STEP = 600  # seconds between checkpoints of the test stream
SETTINGS = JournalSettings(history_seconds=HOUR, group_commit_bytes=0)


class Stream:
    """A VPG stream written by hand into two journals, one checkpoint every STEP s."""

    def __init__(self, tmp_path) -> None:
        self.journals = {f"vm{i}": Journal.create(
            tmp_path / f"vm{i}", [VolumeSpec(i, f"disk{i}", VOLUME)], vm=f"vm{i}",
            settings=SETTINGS) for i in range(2)}
        self.seq = 0
        self.images = [bytearray(VOLUME), bytearray(VOLUME)]
        self.at: dict[int, list[bytes]] = {}  # checkpoint seq -> images then

    def t(self, k: int) -> int:
        return BASE_NS + k * STEP * 10**9

    def step(self, k: int, vms=(0, 1)) -> int:
        for vm in vms:
            self.seq += 1
            offset = (k * 4096 + vm * 8192) % VOLUME
            data = os.urandom(4096)
            self.journals[f"vm{vm}"].append_encoded(
                records.encode_write(vm, self.seq, offset, data, self.t(k)))
            self.images[vm][offset:offset + 4096] = data
        self.seq += 1
        marker = records.encode_checkpoint(self.seq, self.t(k), records.CKPT_AUTO, True)
        for vm in vms:
            self.journals[f"vm{vm}"].append_encoded(marker)
        for j in self.journals.values():
            j.commit()
        self.at[self.seq] = [bytes(i) for i in self.images]
        return self.seq


def _read_all(vpg: RecoveryVPG, seq: int) -> list[bytes]:
    with vpg.views(seq) as views:
        return [views.read(f"vm{vm}", vm, 0, VOLUME) for vm in range(2)]


def test_every_journal_is_promoted_to_the_newest_checkpoint_older_than_the_history(tmp_path):
    s = Stream(tmp_path)
    seqs = [s.step(k) for k in range(12)]  # 12 checkpoints over 110 minutes
    now = s.t(11) / 1e9 + 60
    with RecoveryVPG("vpg", s.journals, owns_journals=True) as vpg:
        target = retention_target(vpg, now=now)
        # the newest checkpoint at or before now - 1 h: k = 5 (t = 50 min, now = 111 min)
        assert target == seqs[5]
        report = apply_retention(vpg, now=now)
        assert report.target_seq == target and not report.skipped
        assert report.promoted == {"vm0": target, "vm1": target}
        kept = [c.seq for c in vpg.checkpoints()]
        assert kept == seqs[5:]
        assert vpg.status(now=now).history_held_seconds >= HOUR
        for seq in kept:  # the replicas took the promoted writes: every view unchanged
            assert _read_all(vpg, seq) == s.at[seq]
        # a second round in the same minute has nothing to do
        assert apply_retention(vpg, now=now).promoted == {}


def test_nothing_is_promoted_while_no_checkpoint_is_as_old_as_the_history(tmp_path):
    s = Stream(tmp_path)
    for k in range(3):
        s.step(k)
    with RecoveryVPG("vpg", s.journals, owns_journals=True) as vpg:
        report = apply_retention(vpg, now=s.t(2) / 1e9 + 60)
        assert report.target_seq is None and report.promoted == {}
        assert len(vpg.checkpoints()) == 3


def test_a_stopped_stream_keeps_its_last_usable_checkpoint_when_a_journal_lags(tmp_path):
    s = Stream(tmp_path)
    seqs = [s.step(k) for k in range(3)]
    s.step(3, vms=(0,))  # vm1 never got the last bundle: the stream stopped there
    much_later = s.t(3) / 1e9 + 30 * 86400
    with RecoveryVPG("vpg", s.journals, owns_journals=True) as vpg:
        assert vpg.latest().seq == seqs[2]
        report = apply_retention(vpg, now=much_later)
        assert report.target_seq == seqs[2]
        assert [c.seq for c in vpg.checkpoints()] == [seqs[2]]  # still one to fail over to
        assert _read_all(vpg, seqs[2]) == s.at[seqs[2]]


def test_a_journal_pinned_by_a_view_is_skipped_and_catches_up_later(tmp_path):
    s = Stream(tmp_path)
    seqs = [s.step(k) for k in range(12)]
    now = s.t(11) / 1e9 + 60
    with RecoveryVPG("vpg", s.journals, owns_journals=True) as vpg:
        pinned = s.journals["vm1"].view(seqs[1])
        report = apply_retention(vpg, now=now)
        assert set(report.promoted) == {"vm0"} and "pins" in report.skipped["vm1"]
        pinned.close()
        report = apply_retention(vpg, now=now)
        assert report.promoted == {"vm1": seqs[5]}


def test_the_retention_loop_runs_rounds_until_stopped(tmp_path):
    s = Stream(tmp_path)
    seqs = [s.step(k) for k in range(12)]
    reports = []

    async def main(vpg: RecoveryVPG) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_retention(
            lambda: [vpg], stop, interval=0.01, on_report=reports.append,
            clock=lambda: s.t(11) / 1e9 + 60))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 5)

    with RecoveryVPG("vpg", s.journals, owns_journals=True) as vpg:
        asyncio.run(main(vpg))
    # the first round promoted; later rounds had nothing to do and reported nothing
    assert [r.target_seq for r in reports] == [seqs[5]]
