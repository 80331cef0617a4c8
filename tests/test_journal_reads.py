"""Reads against a journal that changes under them: reads take the index lock, not the
append lock (zcore/journal/readthrough.py), so they run while appends write, segments
rotate and promotion rewrites replicas and closes and unlinks segment files."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from zcore.errors import CheckpointNotFoundError, JournalFullError, OutOfRangeError
from zcore.journal import Journal, JournalSettings, VolumeSpec

KiB = 1024
MiB = 1024 * KiB
VOLUME = 512 * KiB


def make(path) -> Journal:
    settings = JournalSettings(segment_bytes=MiB, group_commit_bytes=256 * KiB)
    return Journal.create(path, [VolumeSpec(0, "disk0", VOLUME)], settings=settings)


def payload(rng: random.Random, n: int) -> bytes:
    if rng.random() < 0.5:  # compressible: an LZ4 record, read through the LZ4 cache
        return bytes([rng.randrange(256)]) * n
    return rng.randbytes(n)


def test_reads_racing_appends_rotation_and_promotion_unlinks_never_see_stale_or_foreign_bytes(
        tmp_path):
    """Readers in threads read views and `read_at` of recent checkpoints while the main
    thread appends (rotating 1 MiB segments) and promotes (closing and unlinking the
    oldest segments, whose descriptor numbers the next segments reuse).  Every byte read
    must match the model of its checkpoint: a read served from a closed or reused
    descriptor, or from a replica promotion rewrote under it, would not."""
    rng = random.Random(81)
    j = make(tmp_path / "j")
    model = bytearray(VOLUME)
    snapshots: dict[int, bytes] = {}  # checkpoint seq -> the volume as of it
    recent: list[int] = []
    guard = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"view": 0, "read_at": 0}

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                with guard:
                    if not recent:
                        continue
                    seq = r.choice(recent[-6:])
                    want = snapshots[seq]
                offset = r.randrange(VOLUME // 4096) * 4096
                length = min(VOLUME - offset, r.choice((4, 16, 64, 128)) * KiB)
                if r.random() < 0.5:
                    try:
                        view = j.view(seq)
                    except CheckpointNotFoundError:
                        continue  # promoted away meanwhile
                    with view:
                        got = view.read(0, offset, length)
                    counts["view"] += 1
                else:
                    try:
                        got = j.read_at(seq, 0, offset, length)
                    except CheckpointNotFoundError:
                        continue
                    counts["read_at"] += 1
                assert got == want[offset : offset + length], (seq, offset, length)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    first_segment = j.segments()[0].number
    promotions = 0
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline and not stop.is_set():
            for _ in range(8):
                offset = rng.randrange(VOLUME // 4096) * 4096
                data = payload(rng, min(VOLUME - offset, rng.choice((4, 8, 32)) * KiB))
                j.append([(0, offset, data)])
                model[offset : offset + len(data)] = data
            c = j.checkpoint()
            with guard:
                snapshots[c.seq] = bytes(model)
                recent.append(c.seq)
            if len(recent) > 12 and rng.random() < 0.3:
                try:
                    j.promote_to(recent[-10])
                    promotions += 1
                except JournalFullError:
                    pass  # a reader pins an older checkpoint: promote next time
                with guard:  # forget what no reader picks any more
                    for seq in recent[:-12]:
                        snapshots.pop(seq, None)
                    del recent[:-12]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    if errors:
        raise errors[0]
    segs = j.segments()
    assert promotions and segs[0].number > first_segment + 2  # segments were unlinked
    assert len(segs) >= 1 and segs[-1].number > 5  # and many rotated
    assert counts["view"] > 50 and counts["read_at"] > 50
    latest = recent[-1]
    assert j.read_at(latest, 0, 0, VOLUME) == snapshots[latest]
    j.close()


def test_read_at_outside_the_journal_is_refused(tmp_path):
    """`read_at` serves only states the journal holds: none below the promotion watermark
    (the replicas hold newer bytes there) and none past the next seq."""
    j = make(tmp_path / "j")
    j.append([(0, 0, b"\x11" * 4096)])
    first = j.checkpoint()
    j.append([(0, 0, b"\x22" * 4096)])
    second = j.checkpoint()
    assert j.read_at(first.seq, 0, 0, 4096) == b"\x11" * 4096
    assert j.read_at(1, 0, 0, 4096) == bytes(4096)  # before the first write
    assert j.read_at(j.last_seq + 1, 0, 0, 4096) == b"\x22" * 4096
    with pytest.raises(OutOfRangeError):
        j.read_at(j.last_seq + 2, 0, 0, 4096)
    j.promote_to(second.seq)
    with pytest.raises(CheckpointNotFoundError):
        j.read_at(first.seq, 0, 0, 4096)
    assert j.read_at(second.seq, 0, 0, 4096) == b"\x22" * 4096
    j.close()


def test_segments_report_numbers_seqs_and_sealing(tmp_path):
    j = make(tmp_path / "j")
    rng = random.Random(82)
    while len(j.segments()) < 3:
        j.append([(0, rng.randrange(VOLUME // 65536) * 65536, rng.randbytes(64 * KiB))])
    segs = j.segments()
    assert [s.number for s in segs] == [1, 2, 3]
    assert [s.sealed for s in segs] == [True, True, False]
    assert segs[0].min_seq == 1 and segs[1].min_seq == segs[0].max_seq + 1
    assert all(s.path.stat().st_size == s.size for s in segs)
    j.close()


def test_reads_are_served_while_a_commit_is_blocked_in_fsync(tmp_path, monkeypatch):
    """A commit stuck in a slow fsync holds the append lock; reads of a view and
    `read_at` must still be served meanwhile, and appends resume when it returns."""
    j = make(tmp_path / "j")
    j.append([(0, 0, b"\x33" * 8192)])
    c = j.checkpoint()
    j.append([(0, 8192, b"\x44" * 4096)])  # unsynced: the commit below must fsync
    view = j.view(c)
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def slow(fd):
        entered.set()
        release.wait(10)
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    committer = threading.Thread(target=j.commit)
    committer.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        assert view.read(0, 0, 8192) == b"\x33" * 8192
        assert j.read_at(j.last_seq + 1, 0, 8192, 4096) == b"\x44" * 4096
        assert time.monotonic() - started < 5 and committer.is_alive()
    finally:
        release.set()
        committer.join(10)
    monkeypatch.undo()
    view.close()
    j.close()
