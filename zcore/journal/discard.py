"""Dropping a journal's history after a checkpoint, and writing into its replicas: what a
committed live failover does (zcore.recovery.failover).

A mixin of Journal.  `discard_after(checkpoint)` promotes every write below the
checkpoint into the replicas, then forgets everything journaled from the checkpoint on:
the replicas become the volumes as of the checkpoint and the journal holds nothing.
Crash-safe order: (1) the promotion (replicas fsynced, journal.meta's watermark at the
checkpoint); (2) journal.meta rewritten atomically with the promotion watermark *and*
target past the last seq (a reopen then skips every remaining record, and redoes no
promotion: nothing after the checkpoint can ever reach a replica); (3) the segment
files deleted, a fresh active segment started, the directory fsynced.  A crash between
(2) and (3) leaves segments whose records are all below the watermark: a reopen ignores
them and the next promotion deletes them.

`replica_write`/`replica_sync` write into a replica directly; they are allowed only
while the journal holds nothing (after `discard_after`), when the replica is the volume."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from zcore import records
from zcore.errors import StateError
from zcore.fsutil import fsync_dir, pwrite_all
from zcore.journal.meta import write_meta
from zcore.journal.state import JournalState
from zcore.records import Checkpoint

if TYPE_CHECKING:
    from typing_extensions import Buffer


class DiscardMixin(JournalState):
    def discard_after(self, checkpoint: Checkpoint | int) -> int:
        """Promote up to `checkpoint`, then drop every record from it on (see the module
        docstring).  Refused while any view is open.  Returns the new watermark."""
        self.wait_loaded()
        with self._lock:
            self._check_usable()
            cid = (checkpoint.id if isinstance(checkpoint, Checkpoint)
                   else records.check_int("checkpoint id", checkpoint))
            ckpt = self.checkpoint_by_id(cid)
            if self._pins:
                raise StateError(f"journal {self.path}: views are open (checkpoints "
                                 f"{sorted(self._pins)}); close them before discarding")
            self._promote_to(ckpt.seq)
            end = self.last_seq + 1
            with self._index_lock:
                self._meta["promote_target"] = end
                self._meta["promoted_seq"] = end
            write_meta(self.path, self._meta)
            self.promoted_seq = end
            with self._index_lock:
                self._index.drop_before(end)
                self._lz4_cache.clear()
            self._checkpoints = []
            for seg in list(self._segments.values()):
                if seg is not self._active:
                    self._drop_segment(seg)
            if self._active.records:
                old = self._active
                self._active = self._new_segment(old.number + 1)
                self._drop_segment(old)
            fsync_dir(self.path)
            return end

    @property
    def empty(self) -> bool:
        """True when every journaled write is in the replicas (nothing after them)."""
        return self.promoted_seq > self.last_seq

    def _check_empty(self) -> None:
        if not self.empty:
            raise StateError(f"journal {self.path} still holds writes after seq "
                             f"{self.promoted_seq}: its replicas are not the volumes")

    def replica_write(self, volume: int | str, offset: int, data: Buffer) -> None:
        """Write `data` into `volume`'s replica (only while the journal is empty)."""
        spec = self._volume(volume)
        view = records.byte_view(data)
        records.check_range(offset, len(view), spec.size)
        with self._lock:
            self._check_usable()
            self._check_empty()
            pwrite_all(self._replica_fds[spec.id], view, offset)

    def replica_sync(self) -> None:
        """fsync every replica."""
        with self._lock:
            self._check_usable()
            for fd in self._replica_fds.values():
                os.fsync(fd)

    def replica_path(self, volume: int | str) -> str:
        """The replica image file of `volume`."""
        spec = self._volume(volume)
        return str(self.path / f"replica-{spec.id:04d}.img")
