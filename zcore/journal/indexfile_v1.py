"""The legacy reader of version 1 segment index files (docs/format.md 7.4): every extent
in seq order, then a blob of (time_ns, payload) per checkpoint.  This build never writes
v1; it reads it so journals written by v1 builds reopen without a rescan."""

from __future__ import annotations

import struct

import numpy as np

from zcore import records
from zcore.journal.indexfile import SegmentIndex
from zcore.journal.segments import Segment
from zcore.records import Checkpoint

INDEX_TIMES = struct.Struct("<QQ")  # v1 body prefix: min_time, max_time


def parse_index_v1(seg: Segment, last_seq: int, body: memoryview, count: int,
                   ckpt_bytes: int) -> SegmentIndex | None:
    """The checked v1 index body of `seg`, or None when it does not match the segment."""
    esize = records.EXTENT_DTYPE.itemsize
    if len(body) != INDEX_TIMES.size + count * esize + ckpt_bytes:
        return None
    min_time, max_time = INDEX_TIMES.unpack_from(body)
    extents = body[INDEX_TIMES.size : INDEX_TIMES.size + count * esize]
    arr = np.frombuffer(extents, dtype=records.EXTENT_DTYPE)
    min_seq = max_seq = 0
    if count:
        seqs = arr["seq"]
        if seqs[0] <= last_seq or np.any(np.diff(seqs.astype(np.int64)) <= 0):
            return None
        if np.any(arr["segment"] != seg.number) or np.any(arr["pos"] >= seg.size):
            return None
        min_seq, max_seq = int(seqs[0]), int(seqs[-1])
    blob = body[INDEX_TIMES.size + count * esize :]
    checkpoints = []
    refs = []
    at = 0
    for rec in arr[arr["type"] == records.REC_CHECKPOINT]:
        stored = int(rec["stored"])
        (t,) = struct.unpack_from("<Q", blob, at)
        if at + 8 + stored > len(blob):
            return None
        checkpoints.append(
            Checkpoint.from_payload(int(rec["seq"]), t, blob[at + 8 : at + 8 + stored]))
        refs.append((int(rec["pos"]), stored))
        at += 8 + stored
    if at != len(blob):
        return None
    return SegmentIndex(min_time, max_time, min_seq, max_seq, count, extents, False,
                        checkpoints, refs)
