"""The scrub (docs/format.md 8.6): read everything a journal holds and check it, at a
bounded rate, while the journal stays in use.  `Journal.scrub` verifies every record
(header, payload and block CRCs, as the native scan does), every sealed segment's index
file against the records of its segment, and every replica block against its sum
(zcore.journal.replica), and returns a `ScrubReport` of what is damaged.

Sits beside the read path: the recovery site runs it in a worker thread on a timer
(zcore.replication.scrubbing) and `zcore journal check PATH` runs it at full speed on a
journal no process holds.  It changes nothing: damage is reported, never repaired.

Locking: segments and index files are read through descriptors of the scrub's own (a
segment promoted away meanwhile is skipped), so only the list of segments is taken under
the append lock; replica blocks are read and checked under the index lock, a chunk at a
time, so a promotion rewriting a block and its sum is never seen half-way."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from zcore import records
from zcore._native import record as _rec
from zcore.errors import ClosedError, ZcoreError
from zcore.fsutil import preadinto_upto
from zcore.journal import indexfile, segments
from zcore.journal.replica import data_extents
from zcore.journal.segments import Segment
from zcore.journal.state import JournalState

# Bytes read per step (between rate checks and stop checks): 1 MiB keeps the index lock
# held for well under a millisecond per replica step.
SCRUB_CHUNK = 1 << 20


class DamageKind(StrEnum):
    SEGMENT = "segment"  # a segment's header
    RECORD = "record"  # records that fail their header, payload or block CRCs
    INDEX = "index"  # an index file that fails its checks or disagrees with its segment
    REPLICA = "replica"  # replica blocks that fail their sums


@dataclass(frozen=True)
class Damage:
    """One damaged range.  `offset`/`length` are bytes of `file` for segments, records
    and index files, and of the volume for replica blocks; `seqs` the first and last seq
    affected where known."""

    kind: DamageKind
    file: str
    offset: int
    length: int
    volume: int | None = None
    seqs: tuple[int, int] | None = None
    detail: str = ""


@dataclass
class ScrubReport:
    """What a scrub checked and what it found damaged."""

    path: str
    complete: bool = True  # False when `stop` ended it early
    seconds: float = 0.0
    bytes_read: int = 0
    segments: int = 0
    records: int = 0
    index_files: int = 0
    replica_blocks: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damage

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean"] = self.clean
        return out


class _Pace:
    """Keeps the scrub at `rate` bytes/s; `spend` returns False once `stop` is set."""

    def __init__(self, rate: float | None, stop: threading.Event | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate_bytes_per_s must be positive")
        self.rate = rate
        self.stop = stop
        self.t0 = time.monotonic()
        self.done = 0

    def spend(self, n: int) -> bool:
        self.done += n
        if self.rate is not None:
            ahead = self.done / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                if self.stop is not None:
                    return not self.stop.wait(ahead)
                time.sleep(ahead)
        return self.stop is None or not self.stop.is_set()


class ScrubMixin(JournalState):
    def scrub(self, *, rate_bytes_per_s: float | None = None,
              stop: threading.Event | None = None) -> ScrubReport:
        """Check every record, index file and replica block, reading at most
        `rate_bytes_per_s` (None: as fast as it can); `stop` set ends it early
        (`complete` False).  Raises ClosedError when the journal is closed first."""
        self.wait_loaded()
        report = ScrubReport(str(self.path))
        pace = _Pace(rate_bytes_per_s, stop)
        with self._lock:
            self._check_open()
            segs = [(s.number, s.path, s.size, s.sealed, s.min_seq if s.records else 0,
                     s.max_seq if s.records else 0) for s in self._segments.values()]
            volumes = sorted(self._replica_sums)
        ok = True
        for number, path, size, sealed, min_seq, max_seq in segs:
            ok = self._scrub_segment(report, pace, number, path, size, sealed,
                                     (min_seq, max_seq))
            if not ok:
                break
        for volume in volumes if ok else ():
            ok = self._scrub_replica(report, pace, volume)
            if not ok:
                break
        report.complete = ok
        report.bytes_read = pace.done
        report.seconds = time.monotonic() - pace.t0
        return report

    # ---- segments and index files ----------------------------------------------------

    def _scrub_segment(self, report: ScrubReport, pace: _Pace, number: int, path: Path,
                       size: int, sealed: bool, seqs: tuple[int, int]) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # promoted away since the list was taken
            return True
        try:
            buf = np.empty(size, dtype=np.uint8)
            got = 0
            while got < size:
                n = preadinto_upto(fd, buf[got : min(size, got + SCRUB_CHUNK)].data, got)
                got += n
                if not pace.spend(n):
                    return False
                if n == 0:
                    break
            report.segments += 1
            data = buf[:got].data
            if got < size:
                report.damage.append(Damage(DamageKind.RECORD, str(path), got, size - got,
                                            seqs=seqs if seqs[1] else None,
                                            detail="segment shorter than journaled"))
            try:
                good = segments.check_header(path, number, self.journal_id, data[:64])
            except ZcoreError as exc:
                good, why = False, str(exc)
            else:
                why = "damaged segment header"
            if not good:
                report.damage.append(Damage(DamageKind.SEGMENT, str(path), 0, 64,
                                            detail=why))
            flags = segments.record_flags(good or segments.SEGMENT_VERSION)
            extents, clean = self._scrub_records(report, path, number, data, seqs, flags)
            if sealed and clean and got == size:
                self._scrub_index(report, path, number, fd, size, extents, seqs)
            return True
        finally:
            os.close(fd)

    def _scrub_records(self, report: ScrubReport, path: Path, number: int,
                       data: memoryview, seqs: tuple[int, int],
                       flags: int) -> tuple[np.ndarray, bool]:
        """Scan the records of a segment's bytes, going on after a record whose header
        still holds (its payload failed); returns the good extents and whether all were."""
        parts = []
        pos, end, last = 64, len(data), 0
        clean = True
        while pos < end:
            batch = _rec.scan(data[pos:end], pos, number, 0, self._volume_sizes, flags)
            arr = batch.array()
            parts.append(arr)
            report.records += len(arr)
            if len(arr):
                last = int(arr["seq"][-1])
            if not batch.status:
                break
            clean = False
            bad = pos + batch.consumed
            step, seq, why = self._damaged_record(data, bad, end, batch.status)
            if step:
                report.damage.append(Damage(DamageKind.RECORD, str(path), bad, step,
                                            seqs=(seq, seq), detail=why))
                pos = bad + step
                continue
            report.damage.append(Damage(
                DamageKind.RECORD, str(path), bad, end - bad,
                seqs=(last + 1, seqs[1]) if seqs[1] > last else None,
                detail=f"{why}; the rest of the segment cannot be read"))
            break
        arr = np.concatenate(parts) if parts else np.empty(0, dtype=records.EXTENT_DTYPE)
        return arr, clean

    @staticmethod
    def _damaged_record(data: memoryview, pos: int, end: int,
                        status: int) -> tuple[int, int, str]:
        """(bytes, seq, why) of the failed record at `pos` when its header is intact
        and it fits (0 bytes otherwise: nothing after it can be located)."""
        from zcore.errors import status_error

        why = str(status_error(status, f"record at {pos}"))
        try:
            head, _ = _rec.parse_header(data[pos : pos + 64])
        except ZcoreError:
            return 0, 0, why
        step = int(_rec.record_size(int(head["stored"])))
        if pos + step > end:
            return 0, 0, why
        return step, int(head["seq"]), why

    def _scrub_index(self, report: ScrubReport, path: Path, number: int, fd: int,
                     size: int, extents: np.ndarray, seqs: tuple[int, int]) -> None:
        zci = path.with_suffix(".zci")
        if not zci.exists():  # a sealed segment without one is rescanned at open
            return
        report.index_files += 1
        seg = Segment(number, path, fd, size, sealed=True)
        parsed = indexfile.read_index(seg, self.journal_id, max(0, seqs[0] - 1))
        problem = "fails its checks (checksum, numbers or length)" if parsed is None else \
            _index_disagreement(parsed, extents)
        if problem:
            report.damage.append(Damage(DamageKind.INDEX, str(zci), 0, zci.stat().st_size,
                                        seqs=seqs if seqs[1] else None,
                                        detail=f"index file {problem}"))

    # ---- replica blocks --------------------------------------------------------------

    def _scrub_replica(self, report: ScrubReport, pace: _Pace, volume: int) -> bool:
        size = self.volumes[volume].size
        bad: list[int] = []
        pos = 0
        while pos < size:
            hi = min(pos + SCRUB_CHUNK, size)
            with self._index_lock:
                if self._closed:
                    raise ClosedError(f"journal {self.path} closed during its scrub")
                sums = self._replica_sums[volume]
                n = self._scrub_chunk(sums, self._replica_fds[volume], pos, hi, bad)
                report.replica_blocks += -(-(hi - pos) // sums.block)
            pos = hi
            if not pace.spend(n) and pos < size:
                self._replica_damage(report, volume, bad)
                return False
        self._replica_damage(report, volume, bad)
        return True

    @staticmethod
    def _scrub_chunk(sums: Any, fd: int, lo: int, hi: int, bad: list[int]) -> int:
        """Check the blocks of [lo, hi) (block-aligned lo); returns the bytes read.  A
        chunk with no data (a hole) is not read: its entries must be those of zeros."""
        B = sums.block
        first, last = lo // B, -(-hi // B)
        if not data_extents(fd, lo, hi):
            bad.extend(first + int(i) for i in np.flatnonzero(sums.sums[first:last]))
            return 0
        buf = np.empty(hi - lo, dtype=np.uint8)
        n = preadinto_upto(fd, buf.data, lo)
        if n < hi - lo:  # a replica shorter than its volume: the rest is missing
            bad.extend(range((lo + n) // B, last))
            buf = buf[: (n // B) * B]
        if len(buf):
            bad.extend(sums.check(fd, lo, buf))
        return n

    def _replica_damage(self, report: ScrubReport, volume: int, bad: list[int]) -> None:
        sums = self._replica_sums.get(volume)
        if sums is None or not bad:
            return
        B, size = sums.block, sums.size
        runs: list[list[int]] = []
        for b in sorted(set(bad)):
            if runs and runs[-1][1] == b:
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        for b0, b1 in runs:
            lo, hi = b0 * B, min(b1 * B, size)
            report.damage.append(Damage(
                DamageKind.REPLICA, str(self.path / f"replica-{volume:04d}.img"), lo,
                hi - lo, volume=volume,
                detail=f"{b1 - b0} replica block(s) fail their sums"))
        bad.clear()


def _index_disagreement(parsed: indexfile.SegmentIndex, extents: np.ndarray) -> str:
    """Why the index `parsed` does not describe the scanned `extents` ('' when it does)."""
    is_ckpt = extents["type"] == records.REC_CHECKPOINT
    data = extents[~is_ckpt]
    data = data[np.lexsort((data["seq"], data["offset"], data["volume"]))]
    listed = np.frombuffer(parsed.extents, dtype=records.EXTENT_DTYPE)
    if not parsed.presorted:
        listed = listed[np.lexsort((listed["seq"], listed["offset"], listed["volume"]))]
    if len(extents) != parsed.records:
        return f"counts {parsed.records} records, the segment holds {len(extents)}"
    if len(extents) and (int(extents["seq"].min()) != parsed.min_seq
                         or int(extents["seq"].max()) != parsed.max_seq):
        return (f"gives seqs {parsed.min_seq}..{parsed.max_seq}, the segment holds "
                f"{int(extents['seq'].min())}..{int(extents['seq'].max())}")
    if len(listed) != len(data) or listed.tobytes() != data.tobytes():
        return "lists extents that differ from the segment's records"
    got = [(c.seq) for c in parsed.checkpoints]
    want = extents["seq"][is_ckpt].tolist()
    if got != want:
        return f"lists checkpoints {got}, the segment holds {want}"
    return ""
