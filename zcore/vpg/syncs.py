"""Bitmap mode and the syncs that leave it: the fold, bitmap syncs and the initial sync.

Sits on `VPGCore`, under the stream thread (zcore.vpg.stream) that drives it.  The fold
turns queued and pending writes into dirty bits (buffer overflow, link down, stop); a
sync then reads the dirty blocks from the backing stores (or a capture-only volume's
source, a hypervisor's disk) into the ring as sync records, leaving room for the guest's
writes.  Checkpoints taken while it runs are flagged not
crash-consistent; the consistent one that closes it returns the VPG to streaming.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from zcore._native.capture import MODE_BITMAP, MODE_STREAM, CaptureRing
from zcore.capture import ProtectedVolume
from zcore.errors import ZcoreError
from zcore.records import CheckpointKind
from zcore.vpg.core import Bundle, SyncItem, VPGCore
from zcore.vpg.settings import SYNC_HEADROOM, VPGMode


class VPGSyncs(VPGCore):
    """Folding into bitmaps and syncing out of them (callers hold `_lock`)."""

    def _note_unsynced(self, oldest_ns: int) -> None:
        if oldest_ns and (not self._unsynced_since_ns or oldest_ns < self._unsynced_since_ns):
            self._unsynced_since_ns = oldest_ns

    def _fold(self, reason: str | None) -> None:
        """Stop streaming: queued and pending writes become dirty bits."""
        self._folds += 1
        # Part of an initial sync may already be journaled: a block zeroed since must be
        # resent as zeros, so the sync that follows skips no zero block.
        self._skip_zero = False
        ring = self._ring
        markers: list[int] = []  # seqs of the checkpoint markers dropped, in seq order
        if ring is not None:
            ring.set_mode(MODE_BITMAP)
            while True:  # in-flight writes commit within microseconds
                dropped: list[tuple[int, int, bytes]] = []
                vols, offs, lens, oldest = ring.discard(dropped)
                markers += [seq for seq, _, _ in dropped]
                self._mark(vols, offs, lens)
                self._note_unsynced(oldest)
                if ring.stats()["ring_used"] == 0:
                    break
                time.sleep(0.0001)
            self._mark(*ring.take_dirty())
        for b in self._pending:
            self._mark(b.volumes, b.offsets, b.lengths)
            markers += [c.seq for c in b.checkpoints]
            self._note_unsynced(b.oldest_time_ns)
        self._pending.clear()
        self._pending_bytes = 0
        self._carry(sorted(markers), announce=reason is not None)
        if not self._unsynced_since_ns:
            self._unsynced_since_ns = time.time_ns()
        self._sync_acked_at = 0  # the sync's data, if it finished, was just dropped
        self._sync_iter = None
        if reason is not None:
            self._mode = VPGMode.BITMAP
            self._event(f"bitmap mode: {reason}")
            self._wake.notify_all()

    def _fold_overflow(self) -> None:
        """The ring overflowed.  If a link took bundles it has not acknowledged, the
        bitmap sync waits until it does (or until `link_up`): a link that stalled, still
        counted up until the sender notices, would not drain a sync begun now; it would
        overflow the buffer again and fold a second time, rereading the dirty blocks
        (issue 9 finding 15).  A link that delivers acknowledges them within a round
        trip; nothing taken and unacknowledged, nothing to wait for."""
        handed = self._handed_seq
        self._fold("buffer overflow")
        if handed > self._acked_seq:
            self._sync_awaits_ack = handed
            self._event(f"bitmap sync waits for the link to acknowledge seq {handed}")

    def _took(self, bundles: list[Bundle]) -> list[Bundle]:
        """A link takes `bundles` (the newest last) to send them."""
        if bundles:
            self._handed_seq = max(self._handed_seq, bundles[-1].last_seq)
        return bundles

    def _acked_for_sync(self, seq: int) -> None:
        """The link acknowledged `seq`: once it covers what the link took before an
        overflow, the link delivers and the sync may begin."""
        if seq >= self._sync_awaits_ack:
            self._sync_awaits_ack = 0

    def _carry(self, markers: list[int], *, announce: bool) -> None:
        """Tagged checkpoints whose markers a fold dropped go on to the end of the sync
        (`announce`: say so in an event; not when stopping, which reports them lost)."""
        for seq in markers:
            report = self._tagged.carry(seq, "carried through a fold")
            if report is not None and announce:
                self._event(f"tagged checkpoint {report.checkpoint.tag!r} (seq {seq}) was "
                            "not delivered before the fold: carried through the sync, to be "
                            "journaled after it, not crash-consistent")

    def _append_carried(self) -> None:
        """Append the carried tagged checkpoints' markers again (streaming, so after every
        record of the sync that folded their data into the bitmaps), flagged not
        crash-consistent: the image at them also holds writes made after they were taken.
        What finds no room in the ring is retried next round."""
        for report in self._tagged.carried():
            c = report.checkpoint
            marker = self._marker(CheckpointKind.TAGGED, c.tag, consistent=False)
            if marker is None:
                return
            self._tagged.appended(c.id, marker)
            self._event(f"tagged checkpoint {c.tag!r} (seq {c.seq}) carried through the "
                        f"sync: appended again at seq {marker.seq}, not crash-consistent")

    def _begin_sync(self) -> None:
        ring = self._live_ring()
        ring.set_mode(MODE_STREAM)
        # what bitmap mode logged since the stream's last look (writes racing this
        # round): marked now, so that from here the log holds only failed writes
        self._mark(*ring.take_dirty())
        if self._skip_zero:  # onto empty replicas: a source's holes need not be read
            self._unmark_source_holes()
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

    def _unmark_source_holes(self) -> None:
        for vid, vol in self.volumes.items():
            if vol.source is None:
                continue
            try:
                holes = vol.source.zero_extents()
            except (ZcoreError, OSError) as exc:
                self._event(f"volume {vol.vm}/{vol.name}: its source's holes are unknown "
                            f"({exc}): the initial sync reads every block")
                continue
            for offset, length in holes:
                self.bitmaps[vid].clear(offset, length)

    def _sync_from_source(self, ring: CaptureRing, vol: ProtectedVolume, item: SyncItem) -> bool:
        """One sync record of a capture-only volume, read from its source (a hypervisor's
        disk) between a watch and its append (csrc/zc_capture.h: a write of the range
        captured meanwhile spoils the read, which is then read again).  False when it
        cannot go now (no room, not streaming, or the source failed: said once)."""
        vid, offset, length = item
        assert vol.source is not None
        for _attempt in range(3):
            watch = ring.watch(vid, offset, length)
            data = bytearray(length)
            try:
                vol.source.read_into(offset, data)
            except (ZcoreError, OSError) as exc:
                ring.unwatch(watch)
                if not self._source_failed:
                    self._event(f"volume {vol.vm}/{vol.name}: reading its source for the "
                                f"sync failed ({exc}): retrying")
                self._source_failed = True
                return False
            self._source_failed = False
            seq = ring.sync_from(watch, length, data, self._skip_zero)
            if seq is None:
                ring.unwatch(watch)
                return False
            if seq:
                return True
        return False  # a hot range: the next round reads it again

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
            if length + 64 > room or not (
                    self._sync_from_source(ring, vol, item) if vol.source is not None else
                    ring.sync(vol.fd, vid, offset, length, self._skip_zero) is not None):
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
        # the sync's data is in the ring, not at the recovery site: the RPO keeps counting
        # from the oldest write it covers until the ack of its last seq (VPG.ack)
        self._sync_acked_at = self._live_ring().stats()["next_seq"] - 1
        if self._sync_acked_at <= self._acked_seq:
            self._unsynced_since_ns = self._sync_acked_at = 0
        self._append_carried()
        self._marker(CheckpointKind.AUTO, None)
        self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval
        self._save_state(clean=False)
        self.files.remove_bitmaps(list(self.bitmaps))
        self._event(f"{was.label} complete: consistent checkpoint emitted")

