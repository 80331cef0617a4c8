"""Segment index files `seg-NNNNNNNN.zci` (docs/format.md 7.4): the codec of version 2,
which this build writes, and the checks every index file must pass before it is trusted.

An index file only spares a rescan of its sealed segment: one that is missing, torn or
fails any check reads as None and the loader rescans the segment.  Version 1 files are
still read, by the legacy reader in indexfile_v1."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from zcore import records
from zcore._native import record as _rec
from zcore.errors import CorruptRecordError
from zcore.fsutil import pread_exact
from zcore.journal import segments
from zcore.journal.segments import Segment
from zcore.records import Checkpoint

INDEX_MAGIC = b"ZCJIDX\r\n"
INDEX_VERSION = 2  # v2: data extents sorted by (volume, offset, seq), checkpoint table
INDEX_V1 = 1  # v1: every extent in seq order, checkpoint blob; still read
INDEX_HEADER = struct.Struct("<8sII Q 16s Q II I I")  # 64 bytes, body crc, header crc
INDEX_STATS = struct.Struct("<QQQQQ")  # v2: min_time, max_time, min_seq, max_seq, records
INDEX_CKPT = struct.Struct("<QQQII")  # v2 entry: seq, pos, time_ns, stored, 0; payload follows
assert INDEX_HEADER.size == 64


@dataclass
class SegmentIndex:
    """A sealed segment's index file, read and checked but not yet adopted."""

    min_time: int
    max_time: int
    min_seq: int
    max_seq: int
    records: int
    extents: memoryview  # EXTENT_DTYPE entries
    presorted: bool  # v2: data extents sorted by (volume, offset, seq)
    checkpoints: list[Checkpoint]
    # (pos, stored) of the record each checkpoint names, checked by `checkpoints_match`
    checkpoint_records: list[tuple[int, int]] = field(default_factory=list)


def seqs_match(seqs: np.ndarray, ckpt_seqs: list[int], min_seq: int, max_seq: int,
               nrecords: int) -> bool:
    """True when the seqs of an index file's entries (data extents `seqs`, checkpoints
    `ckpt_seqs`) are distinct, as many as its record count and span exactly its own
    [min_seq, max_seq]: an entry whose seq was changed (to 0, past the segment) passes
    the file's CRC but not this."""
    every = np.concatenate((seqs.astype(np.uint64), np.array(ckpt_seqs, dtype=np.uint64)))
    if len(every) != nrecords:
        return False
    if not nrecords:
        return True
    return (int(every.min()) == min_seq and int(every.max()) == max_seq
            and len(np.unique(every)) == nrecords)


def checkpoints_match(seg: Segment, parsed: SegmentIndex) -> bool:
    """True when every checkpoint of a parsed index file is the CHECKPOINT record it
    names in `seg` (header, payload checksum, seq, time and marker all agree), so a
    crafted checkpoint table cannot make a phantom checkpoint.  One pread per checkpoint
    (a few hundred bytes) at load time."""
    if len(parsed.checkpoint_records) != len(parsed.checkpoints):
        return False
    for c, (pos, stored) in zip(parsed.checkpoints, parsed.checkpoint_records, strict=True):
        try:
            raw = pread_exact(seg.fd, 64 + stored, pos, what=f"segment {seg.path}")
            _rec.verify_payload(raw[:64], memoryview(raw)[64:])
            head = records.read_header(raw)
            if (head.type != records.REC_CHECKPOINT or head.seq != c.seq
                    or head.stored != stored):
                return False
            if Checkpoint.from_payload(c.seq, head.time_ns, memoryview(raw)[64:]) != c:
                return False
        except (CorruptRecordError, OSError):
            return False
    return True


def encode_index(seg: Segment, journal_id: bytes) -> bytes:
    """The v2 index file of `seg`, from the extents it collected while it was active
    (checkpoint payloads are read back from the segment and verified)."""
    arr = (np.concatenate(seg.extents) if seg.extents
           else np.empty(0, dtype=records.EXTENT_DTYPE))
    is_ckpt = arr["type"] == records.REC_CHECKPOINT
    data = arr[~is_ckpt]
    data = data[np.lexsort((data["seq"], data["offset"], data["volume"]))]
    blob = bytearray()
    for rec in arr[is_ckpt]:
        raw = pread_exact(seg.fd, 64 + int(rec["stored"]), int(rec["pos"]),
                          what=f"segment {seg.path}")
        _rec.verify_payload(raw[:64], raw[64:])
        blob += INDEX_CKPT.pack(int(rec["seq"]), int(rec["pos"]),
                                records.record_time(raw, 0), int(rec["stored"]), 0)
        blob += raw[64:]
    body: bytes = (INDEX_STATS.pack(seg.min_time, seg.max_time, seg.min_seq, seg.max_seq,
                                    seg.records) + data.tobytes() + bytes(blob))
    head = INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 64, seg.number, journal_id,
                             seg.size, len(data), len(blob), _rec.crc32c(body), 0)
    return head[:60] + struct.pack("<I", _rec.crc32c(head[:60])) + body


