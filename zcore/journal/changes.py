"""Changed extents between two checkpoints: what an incremental backup reads (issue 13).

Sits beside the read-through (readthrough.py) and asks the same extent index: a read of
the whole volume planned as of the newer checkpoint tiles it with fragments, each taken
from the newest record before that checkpoint (or the replica); a fragment whose record's
seq is at or after the older checkpoint's is a byte range written in between.  Ranges
written with the same bytes again count as changed: the answer is a superset of the bytes
that differ, never a subset.  The older checkpoint must still be above the promotion
floor (its later writes still in the index): otherwise CheckpointNotFoundError, and the
caller falls back to a full read.

Cost: one native plan per window of PLAN_WINDOW bytes, O(fragments) Python work; a
volume with 100,000 journaled extents answers in about 50 ms.

`zero_ranges` answers the other question a full backup asks: which ranges read as zeros
at a checkpoint without being read (no journaled write there, a hole in the replica, and
block sums that say zero), so a half-empty volume is not read, copied and compared for
its empty half.  A mixin of Journal."""

from __future__ import annotations

import errno
import os

import numpy as np

from zcore import records
from zcore.errors import CheckpointNotFoundError, ConfigError
from zcore.journal.readthrough import ReadThroughMixin
from zcore.records import Checkpoint

# The volume is planned in windows of this many bytes, so a huge, much-written volume
# never builds one fragment list for all of it at once.
PLAN_WINDOW = 256 << 20


class ChangesMixin(ReadThroughMixin):
    def changed_extents(self, since: Checkpoint | int, until: Checkpoint | int,
                        volume: int | str) -> list[tuple[int, int]]:
        """The (offset, length) ranges of `volume` written after checkpoint `since` and
        before checkpoint `until`, sorted and merged.  CheckpointNotFoundError when either
        is unknown or `since` is promoted away (its later writes are in the replica)."""
        self.wait_loaded()
        spec = self._volume(volume)
        old = self._checkpoint_of(since)
        new = self._checkpoint_of(until)
        if old.seq > new.seq:
            raise ConfigError(f"checkpoint {old.id} is newer than checkpoint {new.id}")
        out: list[tuple[int, int]] = []
        with self._index_lock:
            self._check_open()
            if old.seq < self._promotion_floor():
                raise CheckpointNotFoundError(
                    f"checkpoint {old.id} of journal {self.path} is promoted away")
            for start in range(0, spec.size, PLAN_WINDOW):
                length = min(PLAN_WINDOW, spec.size - start)
                # a fragment's dst is its offset in the window planned, not in the volume
                for dst, n, _src, seq in self._index.plan(spec.id, start, length, new.seq):
                    if seq and seq >= old.seq:
                        _merge(out, start + dst, n)
        return out

    def _checkpoint_of(self, c: Checkpoint | int) -> Checkpoint:
        cid = c.id if isinstance(c, Checkpoint) else records.check_int("checkpoint id", c)
        return self.checkpoint_by_id(cid)

    def zero_ranges(self, at: Checkpoint | int, volume: int | str) -> list[tuple[int, int]]:
        """The (offset, length) ranges of `volume`, sorted, that read as zeros at checkpoint
        `at` and whose read would pass every check a read makes: no journaled record below
        `at` covers them, the replica file has a hole there (SEEK_DATA/SEEK_HOLE), and the
        replica's block sums say zero for every block they touch (so a read, which checks
        whole blocks, would return zeros and raise nothing).  Ranges are cut to whole sum
        blocks.  Empty when the journal records damage (reads refuse damaged ranges) or
        the file system reports no holes: an answer is always safe to skip reading, never
        the whole truth.  It stays true while a view of `at` is open: the view pins `at`
        against promotion, the one writer of replica bytes, and promotion writes only
        where the index maps records (never a range this answer names)."""
        self.wait_loaded()
        spec = self._volume(volume)
        ckpt = self._checkpoint_of(at)
        with self._index_lock:
            self._check_open()
            if self._damage:
                return []
            fd = self._replica_fds.get(spec.id, -1)
            sums = self._replica_sums.get(spec.id)
            if fd < 0:
                return []
            holes = _holes(fd, min(spec.size, os.fstat(fd).st_size))
            if not holes:
                return []
            replica: list[tuple[int, int]] = []
            for start in range(0, spec.size, PLAN_WINDOW):
                length = min(PLAN_WINDOW, spec.size - start)
                for dst, n, _src, seq in self._index.plan(spec.id, start, length, ckpt.seq):
                    if not seq:
                        _merge(replica, start + dst, n)
            out = _intersect(replica, holes)
            if sums is not None:
                out = _zero_blocks(out, sums.block, spec.size, sums.sums, sums.damaged)
        return out


def _merge(ranges: list[tuple[int, int]], off: int, n: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == off:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
    else:
        ranges.append((off, n))


def _holes(fd: int, size: int) -> list[tuple[int, int]]:
    """The holes of the file `fd` below `size`, sorted (empty when SEEK_DATA is refused)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end
                data = size
            else:  # EINVAL: no SEEK_DATA on this file system
                return []
        data = min(data, size)
        if data > pos:
            out.append((pos, data - pos))
        if data >= size:
            break
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), size)
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            _merge(out, lo, hi - lo)
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _zero_blocks(ranges: list[tuple[int, int]], block: int, size: int, sums: np.ndarray,
                 damaged: set[int]) -> list[tuple[int, int]]:
    """`ranges` cut to the whole sum blocks they cover whose sums are zero (a block's sum
    is 0 only for a block of zeros) and that were never found damaged."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        first = -(-off // block)
        end = off + n
        last = end // block if end < size else -(-size // block)  # exclusive
        b = first
        while b < last:
            nz = np.flatnonzero(sums[b:last])
            stop = last if not len(nz) else b + int(nz[0])
            while b < stop:
                bad = [d for d in damaged if b <= d < stop]
                cut = min(bad) if bad else stop
                if cut > b:
                    _merge(out, b * block, min(cut * block, size) - b * block)
                b = cut + 1 if bad else stop
            b = stop + 1 if stop < last else last
    return out
