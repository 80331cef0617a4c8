"""The journal's knowledge of its own files (issue 9, findings 1-4 and 7): promotion
leftovers, the manifest of segments, the durable-length mark of the active segment and
the quarantine of damaged committed records.  Each test is named after the failure it
covers and failed before the fix."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers.journal import abandon

from zcore._native import record as _rec
from zcore.errors import CorruptRecordError, DamagedRecordError, JournalFullError
from zcore.journal import Checkpoint, Journal, JournalSettings, ReopenReport, VolumeSpec, segments
from zcore.journal.manifest import ManifestMixin
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


# ---- the manifest: missing, extra and truncated segments (findings 2, 3, 4) -------------


def three_segments(path: Path, rng: random.Random
                   ) -> tuple[Journal, list[Checkpoint], dict[int, bytes]]:
    """A closed journal of four segments (three sealed), a checkpoint after each bundle;
    returns it reopened, its checkpoints and the image of volume 0 at each."""
    j = make(path, size=8 * MiB, segment_bytes=MiB)
    model = bytearray(8 * MiB)
    cps = []
    images = {}
    for i in range(4):
        data = rng.randbytes(600 * KiB)
        off = i * MiB
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
        cps.append(j.checkpoint())
        images[cps[-1].seq] = bytes(model)
    assert len(seg_files(path)) == 4
    j.close()
    return Journal.open(path), cps, images


def seg_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.zcj"))


def reads_or_refuses(j: Journal, c: Checkpoint, image: bytes) -> str:
    with j.view(c) as v:
        try:
            got = v.read(0, 0, len(image))
        except DamagedRecordError:
            return "refused"
    assert got == image, f"checkpoint {c.seq} served wrong bytes"
    return "exact"


def test_missing_oldest_segment_is_reported_and_views_do_not_serve_stale_replica_bytes(
        tmp_path):
    """Finding 2: with the oldest segment gone, reopen reported nothing and every view
    returned the replica's stale bytes for what that segment held."""
    j, cps, images = three_segments(tmp_path / "j", random.Random(3))
    j.close()
    oldest = seg_files(tmp_path / "j")[0]
    oldest.unlink()
    oldest.with_suffix(".zci").unlink()
    j = Journal.open(tmp_path / "j")
    report = j.reopen_report
    assert report.damage and report.damaged_seqs[0][0] == 1
    assert report.dropped_bytes == 0
    # the first checkpoint went with the segment; every later one lacks its writes
    assert [c.seq for c in j.checkpoints()] == [c.seq for c in cps[1:]]
    assert report.inexact_checkpoints == tuple(c.seq for c in cps[1:])
    assert j.status().damaged_seqs == report.damaged_seqs
    assert reads_or_refuses(j, cps[-1], images[cps[-1].seq]) == "refused"
    j.close()
    j = Journal.open(tmp_path / "j")  # the damage is recorded, not forgotten
    assert j.reopen_report.damaged_seqs == report.damaged_seqs
    assert reads_or_refuses(j, cps[-1], images[cps[-1].seq]) == "refused"
    j.close()


def test_missing_newest_segment_is_reported_with_the_writes_it_lost(tmp_path):
    """Finding 3: with the newest segment gone, its committed writes and checkpoints
    vanished and the reopen report was empty."""
    j, cps, images = three_segments(tmp_path / "j", random.Random(4))
    last_sealed = j.segments()[-2].max_seq
    j.close()
    seg_files(tmp_path / "j")[-1].unlink()
    j = Journal.open(tmp_path / "j")
    report = j.reopen_report
    assert report.damage and report.dropped_bytes == 0
    assert report.damaged_seqs == ((last_sealed + 1, None),)
    assert any("active segment" in d for d in report.damage)
    kept = [c for c in cps if c.seq <= last_sealed]
    assert [c.seq for c in j.checkpoints()] == [c.seq for c in kept]
    assert report.inexact_checkpoints == ()  # what is left is exact
    assert reads_or_refuses(j, kept[-1], images[kept[-1].seq]) == "exact"
    j.append([(0, 0, b"\x01" * 4096)])  # the journal takes new writes
    j.close()


