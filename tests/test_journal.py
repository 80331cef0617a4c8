"""Unit tests of zcore.journal, each named after the failure it covers.

The state machine in test_journal_model.py explores sequences of operations; these tests
pin down single behaviours: refusals, retention, limits, fsync failures, reopening.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.journal import abandon

from zcore import records
from zcore._native import record as _rec
from zcore.errors import (
    AlignmentError,
    CheckpointNotFoundError,
    ChecksumError,
    ClosedError,
    ConfigError,
    CorruptRecordError,
    DamagedRecordError,
    DurabilityError,
    JournalFullError,
    OutOfRangeError,
    SequenceError,
)
from zcore.journal import Journal, JournalSettings, VolumeSpec

KiB = 1 << 10
MiB = 1 << 20
HOUR = 3600.0


def make(path: Path, sizes=(MiB,), **settings) -> Journal:
    settings.setdefault("segment_bytes", MiB)
    settings.setdefault("group_commit_bytes", 0)
    return Journal.create(
        path,
        [VolumeSpec(i, f"disk{i}", size) for i, size in enumerate(sizes)],
        settings=JournalSettings(**settings),
    )


def rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def read_all(journal: Journal, ckpt, volume=0) -> bytes:
    with journal.view(ckpt) as view:
        return view.read(volume, 0, view.size(volume))


def record_kinds(segment: Path, *volume_sizes: int) -> list[tuple[int, int]]:
    """(type, flags) of every record of a segment file, by the native scanner."""
    data = segment.read_bytes()
    batch = _rec.scan(data[64:], 64, 1, 0, np.array(volume_sizes, dtype=np.uint64))
    assert batch.status == 0
    return [(int(e["type"]), int(e["flags"])) for e in batch.array()]


def segment_files(path: Path, suffix=".zcj") -> list[Path]:
    return sorted(path.glob(f"seg-*{suffix}"))


def fill_until_rotation(journal: Journal, model: bytearray, rng: random.Random, segments=2):
    """Append random 64 KiB writes until the journal holds `segments` sealed segments."""
    while len(segment_files(journal.path, ".zci")) < segments:
        offset = rng.randrange(len(model) // (64 * KiB)) * 64 * KiB
        data = rand(rng, 64 * KiB)
        journal.append([(0, offset, data)])
        model[offset : offset + len(data)] = data


# ---- refusals ------------------------------------------------------------------------------


def test_misaligned_write_is_refused(tmp_path):
    j = make(tmp_path / "j")
    for offset, length in [(1, 512), (0, 100), (512, 513), (256, 1024)]:
        with pytest.raises(AlignmentError):
            j.append([(0, offset, b"x" * length)])
    assert j.last_seq == 0
    assert j.status().records == 0
    j.close()


def test_write_past_volume_end_or_to_unknown_volume_is_refused(tmp_path):
    j = make(tmp_path / "j", sizes=(64 * KiB,))
    with pytest.raises(OutOfRangeError):
        j.append([(0, 64 * KiB - 512, b"x" * 1024)])
    with pytest.raises(OutOfRangeError):
        j.append([(0, 64 * KiB, b"x" * 512)])
    with pytest.raises(OutOfRangeError):
        j.append([(1, 0, b"x" * 512)])
    with pytest.raises(OutOfRangeError):
        j.append([("nosuchdisk", 0, b"x" * 512)])
    j.append([("disk0", 64 * KiB - 512, b"y" * 512)])  # the last sector is fine
    assert j.last_seq == 1
    j.close()


def test_batch_with_one_bad_write_appends_nothing(tmp_path):
    j = make(tmp_path / "j")
    with pytest.raises(AlignmentError):
        j.append([(0, 0, b"a" * 512), (0, 512, b"b" * 512), (0, 1000, b"c" * 512)])
    assert j.last_seq == 0
    c = j.checkpoint()
    assert read_all(j, c) == bytes(MiB)
    j.close()


def test_misaligned_or_out_of_range_read_is_refused(tmp_path):
    j = make(tmp_path / "j", sizes=(64 * KiB,))
    j.append([(0, 0, b"a" * 512)])
    with j.view(j.checkpoint()) as view:
        with pytest.raises(AlignmentError):
            view.read(0, 100, 512)
        with pytest.raises(AlignmentError):
            view.read(0, 0, 700)
        with pytest.raises(OutOfRangeError):
            view.read(0, 63 * KiB, 2 * KiB)
        with pytest.raises(OutOfRangeError):
            view.read(3, 0, 512)
        assert view.read(0, 0, 1024) == b"a" * 512 + bytes(512)
    j.close()


def _bundle(first_seq: int, n: int, rng: random.Random, volume=0) -> list[bytes]:
    return [
        records.encode_write(volume, first_seq + i, i * 4096, rand(rng, 4096), 1, compress=False)
        for i in range(n)
    ]


def test_bundle_with_one_bad_record_is_refused_whole(tmp_path):
    rng = random.Random(1)
    j = make(tmp_path / "j")
    parts = _bundle(1, 4, rng)
    bad = bytearray(parts[2])
    bad[64 + 64 + 100] ^= 0x10  # one bit of the third record's data
    seg = segment_files(j.path)[0]
    size_before = seg.stat().st_size
    with pytest.raises(ChecksumError):
        j.append_encoded(b"".join(parts[:2]) + bytes(bad) + parts[3])
    assert j.last_seq == 0 and j.status().records == 0
    assert seg.stat().st_size == size_before
    # the same seqs are still free: the journal holds nothing of the refused bundle
    assert j.append_encoded(b"".join(parts)) == 4
    c = j.checkpoint()
    j.commit()
    with j.view(c) as view:
        for i, part in enumerate(parts):
            assert view.read(0, i * 4096, 4096) == part[128 : 128 + 4096]
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.last_seq == 5
    j.close()


def test_bundle_with_bad_checkpoint_payload_is_refused_whole(tmp_path):
    """A checkpoint record whose CRCs are right but whose payload breaks the format must be
    refused before any byte of its bundle is written or indexed."""
    rng = random.Random(2)
    j = make(tmp_path / "j")
    write = records.encode_write(0, 1, 0, rand(rng, 4096), 1, compress=False)
    bad_ckpt = _rec.encode_stored(records.REC_CHECKPOINT, 0, 0, 2, 0, 4, 1,
                                  struct.pack("<BBH", 7, 0, 0))  # kind 7 does not exist
    with pytest.raises(CorruptRecordError):
        j.append_encoded(write + bad_ckpt)
    assert j.last_seq == 0 and j.status().records == 0
    assert j.checkpoints() == []
    data = rand(rng, 4096)
    j.append([(0, 0, data)])  # seq 1 again: nothing of the refused bundle was kept
    c = j.checkpoint()
    assert read_all(j, c)[:4096] == data
    j.close()
    j = Journal.open(tmp_path / "j")
    assert [x.id for x in j.checkpoints()] == [c.id]
    assert read_all(j, c)[:4096] == data
    j.close()


def test_bundle_with_repeated_or_older_seq_is_refused(tmp_path):
    rng = random.Random(3)
    j = make(tmp_path / "j")
    j.append_encoded(b"".join(_bundle(10, 2, rng)))
    with pytest.raises(SequenceError):
        j.append_encoded(_bundle(11, 1, rng)[0])
    with pytest.raises(SequenceError):
        j.append_encoded(_bundle(5, 1, rng)[0])
    with pytest.raises(SequenceError):  # out of order inside one bundle
        j.append_encoded(_bundle(20, 1, rng)[0] + _bundle(15, 1, rng)[0])
    assert j.last_seq == 11
    assert j.append_encoded(_bundle(12, 1, rng)[0]) == 12
    j.close()


def test_bundle_for_unknown_volume_or_past_the_end_is_refused(tmp_path):
    rng = random.Random(4)
    j = make(tmp_path / "j", sizes=(64 * KiB,))
    with pytest.raises(OutOfRangeError):
        j.append_encoded(records.encode_write(9, 1, 0, rand(rng, 512), 1))
    with pytest.raises(OutOfRangeError):
        j.append_encoded(records.encode_write(0, 1, 64 * KiB, rand(rng, 512), 1))
    assert j.last_seq == 0
    j.close()


def test_settings_out_of_range_are_refused(tmp_path):
    bad = [
        dict(history_seconds=HOUR - 1),
        dict(history_seconds=30 * 24 * HOUR + 1),
        dict(hard_limit_bytes=4 * MiB - 1),
        dict(hard_limit_bytes=8 * MiB, hard_limit_percent=50),
        dict(hard_limit_percent=0),
        dict(hard_limit_percent=1001),
        dict(warning_fraction=0),
        dict(warning_fraction=1),
        dict(segment_bytes=MiB - 1),
        dict(group_commit_bytes=-1),
    ]
    for i, kwargs in enumerate(bad):
        with pytest.raises(ConfigError):
            make(tmp_path / f"j{i}", **kwargs)
        assert not (tmp_path / f"j{i}" / "journal.meta").exists()
    # the edges themselves are accepted
    make(tmp_path / "lo", history_seconds=HOUR, hard_limit_bytes=4 * MiB).close()
    make(tmp_path / "hi", history_seconds=30 * 24 * HOUR, hard_limit_percent=1000).close()


def test_bad_volume_lists_are_refused(tmp_path):
    cases = [
        [],
        [VolumeSpec(0, "a", MiB), VolumeSpec(0, "b", MiB)],
        [VolumeSpec(0, "a", MiB), VolumeSpec(1, "a", MiB)],
        [VolumeSpec(0, "a", 1000)],
        [VolumeSpec(0, "a", 0)],
        [VolumeSpec(65536, "a", MiB)],
        [VolumeSpec(-1, "a", MiB)],
    ]
    for i, vols in enumerate(cases):
        with pytest.raises(ConfigError):
            Journal.create(tmp_path / f"j{i}", vols)


def test_create_in_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError):
        make(tmp_path / "j")
    assert (tmp_path / "j" / "precious.txt").read_text() == "keep me"


def test_open_of_directory_without_journal_is_refused(tmp_path):
    with pytest.raises(ConfigError):
        Journal.open(tmp_path)


def test_second_open_of_same_journal_is_refused(tmp_path):
    j = make(tmp_path / "j")
    with pytest.raises(ConfigError):
        Journal.open(tmp_path / "j")
    # journal.meta is replaced atomically by promotion: the lock must survive that
    j.append([(0, 0, b"a" * 512)])
    c = j.checkpoint()
    j.promote_to(c.seq)
    with pytest.raises(ConfigError):
        Journal.open(tmp_path / "j")
    j.close()
    Journal.open(tmp_path / "j").close()


def test_closed_journal_refuses_use_and_its_views_stop_reading(tmp_path):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    view = j.view(j.checkpoint())
    j.close()
    j.close()  # idempotent
    with pytest.raises(ClosedError):
        view.read(0, 0, 512)
    with pytest.raises(ClosedError):
        j.append([(0, 0, b"a" * 512)])
    with pytest.raises(ClosedError):
        j.commit()
    with pytest.raises(ClosedError):
        j.checkpoint()


def test_closed_view_refuses_reads(tmp_path):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    view = j.view(j.checkpoint())
    view.close()
    with pytest.raises(ClosedError):
        view.read(0, 0, 512)
    j.close()


def test_checkpoint_tag_too_long_is_refused(tmp_path):
    j = make(tmp_path / "j")
    with pytest.raises(ConfigError):
        j.checkpoint("x" * 1025)
    assert j.checkpoint("é" * 512).tag == "é" * 512  # 1024 bytes of UTF-8
    j.close()


def test_view_of_unknown_checkpoint_is_refused(tmp_path):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    c = j.checkpoint()
    with pytest.raises(CheckpointNotFoundError):
        j.view(c.id + 1)
    with pytest.raises(CheckpointNotFoundError):
        j.view(1)  # seq 1 is a write, not a checkpoint
    j.close()


# ---- reading at checkpoints -------------------------------------------------------------


def test_checkpoint_covers_only_writes_before_it(tmp_path):
    rng = random.Random(5)
    j = make(tmp_path / "j", sizes=(256 * KiB, 256 * KiB))
    a, b, c = rand(rng, 8 * KiB), rand(rng, 4 * KiB), rand(rng, 8 * KiB)
    j.append([(0, 0, a)])
    c1 = j.checkpoint()
    j.append([(0, 4 * KiB, b), (1, 0, c)])
    c2 = j.checkpoint("after b")
    j.append([(0, 0, bytes(16 * KiB))])  # zeros over everything of volume 0
    c3 = j.checkpoint()
    assert c1.id == c1.seq == 2 and c2.id == 5 and c3.id == 7
    assert read_all(j, c1, 0) == a + bytes(248 * KiB)
    assert read_all(j, c1, 1) == bytes(256 * KiB)
    assert read_all(j, c2, 0) == a[: 4 * KiB] + b + bytes(248 * KiB)
    assert read_all(j, c2, 1) == c + bytes(248 * KiB)
    assert read_all(j, c3, 0) == bytes(256 * KiB)
    assert read_all(j, c3, 1) == c + bytes(248 * KiB)
    j.close()


def test_every_record_encoding_reads_back(tmp_path):
    """Zero records, LZ4 records and raw records (and sync records) all read back exactly,
    whole and in sector pieces that start and end inside 4 KiB CRC blocks."""
    rng = random.Random(6)
    j = make(tmp_path / "j", sizes=(256 * KiB,))
    raw = rand(rng, 20 * KiB + 512)
    text = (b"zcore journal " * 3000)[: 12 * KiB]
    zero = bytes(8 * KiB)
    bundle = (
        records.encode_write(0, 1, 0, raw, 1)
        + records.encode_write(0, 2, 32 * KiB, text, 1)
        + records.encode_write(0, 3, 48 * KiB, b"\xff" * 8 * KiB, 1)
        + records.encode_write(0, 4, 64 * KiB, raw[: 8 * KiB], 1, sync=True)
        + records.encode_write(0, 5, 80 * KiB, text[: 4 * KiB], 1, sync=True)
    )
    j.append_encoded(bundle)
    j.append([(0, 48 * KiB, zero)])
    c = j.checkpoint()
    assert record_kinds(segment_files(j.path)[0], 256 * KiB) == [
        (records.REC_WRITE, records.FLAG_BLOCKCRC),
        (records.REC_WRITE, records.FLAG_LZ4),
        (records.REC_WRITE, records.FLAG_LZ4),
        (records.REC_SYNC, records.FLAG_BLOCKCRC),
        (records.REC_SYNC, records.FLAG_LZ4),
        (records.REC_ZERO, 0),
        (records.REC_CHECKPOINT, 0),
    ]
    model = bytearray(256 * KiB)
    model[0 : len(raw)] = raw
    model[32 * KiB : 44 * KiB] = text
    model[48 * KiB : 56 * KiB] = zero
    model[64 * KiB : 72 * KiB] = raw[: 8 * KiB]
    model[80 * KiB : 84 * KiB] = text[: 4 * KiB]
    with j.view(c) as view:
        assert view.read(0, 0, 256 * KiB) == model
        for off in range(0, 96 * KiB, 1536):
            for length in (512, 3584, 4608, 9216):
                if off + length <= 256 * KiB:
                    assert view.read(0, off, length) == model[off : off + length], (off, length)
        buf = bytearray(10 * KiB)
        view.read_into(0, 1024, buf)
        assert buf == model[1024 : 11 * KiB]
    j.close()


def test_newest_write_wins_across_overlaps(tmp_path):
    rng = random.Random(7)
    size = 128 * KiB
    j = make(tmp_path / "j", sizes=(size,))
    model = bytearray(size)
    ckpts = []
    for _ in range(300):
        sectors = rng.randrange(1, 33)
        off = rng.randrange(0, size // 512 - sectors + 1) * 512
        data = rand(rng, sectors * 512) if rng.random() < 0.7 else bytes(sectors * 512)
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
        if rng.random() < 0.1:
            ckpts.append((j.checkpoint(), bytes(model)))
    for c, expect in ckpts:
        assert read_all(j, c) == expect
    j.close()


# ---- views, pins and promotion ------------------------------------------------------------


def test_view_pins_checkpoint_against_promotion(tmp_path):
    rng = random.Random(8)
    j = make(tmp_path / "j", sizes=(256 * KiB,))
    a, b = rand(rng, 64 * KiB), rand(rng, 64 * KiB)
    j.append([(0, 0, a)])
    c1 = j.checkpoint()
    j.append([(0, 32 * KiB, b)])
    c2 = j.checkpoint()
    view = j.view(c1)
    with pytest.raises(JournalFullError):
        j.promote_to(c2.seq)
    assert j.promoted_seq == 0
    assert j.promote_to(c1.seq) == c1.seq  # up to the pin itself is fine
    assert view.read(0, 0, 96 * KiB) == a + bytes(32 * KiB)
    assert j.promote(now=1e12) == c1.seq  # policy promotion stops at the pin
    assert [c.id for c in j.checkpoints()] == [c1.id, c2.id]
    view.close()
    assert j.promote_to(c2.seq) == c2.seq
    assert [c.id for c in j.checkpoints()] == [c2.id]
    with pytest.raises(CheckpointNotFoundError):
        j.view(c1)
    assert read_all(j, c2)[: 96 * KiB] == a[: 32 * KiB] + b
    j.close()


def test_two_views_of_one_checkpoint_pin_until_both_close(tmp_path):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    c1 = j.checkpoint()
    j.append([(0, 0, b"b" * 512)])
    j.checkpoint()
    v1, v2 = j.view(c1), j.view(c1)
    v1.close()
    v1.close()  # closing twice must not release the other view's pin
    with pytest.raises(JournalFullError):
        j.promote_to(j.last_seq)
    assert v2.read(0, 0, 512) == b"a" * 512
    v2.close()
    j.promote_to(j.last_seq)
    j.close()


def test_promotion_moves_writes_into_replica_and_keeps_later_checkpoints_exact(tmp_path):
    rng = random.Random(9)
    size = 256 * KiB
    j = make(tmp_path / "j", sizes=(size, size))
    model = {0: bytearray(size), 1: bytearray(size)}
    ckpts = []
    for _ in range(12):
        for _ in range(rng.randrange(1, 5)):
            vol = rng.randrange(2)
            off = rng.randrange(size // 4096) * 4096
            n = min(size - off, rng.randrange(1, 9) * 4096)
            data = rand(rng, n) if rng.random() < 0.6 else b"\x5a" * n
            j.append([(vol, off, data)])
            model[vol][off : off + n] = data
        ckpts.append((j.checkpoint(), {v: bytes(m) for v, m in model.items()}))
    target, state = ckpts[5]
    assert j.promote_to(target.seq) == target.seq
    for vol in (0, 1):
        image = (tmp_path / "j" / f"replica-{vol:04d}.img").read_bytes()
        assert image == state[vol]  # the replica holds the volume as of the watermark
    assert [c.id for c in j.checkpoints()] == [c.id for c, _ in ckpts[5:]]
    for c, snap in ckpts[5:]:
        for vol in (0, 1):
            assert read_all(j, c, vol) == snap[vol]
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.promoted_seq == target.seq
    for c, snap in ckpts[5:]:
        for vol in (0, 1):
            assert read_all(j, c, vol) == snap[vol]
    j.close()


def test_promotion_to_the_end_drops_every_segment_but_an_empty_active_one(tmp_path):
    rng = random.Random(10)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=2)
    c = j.checkpoint()
    j.promote_to(j.last_seq + 1)
    assert j.checkpoints() == []
    assert len(segment_files(j.path)) == 1 and segment_files(j.path, ".zci") == []
    assert j.status().records == 0
    assert (tmp_path / "j" / "replica-0000.img").read_bytes() == model
    c = j.checkpoint()
    assert read_all(j, c) == model
    j.close()


def test_reopen_after_full_promotion_continues_numbering(tmp_path):
    """After promoting everything and reopening, seqs must continue above the watermark:
    restarting at 1 would put new writes below promoted_seq, where reopen discards them."""
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    j.checkpoint()
    j.promote_to(j.last_seq + 1)
    promoted = j.promoted_seq
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.last_seq >= promoted - 1
    j.append([(0, 512, b"b" * 512)])
    c = j.checkpoint()
    assert c.seq >= promoted
    j.close()
    j = Journal.open(tmp_path / "j")
    assert [x.id for x in j.checkpoints()] == [c.id]
    assert read_all(j, c)[:1024] == b"a" * 512 + b"b" * 512
    j.close()


class Crash(BaseException):
    """The process dies here (not an error the journal could handle)."""


@pytest.mark.parametrize("crash_point", ["replica write", "segment drop"])
def test_interrupted_promotion_is_finished_on_reopen(tmp_path, monkeypatch, crash_point):
    rng = random.Random(11)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    ckpts = []
    for _ in range(40):  # 2.5 MiB: three segments
        off = rng.randrange(16) * 64 * KiB
        data = rand(rng, 64 * KiB)
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
        ckpts.append((j.checkpoint(), bytes(model)))
    assert len(segment_files(j.path)) == 3
    first = 30
    target = ckpts[first][0]
    if crash_point == "replica write":
        real_pwrite = os.pwrite
        calls = []

        def pwrite(fd, data, offset):
            calls.append(fd)
            if len(calls) == 3:
                raise Crash()
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    else:
        def drop(self, seg):
            raise Crash()

        monkeypatch.setattr(Journal, "_drop_segment", drop)
    with pytest.raises(Crash):
        j.promote_to(target.seq)
    monkeypatch.undo()
    abandon(j)
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report.resumed_promotion == (crash_point == "replica write")
    assert j.promoted_seq == target.seq
    assert [c.id for c in j.checkpoints()] == [c.id for c, _ in ckpts[first:]]
    for c, snap in ckpts[first:]:
        assert read_all(j, c) == snap
    with pytest.raises(CheckpointNotFoundError):
        j.view(ckpts[first - 1][0])
    assert (tmp_path / "j" / "replica-0000.img").read_bytes() == ckpts[first][1]
    # the next promotion removes whatever the crash left behind
    j.promote_to(ckpts[-1][0].seq)
    assert len(segment_files(tmp_path / "j")) == 1
    assert read_all(j, ckpts[-1][0]) == ckpts[-1][1]
    j.close()


def test_policy_promotion_stops_at_pinned_view(tmp_path):
    j = make(tmp_path / "j")
    t0 = j.created_ns
    seq = 0
    for i in range(6):
        seq += 1
        j.append_encoded(records.encode_write(0, seq, i * 512, b"w" * 512, t0 + i))
        seq += 1
        j.append_encoded(records.encode_checkpoint(seq, t0 + i, records.CKPT_AUTO, True))
    ckpts = j.checkpoints()
    view = j.view(ckpts[2])
    assert j.promote(now=t0 / 1e9 + 10 * 24 * HOUR) == ckpts[2].seq
    assert j.checkpoints() == ckpts[2:]
    assert view.read(0, 0, 3 * 512) == b"w" * 3 * 512
    view.close()
    j.close()


def _journal_with_times(path: Path, times_h: list[float], **settings) -> tuple[Journal, float]:
    """A journal with one write and one checkpoint at each of `times_h` hours after its
    creation (sender time stamps, as replication appends them)."""
    j = make(path, **settings)
    t0 = j.created_ns / 1e9
    seq = 0
    for i, h in enumerate(times_h):
        t = int((t0 + h * HOUR) * 1e9)
        seq += 1
        j.append_encoded(records.encode_write(0, seq, i * 4096, bytes([i + 1]) * 4096, t))
        seq += 1
        j.append_encoded(records.encode_checkpoint(seq, t, records.CKPT_AUTO, True))
    return j, t0


def test_history_promotion_drops_checkpoints_older_than_history(tmp_path):
    # checkpoints at 0.5 .. 9.5 h; history 4 h; now = 10 h: the cutoff is 6 h
    j, t0 = _journal_with_times(tmp_path / "j", [h + 0.5 for h in range(10)],
                                history_seconds=4 * HOUR)
    ckpts = j.checkpoints()
    now = t0 + 10 * HOUR
    j.promote(now=now)
    kept = j.checkpoints()
    # every checkpoint inside the history stays; of the older ones only the newest may
    # stay (the replica is exactly at it, so it costs nothing)
    assert kept[0].time <= now - 4 * HOUR < kept[1].time
    assert kept == ckpts[5:]
    assert j.promoted_seq == ckpts[5].seq
    for i, c in enumerate(kept):
        data = read_all(j, c)
        for k in range(10):
            expect = bytes([k + 1]) * 4096 if k <= i + 5 else bytes(4096)
            assert data[k * 4096 : (k + 1) * 4096] == expect
    assert j.promote(now=now) == ckpts[5].seq  # idempotent
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.checkpoints() == kept
    j.close()


def test_history_promotion_keeps_a_recovery_point_when_the_stream_stops(tmp_path):
    """The protected site dies; a day later retention runs.  The newest checkpoint must
    survive even when it is the last record of a sealed segment, or nothing is left to fail
    over to."""
    rng = random.Random(12)
    j = make(tmp_path / "j", history_seconds=HOUR)
    t = j.created_ns
    seq = 0
    model = bytearray(MiB)
    record = _rec.raw_record_size(64 * KiB)
    while j.size_bytes + record <= MiB - 128:  # fill segment 1, leave room for a checkpoint
        seq += 1
        data = rand(rng, 64 * KiB)
        off = (seq % 16) * 64 * KiB
        j.append_encoded(records.encode_write(0, seq, off, data, t))
        model[off : off + len(data)] = data
    seq += 1
    j.append_encoded(records.encode_checkpoint(seq, t, records.CKPT_TAGGED, True, "last"))
    last = j.checkpoints()[-1]
    snapshot = bytes(model)
    seq += 1  # one more write after it rotates to segment 2, then the stream stops
    j.append_encoded(records.encode_write(0, seq, 0, rand(rng, 64 * KiB), t))
    assert len(segment_files(j.path)) == 2
    j.commit()
    j.promote(now=t / 1e9 + 2 * 24 * HOUR)
    assert j.checkpoints() == [last]
    assert read_all(j, last) == snapshot
    j.close()


def test_hard_limit_promotes_oldest_segments(tmp_path):
    rng = random.Random(13)
    j = make(tmp_path / "j", sizes=(4 * MiB,), hard_limit_bytes=4 * MiB)
    model = bytearray(4 * MiB)
    latest = None
    for _ in range(160):  # 10 MiB of random data through a 4 MiB journal
        off = rng.randrange(64) * 64 * KiB
        data = rand(rng, 64 * KiB)
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
        latest = (j.checkpoint(), bytes(model))
        assert j.size_bytes <= 4 * MiB
    assert j.promoted_seq > 0
    assert not j.status().full
    assert read_all(j, latest[0]) == latest[1]
    j.close()


def test_hard_limit_with_pinned_view_reports_journal_full(tmp_path):
    rng = random.Random(14)
    j = make(tmp_path / "j", sizes=(4 * MiB,), hard_limit_bytes=4 * MiB)
    j.append([(0, 0, rand(rng, 64 * KiB))])
    c = j.checkpoint()
    pinned = read_all(j, c)
    view = j.view(c)
    with pytest.raises(JournalFullError):
        for i in range(100):
            j.append([(0, (i % 64) * 64 * KiB, rand(rng, 64 * KiB))])
    status = j.status()
    assert status.full and status.near_limit
    assert status.size_bytes <= 4 * MiB
    assert view.read(0, 0, 4 * MiB) == pinned
    last = j.last_seq
    with pytest.raises(JournalFullError):
        j.append([(0, 0, rand(rng, 64 * KiB))])
    assert j.last_seq == last
    view.close()
    j.append([(0, 0, rand(rng, 64 * KiB))])  # closing the view lets promotion make room
    assert not j.status().full
    j.close()


# ---- checkpoints and status ----------------------------------------------------------------


def test_checkpoint_filters_by_time_tag_kind(tmp_path):
    j = make(tmp_path / "j")
    t0 = 1_700_000_000
    specs = [
        (t0 + 0, records.CKPT_AUTO, True, None),
        (t0 + 10, records.CKPT_TAGGED, True, "before upgrade"),
        (t0 + 20, records.CKPT_AUTO, False, None),
        (t0 + 30, records.CKPT_TAGGED, False, "after upgrade"),
        (t0 + 40, records.CKPT_TAGGED, True, "nightly"),
    ]
    for i, (t, kind, consistent, tag) in enumerate(specs):
        j.append_encoded(records.encode_checkpoint(i + 1, t * 10**9, kind, consistent, tag))
    all_ = j.checkpoints()
    assert [(c.time, c.kind, c.consistent, c.tag) for c in all_] == [
        (float(t), "auto" if k == records.CKPT_AUTO else "tagged", cons, tag)
        for t, k, cons, tag in specs
    ]
    assert j.checkpoints(start=t0 + 10, end=t0 + 30) == all_[1:4]  # inclusive
    assert j.checkpoints(start=t0 + 10.5) == all_[2:]
    assert j.checkpoints(end=t0 + 9.9) == all_[:1]
    assert j.checkpoints(tag="upgrade") == [all_[1], all_[3]]
    assert j.checkpoints(tag="nothing") == []
    assert j.checkpoints(kind="auto") == [all_[0], all_[2]]
    assert j.checkpoints(kind="tagged", consistent=True) == [all_[1], all_[4]]
    assert j.checkpoints(consistent=False) == [all_[2], all_[3]]
    assert j.latest_checkpoint() == all_[4]
    assert j.checkpoint_by_id(3) == all_[2]
    with pytest.raises(ConfigError):
        j.checkpoints(kind="manual")
    j.close()
    j = Journal.open(tmp_path / "j")  # the same after reopening
    assert j.checkpoints() == all_
    j.close()


def test_latest_checkpoint_skips_inconsistent_ones(tmp_path):
    j = make(tmp_path / "j")
    with pytest.raises(CheckpointNotFoundError):
        j.latest_checkpoint()
    a = j.checkpoint()
    b = j.checkpoint(consistent=False)
    assert j.latest_checkpoint() == a
    assert j.latest_checkpoint(consistent=False) == b
    j.close()


def test_status_reports_history_and_limits(tmp_path):
    j, t0 = _journal_with_times(tmp_path / "j", [0.0, 6.5, 8.0, 9.0],
                                history_seconds=4 * HOUR, hard_limit_bytes=8 * MiB,
                                warning_fraction=0.5)
    st = j.status(now=t0 + 10 * HOUR)
    assert st.oldest_checkpoint == j.checkpoints()[0]
    assert st.newest_checkpoint == j.checkpoints()[-1]
    assert st.history_held_seconds == pytest.approx(10 * HOUR)
    assert st.history_configured_seconds == 4 * HOUR
    assert st.history_state == "ok"
    assert st.hard_limit_bytes == 8 * MiB and st.warning_limit_bytes == 4 * MiB
    assert not st.near_limit and not st.full
    assert st.records == 8 and st.last_seq == 8 and st.durable_seq == 0
    assert st.size_bytes == j.size_bytes > 64
    j.commit()
    assert j.status().durable_seq == 8
    j.close()


def test_status_history_state_degrades_with_missing_history(tmp_path):
    for held_h, state in [(3.5, "ok"), (3.2, "warning"), (2.0, "error")]:
        j, t0 = _journal_with_times(tmp_path / f"j{held_h}", [10.0 - held_h],
                                    history_seconds=4 * HOUR)
        assert j.status(now=t0 + 10 * HOUR).history_state == state, held_h
        j.close()
    # a journal younger than its history is building it up: no warning or error yet
    j, t0 = _journal_with_times(tmp_path / "young", [0.0], history_seconds=4 * HOUR)
    assert j.status(now=t0 + HOUR).history_state == "building"
    j.close()


def test_status_reports_near_limit_in_percent_of_provisioned(tmp_path):
    rng = random.Random(15)
    j = make(tmp_path / "j", sizes=(8 * MiB, 8 * MiB), hard_limit_percent=50,
             warning_fraction=0.5)
    assert j.status().hard_limit_bytes == 8 * MiB
    assert j.status().warning_limit_bytes == 4 * MiB
    for i in range(72):  # 4.5 MiB of incompressible data
        j.append([(i % 2, (i // 2) * 64 * KiB, rand(rng, 64 * KiB))])
    st = j.status()
    assert st.near_limit and not st.full
    assert st.index_bytes > 0
    j.close()


# ---- durability and reopening ------------------------------------------------------------


def test_fsync_failure_stops_acknowledging(tmp_path, monkeypatch):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    assert j.commit() == 1
    j.append([(0, 512, b"b" * 512)])

    def fail(fd):
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fdatasync", fail)
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(DurabilityError):
        j.commit()
    assert j.durable_seq == 1
    monkeypatch.undo()
    # a later fsync may "succeed" after the kernel dropped the pages: never retry and trust
    with pytest.raises(DurabilityError):
        j.commit()
    with pytest.raises(DurabilityError):
        j.append([(0, 1024, b"c" * 512)])
    with pytest.raises(DurabilityError):
        j.checkpoint()
    with pytest.raises(DurabilityError):
        j.promote_to(2)
    assert j.status().durable_seq == 1
    j.close()
    j = Journal.open(tmp_path / "j")  # reopening is the recovery
    j.append([(0, 1024, b"c" * 512)])
    c = j.checkpoint()
    assert j.commit() == c.seq
    assert read_all(j, c)[:1536] == b"a" * 512 + b"b" * 512 + b"c" * 512
    j.close()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_group_commit_failure_in_the_background_stops_acknowledging(tmp_path, monkeypatch):
    """The automatic group commit fsyncs in the background; when that fsync fails the
    durable seq stays where it was and every later call refuses until reopened."""
    rng = random.Random(23)
    j = make(tmp_path / "j", group_commit_bytes=4 * KiB)
    j.append([(0, 0, rand(rng, 4096))])
    wait_for(lambda: j.durable_seq == 1)  # the group commit ran, after append returned

    def fail(fd):
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fdatasync", fail)
    j.append([(0, 4096, rand(rng, 4096))])  # hands its group commit to the committer
    wait_for(lambda: j.failed is not None)
    monkeypatch.undo()
    assert j.durable_seq == 1
    with pytest.raises(DurabilityError):
        j.append([(0, 8192, rand(rng, 4096))])
    with pytest.raises(DurabilityError):
        j.commit()
    j.close()
    j = Journal.open(tmp_path / "j")  # reopening recovers
    assert j.last_seq >= 1
    j.close()


def test_explicit_commit_failure_raises_at_once(tmp_path, monkeypatch):
    rng = random.Random(24)
    j = make(tmp_path / "j")
    j.append([(0, 0, rand(rng, 4096))])

    def fail(fd):
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(DurabilityError):
        j.commit()
    monkeypatch.undo()
    assert j.durable_seq == 0
    j.close()


def test_promotion_fsync_failure_stops_the_journal(tmp_path, monkeypatch):
    rng = random.Random(16)
    j = make(tmp_path / "j", sizes=(256 * KiB,))
    model = bytearray(256 * KiB)
    ckpts = []
    for i in range(8):
        data = rand(rng, 16 * KiB)
        j.append([(0, i * 16 * KiB, data)])
        model[i * 16 * KiB : (i + 1) * 16 * KiB] = data
        ckpts.append((j.checkpoint(), bytes(model)))
    replica_fds = set(j._replica_fds.values())
    real_fsync = os.fsync

    def fsync(fd):
        if fd in replica_fds:
            raise OSError(errno.EIO, "injected replica fsync failure")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DurabilityError):
        j.promote_to(ckpts[4][0].seq)
    monkeypatch.undo()
    # the watermark must not move past writes whose replica copy may be lost
    with pytest.raises(DurabilityError):
        j.promote_to(ckpts[4][0].seq)
    with pytest.raises(DurabilityError):
        j.append([(0, 0, b"x" * 512)])
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report.resumed_promotion
    assert j.promoted_seq == ckpts[4][0].seq
    for c, snap in ckpts[4:]:
        assert read_all(j, c) == snap
    assert (tmp_path / "j" / "replica-0000.img").read_bytes() == ckpts[4][1]
    j.close()


def test_index_file_failure_during_rotation_stops_the_journal(tmp_path, monkeypatch):
    rng = random.Random(24)
    fds_before = len(os.listdir("/proc/self/fd"))
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    record = _rec.raw_record_size(64 * KiB)
    while j.size_bytes + record <= MiB:
        off = rng.randrange(16) * 64 * KiB
        data = rand(rng, 64 * KiB)
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
    c = j.checkpoint()

    def fail(fd):
        raise OSError(errno.EIO, "injected fsync failure")

    # sealing fails (the new segment's header fsync; fdatasync still works)
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(DurabilityError):
        j.append([(0, 0, rand(rng, 64 * KiB))])  # does not fit: rotates
    monkeypatch.undo()
    with pytest.raises(DurabilityError):
        j.append([(0, 0, rand(rng, 64 * KiB))])
    j.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # nothing leaked on the way
    j = Journal.open(tmp_path / "j")
    assert j.last_seq == c.seq
    assert read_all(j, c) == model
    j.close()


def test_durable_records_survive_a_crash(tmp_path):
    rng = random.Random(17)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=1)
    c = j.checkpoint()
    j.commit()
    abandon(j)
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report.dropped_bytes == 0
    assert j.durable_seq == j.last_seq == c.seq
    assert read_all(j, c) == model
    j.close()


def test_reopen_syncs_tail_before_reporting_it_durable(tmp_path, monkeypatch):
    """Records appended but never committed by a crashed process are in the page cache,
    not necessarily on disk: reopening may only call them durable after syncing them."""
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 4096)])
    assert j.durable_seq == 0
    abandon(j)

    def fail(fd):
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(os, "fdatasync", fail)
    monkeypatch.setattr(os, "fsync", fail)
    try:
        reopened = Journal.open(tmp_path / "j")
    except DurabilityError:
        reopened = None
    if reopened is not None:
        durable = reopened.durable_seq
        abandon(reopened)
        assert durable == 0, "an unsynced record was reported durable"
    monkeypatch.undo()
    j = Journal.open(tmp_path / "j")
    assert j.durable_seq == j.last_seq == 1
    j.close()


def test_reopen_uses_segment_index_files(tmp_path):
    rng = random.Random(18)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=3)
    c = j.checkpoint("x")
    j.close()
    assert len(segment_files(tmp_path / "j", ".zci")) == 3
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report.rescanned_segments == 0
    assert j.reopen_report.dropped_bytes == 0
    assert j.checkpoints() == [c]
    assert read_all(j, c) == model
    j.close()


@pytest.mark.parametrize("damage", ["missing", "bit flip", "stale length", "other segment"])
def test_missing_segment_index_is_rebuilt(tmp_path, damage):
    rng = random.Random(19)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=1)
    c1 = j.checkpoint("in segment 2")
    fill_until_rotation(j, model, rng, segments=2)
    c2 = j.checkpoint()
    snap1 = read_all(j, c1)
    j.close()
    zcis = segment_files(tmp_path / "j", ".zci")
    victim = zcis[1]
    if damage == "missing":
        victim.unlink()
    elif damage == "bit flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x04
        victim.write_bytes(raw)
    elif damage == "stale length":  # an index written for a shorter segment
        raw = bytearray(victim.read_bytes())
        raw[40:48] = struct.pack("<Q", struct.unpack_from("<Q", raw, 40)[0] - 64)
        raw[60:64] = struct.pack("<I", _rec.crc32c(bytes(raw[:60])))
        victim.write_bytes(raw)
    else:
        victim.write_bytes(zcis[0].read_bytes())
    for round_ in range(2):  # the rebuilt index file must be whole: reopen from it too
        j = Journal.open(tmp_path / "j")
        assert j.reopen_report.rescanned_segments == (1 if round_ == 0 else 0)
        assert j.checkpoints() == [c1, c2]
        assert read_all(j, c1) == snap1
        assert read_all(j, c2) == model
        j.close()


def test_torn_new_segment_is_dropped_without_losing_the_previous_one(tmp_path):
    """A crash right after a rotation created the next segment file, before its header
    reached the disk.  The segment before it becomes the active one again: it must keep
    every record (and get a whole index file when it is sealed again)."""
    rng = random.Random(20)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    seg3 = tmp_path / "j" / "seg-00000003.zcj"
    while not seg3.exists():
        before = bytes(model)  # the append that rotates to segment 3 is not durable
        off = rng.randrange(16) * 64 * KiB
        data = rand(rng, 64 * KiB)
        j.append([(0, off, data)])
        model[off : off + len(data)] = data
    abandon(j)
    os.truncate(seg3, 0)
    j = Journal.open(tmp_path / "j")
    assert j.reopen_report.dropped_segments == 1
    c = j.checkpoint()
    assert read_all(j, c) == before
    model = bytearray(before)
    fill_until_rotation(j, model, rng, segments=3)  # segment 2 is sealed a second time
    c2 = j.checkpoint()
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.checkpoints() == [c, c2]
    assert read_all(j, c) == before
    assert read_all(j, c2) == model
    j.close()


def test_damaged_header_of_active_segment_is_refused_not_deleted(tmp_path):
    """A segment header is fsynced before any record is appended, so a bad header in front
    of records is media damage, not a crash: reopening must refuse, not delete the file."""
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 4096)])
    j.checkpoint()
    j.close()
    seg = segment_files(tmp_path / "j")[0]
    raw = bytearray(seg.read_bytes())
    raw[20] ^= 0x01  # inside the segment number
    seg.write_bytes(raw)
    with pytest.raises(CorruptRecordError):
        Journal.open(tmp_path / "j")
    assert seg.read_bytes() == raw
    raw[20] ^= 0x01
    seg.write_bytes(raw)
    j = Journal.open(tmp_path / "j")
    assert read_all(j, j.checkpoints()[0])[:4096] == b"a" * 4096
    j.close()


def test_segments_rotate_and_seal_index_files(tmp_path):
    rng = random.Random(21)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=2)
    files = segment_files(tmp_path / "j")
    assert len(files) == 3
    for f in files[:2]:
        assert MiB - 64 * KiB <= f.stat().st_size <= MiB + 64 * KiB + 4 * KiB
    c = j.checkpoint()
    assert read_all(j, c) == model
    j.close()


def test_commit_returns_durable_seq_and_reopen_keeps_it(tmp_path):
    j = make(tmp_path / "j")
    assert j.commit() == 0
    j.append([(0, 0, b"a" * 512), (0, 512, b"b" * 512)])
    assert j.durable_seq == 0 and j.last_seq == 2
    assert j.commit() == 2
    c = j.checkpoint()
    assert j.commit() == c.seq == 3
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.last_seq == j.durable_seq == 3
    assert j.reopen_report.dropped_bytes == 0 and j.reopen_report.reason == ""
    j.close()


def test_corrupt_payload_in_journal_is_never_returned(tmp_path):
    """A bit flip in a record's data after it was appended surfaces as a ChecksumError on
    the read that touches it; other reads keep working."""
    rng = random.Random(22)
    j = make(tmp_path / "j", sizes=(64 * KiB,))
    raw, lz = rand(rng, 16 * KiB), b"compressible " * 1000
    lz = lz[: 8 * KiB]
    j.append([(0, 0, raw), (0, 32 * KiB, lz)])
    c = j.checkpoint()
    j.commit()
    seg = segment_files(tmp_path / "j")[0]
    with open(seg, "r+b") as f:
        f.seek(64 + 64 + 64 + 5000)  # second 4 KiB block of the raw write's data
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with j.view(c) as view:
        assert view.read(0, 0, 4096) == raw[:4096]
        assert view.read(0, 8192, 8192) == raw[8192:]
        with pytest.raises(ChecksumError):
            view.read(0, 4096, 512)
        with pytest.raises(ChecksumError):
            view.read(0, 0, 64 * KiB)
        assert view.read(0, 32 * KiB, 8 * KiB) == lz
    j.close()


def test_failed_open_releases_every_descriptor(tmp_path):
    j = make(tmp_path / "j", sizes=(MiB, MiB))
    j.append([(0, 0, b"a" * 4096)])
    j.close()
    seg = segment_files(tmp_path / "j")[0]
    raw = bytearray(seg.read_bytes())
    raw[16] ^= 0x80  # damaged header in front of records: the open fails
    seg.write_bytes(raw)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CorruptRecordError):
            Journal.open(tmp_path / "j")
    assert len(os.listdir("/proc/self/fd")) == before
    raw[16] ^= 0x80
    seg.write_bytes(raw)
    Journal.open(tmp_path / "j").close()  # and the lock was released too


def test_concurrent_appends_and_reads_stay_consistent(tmp_path):
    """Writers append from several threads while readers read views: every checkpoint
    still reads exactly what was written before it (each writer owns one region, so the
    expected image follows from each writer's own history)."""
    import threading

    size = 256 * KiB
    j = make(tmp_path / "j", sizes=(size,), group_commit_bytes=64 * KiB)
    writers, rounds, region = 4, 40, size // 4
    history = {w: [] for w in range(writers)}  # w -> [(seq, offset, data)]
    errors = []

    def writer(w):
        rng = random.Random(w)
        try:
            for _ in range(rounds):
                off = w * region + rng.randrange(region // 4096) * 4096
                data = rand(rng, 4096) if rng.random() < 0.7 else bytes(4096)
                seq = j.append([(0, off, data)])
                history[w].append((seq, off, data))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(rounds):
                c = j.checkpoint()
                with j.view(c) as view:
                    view.read(0, 0, size)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    seqs = sorted(s for h in history.values() for s, _, _ in h)
    assert len(set(seqs)) == len(seqs) == writers * rounds
    for c in j.checkpoints():
        image = bytearray(size)
        for h in history.values():
            for seq, off, data in h:
                if seq < c.seq:
                    image[off : off + len(data)] = data
        assert read_all(j, c) == image, c.seq
    j.close()


def test_missing_middle_segment_is_reported_and_its_reads_refused(tmp_path):
    """Promotion only removes segments from the oldest end, so a gap in the numbers is
    damage (a lost or half-restored file): reading on would return stale data.  The
    manifest names the lost seqs; reopen reports them (it refused the whole journal with
    CorruptRecordError before the manifest) and every read that needs them refuses."""
    rng = random.Random(25)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=3)
    c = j.checkpoint()
    j.close()
    files = segment_files(tmp_path / "j")
    assert len(files) == 4
    files[1].unlink()
    files[1].with_suffix(".zci").unlink()
    j = Journal.open(tmp_path / "j")
    try:
        report = j.reopen_report
        assert report.damage and report.damaged_seqs and report.dropped_bytes == 0
        assert c.seq in report.inexact_checkpoints
        assert j.status().inexact_checkpoints == report.inexact_checkpoints
        with j.view(c) as view, pytest.raises(DamagedRecordError):
            view.read(0, 0, MiB)
    finally:
        j.close()


def test_crash_while_promotion_deletes_segments_leaves_a_usable_journal(tmp_path, monkeypatch):
    """Promotion fsyncs the directory once after deleting segments, so a crash may leave
    any subset of them: a hole among wholly promoted segments is not damage."""
    rng = random.Random(26)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=4)
    c = j.checkpoint()
    assert len(segment_files(j.path)) == 5
    real_drop = Journal._drop_segment

    def drop(self, seg):
        if seg.number == 2:  # only the second deletion reaches the disk, then the crash
            real_drop(self, seg)
            raise Crash()

    monkeypatch.setattr(Journal, "_drop_segment", drop)
    third = {s.number: s for s in j.segments()}[3]
    with pytest.raises(Crash):
        j.promote_to(third.max_seq + 1)  # segments 1 to 3 are due to go
    monkeypatch.undo()
    abandon(j)
    assert [f.name[4:12] for f in segment_files(tmp_path / "j")] == [
        "00000001", "00000003", "00000004", "00000005"]
    j = Journal.open(tmp_path / "j")
    assert j.promoted_seq == third.max_seq + 1
    assert read_all(j, c) == model
    j.promote_to(c.seq)  # the next promotion clears what the crash left
    assert len(segment_files(tmp_path / "j")) == 1
    j.close()


