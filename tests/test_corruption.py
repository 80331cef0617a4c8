"""Damaged journal files: one flipped bit anywhere, torn tails, garbage tails.

A small journal (two sealed segments with index files, an active segment, records of every
type and encoding, checkpoints) is built once.  Each example copies it, damages the copy
and reopens it.  The rule: damage is detected, as an error (the CorruptRecordError family)
on open or on the read that touches it, or as a dropped tail that the reopen report
states; a read never returns anything but the exact bytes of its checkpoint.

By design the padding after a record's payload is not checksummed (docs/format.md 6): it
is never returned as data, so flipping it must change nothing.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers.journal import set_mark
from hypothesis import given
from hypothesis import strategies as st

from zcore import records
from zcore._native import record as _rec
from zcore.errors import CorruptRecordError, ZcoreError
from zcore.journal import Journal, JournalSettings, VolumeSpec, segments

KiB = 1 << 10
MiB = 1 << 20
SIZES = {0: 256 * KiB, 4: 128 * KiB}


@dataclass(frozen=True)
class Rec:
    segment: str  # file name
    pos: int
    seq: int
    type: int
    flags: int
    stored: int
    length: int

    def regions(self) -> dict[str, tuple[int, int]]:
        p = self.pos
        out = {"record header": (p, p + 64)}
        end = p + 64 + self.stored
        if self.type == records.REC_CHECKPOINT:
            out["checkpoint payload"] = (p + 64, end)
        elif self.flags & records.FLAG_BLOCKCRC:
            table = _rec.blockcrc_table_size(self.length)
            out["crc table"] = (p + 64, p + 64 + table)
            out["raw data"] = (p + 64 + table, end)
        elif self.flags & records.FLAG_LZ4:
            out["lz4 payload"] = (p + 64, end)
        if p + _rec.record_size(self.stored) > end:
            out["padding"] = (end, p + _rec.record_size(self.stored))
        return out


class Pristine:
    """The undamaged journal and what it holds.  Not a dataclass: hypothesis would print
    the megabytes of snapshots field by field in every failure report."""

    def __init__(self, path: Path, snapshots: dict[int, dict[int, bytes]],
                 recs: list[Rec], segments: list[str], last_seq: int) -> None:
        self.path = path
        self.snapshots = snapshots  # checkpoint seq -> volume -> image
        self.records = recs
        self.segments = segments  # file names, oldest first
        self.last_seq = last_seq

    def __repr__(self) -> str:
        return f"Pristine({self.path}, {len(self.records)} records)"


def volume_sizes() -> np.ndarray:
    sizes = np.zeros(max(SIZES) + 1, dtype=np.uint64)
    for vid, size in SIZES.items():
        sizes[vid] = size
    return sizes


def build(path: Path) -> Pristine:
    rng = random.Random(2026)
    journal = Journal.create(
        path, [VolumeSpec(vid, f"disk{vid}", size) for vid, size in SIZES.items()],
        settings=JournalSettings(segment_bytes=MiB, group_commit_bytes=0),
    )
    model = {vid: bytearray(size) for vid, size in SIZES.items()}
    snapshots = {}

    def write(vid, off, data, **kw):
        journal.append([(vid, off, data)], **kw)
        model[vid][off : off + len(data)] = data

    def checkpoint(tag=None):
        c = journal.checkpoint(tag)
        snapshots[c.seq] = {vid: bytes(m) for vid, m in model.items()}

    def small_writes():
        vid = rng.choice(sorted(SIZES))
        off = rng.randrange(SIZES[vid] // 4096 - 4) * 4096
        write(vid, off, rng.randbytes(12 * KiB))  # raw
        write(vid, off + 1024, (b"lz4 me " * 2000)[: 5 * KiB])  # LZ4, padded
        write(vid, off + 8 * KiB, bytes(4 * KiB))  # zero
        sync = records.encode_write(vid, journal.last_seq + 1, off, rng.randbytes(1536), 1,
                                    compress=False, sync=True)
        journal.append_encoded(sync)
        model[vid][off : off + 1536] = _rec_data(sync)
        text = (b"sync me " * 1000)[: 2 * KiB]
        journal.append_encoded(records.encode_write(vid, journal.last_seq + 1, off + 2 * KiB,
                                                    text, 1, sync=True))
        model[vid][off + 2 * KiB : off + 4 * KiB] = text

    segs = lambda: sorted(p.name for p in path.glob("seg-*.zcj"))  # noqa: E731
    while len(segs()) < 3:  # two sealed segments
        vid = rng.choice(sorted(SIZES))
        write(vid, rng.randrange(SIZES[vid] // (64 * KiB)) * 64 * KiB, rng.randbytes(64 * KiB))
        if rng.random() < 0.3:
            small_writes()
            checkpoint(rng.choice([None, "tagged é"]))
    for i in range(6):  # the active segment: small records of every kind
        small_writes()
        checkpoint(None if i % 2 else f"tag {i}")
    journal.close()
    recs = []
    for name in segs():
        data = (path / name).read_bytes()
        batch = _rec.scan(memoryview(data)[64:], 64, 0, 0, volume_sizes())
        assert batch.status == 0
        for e in batch.array():
            recs.append(Rec(name, int(e["pos"]), int(e["seq"]), int(e["type"]),
                            int(e["flags"]), int(e["stored"]), int(e["length"])))
    kinds = {(r.type, r.flags) for r in recs if r.segment == segs()[-1]}
    assert len(kinds) == 6  # raw, LZ4, zero, raw sync, LZ4 sync, checkpoint
    return Pristine(path, snapshots, recs, segs(), recs[-1].seq)


def _rec_data(record: bytes) -> bytes:
    """Data of a raw record (after its CRC table)."""
    hdr, _ = _rec.parse_header(record[:64])
    table = _rec.blockcrc_table_size(hdr["length"])
    return record[64 + table : 64 + table + hdr["length"]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    return build(tmp_path_factory.mktemp("pristine") / "journal")


class Copy:
    """A scratch copy of the pristine journal, removed afterwards."""

    def __init__(self, pristine: Pristine) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="zcore-corrupt-"))
        self.path = self.tmp / "journal"
        shutil.copytree(pristine.path, self.path)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def flip(path: Path, pos: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << bit)]))


def read_back(journal: Journal, pristine: Pristine) -> dict[int, str]:
    """Read every checkpoint whole and in 4 KiB pieces.  Returns seq -> "exact" or
    "error"; fails on any byte that differs."""
    outcome = {}
    for c in journal.checkpoints():
        assert c.seq in pristine.snapshots, f"checkpoint {c.seq} was never taken"
        state = "exact"
        with journal.view(c) as view:
            for vid, image in pristine.snapshots[c.seq].items():
                pieces = [(0, len(image))] + [(off, 4096) for off in range(0, len(image), 4096)]
                for off, length in pieces:
                    try:
                        got = view.read(vid, off, length)
                    except CorruptRecordError:
                        state = "error"
                        continue
                    assert got == image[off : off + length], (c.seq, vid, off, length)
        outcome[c.seq] = state
    return outcome


def check_damaged(path: Path, pristine: Pristine,
                  promote: bool = True) -> tuple[Journal | None, dict[int, str]]:
    """Open a damaged copy and read everything back (then, with `promote`, promote to the
    newest checkpoint and read that again).  Returns (None, {}) when the open refused the
    journal; else the journal (open) and read_back's outcome.  Lost checkpoints must be
    reported as a dropped tail."""
    try:
        journal = Journal.open(path)
    except ZcoreError as exc:
        assert isinstance(exc, CorruptRecordError), repr(exc)
        return None, {}
    try:  # sealed segments load in the background: their damage surfaces here
        journal.wait_loaded()
    except ZcoreError as exc:
        assert isinstance(exc, CorruptRecordError), repr(exc)
        with pytest.raises(CorruptRecordError):  # and every call that needs them refuses
            journal.checkpoints()
        journal.close()
        return None, {}
    outcome = read_back(journal, pristine)
    lost = set(pristine.snapshots) - set(outcome)
    report = journal.reopen_report
    if lost and report.damage:  # quarantined committed records (issue 9): named
        assert all(any(lo <= s <= (hi if hi is not None else s) for lo, hi in
                       report.damaged_seqs) for s in lost), (lost, report.damaged_seqs)
    elif lost:  # every record here was durable: losing any must be reported
        assert report.dropped_bytes > 0 and report.reason
        assert min(lost) > max(outcome, default=0), "only a tail may be dropped"
    # promotion re-reads the segments: it must refuse damage, never copy it to a replica
    newest = max(outcome, default=None)
    if promote and newest is not None:
        try:
            journal.promote_to(newest)
        except CorruptRecordError:
            pass
        else:
            assert read_back(journal, pristine).get(newest) in ("exact", "error")
    return journal, outcome


LOCATIONS = ["sealed", "sealed without index", "oldest sealed without index", "active"]
RECORD_REGIONS = ["record header", "crc table", "raw data", "lz4 payload",
                  "checkpoint payload", "padding"]


def pick_segment(pristine: Pristine, location: str) -> str:
    if location == "active":
        return pristine.segments[-1]
    # the newest sealed segment is read at open (it vouches for the tail's first seq),
    # the oldest by the background loader
    return pristine.segments[0] if location.startswith("oldest") else pristine.segments[1]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("region", RECORD_REGIONS)
@given(pick=st.integers(0, 2**32), at=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flip_in_a_record_is_detected_or_harmless(pristine, location, region, pick, at,
                                                       bit):
    segment = pick_segment(pristine, location)
    candidates = [r for r in pristine.records
                  if r.segment == segment and region in r.regions()]
    assert candidates, (location, region)
    rec = candidates[pick % len(candidates)]
    lo, hi = rec.regions()[region]
    pos = lo + int(at * (hi - lo))
    with Copy(pristine) as path:
        if location.endswith("without index"):
            (path / segment).with_suffix(".zci").unlink()
        flip(path / segment, pos, bit)
        journal, outcome = check_damaged(path, pristine)
        try:
            if region == "padding":  # never interpreted, never checked
                assert journal is not None
                assert journal.reopen_report.dropped_bytes == 0
                assert set(outcome) == set(pristine.snapshots)
                assert set(outcome.values()) == {"exact"}
            elif location.endswith("without index") or location == "active":
                # damage to committed records (the whole journal was committed): since
                # issue 9 it is quarantined and reported, never refused whole (sealed)
                # nor dropped as a torn tail with every record after it (active)
                assert journal is not None
                report = journal.reopen_report
                assert report.damage and report.dropped_bytes == 0
                assert journal.last_seq == pristine.last_seq
                assert set(pristine.snapshots) - set(outcome) <= {rec.seq}
            elif rec.type == records.REC_CHECKPOINT:
                # a sealed checkpoint is checked against its record at load: refused on
                # open, or dropped from the catalogue with its damage reported
                if journal is not None:
                    assert set(pristine.snapshots) - set(outcome) <= {rec.seq}
                    if rec.seq not in outcome:
                        assert journal.reopen_report.damage or journal.status().damaged_seqs
            else:  # sealed, loaded from its index file: found when read, if ever
                assert journal is not None
                assert set(outcome) == set(pristine.snapshots)
        finally:
            if journal is not None:
                journal.close()


@pytest.mark.parametrize("location", LOCATIONS)
@given(pos=st.integers(0, 63), bit=st.integers(0, 7))
def test_bit_flip_in_a_segment_header_is_detected_or_harmless(pristine, location, pos, bit):
    segment = pick_segment(pristine, location)
    with Copy(pristine) as path:
        if location.endswith("without index"):
            (path / segment).with_suffix(".zci").unlink()
        flip(path / segment, pos, bit)
        journal, outcome = check_damaged(path, pristine)
        if location == "sealed" or segments.MARK_AT <= pos < 60:
            # loaded from its index: the header is not needed; or the mark (v2): a
            # damaged mark is no mark, and every record of this journal is whole
            assert journal is not None
            assert set(outcome.values()) == {"exact"}
            assert set(outcome) == set(pristine.snapshots)
            journal.close()
        else:  # a header in front of records is never torn: refuse, do not delete
            assert journal is None
            assert (path / segment).exists()


@given(which=st.integers(0, 1), at=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flip_in_a_segment_index_file_rebuilds_it(pristine, which, at, bit):
    zci = Path(pristine.segments[which]).with_suffix(".zci").name
    with Copy(pristine) as path:
        size = (path / zci).stat().st_size
        flip(path / zci, int(at * size), bit)
        journal, outcome = check_damaged(path, pristine, promote=False)
        assert journal is not None
        assert journal.reopen_report.rescanned_segments == 1
        assert set(outcome) == set(pristine.snapshots)
        assert set(outcome.values()) == {"exact"}
        journal.close()
        journal = Journal.open(path)  # the rebuilt index file is whole
        assert journal.reopen_report.rescanned_segments == 0
        outcome = read_back(journal, pristine)
        assert set(outcome) == set(pristine.snapshots)
        assert set(outcome.values()) == {"exact"}
        journal.close()


@given(at=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flip_in_journal_meta_is_refused(pristine, at, bit):
    with Copy(pristine) as path:
        size = (path / "journal.meta").stat().st_size
        flip(path / "journal.meta", int(at * size), bit)
        with pytest.raises(CorruptRecordError):
            Journal.open(path)
        with pytest.raises(CorruptRecordError):  # and the lock was released
            Journal.open(path)


# ---- torn and garbage tails ------------------------------------------------------------------


def tail_records(pristine: Pristine) -> list[Rec]:
    return [r for r in pristine.records if r.segment == pristine.segments[-1]]


def reopen_with_tail(path: Path, pristine: Pristine, tail: bytes,
                     unsynced_from: Rec | None = None) -> Journal:
    """Replace the active segment of the copy at `path` with `tail` and reopen.  With
    `unsynced_from`, its mark says that record and those after it were not yet durable
    (the pristine journal was closed: its mark covers everything)."""
    seg = path / pristine.segments[-1]
    seg.write_bytes(tail)
    if unsynced_from is not None:
        before = [r.seq for r in pristine.records if r.seq < unsynced_from.seq]
        set_mark(seg, unsynced_from.pos, before[-1])
    return Journal.open(path)


def test_torn_tail_is_truncated_and_reported(pristine):
    """Cut the active segment at many points inside its last records: the reopen keeps
    exactly the whole records before the cut and reports the bytes it dropped."""
    recs = tail_records(pristine)
    name = pristine.segments[-1]
    tail = (pristine.path / name).read_bytes()
    first = recs[-8].pos
    cuts = sorted(set(range(first, len(tail), 61)) | {r.pos for r in recs[-8:]}
                  | {r.pos + 1 for r in recs[-8:]} | {r.pos + 63 for r in recs[-8:]}
                  | {len(tail) - 1})
    with Copy(pristine) as path:
        for cut in cuts:
            journal = reopen_with_tail(path, pristine, tail[:cut], unsynced_from=recs[-8])
            whole = [r for r in recs if r.pos + _rec.record_size(r.stored) <= cut]
            end = whole[-1].pos + _rec.record_size(whole[-1].stored)
            report = journal.reopen_report
            assert journal.last_seq == whole[-1].seq, cut
            assert report.dropped_bytes == cut - end, cut
            assert bool(report.reason) == (cut > end)
            assert (path / name).stat().st_size == end
            kept = {s for s in pristine.snapshots if s <= whole[-1].seq}
            assert {c.seq for c in journal.checkpoints()} == kept
            if cut in (first, len(tail) - 1):  # reading everything back is the slow part
                assert set(read_back(journal, pristine).values()) == {"exact"}
            journal.close()


def test_cut_at_a_record_boundary_drops_nothing(pristine):
    recs = tail_records(pristine)
    tail = (pristine.path / pristine.segments[-1]).read_bytes()
    with Copy(pristine) as path:
        for r in recs[-4:]:
            journal = reopen_with_tail(path, pristine, tail[: r.pos], unsynced_from=recs[-4])
            assert journal.reopen_report.dropped_bytes == 0
            assert journal.reopen_report.reason == ""
            assert journal.last_seq == max(x.seq for x in pristine.records if x.seq < r.seq)
            journal.close()


@pytest.mark.parametrize("garbage", ["zeros", "random", "old record", "foreign volume",
                                     "record cut short", "ones"])
def test_garbage_tail_is_truncated_and_reported(pristine, garbage):
    recs = tail_records(pristine)
    tail = (pristine.path / pristine.segments[-1]).read_bytes()
    rng = random.Random(garbage)
    if garbage == "zeros":
        junk = bytes(3000)
    elif garbage == "ones":
        junk = b"\xff" * 4096
    elif garbage == "random":
        junk = rng.randbytes(5000)
    elif garbage == "old record":  # a valid record, but its seq is not above the last one
        r = recs[-3]
        junk = tail[r.pos : r.pos + _rec.record_size(r.stored)]
    elif garbage == "foreign volume":  # a valid record for a volume the journal lacks
        junk = records.encode_write(2, pristine.last_seq + 1, 0, rng.randbytes(4096), 1)
    else:
        junk = records.encode_write(0, pristine.last_seq + 1, 0, rng.randbytes(8192), 1)
        junk = junk[: len(junk) - 100]
    with Copy(pristine) as path:
        journal = reopen_with_tail(path, pristine, tail + junk)
        report = journal.reopen_report
        assert report.dropped_bytes == len(junk)
        assert report.reason
        assert journal.last_seq == pristine.last_seq
        assert set(read_back(journal, pristine).values()) == {"exact"}
        assert len(journal.checkpoints()) == len(pristine.snapshots)
        journal.close()
        journal = Journal.open(path)  # the truncation itself was durable and final
        assert journal.reopen_report.dropped_bytes == 0
        journal.close()


def test_zeroed_page_inside_the_tail_drops_from_there(pristine):
    """A crash can lose a middle page of an unsynced append while later pages survive:
    everything from the first damaged record on is dropped, even valid records after it
    (past the durable-length mark; before it the damage is quarantined instead: see
    test_journal_integrity)."""
    recs = tail_records(pristine)
    tail = bytearray((pristine.path / pristine.segments[-1]).read_bytes())
    victim = recs[-6]
    page = (victim.pos + 64) // 4096 * 4096
    tail[page : page + 4096] = bytes(4096)
    first_bad = next(r for r in recs if r.pos + _rec.record_size(r.stored) > page)
    with Copy(pristine) as path:
        journal = reopen_with_tail(path, pristine, bytes(tail), unsynced_from=first_bad)
        assert journal.last_seq == max(r.seq for r in pristine.records if r.seq < first_bad.seq)
        assert journal.reopen_report.dropped_bytes == len(tail) - first_bad.pos
        assert set(read_back(journal, pristine).values()) == {"exact"}
        journal.close()
