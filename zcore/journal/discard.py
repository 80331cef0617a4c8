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

`replica_write`/`replica_sync` write into a replica directly, its block sums kept equal
to its bytes (zcore.journal.replica); they are allowed only while the journal holds
nothing (after `discard_after`, or a new journal a delta sync fills), when the replica
is the volume.  `replica_resum` rebuilds a replica's sums from its bytes (after a delta
sync verified them all: a crash may have left a block's bytes and sum apart)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from zcore import records
from zcore.errors import StateError
from zcore.fsutil import fsync_dir
from zcore.journal.meta import write_meta
from zcore.journal.replica import ReplicaSums
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
        """True when every journaled write is in the replicas (nothing after them), or
        the journal never held a record."""
        return self.last_seq == 0 or self.promoted_seq > self.last_seq

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
            with self._index_lock:  # a read never sees bytes and sums apart
                self._replica_sums[spec.id].write(self._replica_fds[spec.id], view, offset,
                                                  resuming=False)

    def replica_zero(self, volume: int | str, offset: int, length: int) -> None:
        """Zero [offset, offset + length) of `volume`'s replica, its whole blocks punched
        out (only while the journal is empty)."""
        spec = self._volume(volume)
        records.check_range(offset, length, spec.size)
        with self._lock:
            self._check_usable()
            self._check_empty()
            with self._index_lock:  # a read never sees bytes and sums apart
                self._replica_sums[spec.id].zero(self._replica_fds[spec.id], offset, length,
                                                 resuming=False)

    def replica_sync(self) -> None:
        """fsync every replica, then its sums."""
        with self._lock:
            self._check_usable()
            for fd in self._replica_fds.values():
                os.fsync(fd)
            for sums in self._replica_sums.values():
                sums.fsync()

    def replica_resum(self, volume: int | str) -> None:
        """Rebuild `volume`'s replica sums from its bytes as they are (trusted: call it
        only when they were verified otherwise, as a delta sync does)."""
        spec = self._volume(volume)
        with self._lock:
            self._check_usable()
            self._check_empty()
            fd = self._replica_fds[spec.id]
            os.fsync(fd)
            with self._index_lock:
                self._index.set_replica_sums(spec.id, None, 0, 0, 0, 0)
                self._replica_sums.pop(spec.id).close()
                sums = ReplicaSums.create(self.path, spec.id, spec.size, self.journal_id, fd)
                self._replica_sums[spec.id] = sums
                self._index.set_replica_sums(spec.id, sums.sums, sums.size, sums.block,
                                             sums.zero_full, sums.zero_last)

    def replica_path(self, volume: int | str) -> str:
        """The replica image file of `volume`."""
        spec = self._volume(volume)
        return str(self.path / f"replica-{spec.id:04d}.img")
