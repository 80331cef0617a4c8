"""Retention and promotion (docs/format.md 8.5): which writes leave the journal (older
than the history, or the oldest segments while the journal passes its hard limit, never
past a pinned checkpoint) and moving them into the replicas.

A mixin of Journal.  Promotion runs under the append lock; it takes the index lock only
to change what reads see (the target, the index, the LZ4 cache, closing descriptors), so
reads go on while it copies records into the replicas."""

from __future__ import annotations

import os
import time

import numpy as np
import numpy.typing as npt

from zcore import records
from zcore._native import record as _rec
from zcore.errors import (
    CorruptRecordError,
    DurabilityError,
    JournalFullError,
    status_error,
)
from zcore.fsutil import preadinto_exact
from zcore.journal.damage import scan_segment_records
from zcore.journal.meta import write_meta
from zcore.journal.segments import Segment, record_flags
from zcore.journal.state import JournalState


class RetentionMixin(JournalState):
    @property
    def provisioned_bytes(self) -> int:
        return sum(v.size for v in self.volumes.values())

    @property
    def hard_limit_bytes(self) -> int | None:
        s = self.settings
        if s.hard_limit_bytes is not None:
            return s.hard_limit_bytes
        if s.hard_limit_percent is not None:
            return int(self.provisioned_bytes * s.hard_limit_percent / 100)
        return None

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def _min_pin(self) -> int | None:
        return min(self._pins) if self._pins else None

    def _make_room(self, incoming: int) -> None:
        hard = self.hard_limit_bytes
        if hard is None or self.size_bytes + incoming <= hard:
            self._full = False
            return
        if not self._loaded.is_set():  # promotion needs the whole index (and our lock)
            raise JournalFullError(f"journal {self.path} passed its hard limit while its "
                                   "index is still loading; retry shortly")
        self.promote(incoming=incoming)
        if self.size_bytes + incoming > hard:
            self._full = True
            pin = self._min_pin()
            why = f"a view pins checkpoint {pin}" if pin is not None else "nothing to promote"
            raise JournalFullError(
                f"journal {self.path} is full ({self.size_bytes} of {hard} bytes) and cannot "
                f"promote: {why}"
            )
        self._full = False

    def promote(self, *, now: float | None = None, incoming: int = 0) -> int:
        """Promote what retention asks for: writes older than the history, and the oldest
        segments while the journal (plus `incoming` bytes) passes its hard limit.
        Never past a pinned checkpoint.  Returns the new promotion watermark."""
        self.wait_loaded()
        with self._lock:
            self._check_usable()
            now_ns = int((time.time() if now is None else now) * 1e9)
            cutoff = now_ns - int(self.settings.history_seconds * 1e9)
            target = self.promoted_seq
            for c in self._checkpoints:
                if c.time_ns > cutoff:
                    break
                target = max(target, c.seq)
            for seg in self._segments.values():
                if seg.records and seg.max_time <= cutoff and seg is not self._active:
                    target = max(target, seg.max_seq + 1)
            if self._checkpoints:
                # history alone never passes the newest checkpoint: when the stream stops
                # (a disaster at the protected site) it must stay to fail over to
                target = min(target, max(self.promoted_seq, self._checkpoints[-1].seq))
            hard = self.hard_limit_bytes
            if hard is not None:
                size = self.size_bytes + incoming
                for seg in self._segments.values():
                    if size <= hard:
                        break
                    if seg is self._active:
                        # the active segment goes whole: promote it and start afresh
                        target = max(target, self.last_seq + 1)
                        break
                    target = max(target, seg.max_seq + 1)
                    size -= seg.size
            pin = self._min_pin()
            if pin is not None:
                target = min(target, pin)
            return self._promote_to(target)

    def promote_to(self, seq: int) -> int:
        """Promote every write with seq < `seq` (bounded by pins and the last seq)."""
        self.wait_loaded()
        with self._lock:
            self._check_usable()
            pin = self._min_pin()
            if pin is not None and seq > pin:
                raise JournalFullError(f"cannot promote to {seq}: a view pins checkpoint {pin}")
            return self._promote_to(min(seq, self.last_seq + 1))

    def _promote_to(self, target: int) -> int:
        try:
            if target <= self.promoted_seq:
                # nothing new to promote, but a crash may have left segments below the
                # watermark that retention counts as freed: free them
                self._drop_promoted()
                return self.promoted_seq
            self.commit()
            return self._apply_promotion(target)
        except DurabilityError:
            raise
        except OSError as exc:
            # a replica write or fsync failed: retrying could "succeed" over lost pages,
            # so stop; reopening redoes the promotion from promote_target
            raise self._stop(exc, f"promotion to seq {target}") from exc

    def _stop(self, exc: OSError, doing: str) -> DurabilityError:
        """Enter the failed state after an I/O error that may have lost written data."""
        self._failed = exc
        return DurabilityError(f"{doing} failed ({exc}); journal {self.path} stops until "
                               "it is reopened")

    def _apply_promotion(self, target: int) -> int:
        # an intent already past the watermark: this pass replays an interrupted one, over
        # replica blocks and sums that may each hold old or new bytes (zcore.journal.replica)
        resuming = int(self._meta.get("promote_target", 0)) > self.promoted_seq
        with self._index_lock:  # from here no read below the target starts
            self._meta["promote_target"] = target
        write_meta(self.path, self._meta)
        touched: set[int] = set()
        # one buffer for every segment (fresh 64 MiB buffers page-fault), never zero-filled:
        # bytearray(n) memsets it holding the GIL, ~30 ms in which a recovered volume's
        # first read waited (bench: recovery.rto_first_read)
        buf = np.empty(0, dtype=np.uint8)
        for seg in list(self._segments.values()):
            if not seg.records or seg.min_seq >= target:
                continue
            if seg.max_seq < self.promoted_seq:
                continue
            if len(buf) < seg.size:
                buf = np.empty(seg.size, dtype=np.uint8)
            touched |= self._promote_segment(seg, target, buf, resuming)
        # replica fsynced, then its sums, then the watermark: until it is
        # durable a reopen replays this promotion and rewrites both (docs/format.md 7.5)
        for volume in touched:
            os.fsync(self._replica_fds[volume])
            self._replica_sums[volume].fsync()
        self.promoted_seq = target
        self._meta["promoted_seq"] = target
        write_meta(self.path, self._meta)
        with self._index_lock:  # the replicas hold every write below the target now
            self._index.drop_before(target)
            self._lz4_cache.clear()
        self._checkpoints = [c for c in self._checkpoints if c.seq >= target]
        self._drop_promoted()  # segments wholly below the target (manifest.py)
        return target

    def _promote_segment(self, seg: Segment, target: int, buf: npt.NDArray[np.uint8],
                         resuming: bool = False) -> set[int]:
        """Write the data records of `seg` with promoted_seq <= seq < target into the
        replicas and their block sums (not fsynced); returns the volumes written.  Each
        write and its sums change together under the index lock, so a read checks every
        replica block against the sum of the bytes it reads."""
        touched: set[int] = set()
        view = buf.data[: seg.size]
        preadinto_exact(seg.fd, view, 0, what=f"segment {seg.path} (shorter than recorded)")
        # records quarantined at reopen are stepped over (their damage stays recorded);
        # damage found only now is recorded and refused this once (damage.py)
        scan = scan_segment_records(view, 64, seg.size, seg.number, 0, self._volume_sizes,
                                    record_flags(seg.version))
        if scan.status:
            raise status_error(scan.status, f"promoting from segment {seg.path}")
        if self._new_damage(scan.damage):
            raise CorruptRecordError(f"promoting from segment {seg.path}: damaged records "
                                     "found, quarantined and reported; retry to go on")
        arr = (np.concatenate([a for _b, a in scan.batches]) if scan.batches
               else np.empty(0, dtype=records.EXTENT_DTYPE))
        columns = zip(arr["seq"].tolist(), arr["type"].tolist(), arr["flags"].tolist(),
                      arr["volume"].tolist(), arr["offset"].tolist(),
                      arr["length"].tolist(), arr["pos"].tolist(), arr["stored"].tolist(),
                      strict=True)
        for seq, kind, flags, volume, offset, length, pos, stored in columns:
            if seq >= target:
                break
            if seq < self.promoted_seq or kind == records.REC_CHECKPOINT:
                continue
            pos += 64
            payload: bytes | memoryview
            table: memoryview | None = None
            if kind == records.REC_ZERO:
                # whole blocks become holes in the replica (TRIM, fast zero: the space
                # is given back); edges are written as zeros
                with self._index_lock:
                    self._replica_sums[volume].zero(self._replica_fds[volume], offset,
                                                    length, resuming=resuming)
                touched.add(volume)
                continue
            if flags & records.FLAGS_COMPRESSED:
                payload = records.decode_payload(flags, view[pos : pos + stored], length,
                                                 f"seq {seq} in {seg.path}")
            else:
                start = pos + _rec.blockcrc_table_size(length)
                payload = view[start : start + length]
                table = view[pos:start]  # its blocks' CRCs, verified by the scan above
            with self._index_lock:
                self._replica_sums[volume].write(self._replica_fds[volume], payload,
                                                 offset, resuming=resuming, block_crcs=table)
            touched.add(volume)
        del view, scan
        return touched

    def _drop_segment(self, seg: Segment) -> None:
        """Delete a fully promoted segment (the caller fsyncs the directory once).  The
        descriptor is closed under the index lock: no read is using it then."""
        with self._index_lock:
            self._index.set_segment_fd(seg.number, -1)
            os.close(seg.fd)
            seg.fd = -1
            del self._segments[seg.number]
        seg.path.with_suffix(".zci").unlink(missing_ok=True)
        seg.path.unlink()
