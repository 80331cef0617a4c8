"""Group commit (docs/format.md 8.1): `commit` fsyncs the active segment in the caller's
thread; the automatic group commit hands the fsync to a committer thread so the fsync of
one group overlaps the writes of the next.

Every fdatasync of a v2 segment is preceded by a write of its durable-length mark (the
end and last seq the previous fdatasync covered, docs/format.md 7.3): the mark never
claims more than is durable, and it costs no fsync of its own.

A mixin of Journal: `durable_seq` moves only when an fsync has returned; a failed fsync
stops the journal until it is reopened.  `_mark_lock` is a leaf: it orders the mark
writes of the caller's and the committer's thread."""

from __future__ import annotations

import logging
import os
import threading

from zcore.errors import DurabilityError
from zcore.fsutil import pwrite_all
from zcore.journal import segments
from zcore.journal.segments import Segment
from zcore.journal.state import JournalState

log = logging.getLogger("zcore.journal")


class CommitterMixin(JournalState):
    def commit(self) -> int:
        """Group commit: make every appended record durable; returns the durable seq."""
        with self._lock:
            self._check_usable()
            self._unsynced = 0
            if self.durable_seq == self.last_seq:
                return self.durable_seq
            target = self.last_seq
            seg = self._active
            end = seg.size
            try:
                self._write_mark(seg, seg.fd)
                os.fdatasync(seg.fd)
            except OSError as exc:
                self._failed = exc
                raise DurabilityError(f"fsync of {seg.path} failed: {exc}") from exc
            seg.synced = max(seg.synced, (end, target))
            self.durable_seq = max(self.durable_seq, target)
            return self.durable_seq

    def _write_mark(self, seg: Segment, fd: int) -> None:
        """Write `seg`'s mark for what its last completed fdatasync covered, when the mark
        on disk states less (no fsync: the caller's next fdatasync carries it)."""
        if seg.version < segments.SEGMENT_V2 or seg.synced[0] <= seg.marked_end:
            return
        with self._mark_lock:
            end, seq = seg.synced
            if end <= seg.marked_end:
                return
            mark = segments.pack_mark(seg.head, end, seq)
            if mark is not None:
                pwrite_all(fd, mark, segments.MARK_AT)
            seg.marked_end = end

    def _sync_mark(self) -> None:
        """Make the active segment's mark state everything committed (at close: one more
        fdatasync, so a cleanly closed journal has no unmarked committed bytes)."""
        seg = self._active
        if seg.version < segments.SEGMENT_V2 or seg.synced[0] <= seg.marked_end:
            return
        try:
            self._write_mark(seg, seg.fd)
            os.fdatasync(seg.fd)
        except OSError as exc:
            self._failed = exc
            raise DurabilityError(f"fsync of {seg.path} failed: {exc}") from exc

    def _commit_in_background(self) -> None:
        """The automatic group commit: the committer thread fsyncs the active segment
        while appends go on.  Rotation and `commit` sync synchronously."""
        self._unsynced = 0
        # the committer gets its own descriptor: promotion may close the segment's before
        # the fsync runs, and a closed number can be reused by another file
        seg = self._active
        fd = os.dup(seg.fd)
        with self._sync_cond:
            if self._sync_target is not None:
                os.close(self._sync_target[1])
            self._sync_target = (self.last_seq, fd, seg, seg.size)
            if self._committer is None:
                self._committer = threading.Thread(target=self._run_committer,
                                                   name=f"journal-commit-{self.vm}",
                                                   daemon=True)
                self._committer.start()
            self._sync_cond.notify()

    def _run_committer(self) -> None:
        while True:
            with self._sync_cond:
                while self._sync_target is None and not self._closing:
                    self._sync_cond.wait()
                if self._sync_target is None:
                    return
                (seq, fd, seg, end), self._sync_target = self._sync_target, None
            try:
                self._write_mark(seg, fd)
                os.fdatasync(fd)
            except OSError as exc:
                self._failed = exc
                log.error("journal %s: background fsync failed: %s", self.path, exc)
                return
            finally:
                os.close(fd)
            with self._lock:
                seg.synced = max(seg.synced, (end, seq))
                if not self._closing and seq > self.durable_seq:
                    self.durable_seq = seq

    def _stop_committer(self) -> None:
        with self._sync_cond:
            self._closing = True
            if self._sync_target is not None:
                os.close(self._sync_target[1])
            self._sync_target = None
            self._sync_cond.notify()
        if self._committer is not None:
            self._committer.join()
            self._committer = None
