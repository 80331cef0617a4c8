"""Group commit (docs/format.md 8.1): `commit` fsyncs the active segment in the caller's
thread; the automatic group commit hands the fsync to a committer thread so the fsync of
one group overlaps the writes of the next.

A mixin of Journal: `durable_seq` moves only when an fsync has returned; a failed fsync
stops the journal until it is reopened."""

from __future__ import annotations

import logging
import os
import threading

from zcore.errors import DurabilityError
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
            try:
                os.fdatasync(self._active.fd)
            except OSError as exc:
                self._failed = exc
                raise DurabilityError(f"fsync of {self._active.path} failed: {exc}") from exc
            self.durable_seq = max(self.durable_seq, target)
            return self.durable_seq

    def _commit_in_background(self) -> None:
        """The automatic group commit: the committer thread fsyncs the active segment
        while appends go on.  Rotation and `commit` sync synchronously."""
        self._unsynced = 0
        # the committer gets its own descriptor: promotion may close the segment's before
        # the fsync runs, and a closed number can be reused by another file
        fd = os.dup(self._active.fd)
        with self._sync_cond:
            if self._sync_target is not None:
                os.close(self._sync_target[1])
            self._sync_target = (self.last_seq, fd)
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
                (seq, fd), self._sync_target = self._sync_target, None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._failed = exc
                log.error("journal %s: background fsync failed: %s", self.path, exc)
                return
            finally:
                os.close(fd)
            with self._lock:
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