def test_sealed_segment_truncated_at_a_record_boundary_is_reported(tmp_path):
    """Finding 4: a sealed segment cut at a record boundary was accepted: its index was
    discarded as a stale cache and the rescan adopted the short file."""
    j, cps, images = three_segments(tmp_path / "j", random.Random(5))
    info = j.segments()[-2]
    j.close()
    seg = info.path
    data = seg.read_bytes()
    sizes = np.zeros(1, dtype=np.uint64)
    sizes[0] = 8 * MiB
    recs = _rec.scan(data[64:], 64, info.number, 0, sizes).array()
    cut = int(recs["pos"][len(recs) // 2])
    with open(seg, "r+b") as f:
        f.truncate(cut)
    j = Journal.open(tmp_path / "j")
    report = j.reopen_report
    assert report.damage and report.dropped_bytes == 0
    lo, hi = report.damaged_seqs[0]
    assert hi == info.max_seq and lo <= info.max_seq
    assert [c.seq for c in cps if c.seq > lo] == list(report.inexact_checkpoints)
    assert reads_or_refuses(j, cps[-1], images[cps[-1].seq]) == "refused"
    j.close()


def test_segment_not_in_the_manifest_is_set_aside_and_reported(tmp_path):
    j, cps, images = three_segments(tmp_path / "j", random.Random(6))
    newest = j.segments()[-1]
    j.close()
    stray = tmp_path / "j" / f"seg-{newest.number + 5:08d}.zcj"
    shutil.copy(newest.path, stray)
    j = Journal.open(tmp_path / "j")
    assert any("not in the manifest" in d for d in j.reopen_report.damage)
    assert not stray.exists() and stray.with_name(stray.name + ".unlisted").exists()
    assert reads_or_refuses(j, cps[-1], images[cps[-1].seq]) == "exact"
    j.close()


def test_rotation_crash_before_the_manifest_names_the_new_segment_opens_clean(
        tmp_path, monkeypatch):
    """A crash after rotation created the next segment but before the manifest named it
    leaves a newer segment holding no record: not damage, removed at reopen."""
    j = make(tmp_path / "j", segment_bytes=MiB)
    j.append([(0, 0, os.urandom(700 * KiB))])
    c = j.checkpoint()
    monkeypatch.setattr(ManifestMixin, "_listed_sealed",
                        lambda self: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        j.append([(0, MiB, os.urandom(700 * KiB))])
    abandon(j)
    monkeypatch.undo()
    assert len(seg_files(tmp_path / "j")) == 2
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report == ReopenReport()
    assert len(seg_files(tmp_path / "j")) == 1 and j.checkpoints() == [c]
    j.close()


def test_flipped_bit_in_the_manifest_is_refused(tmp_path):
    j, _cps, _images = three_segments(tmp_path / "j", random.Random(7))
    j.close()
    m = tmp_path / "j" / "journal.manifest"
    raw = bytearray(m.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    m.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError):
        Journal.open(tmp_path / "j")


# ---- the durable-length mark and quarantine (finding 7) --------------------------------


def active_journal(path: Path, rng: random.Random, n: int = 24) -> tuple[Journal, bytes,
                                                                        list[Checkpoint]]:
    """A journal whose active segment holds `n` committed 16 KiB writes, a checkpoint
    after each; closed."""
    j = make(path, size=4 * MiB)
    model = bytearray(4 * MiB)
    cps = []
    for i in range(n):
        data = rng.randbytes(16 * KiB)
        j.append([(0, i * 64 * KiB, data)], compress=False)
        model[i * 64 * KiB : i * 64 * KiB + len(data)] = data
        cps.append(j.checkpoint())
        j.commit()
    j.close()
    return j, bytes(model), cps


def test_flipped_bit_inside_committed_records_of_the_active_segment_is_not_a_torn_tail(
        tmp_path):
    """Finding 7: one flipped bit in the middle of the active segment dropped every
    committed record after it as a "torn tail".  Now the record is quarantined, every
    intact record after it kept, and the damaged seq and inexact checkpoints named."""
    _j, model, cps = active_journal(tmp_path / "j", random.Random(8))
    seg = seg_files(tmp_path / "j")[-1]
    size = seg.stat().st_size
    data = seg.read_bytes()
    sizes = np.array([4 * MiB], dtype=np.uint64)
    recs = _rec.scan(data[64:], 64, 1, 0, sizes).array()
    victim = recs[recs["type"] == 1][10]
    with open(seg, "r+b") as f:
        f.seek(int(victim["pos"]) + 64 + int(victim["stored"]) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    j = Journal.open(tmp_path / "j")
    report = j.reopen_report
    assert report.dropped_bytes == 0 and seg.stat().st_size == size
    seq = int(victim["seq"])
    assert report.damaged_seqs == ((seq, seq),)
    assert report.inexact_checkpoints == tuple(c.seq for c in cps if c.seq > seq)
    assert j.status().inexact_checkpoints == report.inexact_checkpoints
    assert j.last_seq == cps[-1].seq and [c.seq for c in j.checkpoints()] == \
        [c.seq for c in cps]
    off = int(victim["offset"])
    with j.view(cps[-1]) as v:
        with pytest.raises(DamagedRecordError):
            v.read(0, off, 4096)
        # every other write, including those after the damaged one, reads back
        assert v.read(0, off + 64 * KiB, 3 * MiB) == model[off + 64 * KiB : off + 3 * MiB
                                                           + 64 * KiB]
    with j.view(cps[seq - 2 if seq > 2 else 0]) as v:  # before it: exact
        assert v.read(0, 0, off) == read_before(cps, model, seq)[:off]
    j.append([(0, 0, b"\x02" * 4096)])  # appends go on after the quarantined record
    j.close()
    j = Journal.open(tmp_path / "j")  # and the quarantine is remembered
    assert (seq, seq) in j.reopen_report.damaged_seqs
    j.close()


def read_before(cps: list[Checkpoint], model: bytes, seq: int) -> bytes:
    """The model as of before `seq`: the writes are 16 KiB at i * 64 KiB, each followed
    by a checkpoint, so the image before write i is the model cut at i * 64 KiB."""
    i = (seq - 1) // 2
    return model[: i * 64 * KiB]


def test_unsynced_tail_past_the_mark_is_still_a_torn_tail(tmp_path):
    """The mark tells the two apart: damage past it is a crash's unsynced tail, truncated
    and counted in dropped_bytes; nothing is reported as damage."""
    j = make(tmp_path / "j", size=4 * MiB)
    j.append([(0, 0, os.urandom(64 * KiB))], compress=False)
    j.commit()
    j.append([(0, 64 * KiB, os.urandom(64 * KiB))], compress=False)
    c = j.checkpoint()
    j.commit()  # writes the mark for the first commit, then syncs the second
    j.append([(0, 128 * KiB, os.urandom(64 * KiB))], compress=False)  # never committed
    seg = j.segments()[-1].path
    end = j.segments()[-1].size
    abandon(j)
    with open(seg, "r+b") as f:  # the crash tore the unsynced record
        f.seek(end - 4096)
        f.write(bytes(4096))
    j = Journal.open(tmp_path / "j")
    report = j.reopen_report
    assert report.damage == () and report.dropped_bytes > 0 and report.reason
    assert j.checkpoints()[-1] == c
    j.close()


def test_group_commit_writes_its_mark_without_an_extra_fsync(tmp_path, monkeypatch):
    j = make(tmp_path / "j")
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    for i in range(5):
        j.append([(0, i * 4096, os.urandom(4096))])
        j.commit()
    assert len(calls) == 5  # one fdatasync per commit, the mark rides on it
    j.close()
    head = j_segment_head(tmp_path / "j")
    mark = segments.read_mark(head)
    assert mark is not None and mark[0] == seg_files(tmp_path / "j")[-1].stat().st_size


def j_segment_head(path: Path) -> bytes:
    return seg_files(path)[-1].read_bytes()[:64]


# ---- kill points along rotation and promotion: the manifest's order -------------------


def _workload(path: Path, hook: Callable[[], None]) -> dict[int, bytes]:
    """Rotations and promotions near the hard limit; calls `hook` before every file
    operation that changes the directory.  Returns the image of each committed
    checkpoint (volume 0)."""
    rng = random.Random(9)
    hook.journal = None  # type: ignore[attr-defined]
    j = make(path, size=8 * MiB, hard_limit_bytes=6 * MiB)
    model = bytearray(8 * MiB)
    images: dict[int, bytes] = {}
    try:
        for i in range(14):
            data = rng.randbytes(700 * KiB)
            off = (i % 10) * 700 * KiB
            j.append([(0, off, data)], compress=False)
            model[off : off + len(data)] = data
            c = j.checkpoint()
            j.commit()
            images[c.seq] = bytes(model)
            if i % 4 == 3:
                j.promote_to(c.seq)
        j.close()
    finally:
        hook.journal = j  # type: ignore[attr-defined]
    return images


def test_a_kill_at_any_file_operation_of_rotation_or_promotion_reopens_clean(
        tmp_path, monkeypatch):
    """Every point where a kill -9 can stop rotation (segment creation, manifest) or
    promotion (watermark, manifest, unlinks): reopen reports no damage, keeps every
    committed checkpoint not yet promoted, and takes new bundles."""
    real = {"replace": os.replace, "unlink": Path.unlink, "open": os.open}
    calls = [0]
    crash_at = [-1]

    def hook() -> None:
        calls[0] += 1
        if calls[0] == crash_at[0]:
            raise Crash

    def patch() -> None:
        monkeypatch.setattr(os, "replace", lambda *a, **k: (hook(), real["replace"](*a, **k))[1])
        monkeypatch.setattr(Path, "unlink",
                            lambda self, *a, **k: (hook(), real["unlink"](self, *a, **k))[1])
        monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: (
            hook() if flags & os.O_CREAT else None, real["open"](p, flags, *a, **k))[1])

    patch()
    full = _workload(tmp_path / "dry", hook)
    total = calls[0]
    assert total > 40, total
    for n in range(1, total + 1, 1 if os.environ.get("ZCORE_DEEP") else 3):
        path = tmp_path / f"k{n}"
        calls[0], crash_at[0] = 0, n
        try:
            images = _workload(path, hook)
        except Crash:
            if hook.journal is None:  # type: ignore[attr-defined]
                continue  # killed while Journal.create made the directory
            abandon(hook.journal)  # type: ignore[attr-defined]
            images = full
        calls[0], crash_at[0] = 0, -1
        j = Journal.open(path)
        report = j.reopen_report
        assert report.damage == () and report.dropped_bytes == 0, (n, report)
        for c in j.checkpoints():
            if c.seq in images and c.seq >= j.promoted_seq:
                with j.view(c) as v:
                    assert v.read(0, 0, 8 * MiB) == images[c.seq], (n, c.seq)
        j.append([(0, 0, os.urandom(2 * MiB))])  # never wedged
        j.close()
        shutil.rmtree(path)
