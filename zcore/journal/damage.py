"""Damage the journal found in its own files, and the scan that steps over it
(docs/format.md 8.3): a record that fails inside the committed part of a segment is
quarantined, never served, and the scan resumes at the next intact record.

Pure functions and a value type; the loader and promotion call them, the read path
refuses what a `Damage` covers (DamagedRecordError)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zcore._native import record as _rec
from zcore.errors import DamagedRecordError, ZcoreError, status_error


@dataclass(frozen=True)
class Damage:
    """Journaled records that are damaged or missing.  `seq_lo..seq_hi` (inclusive) are
    the seqs that may be affected (`seq_hi` None: every seq from `seq_lo` up to what the
    lost file held, unknown).  `volume` is None when the damaged records' ranges are
    unknown (a damaged header, a missing file): then every read that includes seq_lo
    is refused; otherwise only reads that overlap `offset..offset+length` of it."""

    seq_lo: int
    seq_hi: int | None
    volume: int | None = None
    offset: int = 0
    length: int = 0
    why: str = field(default="", compare=False)

    def affects(self, at: int, volume: int, offset: int, length: int) -> bool:
        """Whether a read of a state as of seq `at` (records below it) needs these."""
        if self.seq_lo >= at:
            return False
        if self.volume is None:
            return True
        return (self.volume == volume and offset < self.offset + self.length
                and self.offset < offset + length)

    def to_json(self) -> dict[str, Any]:
        return {"seq_lo": self.seq_lo, "seq_hi": self.seq_hi, "volume": self.volume,
                "offset": self.offset, "length": self.length, "why": self.why}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Damage:
        def opt(v: Any) -> int | None:
            return None if v is None else int(v)

        return cls(int(doc["seq_lo"]), opt(doc["seq_hi"]), opt(doc["volume"]),
                   int(doc["offset"]), int(doc["length"]), str(doc["why"]))


def refuse_damaged(damage: Iterable[Damage], at: int, volume: int, offset: int,
                   length: int, where: object) -> None:
    """Raise DamagedRecordError when a read as of `at` needs a damaged record."""
    for d in damage:
        if d.affects(at, volume, offset, length):
            hi = "?" if d.seq_hi is None else d.seq_hi
            raise DamagedRecordError(
                f"journal {where}: the read needs records {d.seq_lo}..{hi}, which are "
                f"damaged ({d.why}); the journal needs a resync from there")


def inexact(damage: Iterable[Damage], seqs: Iterable[int]) -> tuple[int, ...]:
    """The checkpoint seqs among `seqs` whose image includes a damaged record."""
    los = [d.seq_lo for d in damage]
    return tuple(s for s in seqs if any(lo < s for lo in los))


@dataclass
class Scan:
    """What `scan_segment_records` found: the intact batches (with their extent arrays),
    the damage stepped over, where valid records end and the status there (0: all)."""

    batches: list[tuple[_rec.ExtentBatch, np.ndarray]]
    damage: list[Damage]
    end: int
    status: int


def scan_segment_records(data: Any, start: int, committed_end: int, number: int,
                         last_seq: int, sizes: np.ndarray, flags: int) -> Scan:
    """Validate the records of segment `number` (its bytes `data`, records from `start`).

    A failure before `committed_end` is damage to committed records: it is recorded and
    the scan resumes at the next intact record.  A failure at or past it ends the scan
    (for the active segment: a torn unsynced tail).  `flags`: the record flags of the
    segment's version (segments.record_flags)."""
    out = Scan([], [], start, 0)
    pos = start
    while True:
        batch = _rec.scan(data[pos:], pos, number, last_seq, sizes, flags)
        if len(batch):
            out.batches.append((batch, batch.array()))
            last_seq = batch.last_seq
        pos += batch.consumed
        out.end, out.status = pos, batch.status
        if batch.status == 0 or pos >= committed_end:
            return out
        nxt, dmg = _skip_damaged(data, pos, last_seq, number, batch.status)
        out.damage.append(dmg)
        if nxt is None:  # nothing intact after it: the committed rest is damaged
            out.end = committed_end
            if committed_end >= len(data):
                out.status = 0
            return out
        pos = nxt
        if dmg.seq_hi is not None:
            last_seq = max(last_seq, dmg.seq_hi)


def _header(data: Any, pos: int) -> tuple[int, int, int, int, int] | None:
    """(seq, volume, offset, length, stored) of an intact record header at `pos`."""
    try:
        h, _crc = _rec.parse_header(bytes(data[pos : pos + 64]))
    except ZcoreError:
        return None
    return h["seq"], h["volume"], h["offset"], h["length"], h["stored"]


def _skip_damaged(data: Any, pos: int, last_seq: int, number: int,
                  status: int) -> tuple[int | None, Damage]:
    """Where the next intact record after the failing one at `pos` starts (None: none),
    and what was lost.  A record whose header is intact is skipped by its own length;
    otherwise the next 64-byte position with an intact header that follows in seq."""
    head = _header(data, pos)
    why = str(status_error(status, f"segment {number} byte {pos}"))
    if head is not None and head[0] > last_seq:
        seq, volume, offset, length, stored = head
        nxt = pos + _rec.record_size(stored)
        if nxt <= len(data):
            return nxt, Damage(seq, seq, volume, offset, length, why)
    q = pos + 64
    while q + 64 <= len(data):
        head = _header(data, q)
        if head is not None and head[0] > last_seq:
            return q, Damage(last_seq + 1, head[0] - 1, None, 0, 0, why)
        q += 64
    return None, Damage(last_seq + 1, None, None, 0, 0, why)
