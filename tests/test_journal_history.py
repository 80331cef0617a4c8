"""History retention without a caller (issue 9, finding 11): the one mechanism beside the
journal (zcore.journal.history) promotes what aged past the history, raises history and
journal-full states as events once per change, grants a new journal grace while its
history builds up, and the recovery site runs it on a timer."""

from __future__ import annotations

import asyncio
import os
import time

from zcore import records
from zcore.journal import HOUR, Journal, JournalSettings, VolumeSpec
from zcore.journal.history import EventKind, RetentionKeeper, usable_target
from zcore.replication.journals import VPGReceiver
from zcore.replication.recovery_site import RecoverySite

MiB = 1 << 20
VOLUME = 256 << 10
STEP = 600  # seconds between checkpoints of the test stream


class Stream:
    """Two journals written by hand, one checkpoint every `step` s from `base` on."""

    def __init__(self, tmp_path, base: float, step: float = STEP, **settings) -> None:
        settings.setdefault("history_seconds", HOUR)
        settings.setdefault("group_commit_bytes", 0)
        self.journals = {f"vm{i}": Journal.create(
            tmp_path / f"vm{i}", [VolumeSpec(i, f"disk{i}", VOLUME)], vm=f"vm{i}",
            settings=JournalSettings(**settings)) for i in range(2)}
        self.base = base
        self.step_seconds = step
        self.seq = 0

    def t(self, k: int) -> int:
        return int((self.base + k * self.step_seconds) * 1e9)

    def step(self, k: int, size: int = 4096) -> int:
        for vm in range(2):
            self.seq += 1
            self.journals[f"vm{vm}"].append_encoded(records.encode_write(
                vm, self.seq, (k * size) % VOLUME, os.urandom(size), self.t(k)))
        self.seq += 1
        marker = records.encode_checkpoint(self.seq, self.t(k), records.CKPT_AUTO, True)
        for j in self.journals.values():
            j.append_encoded(marker)
            j.commit()
        return self.seq

    def close(self) -> None:
        for j in self.journals.values():
            j.close()


def test_new_journal_reports_history_building_instead_of_error(tmp_path):
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d", VOLUME)],
                       settings=JournalSettings(history_seconds=4 * HOUR))
    born = j.created_ns / 1e9
    assert j.status().history_state == "building"
    assert j.status(now=born + 3.9 * HOUR).history_state == "building"
    # as old as its history and holding none of it: now it falls short
    assert j.status(now=born + 4 * HOUR).history_state == "error"
    j.close()


def test_history_is_enforced_by_rounds_with_no_caller_promoting(tmp_path):
    s = Stream(tmp_path, time.time() - 12 * STEP)
    seqs = [s.step(k) for k in range(12)]
    now = s.t(11) / 1e9 + 60
    keeper = RetentionKeeper("vpg", s.journals)
    # the newest checkpoint at least an hour old: k = 5 (6 steps of 10 min before k = 11)
    assert usable_target(s.journals, now=now) == seqs[5]
    report = keeper.run_round(now=now)
    assert report.promoted == {"vm0": seqs[5], "vm1": seqs[5]}
    assert all(j.checkpoints()[0].seq == seqs[5] for j in s.journals.values())
    assert keeper.run_round(now=now).promoted == {}  # nothing more aged out
    s.close()


def test_a_checkpoint_one_journal_lacks_is_never_the_group_target(tmp_path):
    s = Stream(tmp_path, time.time() - 12 * STEP)
    seqs = {}
    for k in range(12):
        if k == 5:  # only vm0 got this checkpoint: it is not usable
            s.seq += 1
            s.journals["vm0"].append_encoded(records.encode_checkpoint(
                s.seq, s.t(k), records.CKPT_AUTO, True))
            s.journals["vm0"].commit()
        else:
            seqs[k] = s.step(k)
    report = RetentionKeeper("vpg", s.journals).run_round(now=s.t(11) / 1e9 + 60)
    assert report.target_seq == seqs[4]
    assert report.promoted == {"vm0": seqs[4], "vm1": seqs[4]}
    s.close()


def test_history_shortfall_and_journal_full_are_raised_once_as_events(tmp_path):
    events = []
    # the first checkpoint comes 3 h after the journals were made (a long initial sync)
    s = Stream(tmp_path, time.time() + 3 * HOUR, step=1, history_seconds=4 * HOUR,
               hard_limit_bytes=4 * MiB, warning_fraction=0.5)
    keeper = RetentionKeeper("vpg", s.journals, on_event=events.append)
    born = max(j.created_ns for j in s.journals.values()) / 1e9
    s.step(0)
    assert keeper.run_round(now=born + 60).events == []  # building, under the limit
    for k in range(1, 40):  # 2.5 MiB per journal: past the 2 MiB warning
        s.step(k, size=64 << 10)
    assert {(e.vm, e.kind, e.state) for e in keeper.run_round(now=born + 120).events} == {
        ("vm0", EventKind.LIMIT, "near_limit"), ("vm1", EventKind.LIMIT, "near_limit")}
    assert keeper.run_round(now=born + 180).events == []  # no change, no event

    def changes(now):
        return {(e.vm, e.kind, e.state, e.previous) for e in keeper.run_round(now=now).events}

    # 4 h old, 1 h of history held: the grace is over and history falls short
    short = born + 4 * HOUR + 60
    assert changes(short) == {("vm0", EventKind.HISTORY, "error", "building"),
                              ("vm1", EventKind.HISTORY, "error", "building")}
    assert changes(short + 60) == set()
    # history builds up past 4 h: ok again; the round promotes what aged past it (all but
    # the newest checkpoint), so the journals are back under their warning limit
    assert changes(s.base + 4.5 * HOUR) == {
        ("vm0", EventKind.HISTORY, "ok", "error"), ("vm1", EventKind.HISTORY, "ok", "error"),
        ("vm0", EventKind.LIMIT, "ok", "near_limit"),
        ("vm1", EventKind.LIMIT, "ok", "near_limit")}
    assert len(events) == 8  # on_event saw each one
    s.close()


def test_recovery_site_enforces_history_on_a_timer_with_no_caller(tmp_path):
    s = Stream(tmp_path / "journals", time.time() - 12 * STEP)
    seqs = [s.step(k) for k in range(12)]
    # checkpoint k was taken (12 - k) * 10 min ago: the newest an hour old is k = 6
    expected = seqs[6]

    async def main() -> list[int]:
        site = RecoverySite(tmp_path / "site")
        site.retention_interval = 0.05
        site.receivers["vpg"] = VPGReceiver("vpg", "owner", list(s.journals), s.journals)
        await site.start()
        try:
            for _ in range(100):
                if all(j.promoted_seq >= expected for j in s.journals.values()):
                    break
                await asyncio.sleep(0.05)
            return [j.promoted_seq for j in s.journals.values()]
        finally:
            await site.stop()  # closes the journals

    assert asyncio.run(main()) == [expected, expected]