def test_appends_proceed_while_sealed_segments_load_and_reads_wait(tmp_path, monkeypatch):
    """Opening does not read the sealed segments' index files: appends go on at once,
    and reads, views and listings wait until every sealed segment is indexed."""
    rng = random.Random(31)
    j = make(tmp_path / "j")
    model = bytearray(MiB)
    fill_until_rotation(j, model, rng, segments=3)
    old = j.checkpoint()
    snapshot = bytes(model)
    j.close()

    release = threading.Event()
    real = Journal._read_segment_index

    def slow(self, *args, **kwargs):
        release.wait(10)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "_read_segment_index", slow)
    j = Journal.open(tmp_path / "j")
    try:
        assert not j.loaded
        started = time.monotonic()
        j.append([(0, 0, b"\x5a" * 4096)])  # not blocked by the loading
        new = j.checkpoint("while loading")
        j.commit()
        assert not j.loaded and time.monotonic() - started < 5
        release.set()
        with j.view(old) as view:
            assert view.read(0, 0, MiB) == snapshot
        with j.view(new) as view:
            assert view.read(0, 0, MiB) == b"\x5a" * 4096 + snapshot[4096:]
        assert [c.seq for c in j.checkpoints()] == sorted(c.seq for c in j.checkpoints())
        assert j.reopen_report.rescanned_segments == 0
    finally:
        release.set()
        j.close()


