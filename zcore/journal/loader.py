"""Reopening a journal: what `Journal.open` does before it returns (replicas, segment
descriptors, the tail segment scanned and its torn tail truncated) and the background
loader that indexes the sealed segments afterwards (docs/format.md 8.3).

A mixin of Journal: it works on the journal's state under the journal's locks."""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import replace
from typing import Any

import numpy as np

from zcore import records
from zcore._native import record as _rec
from zcore.errors import (
    CorruptRecordError,
    DurabilityError,
    StateError,
    ZcoreError,
    status_error,
)
from zcore.fsutil import fsync_dir
from zcore.journal import indexfile, segments
from zcore.journal.damage import Damage, inexact, scan_segment_records
from zcore.journal.indexfile import SegmentIndex
from zcore.journal.manifest import MANIFEST_NAME, read_manifest
from zcore.journal.meta import META_VERSION, write_meta
from zcore.journal.replica import open_sums
from zcore.journal.segments import Segment
from zcore.journal.settings import ReopenReport
from zcore.journal.state import JournalState
from zcore.records import Checkpoint


class LoaderMixin(JournalState):
    def _load(self) -> None:
        """Open what appends need now: metadata, replicas, every segment's descriptor and
        size checked against the manifest, and the tail segment (scanned, torn tail
        truncated).  The sealed segments' index files load in a background thread, so
        opening does not grow with the amount journaled; reads, views, promotion and
        listings wait for it (`wait_loaded`)."""
        for v in self.volumes.values():
            try:
                fd = os.open(self.path / f"replica-{v.id:04d}.img", os.O_RDWR)
            except FileNotFoundError:
                raise CorruptRecordError(f"journal {self.path} lacks the replica of volume "
                                         f"{v.id} ({v.name!r})") from None
            self._replica_fds[v.id] = fd
            sums = open_sums(self.path, v.id, v.size, self.journal_id, fd,
                             self.integrity_notes)
            self._replica_sums[v.id] = sums
            with self._index_lock:
                self._index.set_replica_fd(v.id, fd)
                self._index.set_replica_sums(v.id, sums.sums, sums.size, sums.block,
                                             sums.zero_full, sums.zero_last)
        sizes = segments.list_segments(self.path)
        # a v1 journal has no manifest (or a half-done upgrade's): it is upgraded once
        # loaded (_record_files); a v2 journal without one cannot check its segments
        v2 = int(self._meta.get("version", 1)) >= 2
        manifest = read_manifest(self.path) if v2 else None
        if v2 and manifest is None:
            self._notes.append(f"{MANIFEST_NAME} is missing: the segment files could not be "
                               "checked, and were recorded as found")
        active = self._reconcile(manifest, sizes, self._notes) if manifest else None
        numbers = sorted(sizes)
        dropped = dropped_segments = 0
        reason = ""
        if numbers and numbers[-1] == (active or numbers[-1]) and segments.tail_segment_torn(
                segments.segment_path(self.path, numbers[-1]), numbers[-1], self.journal_id):
            # a crash while rotation created the newest segment, before its header was
            # durable; records are only appended after that, so it held nothing
            number = numbers.pop()
            seg_path = segments.segment_path(self.path, number)
            dropped += seg_path.stat().st_size
            dropped_segments += 1
            reason = f"segment {number} has a torn header"
            seg_path.unlink()
            fsync_dir(self.path)
        for number in numbers:  # sealed ones get their descriptor from the loader
            self._segments[number] = Segment(number, segments.segment_path(self.path, number),
                                             -1, sizes[number], sealed=True)
        # the tail: the newest segment, unless the manifest's active one is missing
        tail = numbers[-1] if numbers and active in (None, numbers[-1]) else None
        sealed = numbers[:-1] if tail is not None else numbers
        for number in sealed[-1:] + ([tail] if tail is not None else []):
            self._open_segment(self._segments[number])
        background = bool(sealed)
        prev_max = self._sealed_last(sealed)
        if prev_max is None:
            # the newest sealed segment cannot vouch for its last seq: load everything now
            self._load_sealed(sealed, ordered=True)
            background = False
            prev_max = max((self._segments[n].max_seq for n in sealed), default=0)
        if tail is not None:
            dropped_tail, tail_reason = self._open_tail(self._segments[tail], prev_max)
            dropped += dropped_tail
            reason = tail_reason or reason
        else:
            self._active = self._new_segment(active or 1)
            if self._listed is not None:
                self._write_manifest()
        last_seq = self._active.max_seq if self._active.records else prev_max
        # quarantined or lost committed seqs are never reused by new records
        last_seq = max([last_seq] + [d.seq_hi for d in self._damage if d.seq_hi is not None])
        # a promotion may have emptied every segment: numbering continues above it
        self.last_seq = self.durable_seq = max(last_seq, self.promoted_seq - 1)
        self._report = ReopenReport(dropped, dropped_segments, 0, False, reason)
        if background:
            self._loaded.clear()
            self._loader = threading.Thread(target=self._load_in_background,
                                            args=(sealed, prev_max),
                                            name=f"journal-load-{self.vm}", daemon=True)
            self._loader.start()
        else:
            self._finish_load()

    def _sealed_last(self, sealed: list[int]) -> int | None:
        """The seq the tail must follow: the manifest's last seq of the newest sealed
        segment (a v1 journal: its .zci's); None when nothing can vouch for it."""
        if not sealed:
            return 0
        if self._listed is not None and sealed[-1] in self._listed:
            return self._listed[sealed[-1]][1]
        return indexfile.tail_max_seq(self._segments[sealed[-1]], self.journal_id)

    def _open_tail(self, tail: Segment, prev_max: int) -> tuple[int, str]:
        """Scan the tail segment (it becomes the active one) after `prev_max`; returns the
        bytes of torn tail dropped and why."""
        tail.sealed = False  # collect extents: it is the active segment again
        outcome = self._scan_segment(tail, prev_max, is_last=True)
        self._active = tail
        # the tail may hold records a crashed process appended but never committed:
        # they are in the page cache, not necessarily on disk, until this sync
        try:
            os.fdatasync(tail.fd)
        except OSError as exc:
            raise DurabilityError(f"fsync of {tail.path} failed: {exc}") from exc
        tail.synced = (tail.size, tail.max_seq if tail.records else prev_max)
        return outcome if outcome else (0, "")

    def _open_segment(self, seg: Segment) -> None:
        seg.fd = os.open(seg.path, os.O_RDWR)
        seg.size = os.fstat(seg.fd).st_size
        seg.version, seg.head = segments.header_of(seg.path, seg.number, self.journal_id,
                                                   seg.fd)
        listed = self._listed.get(seg.number) if self._listed is not None else None
        if listed is not None and seg.size > listed[0]:
            seg.size = listed[0]  # bytes past a sealed segment's recorded end are not its
        with self._index_lock:
            self._index.set_segment_fd(seg.number, seg.fd)

    def _read_segment_index(self, seg: Segment, last_seq: int) -> SegmentIndex | None:
        """Read and check a sealed segment's .zci (no state changes, no lock needed)."""
        return indexfile.read_index(seg, self.journal_id, last_seq)

    def _load_sealed(self, numbers: list[int], *, ordered: bool) -> int:
        """Index the sealed segments `numbers` (oldest first) from their index files,
        rescanning (and re-indexing) those without a valid one.  Holds the lock one
        segment at a time.  Returns the last seq of the chain."""
        last_seq = rescanned = 0
        for number in numbers:
            if self._closing:
                break
            seg = self._segments[number]
            parsed = self._read_segment_index(seg, last_seq)  # file I/O without the lock
            with self._lock:
                if self._closing:
                    break
                if seg.fd < 0:
                    self._open_segment(seg)
                if parsed is not None and not indexfile.fits_version(parsed, seg.version):
                    parsed = None
                if parsed is None or not self._adopt_index(seg, parsed, ordered):
                    seg.sealed = False  # collect the extents the rebuilt index needs
                    self._scan_segment(seg, last_seq, is_last=False, ordered=ordered)
                    indexfile.write_index(seg, self.journal_id)
                    seg.extents = []
                    seg.sealed = True
                    rescanned += 1
                last_seq = self._check_listed(seg, last_seq)
        self._rescanned = rescanned
        return last_seq

    def _check_listed(self, seg: Segment, last_seq: int) -> int:
        """Compare a loaded sealed segment with what the manifest says it held: seqs it
        should hold past its last intact record were lost (a truncated file).  Returns
        the last seq of the chain after it."""
        found = seg.max_seq if seg.records else last_seq
        listed = self._listed.get(seg.number) if self._listed is not None else None
        if listed is None or found >= listed[1]:
            return found
        self._add_damage([Damage(found + 1, listed[1], why=f"segment {seg.number} "
                                 f"lacks its records after seq {found}")])
        return listed[1]

    def _load_in_background(self, numbers: list[int], expected_last: int) -> None:
        self._go.wait()  # leave the GIL to the opening thread until open() returns
        try:
            last = self._load_sealed(numbers, ordered=False)
            with self._lock:
                if self._closing:
                    return
                if last != expected_last:
                    raise CorruptRecordError(
                        f"journal {self.path}: sealed segments end at seq {last}, their "
                        f"newest index says {expected_last}")
                self._finish_load()
        except BaseException as exc:  # surfaced by every call that waits for the index
            self._load_error = exc
        finally:
            self._loaded.set()

    def _finish_load(self) -> None:
        if self._listed is None:
            self._check_contiguous()
        self._checkpoints.sort(key=lambda c: c.seq)
        if self.promoted_seq:
            with self._index_lock:
                self._index.drop_before(self.promoted_seq)
        self._checkpoints = [c for c in self._checkpoints if c.seq >= self.promoted_seq]
        # a crash between a promotion's watermark and its unlinks leaves segments wholly
        # below the watermark: remove them now, or retention counts them as free space
        self._drop_promoted()
        resumed = False
        target = int(self._meta.get("promote_target", 0))
        if target > self.promoted_seq:  # a promotion was interrupted: finish it first
            damage = self._damage
            try:
                self._promote_to(target)
            except CorruptRecordError:
                if self._damage == damage:
                    raise
                self._promote_to(target)  # it found and recorded damage: step over it
            resumed = True
        self._record_files()
        r = self._report
        self._report = ReopenReport(
            r.dropped_bytes, r.dropped_segments, self._rescanned, resumed, r.reason,
            damage=tuple(self._notes) + tuple(d.why for d in self._damage),
            damaged_seqs=tuple((d.seq_lo, d.seq_hi) for d in self._damage),
            inexact_checkpoints=inexact(self._damage, (c.seq for c in self._checkpoints)))

    def _record_files(self) -> None:
        """Write the manifest when what it says changed at this open (damage found), and
        upgrade a v1 journal in place: its manifest first, from the segments as loaded,
        then journal.meta at version 2 (a crash between the two redoes the upgrade)."""
        if self._listed is not None:
            if self._damage != self._damage_read:
                self._write_manifest()
                self._damage_read = self._damage
            return
        self._listed = {s.number: (s.size, s.max_seq) for s in self._segments.values()
                        if s is not self._active}
        self._write_manifest()
        self._meta["version"] = META_VERSION
        write_meta(self.path, self._meta)

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait until the sealed segments' indexes are loaded; raises what loading found
        (a damaged sealed segment) and StateError on timeout.  Do not call with the
        journal's lock held."""
        if not self._loaded.wait(timeout):
            raise StateError(f"journal {self.path} is still loading its index")
        if self._load_error is not None:
            err = self._load_error
            raise err.with_traceback(None) if isinstance(err, ZcoreError) else \
                CorruptRecordError(f"loading journal {self.path} failed: {err!r}")

    @property
    def loaded(self) -> bool:
        """True once the background loader has finished (successfully or not)."""
        return self._loaded.is_set()

    @property
    def reopen_report(self) -> ReopenReport:
        """What opening found (waits for the background index load)."""
        self.wait_loaded()
        return self._report

    def _check_contiguous(self) -> None:
        """Refuse a gap in the segment numbers that promotion cannot have left.

        Promotion deletes the segments whose records are all below the new watermark
        (with one directory fsync at the end, so a crash may leave any subset of them).
        A missing segment after one that is itself wholly promoted is such a leftover;
        after any other segment it is a lost file, and reading on would return stale
        data where its writes were newest."""
        segs = list(self._segments.values())
        for before, after in itertools.pairwise(segs):
            if after.number != before.number + 1 and before.max_seq >= self.promoted_seq:
                raise CorruptRecordError(
                    f"journal {self.path} lacks segment(s) {before.number + 1} to "
                    f"{after.number - 1}; the journal needs a resync from there")

    def _scan_segment(self, seg: Segment, last_seq: int, is_last: bool,
                      ordered: bool = True) -> tuple[int, str] | tuple[()]:
        """Full validation of one segment.  A record failing inside the committed bytes
        (a sealed segment: all of it; the tail: up to its durable-length mark) is
        quarantined and the scan goes on after it.  Returns (dropped bytes, reason) when
        the tail segment had a torn tail past its mark, () otherwise."""
        data = segments.read_segment(seg)
        version = segments.check_header(seg.path, seg.number, self.journal_id, data)
        if not version:
            raise CorruptRecordError(f"segment {seg.path} has a damaged header; the journal "
                                     "needs a resync from that segment")
        mark = segments.read_mark(data) if version >= segments.SEGMENT_V2 else None
        committed = (mark[0] if mark else 64) if is_last else len(data)
        scan = scan_segment_records(data, 64, committed, seg.number, last_seq,
                                    self._volume_sizes, segments.record_flags(version))
        for batch, arr in scan.batches:
            self._take_batch(seg, batch, arr, self._batch_checkpoints(arr, data, 0), ordered)
        found = seg.max_seq if seg.records else last_seq
        # damage running to the end of the committed bytes ends at their last seq
        listed = self._listed.get(seg.number) if self._listed is not None else None
        upto = (segments.full_seq(mark[1], found) if mark and is_last else
                listed[1] if listed is not None and not is_last else None)
        self._add_damage([replace(d, seq_hi=upto) if d.seq_hi is None and upto else d
                          for d in scan.damage])
        if mark and len(data) < committed:  # the file ends before what was committed
            self._add_damage([Damage(found + 1, segments.full_seq(mark[1], found),
                                     why=f"segment {seg.number} ends at byte {len(data)} "
                                     f"but its first {committed} bytes were committed")])
        seg.marked_end = committed if mark else 0
        if scan.status == 0:
            return ()
        end = scan.end
        if not is_last:  # unreachable: a sealed segment is committed to its end
            raise status_error(scan.status, f"sealed segment {seg.path} is damaged at "
                               f"byte {end}; the journal needs a resync from that point")
        os.ftruncate(seg.fd, end)
        os.fsync(seg.fd)
        dropped = seg.size - end
        seg.size = end
        reason = status_error(scan.status, f"torn tail of segment {seg.number} at {end}")
        return dropped, str(reason)

    @staticmethod
    def _batch_checkpoints(arr: np.ndarray, buf: Any, buf_pos: int) -> list[Checkpoint]:
        """Decode the checkpoint records of a validated batch (extents `arr`), raising
        CorruptRecordError on a payload that breaks the format.  `buf` holds the batch's
        bytes, `buf_pos` the file position of buf[0]."""
        out = []
        for rec in arr[arr["type"] == records.REC_CHECKPOINT]:
            at = int(rec["pos"]) - buf_pos
            payload = memoryview(buf)[at + 64 : at + 64 + int(rec["stored"])]
            out.append(Checkpoint.from_payload(int(rec["seq"]), records.record_time(buf, at),
                                               payload))
        return out

    def _take_batch(self, seg: Segment, batch: _rec.ExtentBatch, arr: np.ndarray,
                    checkpoints: list[Checkpoint], ordered: bool = True) -> None:
        """Index a validated batch (extents `arr`, decoded `checkpoints`) and learn its
        segment statistics.  Nothing here refuses the batch: check it before writing it."""
        n = len(batch)
        if not n:
            return
        with self._index_lock:
            self._index.add(batch, ordered)
        if not seg.sealed:
            seg.extents.append(arr)
        if not seg.records:
            seg.min_seq = int(arr["seq"][0])
            seg.min_time = batch.min_time
        seg.min_time = min(seg.min_time, batch.min_time)
        seg.max_seq = batch.last_seq
        seg.max_time = max(seg.max_time, batch.max_time)
        seg.records += n
        self._checkpoints.extend(checkpoints)

    def _adopt_index(self, seg: Segment, parsed: SegmentIndex, ordered: bool) -> bool:
        """Put a checked index file's extents, statistics and checkpoints in place, once
        its checkpoints are found to be the records they name (False: rescan)."""
        if not indexfile.checkpoints_match(seg, parsed):
            return False
        try:
            with self._index_lock:
                if parsed.presorted:
                    self._index.add_sorted(parsed.extents, seg.number, seg.size,
                                           self._volume_sizes, ordered)
                else:
                    self._index.add_array(parsed.extents, ordered)
        except CorruptRecordError:
            return False
        seg.min_time, seg.max_time = parsed.min_time, parsed.max_time
        seg.min_seq, seg.max_seq, seg.records = parsed.min_seq, parsed.max_seq, parsed.records
        self._checkpoints.extend(parsed.checkpoints)
        return True