def write_index(seg: Segment, journal_id: bytes) -> None:
    """Write the .zci of a segment whose records are all durable.  Replaced by rename but
    not fsynced (unlike zcore.fsutil.atomic_write, on purpose): the file only spares a
    rescan, and a torn or missing one is rebuilt by rescanning."""
    zci = seg.path.with_suffix(".zci")
    tmp = zci.with_name(zci.name + ".tmp")
    tmp.write_bytes(encode_index(seg, journal_id))
    os.replace(tmp, zci)


def _checked_body(seg: Segment, journal_id: bytes,
                  versions: tuple[int, ...]) -> tuple[int, memoryview, int, int] | None:
    """(version, body, extent count, checkpoint bytes) of seg's index file when its
    header and body checksums, numbers and journal id match; else None."""
    try:
        data = seg.path.with_suffix(".zci").read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 64 + 16:  # the smallest body: v1's two times
        return None
    (magic, version, hsize, number, jid, seg_len, count, ckpt_bytes, body_crc,
     crc) = INDEX_HEADER.unpack(data[:64])
    if magic != INDEX_MAGIC or _rec.crc32c(data[:60]) != crc or hsize != 64:
        return None
    if version not in versions or number != seg.number or jid != journal_id:
        return None
    body = memoryview(data)[64:]
    if _rec.crc32c(body) != body_crc or seg_len != seg.size:
        return None
    return version, body, count, ckpt_bytes


def read_index(seg: Segment, journal_id: bytes, last_seq: int) -> SegmentIndex | None:
    """Read and check a sealed segment's .zci without changing any state (the loader
    calls it without the journal's locks).  None when it is missing or does not match;
    `last_seq` is the seq its records must follow."""
    from zcore.journal.indexfile_v1 import parse_index_v1

    checked = _checked_body(seg, journal_id, (INDEX_V1, INDEX_VERSION))
    if checked is None:
        return None
    version, body, count, ckpt_bytes = checked
    try:
        if version == INDEX_VERSION:
            index = parse_index_v2(seg, last_seq, body, count, ckpt_bytes)
        else:
            index = parse_index_v1(seg, last_seq, body, count, ckpt_bytes)
    except (struct.error, CorruptRecordError):
        return None
    return index


def fits_version(index: SegmentIndex, version: int) -> bool:
    """False when the index lists a record flag the segment's `version` lacks (zstd in a
    v1-v2 segment): no record zcore wrote there, so the segment is rescanned, which
    reports it as damage (format.md 7.3)."""
    lacks = records.FLAGS_KNOWN & ~segments.record_flags(version)
    flags = np.frombuffer(index.extents, dtype=records.EXTENT_DTYPE)["flags"]
    return not np.any(flags & lacks)


def tail_max_seq(seg: Segment, journal_id: bytes) -> int | None:
    """Last seq of the sealed segment `seg` from its checked v2 index file; None when
    the file cannot vouch for it (missing, damaged, v1, or no records)."""
    checked = _checked_body(seg, journal_id, (INDEX_VERSION,))
    if checked is None or len(checked[1]) < INDEX_STATS.size:
        return None
    _t0, _t1, min_seq, max_seq, nrecords = INDEX_STATS.unpack_from(checked[1])
    return max_seq if nrecords and max_seq >= min_seq else None


def parse_index_v2(seg: Segment, last_seq: int, body: memoryview, count: int,
                   ckpt_bytes: int) -> SegmentIndex | None:
    esize = records.EXTENT_DTYPE.itemsize
    if len(body) != INDEX_STATS.size + count * esize + ckpt_bytes:
        return None
    min_time, max_time, min_seq, max_seq, nrecords = INDEX_STATS.unpack_from(body)
    if nrecords and (min_seq <= last_seq or max_seq < min_seq):
        return None
    checkpoints = []
    refs = []
    blob = body[INDEX_STATS.size + count * esize :]
    at = 0
    while at < len(blob):
        seq, pos, t, stored, zero = INDEX_CKPT.unpack_from(blob, at)
        at += INDEX_CKPT.size
        if zero or not min_seq <= seq <= max_seq or pos >= seg.size \
                or at + stored > len(blob):
            return None
        checkpoints.append(Checkpoint.from_payload(seq, t, blob[at : at + stored]))
        refs.append((pos, stored))
        at += stored
    extents = body[INDEX_STATS.size : INDEX_STATS.size + count * esize]
    seqs = np.frombuffer(extents, dtype=records.EXTENT_DTYPE)["seq"]
    if not seqs_match(seqs, [c.seq for c in checkpoints], min_seq, max_seq, nrecords):
        return None
    return SegmentIndex(min_time, max_time, min_seq, max_seq, nrecords, extents, True,
                        checkpoints, refs)