def test_close_during_background_load_stops_it(tmp_path, monkeypatch):
    rng = random.Random(32)
    j = make(tmp_path / "j")
    fill_until_rotation(j, bytearray(MiB), rng, segments=3)
    j.close()
    calls = []
    real = Journal._read_segment_index

    def slow(self, *args, **kwargs):  # the first segment's index is read once close began
        calls.append(1)
        deadline = time.monotonic() + 10
        while not self._closing and time.monotonic() < deadline:
            time.sleep(0.001)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "_read_segment_index", slow)
    j = Journal.open(tmp_path / "j")
    j.close()  # joins the loader, which stops between segments
    assert len(calls) < 3
    Journal.open(tmp_path / "j").close()  # and the lock was released


def test_background_commit_racing_promotion_does_not_stop_the_journal(tmp_path, monkeypatch):
    """The committer thread is handed the active segment's descriptor; a promotion of
    everything replaces and closes that segment before the fsync runs.  The late fsync
    must not hit a closed (or by then reused) descriptor and stop the journal."""
    rng = random.Random(33)
    j = make(tmp_path / "j", group_commit_bytes=4 * KiB)
    real = os.fdatasync
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def fdatasync(fd):
        if threading.current_thread().name.startswith("journal-commit") and not done.is_set():
            entered.set()
            release.wait(10)
            try:
                return real(fd)
            finally:
                done.set()
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    j.append([(0, 0, rand(rng, 8192))])  # hands a group commit to the committer
    assert entered.wait(10)
    c = j.checkpoint()
    j.promote_to(j.last_seq + 1)  # the active segment is replaced and its file closed
    assert c not in j.checkpoints()
    release.set()
    assert done.wait(10)
    data = rand(rng, 8192)
    j.append([(0, 8192, data)])  # another group commit, for a live committer to finish
    wait_for(lambda: j.durable_seq == j.last_seq)
    c = j.checkpoint()
    assert read_all(j, c)[8192:16384] == data
    j.close()
