"""The journal against a plain model: a bytearray per volume and a snapshot per checkpoint.

A hypothesis state machine drives a Journal with overlapping writes of every encoding
(zero, LZ4, raw), checkpoints, commits, promotions, views, clean reopens and crashes (the
process dies without committing; the tail of the newest segment is cut or overwritten
anywhere after the durable point).  After every step each checkpoint still in the
journal must read back exactly as the model recorded it.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.journal import abandon, quiesce
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from zcore._native import record as _rec
from zcore.errors import (
    AlignmentError,
    ClosedError,
    JournalFullError,
    OutOfRangeError,
)
from zcore.journal import Journal, JournalSettings, VolumeSpec

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
SEGMENT_BYTES = MiB  # the smallest segment the settings accept: rotation comes quickly


def make_data(kind: str, length: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(length)
    if kind == "random":  # incompressible: a raw record with block CRCs
        return rng.randbytes(length)
    if kind == "text":  # compresses well: an LZ4 record
        words = [rng.randbytes(rng.randrange(1, 9)) for _ in range(16)]
        out = bytearray()
        while len(out) < length:
            out += rng.choice(words)
        return bytes(out[:length])
    # "sparse": random sectors among zero ones, compressible about 2:1
    out = bytearray(length)
    for s in range(0, length, SECTOR):
        if rng.random() < 0.5:
            out[s : s + SECTOR] = rng.randbytes(SECTOR)
    return bytes(out)


DATA_KINDS = st.sampled_from(["zero", "random", "text", "sparse"])


def segment_paths(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("seg-*.zcj") if len(p.name) == 16)


def durable_length(seg_path: Path, durable_seq: int, volume_sizes: np.ndarray) -> int:
    """Bytes of the segment file holding only records with seq <= durable_seq."""
    data = seg_path.read_bytes()
    batch = _rec.scan(memoryview(data)[64:], 64, 0, 0, volume_sizes)
    end = 64
    for ext in batch.array():
        if int(ext["seq"]) > durable_seq:
            return int(ext["pos"])
        end = int(ext["pos"]) + _rec.record_size(int(ext["stored"]))
    return end


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="zcore-model-"))
        self.path = self.tmp / "journal"
        self.journal: Journal | None = None

    def teardown(self) -> None:
        try:
            if self.journal is not None:
                self.journal.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- model ----------------------------------------------------------------------------

    @initialize(
        sizes=st.lists(st.sampled_from([256 * KiB, 512 * KiB, MiB]), min_size=1, max_size=3),
        ids=st.sampled_from([[0, 1, 2], [3, 7, 300], [65535, 0, 9]]),
        group_commit=st.sampled_from([0, 0, 192 * KiB, 8 * MiB]),
    )
    def create(self, sizes, ids, group_commit):
        specs = [VolumeSpec(ids[i], f"disk{i}", size) for i, size in enumerate(sizes)]
        self.journal = Journal.create(
            self.path, specs,
            settings=JournalSettings(segment_bytes=SEGMENT_BYTES, group_commit_bytes=group_commit),
        )
        self.sizes = {s.id: s.size for s in specs}
        self.names = {s.id: s.name for s in specs}
        self.volume_sizes = np.zeros(max(self.sizes) + 1, dtype=np.uint64)
        for vid, size in self.sizes.items():
            self.volume_sizes[vid] = size
        self.model = {vid: bytearray(size) for vid, size in self.sizes.items()}
        # seq -> (kind, tag, consistent, {volume: bytes}) for every checkpoint in the journal
        self.ckpts: dict[int, tuple[str, str | None, bool, dict[int, bytes]]] = {}
        self.last_seq = 0
        self.promoted = 0
        self.views: list[tuple[object, int]] = []
        # the durable base: the model as of durable_seq, and the operations after it
        self.base_seq = 0
        self.base = {vid: bytes(m) for vid, m in self.model.items()}
        self.log: list[tuple[int, int, int, bytes]] = []  # (seq, volume, offset, data)

    def _advance_durable(self) -> None:
        durable = self.journal.durable_seq
        assert self.base_seq <= durable <= self.last_seq
        if durable == self.base_seq:
            return
        base = {vid: bytearray(b) for vid, b in self.base.items()}
        keep = []
        for seq, vid, off, data in self.log:
            if seq < durable + 1:
                base[vid][off : off + len(data)] = data
            else:
                keep.append((seq, vid, off, data))
        self.base = {vid: bytes(b) for vid, b in base.items()}
        self.log = keep
        self.base_seq = durable

    def _write(self, vid: int, off: int, data: bytes, seq: int) -> None:
        self.model[vid][off : off + len(data)] = data
        self.log.append((seq, vid, off, data))

    def _check_checkpoint(self, seq: int, ranges=None) -> None:
        snapshot = self.ckpts[seq][3]
        with self.journal.view(seq) as view:
            for vid, image in snapshot.items():
                if ranges is None:
                    assert view.read(vid, 0, len(image)) == image, (seq, vid)
                else:
                    for off, length in ranges(len(image)):
                        got = view.read(self.names[vid], off, length)
                        assert got == image[off : off + length], (seq, vid, off, length)

    def _check_all(self) -> None:
        for seq in sorted(self.ckpts):
            self._check_checkpoint(seq)

    # ---- rules ----------------------------------------------------------------------------

    @rule(data=st.data(), n=st.integers(1, 4), compress=st.booleans())
    def write(self, data, n, compress):
        writes = []
        for _ in range(n):
            vid = data.draw(st.sampled_from(sorted(self.sizes)), label="volume")
            sectors = self.sizes[vid] // SECTOR
            length = data.draw(st.sampled_from([1, 7, 8, 9, 16, 63, 64, 128]), label="sectors")
            length = min(length, sectors)
            start = data.draw(st.integers(0, sectors - length), label="start")
            kind = data.draw(DATA_KINDS, label="kind")
            payload = make_data(kind, length * SECTOR, data.draw(st.integers(0, 2**32)))
            writes.append((vid, start * SECTOR, payload))
        last = self.journal.append(writes, compress=compress)
        for i, (vid, off, payload) in enumerate(writes):
            self._write(vid, off, payload, self.last_seq + 1 + i)
        self.last_seq += len(writes)
        assert last == self.last_seq

    @rule(seed=st.integers(0, 2**32), count=st.integers(4, 12))
    def fill(self, seed, count):
        """Incompressible 64 KiB writes: enough of them rotate segments."""
        rng = random.Random(seed)
        vid = rng.choice(sorted(self.sizes))
        slots = self.sizes[vid] // (64 * KiB)
        for _ in range(count):
            off = rng.randrange(slots) * 64 * KiB
            payload = rng.randbytes(64 * KiB)
            self.journal.append([(vid, off, payload)])
            self.last_seq += 1
            self._write(vid, off, payload, self.last_seq)

    @rule(data=st.data())
    def bad_write(self, data):
        vid = data.draw(st.sampled_from(sorted(self.sizes)))
        size = self.sizes[vid]
        case = data.draw(st.sampled_from(["offset", "length", "end", "volume"]))
        if case == "offset":
            off = data.draw(st.integers(1, SECTOR - 1))
            write, error = (vid, off, bytes(SECTOR)), AlignmentError
        elif case == "length":
            length = data.draw(st.integers(1, SECTOR - 1))
            write, error = (vid, 0, bytes(length)), AlignmentError
        elif case == "end":
            write, error = (vid, size - SECTOR, bytes(2 * SECTOR)), OutOfRangeError
        else:
            write, error = (max(self.sizes) + 1, 0, bytes(SECTOR)), OutOfRangeError
        good = (vid, 0, b"\x01" * SECTOR)
        with pytest.raises(error):
            self.journal.append([good, write])  # the good write of the batch is refused too
        assert self.journal.last_seq == self.last_seq

    @rule(tag=st.one_of(st.none(), st.text(min_size=1, max_size=20)), consistent=st.booleans())
    def checkpoint(self, tag, consistent):
        ckpt = self.journal.checkpoint(tag, consistent=consistent)
        self.last_seq += 1
        assert ckpt.id == ckpt.seq == self.last_seq
        assert ckpt.tag == tag and ckpt.consistent == consistent
        self.ckpts[ckpt.seq] = ("tagged" if tag else "auto", tag, consistent,
                                {vid: bytes(m) for vid, m in self.model.items()})

    @rule()
    def commit(self):
        assert self.journal.commit() == self.last_seq

    @precondition(lambda self: self.ckpts)
    @rule(data=st.data())
    def promote(self, data):
        choices = [*sorted(self.ckpts), self.last_seq + 1, self.last_seq + 5]
        target = data.draw(st.sampled_from(choices))
        pins = [seq for _, seq in self.views]
        if pins and target > min(pins):
            with pytest.raises(JournalFullError):
                self.journal.promote_to(target)
            return
        expected = max(self.promoted, min(target, self.last_seq + 1))
        assert self.journal.promote_to(target) == expected
        self.promoted = expected
        event("promoted" if expected > 0 else "promoted nothing")
        self.ckpts = {seq: c for seq, c in self.ckpts.items() if seq >= expected}

    @precondition(lambda self: self.ckpts)
    @rule(data=st.data())
    def open_view(self, data):
        seq = data.draw(st.sampled_from(sorted(self.ckpts)))
        self.views.append((self.journal.view(seq), seq))

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def close_view(self, data):
        i = data.draw(st.integers(0, len(self.views) - 1))
        view, _ = self.views.pop(i)
        view.close()

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def read_view(self, data):
        view, seq = data.draw(st.sampled_from(self.views))
        vid = data.draw(st.sampled_from(sorted(self.sizes)))
        sectors = self.sizes[vid] // SECTOR
        start = data.draw(st.integers(0, sectors - 1))
        length = data.draw(st.integers(1, min(sectors - start, 300)))
        got = view.read(vid, start * SECTOR, length * SECTOR)
        image = self.ckpts[seq][3][vid]
        assert got == image[start * SECTOR : (start + length) * SECTOR]

    @precondition(lambda self: self.ckpts)
    @rule(data=st.data())
    def read_checkpoint(self, data):
        seq = data.draw(st.sampled_from(sorted(self.ckpts)))
        n = data.draw(st.integers(1, 4))
        picks = [(data.draw(st.integers(0, 2047)), data.draw(st.integers(1, 256)))
                 for _ in range(n)]

        def ranges(size):
            sectors = size // SECTOR
            for start, length in picks:
                start %= sectors
                yield start * SECTOR, min(length, sectors - start) * SECTOR

        self._check_checkpoint(seq, ranges)

    def _after_reopen(self, old_views) -> None:
        for view, _ in old_views:
            with pytest.raises(ClosedError):
                view.read(next(iter(self.sizes)), 0, SECTOR)
        assert self.journal.promoted_seq == self.promoted
        assert [c.id for c in self.journal.checkpoints()] == sorted(self.ckpts)
        self._check_all()

    @rule(drop_index=st.booleans(), write_at_once=st.booleans(), data=st.data())
    def reopen(self, drop_index, write_at_once, data):
        self.journal.close()
        self._advance_durable()
        assert self.base_seq == self.last_seq  # close commits
        sealed = sorted(self.path.glob("seg-*.zci"))
        if drop_index and sealed:
            sealed[0].unlink()
        old_views, self.views = self.views, []
        self.journal = Journal.open(self.path)
        assert self.journal.last_seq == self.last_seq
        if write_at_once:  # while the sealed segments still load in the background
            self.write(data, 2, True)
            self.checkpoint("at once", True)
        report = self.journal.reopen_report
        assert report.dropped_bytes == 0 and report.dropped_segments == 0
        assert report.rescanned_segments == (1 if drop_index and sealed else 0)
        assert self.journal.last_seq == self.last_seq
        if not write_at_once:
            assert self.journal.durable_seq == self.last_seq
        self._after_reopen(old_views)

    @rule(data=st.data())
    def crash(self, data):
        j = self.journal
        quiesce(j)  # the background group commit may have moved durable_seq: read it now
        durable = j.durable_seq
        self._advance_durable()
        tail = segment_paths(self.path)[-1]
        keep = durable_length(tail, durable, self.volume_sizes)
        abandon(j)
        size = tail.stat().st_size
        damage = data.draw(st.sampled_from(["none", "cut", "garbage", "zeros"]))
        # where, as a fraction of the non-durable tail: durable_seq depends on when the
        # background fsync ran, and a draw's bounds must not
        at = keep + (size - keep) * data.draw(st.integers(0, 1024), label="at/1024") // 1024
        if damage == "cut":
            os.truncate(tail, at)
        elif damage != "none":
            n = data.draw(st.integers(1, 3 * 4096), label="damage bytes")
            junk = (random.Random(data.draw(st.integers(0, 2**32))).randbytes(n)
                    if damage == "garbage" else bytes(n))
            with open(tail, "r+b") as f:
                f.seek(at)
                f.write(junk)
        damaged_size = tail.stat().st_size
        old_views, self.views = self.views, []
        self.journal = Journal.open(self.path)
        report = self.journal.reopen_report
        survived = self.journal.last_seq
        # nothing durable is lost; what survives past it is a prefix of what was appended
        assert durable <= survived <= self.last_seq
        assert self.journal.durable_seq == survived
        assert tail.stat().st_size == damaged_size - report.dropped_bytes
        assert bool(report.reason) == (report.dropped_bytes > 0)
        if damage == "none":
            assert survived == self.last_seq and report.dropped_bytes == 0
        event(f"crash: {damage}, " + ("lost non-durable records" if survived < self.last_seq
                                      else "lost nothing"))
        # roll the model back to what survived
        self.model = {vid: bytearray(b) for vid, b in self.base.items()}
        self.log = [op for op in self.log if op[0] <= survived]
        for _seq, vid, off, payload in self.log:
            self.model[vid][off : off + len(payload)] = payload
        self.ckpts = {seq: c for seq, c in self.ckpts.items() if seq <= survived}
        self.last_seq = survived
        self._after_reopen(old_views)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def journal_agrees_with_model(self):
        if self.journal is None:
            return
        self._advance_durable()
        j = self.journal
        assert j.last_seq == self.last_seq
        assert j.promoted_seq == self.promoted
        got = j.checkpoints()
        assert [c.id for c in got] == sorted(self.ckpts)
        for c in got:
            kind, tag, consistent, _ = self.ckpts[c.seq]
            assert (c.kind, c.tag, c.consistent) == (kind, tag, consistent)

    @invariant()
    def count_segments(self):
        if self.journal is not None:
            n = len(segment_paths(self.path))
            event(f"segments: {min(n, 3)}{'+' if n >= 3 else ''}")

    @invariant()
    def checkpoints_read_back_whole(self):
        """The newest checkpoint always; every one while the volumes are small."""
        if self.journal is None or not self.ckpts:
            return
        if sum(self.sizes.values()) <= 512 * KiB:
            self._check_all()
        else:
            self._check_checkpoint(max(self.ckpts))


TestJournalModel = JournalMachine.TestCase  # settings: the profile loaded by conftest.py
