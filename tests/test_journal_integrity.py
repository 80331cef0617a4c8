"""The journal's knowledge of its own files (issue 9, findings 1-4 and 7): promotion
leftovers, the manifest of segments, the durable-length mark of the active segment and
the quarantine of damaged committed records.  Each test is named after the failure it
covers and failed before the fix."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers.journal import abandon

from zcore.errors import JournalFullError
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.journal.retention import RetentionMixin

KiB = 1 << 10
MiB = 1 << 20


class Crash(Exception):
    """Stands for a SIGKILL at the point where it is raised."""


def make(path: Path, size: int = 16 * MiB, **settings: object) -> Journal:
    s = JournalSettings(**{"group_commit_bytes": 0, **settings})  # type: ignore[arg-type]
    return Journal.create(path, [VolumeSpec(0, "disk0", size)], settings=s)


def test_crash_before_promotion_unlinks_does_not_wedge_a_full_journal(tmp_path, monkeypatch):
    """Finding 1: SIGKILL between the watermark write and the first segment unlink left a
    segment wholly below the watermark; promotion counted it as freed without deleting it
    and a journal near its hard limit refused every bundle with "nothing to promote"."""
    rng = random.Random(1)
    j = make(tmp_path / "j", hard_limit_bytes=6 * MiB)
    j.append([(0, 0, rng.randbytes(5 * MiB))])
    real_drop = RetentionMixin._drop_segment

    def crash(self: RetentionMixin, seg: object) -> None:
        raise Crash

    monkeypatch.setattr(RetentionMixin, "_drop_segment", crash)
    with pytest.raises(Crash):
        j.promote_to(j.last_seq + 1)
    abandon(j)
    monkeypatch.setattr(RetentionMixin, "_drop_segment", real_drop)
    j = Journal.open(tmp_path / "j")
    j.wait_loaded()
    assert j.size_bytes < 1 * MiB  # the leftover is gone on reopen
    data = rng.randbytes(2 * MiB)
    j.append([(0, 8 * MiB, data)])  # refused with "nothing to promote" before the fix
    c = j.checkpoint()
    with j.view(c) as v:
        assert v.read(0, 8 * MiB, len(data)) == data
    j.close()


def test_leftover_sealed_segment_below_the_watermark_is_freed_not_just_counted(
        tmp_path, monkeypatch):
    """Finding 1, the accounting: promote() counted a sealed leftover wholly below the
    watermark as freed, then returned early (target not above the watermark) without
    deleting it, and refused the bundle."""
    rng = random.Random(2)
    j = make(tmp_path / "j", hard_limit_bytes=8 * MiB)
    j.append([(0, 0, rng.randbytes(5 * MiB))])
    j.append([(0, 5 * MiB, rng.randbytes(MiB))])  # a second segment: the first is sealed
    monkeypatch.setattr(RetentionMixin, "_drop_segment",
                        lambda self, seg: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        j.promote_to(j.last_seq)
    abandon(j)
    monkeypatch.undo()
    j = Journal.open(tmp_path / "j")
    j.append([(0, 8 * MiB, rng.randbytes(3 * MiB))])
    assert j.size_bytes <= 8 * MiB
    assert j.segments()[0].number >= 2
    j.close()


def test_full_journal_still_refuses_when_nothing_can_be_freed(tmp_path):
    j = make(tmp_path / "j", hard_limit_bytes=6 * MiB)
    c = j.checkpoint()
    j.append([(0, 0, os.urandom(5 * MiB))])
    with j.view(c), pytest.raises(JournalFullError):
        j.append([(0, 0, os.urandom(2 * MiB))])
    j.close()
