"""Bitmap mode and the syncs that leave it: the fold, bitmap syncs and the initial sync.

Sits on `VPGCore`, under the stream thread (zcore.vpg.stream) that drives it.  The fold
turns queued and pending writes into dirty bits (buffer overflow, link down, stop); a
sync then reads the dirty blocks from the backing stores into the ring as sync records,
leaving room for the guest's writes.  Checkpoints taken while it runs are flagged not
crash-consistent; the consistent one that closes it returns the VPG to streaming.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from zcore._native.capture import MODE_BITMAP, MODE_STREAM
from zcore.records import CheckpointKind
from zcore.vpg.core import SyncItem, VPGCore
from zcore.vpg.settings import SYNC_HEADROOM, VPGMode


class VPGSyncs(VPGCore):
    """Folding into bitmaps and syncing out of them (callers hold `_lock`)."""

    def _note_unsynced(self, oldest_ns: int) -> None:
        if oldest_ns and (not self._unsynced_since_ns or oldest_ns < self._unsynced_since_ns):
            self._unsynced_since_ns = oldest_ns

    def _fold(self, reason: str | None) -> None:
        """Stop streaming: queued and pending writes become dirty bits."""
        # Part of an initial sync may already be journaled: a block zeroed since must be
        # resent as zeros, so the sync that follows skips no zero block.
        self._skip_zero = False
        ring = self._ring
        if ring is not None:
            ring.set_mode(MODE_BITMAP)
            while True:  # in-flight writes commit within microseconds
                vols, offs, lens, oldest = ring.discard()
                self._mark(vols, offs, lens)
                self._note_unsynced(oldest)
                if ring.stats()["ring_used"] == 0:
                    break
                time.sleep(0.0001)
            self._mark(*ring.take_dirty())
        for b in self._pending:
            self._mark(b.volumes, b.offsets, b.lengths)
            for c in b.checkpoints:
                if c.tag:
                    self._event(f"tagged checkpoint {c.tag!r} (seq {c.seq}) was not delivered "
                                "before the fold: it is lost")
            self._note_unsynced(b.oldest_time_ns)
        self._pending.clear()
        self._pending_bytes = 0
        if not self._unsynced_since_ns:
            self._unsynced_since_ns = time.time_ns()
        self._sync_iter = None
        if reason is not None:
            self._mode = VPGMode.BITMAP
            self._event(f"bitmap mode: {reason}")
            self._wake.notify_all()

    def _begin_sync(self) -> None:
        self._live_ring().set_mode(MODE_STREAM)
        self._mode = VPGMode.INITIAL_SYNC if self._initial else VPGMode.BITMAP_SYNCING
        self._sync_total = sum(bm.dirty_bytes for bm in self.bitmaps.values())
        self._sync_done = 0
        self._sync_iter = self._sync_extents()
        self._sync_next = None
        self._event(f"{self._mode.label} of {self._sync_total} bytes started")

    def _sync_extents(self) -> Iterator[SyncItem]:
        chunk = self.settings.sync_chunk_bytes
        for vid, bm in self.bitmaps.items():
            for offset, length in bm.extents(max_length=chunk):
                yield vid, offset, length

    def _sync_step(self) -> bool:
        """Send dirty blocks as sync records while the ring has room, leaving a part of it
        free for the guest's writes (else the first write after each refill overflows it
        and the sync starts over)."""
        ring = self._live_ring()
        budget = self.settings.buffer_bytes // 8
        sent = 0
        while sent < budget:
            item = self._sync_next
            if item is None and self._sync_iter is not None:
                item = next(self._sync_iter, None)
            self._sync_next = None
            if item is None:
                self._finish_sync()
                return False
            vid, offset, length = item
            vol = self.volumes[vid]
            stats = ring.stats()
            room = stats["ring_size"] - stats["ring_size"] // SYNC_HEADROOM - stats["ring_used"]
            if length + 64 > room or ring.sync(vol.fd, vid, offset, length,
                                               self._skip_zero) is None:
                # ring full: retry after sealing.  Not "busy": when sealing is blocked too
                # (pending bound, no acks), the thread must wait for an ack, not spin.
                self._sync_next = item
                return False
            self.bitmaps[vid].clear(offset, length)
            self._sync_done += length
            sent += length
        return True

    def _finish_sync(self) -> None:
        if any(self.bitmaps.values()):  # failed writes re-dirtied blocks: go again
            self._skip_zero = False  # their old contents may already be journaled
            self._sync_iter = self._sync_extents()
            return
        was = self._mode
        self._mode = VPGMode.STREAMING
        self._skip_zero = self._initial = False
        self._sync_iter = None
        self._unsynced_since_ns = 0
        self._marker(CheckpointKind.AUTO, None)
        self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval
        self._save_state(clean=False)
        self.files.remove_bitmaps(list(self.bitmaps))
        self._event(f"{was.label} complete: consistent checkpoint emitted")

