"""The VPG: a consistency group of VMs and volumes, and what links and users call.

Sits on top of the stream (zcore.vpg.stream) and is what `zcore.vpg` exports: defining
VMs and volumes, start and stop (with the state files of zcore.vpg.state), checkpoints,
link up and down, the bundles a sender takes and the acks it returns, status and RPO.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence

from zcore import records
from zcore._native.capture import MODE_BITMAP, CaptureRing
from zcore.bitmap import DirtyBitmap
from zcore.capture import ProtectedVolume, VolumeSource, backing_size
from zcore.errors import ConfigError, StateError, ZcoreError
from zcore.journal import VolumeSpec
from zcore.records import Checkpoint, CheckpointKind
from zcore.vpg.core import VM, Bundle, DeltaSyncReport, ResyncReport, VPGStatus
from zcore.vpg.promises import CheckpointReport
from zcore.vpg.settings import CHECKPOINT_WAIT, SEQ_RESERVE, VPGMode
from zcore.vpg.stream import VPGStream


class VPG(VPGStream):
    """A consistency group: every write of every volume in one seq order."""

    # ---- definition ----------------------------------------------------------------------

    def add_vm(self, name: str) -> VM:
        with self._lock:
            self._require_stopped("add a VM")
            if not name or name in self.vms:
                raise ConfigError(f"VM name {name!r} is empty or already in VPG {self.name}")
            vm = self.vms[name] = VM(name)
            return vm

    def add_volume(self, vm: VM | str, name: str, path: str | os.PathLike[str] | None,
                   size: int | None = None, *,
                   source: VolumeSource | None = None) -> ProtectedVolume:
        """Protect the raw image or block device at `path` (size: the whole store), or,
        with `source` and no path, a capture-only volume over a hypervisor's disk."""
        with self._lock:
            self._require_stopped("add a volume")
            vm_obj = self.vms.get(vm if isinstance(vm, str) else vm.name)
            if vm_obj is None:
                raise ConfigError(f"VPG {self.name} has no VM {vm!r}")
            if any(v.name == name for v in vm_obj.volumes):
                raise ConfigError(f"VM {vm_obj.name} already has a volume {name!r}")
            if size is None and source is not None:
                size = source.size
            elif size is None and path is not None:
                size = backing_size(path) // records.SECTOR * records.SECTOR
            elif size is None:
                raise ConfigError(f"volume {name!r}: give a backing store or a source")
            volume_id = len(self.volumes)
            if volume_id >= 65536:
                raise ConfigError("a VPG holds at most 65536 volumes")
            volume = ProtectedVolume(vm_obj.name, volume_id, name, path, size, source=source)
            vm_obj.volumes.append(volume)
            self.volumes[volume_id] = volume
            return volume

    def journal_volumes(self, vm: str) -> list[VolumeSpec]:
        """The volumes a recovery-site journal of `vm` holds."""
        return [VolumeSpec(v.id, v.name, v.size) for v in self.vms[vm].volumes]

    # ---- lifetime ------------------------------------------------------------------------

    def start(self, *, initial_sync: bool = False, delta_sync: bool = False,
              min_seq: int = 0, hold_sync: bool = False) -> None:
        """Start capturing.  `initial_sync` copies the volumes' current contents (zero
        blocks skipped) before the first consistent checkpoint; `delta_sync` says the
        recovery site's replicas hold an older copy of the volumes (reverse protection):
        the sender's delta sync sends what differs (mode DELTA_SYNC, writes meanwhile
        marked dirty), then the bitmap sync of those writes, then the first consistent
        checkpoint.  Both count on a first start only: later the state file decides.
        `min_seq` is the highest seq the recovery site already holds.  A restart after a
        clean stop resumes the persisted bitmaps (and a pending delta sync or compare);
        after a crash the volumes are compared with the recovery site's journals (mode
        RESYNC_COMPARE, run by the sender: `resync_pending`), what differs marked dirty
        and sent by the bitmap sync, except while a delta sync is pending: that sync
        then starts over (it compares every block, so nothing needs marking).  With
        `hold_sync`, a sync the start calls for waits for `release_sync` (a source must
        first forward every later write: a hypervisor's mirror)."""
        if initial_sync and delta_sync:
            raise ConfigError("a VPG starts with an initial sync or a delta sync, not both")
        with self._lock:
            self._require_stopped("start")
            if not self.volumes:
                raise ConfigError(f"VPG {self.name} protects no volume")
            state = self.files.load(self._definition(), self.name)
            self._restore_bitmaps(state, initial_sync, delta_sync)
            first_seq = max(int(state["seq_reserved"]) if state else 1, min_seq + 1)
            self._seq_reserved = first_seq + SEQ_RESERVE
            self._last_seq = first_seq - 1
            self._acked_seq = max(self._acked_seq, min_seq)
            self._handed_seq = self._sync_awaits_ack = 0
            ring = self._ring = CaptureRing(self._ring_bytes(), first_seq)
            dirty = any(self.bitmaps.values()) or self._delta or self._resync
            self._mode = (VPGMode.DELTA_SYNC if self._delta else
                          VPGMode.RESYNC_COMPARE if self._resync else
                          VPGMode.BITMAP if dirty else VPGMode.STREAMING)
            if dirty:
                ring.set_mode(MODE_BITMAP)
            # nothing dirty: everything captured before the stop is at the recovery site
            self._unsynced_since_ns = time.time_ns() if dirty else 0
            self._sync_acked_at = 0
            self._save_state(clean=False)
            for vol in self.volumes.values():
                vol._attach(ring)
            self._stopping = False
            self._sync_held = hold_sync
            self._error = None
            self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval
            self._last_persist = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"vpg-{self.name}",
                                            daemon=True)
            self._thread.start()

    def _restore_bitmaps(self, state: dict[str, object] | None, initial_sync: bool,
                         delta_sync: bool = False) -> None:
        """Fresh bitmaps, then what the saved state says is dirty: nothing or everything
        (first start), the persisted bitmaps (clean stop) or nothing yet (crash: a
        compare marks what differs; while a delta sync is pending, it starts over)."""
        for vid, vol in self.volumes.items():
            self.bitmaps[vid] = DirtyBitmap(vol.size, max_bytes=self.settings.bitmap_max_bytes)
        if state is None:
            self._skip_zero = self._initial = initial_sync
            self._delta, self._delta_fresh = delta_sync, delta_sync
            if initial_sync:
                for bm in self.bitmaps.values():
                    bm.mark_all()
                self._event("initial sync of every volume")
            if delta_sync:
                self._event(f"delta sync of {len(self.volumes)} volumes pending: the "
                            "recovery site's replicas hold an older copy")
            return
        # zero blocks may be skipped only while the replicas hold nothing: after a restart,
        # part of an initial sync (or writes since) may be journaled
        self._skip_zero = False
        self._initial = bool(state.get("initial_sync_pending"))
        self._delta = bool(state.get("delta_sync_pending"))
        self._delta_fresh = bool(state.get("delta_sync_fresh"))
        if self._delta and not state["clean"]:
            # the marks of writes since the last persisted bitmaps are lost, and so may
            # be blocks the target already verified: the delta sync compares every block
            # again (its progress dropped), which resends whatever they covered
            self._delta_fresh = True
            self._event("unclean shutdown during the delta sync: it starts over")
            return
        self._resync = bool(state.get("resync_pending"))
        sourced = any(v.source is not None for v in self.volumes.values())
        if state["clean"]:
            self.files.load_bitmaps(self.volumes, self.bitmaps,
                                    self.settings.bitmap_max_bytes, self._event)
            if self._resync:  # the marks so far are kept; blocks not compared are not
                self._event("a stop interrupted the resync's compare: it compares again")
            # a hypervisor went on writing while zcore was stopped: its bitmaps say where
            elif sourced and not self._mark_from_sources("a clean stop"):
                self._resync = True
                self._event("the volumes will be compared with the recovery site's "
                            "journals and what differs resent")
        elif sourced and self._mark_from_sources("an unclean shutdown"):
            self._resync = False
        else:
            # the marks of writes not acknowledged are lost: what the recovery site holds
            # is compared with the volumes instead (blocks not compared yet stay unknown,
            # so a crash during the compare compares again)
            self._resync = True
            self._event("unclean shutdown: the volumes will be compared with the recovery "
                        "site's journals and what differs resent")

    def _mark_from_sources(self, after: str) -> bool:
        """Mark what every volume's source says changed since the recovery site last had
        it (a hypervisor's dirty bitmaps); False when a volume has no source or its
        source cannot tell (then the caller resends more: a compare, or every block)."""
        changed: dict[int, Sequence[tuple[int, int]]] = {}
        for vid, vol in self.volumes.items():
            try:
                extents = vol.source.changed_extents() if vol.source is not None else None
            except ZcoreError as exc:  # unreachable now: what it recorded is unknown
                self._event(f"volume {vol.vm}/{vol.name}: its source cannot be asked what "
                            f"changed ({exc})")
                return False
            if extents is None:
                if vol.source is not None:
                    self._event(f"volume {vol.vm}/{vol.name}: its source's dirty bitmap is "
                                "gone")  # the caller says what is resent instead
                return False
            changed[vid] = extents
        total = 0
        for vid, extents in changed.items():
            for offset, length in extents:
                self.bitmaps[vid].mark(offset, length)
                total += length
        self._event(f"after {after}, the hypervisor's dirty bitmaps name {total} bytes "
                    "that may not be at the recovery site: a bitmap sync resends them")
        return True

    @property
    def sync_held(self) -> bool:
        """True while `start(hold_sync=True)` holds the sync (and a pending compare: its
        reads would fail or miss writes until the sources' mirrors run)."""
        return self._sync_held

    def release_sync(self) -> None:
        """Let the sync held by `start(hold_sync=True)` begin."""
        with self._lock:
            self._sync_held = False
            self._wake.notify_all()

    def note(self, text: str) -> None:
        """Record an event of this VPG from outside it (its hypervisor's mirrors)."""
        with self._lock:
            self._event(text)

    def source_mark(self) -> tuple[int, int] | None:
        """A point after every write captured so far, while streaming (None otherwise):
        what a hypervisor's bitmap generation taken just before covers."""
        with self._lock:
            if self._mode != VPGMode.STREAMING or self._ring is None:
                return None
            return int(self._ring.stats()["next_seq"]), self._folds

    def source_mark_durable(self, mark: tuple[int, int]) -> bool:
        """True when every write captured before `mark` is at the recovery site: acked,
        and never folded into the bitmaps since (a fold's data goes again in a sync)."""
        with self._lock:
            next_seq, folds = mark
            return (self._mode == VPGMode.STREAMING and self._folds == folds
                    and self._acked_seq >= next_seq - 1)

    def resync_from_sources(self, reason: str) -> None:
        """The hypervisor wrote without mirroring to this VPG (its mirror broke, `reason`):
        fold into bitmap mode and mark what the sources' dirty bitmaps say changed; the
        bitmap sync resends it.  When a source cannot tell (its bitmaps are gone), the
        volumes are compared with the recovery site's journals, as after an unclean
        restart (`resync_pending`: the link starts a new session for it); when that is
        under way already, every block is marked instead."""
        with self._lock:
            if self._mode == VPGMode.STOPPED:
                return  # the next start asks the sources
            comparing = self._mode in (VPGMode.DELTA_SYNC, VPGMode.RESYNC_COMPARE)
            if not comparing:
                self._fold(reason)  # those two only mark writes already: the sync follows
            if self._mark_from_sources(reason):
                return
            if comparing and self._sync_held:  # just started: the compare follows this
                self._event("the volumes are compared with the recovery site's journals "
                            "(a delta sync) instead")
                return
            if comparing:  # blocks it compared already may have changed unmirrored since
                for bm in self.bitmaps.values():
                    bm.mark_all()
                self._event("every block of the VPG is resent by the bitmap sync")
                return
            self._resync = True
            self._mode = VPGMode.RESYNC_COMPARE
            self._save_state(clean=False)  # a crash from now on compares too
            self._event("the volumes are compared with the recovery site's journals (a "
                        "delta sync) instead: the link starts a new session for it")
            self._wake.notify_all()

    def _ring_bytes(self) -> int:
        return self.settings.buffer_bytes // 2 // 64 * 64

    def stop(self) -> None:
        """Clean shutdown: fold everything not yet acknowledged into the bitmaps, persist
        them, and mark the state clean (the next start resumes with a bitmap sync)."""
        if not self._stop_thread():
            return
        with self._lock:
            for vol in self.volumes.values():
                vol._attach(None)
            # a writer may still hold the ring (looked up before the detach, or waiting on
            # an overlapping write): refuse it and let in-flight writes finish, so every
            # completed write is folded below
            ring = self._live_ring()
            ring.close()
            self._fold(reason=None)
            self._lose_tagged("the VPG stopped before the recovery site acknowledged it")
            self.files.persist_bitmaps(self.bitmaps)
            # every seq handed out is below the ring's next one: release the rest of the
            # reserved block, so an orderly restart continues the numbering (checkpoint
            # ids) instead of skipping 2^24 ahead
            self._seq_reserved = int(ring.stats()["next_seq"])
            self._save_state(clean=True)
            self._ring = None
            self._mode = VPGMode.STOPPED
            self._sync_iter = None

    def _stop_thread(self) -> bool:
        """Stop the stream thread and wait for it; False when the VPG was not running."""
        with self._lock:
            if self._mode == VPGMode.STOPPED:
                return False
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        return True

    def abandon(self) -> None:
        """Die as a crashed process would: the stream thread stops and the volumes close,
        with no fold, no persisted bitmaps, and the state file still saying "running", so
        the next start (of this VPG or of a new one over the same state directory) resends
        every volume.  For crash tests."""
        self._stop_thread()
        for vol in self.volumes.values():
            vol.close()
        with self._lock:  # a later stop() or close() must not call this state clean
            self._lose_tagged("the VPG was abandoned before the recovery site acknowledged it")
            self._ring = None
            self._mode = VPGMode.STOPPED

    def _lose_tagged(self, reason: str) -> None:
        for r in self._tagged.lose_all(reason):
            self._event(f"tagged checkpoint {r.checkpoint.tag!r} (seq {r.checkpoint.seq}) "
                        f"is lost: {reason}")

    def close(self) -> None:
        """Stop, then close every volume."""
        self.stop()
        for vol in self.volumes.values():
            vol.close()

    # ---- what links and users call -------------------------------------------------------

    def checkpoint(self, tag: str | None = None) -> Checkpoint:
        """Take a tagged (or, without a tag, automatic) checkpoint now.  Raises
        StateError in bitmap mode, where no checkpoint can be taken.

        A tagged checkpoint is a promise: it reaches the recovery journals or is reported
        lost (an event, and `checkpoint_state`).  Ask `checkpoint_state` whether it is
        durable there; `acked_seq` passing its seq does not say so.  The checkpoint's
        `time_ns` is read as its marker enters the ring (the journals' copy carries the
        ring's reading of the same moment, microseconds apart)."""
        with self._lock:
            self._check_running()
            if self._marking():
                raise StateError(f"VPG {self.name} is in {self._mode.label} mode: no "
                                 "checkpoint possible")
            kind = CheckpointKind.TAGGED if tag else CheckpointKind.AUTO
            deadline = time.monotonic() + CHECKPOINT_WAIT
            while True:
                ckpt = self._marker(kind, tag)
                if ckpt is not None:
                    if kind == CheckpointKind.TAGGED:
                        self._tagged.taken(ckpt)
                    self._wake.notify_all()
                    return ckpt
                if self._in_bitmap_mode():  # the ring overflowed under us
                    raise StateError(f"VPG {self.name} fell into bitmap mode")
                if time.monotonic() > deadline:
                    raise StateError(f"VPG {self.name}: no room for a checkpoint marker in "
                                     f"{CHECKPOINT_WAIT} s (the link is not draining)")
                self._seal()
                self._wake.wait(0.005)

    def link_down(self, reason: str = "link declared down") -> None:
        """The recovery site is unreachable for long: fold into bitmaps now."""
        with self._lock:
            self._check_running()
            self._link_up = False
            if not self._marking():  # a delta sync or a compare marks already
                self._fold(reason)

    def link_up(self) -> None:
        """The recovery site is back: a bitmap sync starts when the queue is empty."""
        with self._lock:
            self._link_up = True
            self._sync_awaits_ack = 0  # an overflow's sync waits for no ack now
            self._wake.notify_all()

    def bundles_after(self, seq: int) -> list[Bundle]:
        """Pending bundles with seqs above `seq` (what a sender has not sent yet): the
        caller takes them to send (an overflow's bitmap sync waits for their ack)."""
        with self._lock:
            return self._took([b for b in self._pending if b.last_seq > seq])

    def wait_bundles(self, after_seq: int, timeout: float) -> list[Bundle]:
        """Like bundles_after, waiting up to `timeout` seconds for at least one."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [b for b in self._pending if b.last_seq > after_seq]
                left = deadline - time.monotonic()
                if found or left <= 0 or self._stopping or self._mode == VPGMode.STOPPED:
                    return self._took(found)
                self._wake.wait(left)

    def ack(self, seq: int) -> None:
        """The recovery site holds every record up to `seq` durably."""
        with self._lock:
            if seq <= self._acked_seq:
                return
            self._acked_seq = seq
            while self._pending and self._pending[0].last_seq <= seq:
                b = self._pending.popleft()
                self._pending_bytes -= b.encoded_bytes
                self._tagged.acknowledged(b.checkpoints)
            if self._sync_acked_at and seq >= self._sync_acked_at:
                self._unsynced_since_ns = self._sync_acked_at = 0  # the sync is durable
            self._acked_for_sync(seq)
            self._wake.notify_all()

    def flush(self, timeout: float = 10.0) -> int:
        """Seal everything captured so far; returns the last seq sealed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check_running()
            target = self._live_ring().stats()["next_seq"] - 1
            while self._last_seq < target and not self._marking():
                if time.monotonic() > deadline:
                    raise StateError(f"VPG {self.name}: sealing did not catch up in {timeout} s")
                self._seal()
                if self._last_seq < target:
                    self._wake.wait(0.001)
            return self._last_seq

    # ---- the delta sync of reverse protection (run by the sender) ------------------------

    @property
    def delta_pending(self) -> bool:
        """True until the delta sync this VPG started with is done (durable in vpg.json:
        a restart resumes it)."""
        return self._delta

    @property
    def delta_fresh(self) -> bool:
        """True when the next delta-sync session must start over, the recovery site's
        progress dropped (the first session, and any after a crash of this VPG)."""
        return self._delta and self._delta_fresh

    def delta_started(self) -> None:
        """A delta-sync session began from scratch: later sessions resume its progress."""
        with self._lock:
            self._check_running()
            if self._delta and self._delta_fresh:
                self._delta_fresh = False
                self._save_state(clean=False)

    def delta_progress(self, done: int, total: int) -> None:
        """Where the running delta sync stands (bytes compared of the volumes' total),
        reported as the sync's progress in `status()`."""
        with self._lock:
            if self._mode == VPGMode.DELTA_SYNC:
                self._sync_done, self._sync_total = done, total

    def delta_done(self, report: DeltaSyncReport) -> None:
        """The delta sync is done (the recovery site verified every block): durably
        clear it, then the bitmap sync of the writes made meanwhile starts, then
        streaming and the first consistent checkpoint."""
        with self._lock:
            self._check_running()
            if not self._delta:
                return
            self._delta = self._delta_fresh = False
            self._save_state(clean=False)  # before any bundle: a restart cannot redo it
            self._delta_report = report
            self._mode = VPGMode.BITMAP
            self._event(f"delta sync of {report.volumes} volumes: {report.differing_bytes} "
                        f"bytes differed, {report.bytes_sent} sent in {report.seconds:.1f} s")
            self._wake.notify_all()

    # ---- the resync after an unclean restart (its compare run by the sender) ------------

    @property
    def resync_pending(self) -> bool:
        """True until the compare this VPG started with after an unclean restart is done
        (durable in vpg.json: a restart compares again)."""
        return self._resync

    def resync_differs(self, vid: int, offset: int, length: int) -> None:
        """The compare found [offset, offset+length) of volume `vid` different from the
        recovery site's image: mark it dirty (the bitmap sync after the compare sends
        it)."""
        with self._lock:
            self._check_running()
            if self._mode != VPGMode.RESYNC_COMPARE:
                raise StateError(f"VPG {self.name} is not comparing (mode {self._mode})")
            self.bitmaps[vid].mark(offset, length)

    def resync_progress(self, done: int, total: int) -> None:
        """Where the running compare stands (bytes compared of the volumes' total)."""
        with self._lock:
            if self._mode == VPGMode.RESYNC_COMPARE:
                self._sync_done, self._sync_total = done, total

    def resync_done(self, report: ResyncReport) -> None:
        """Every block was compared (and those that differ marked): durably clear the
        compare, then the bitmap sync sends what is marked, then streaming and the first
        consistent checkpoint."""
        with self._lock:
            self._check_running()
            if self._mode != VPGMode.RESYNC_COMPARE:
                return
            self._resync = False
            self._resync_report = report
            self._save_state(clean=False)  # a crash from now on compares again
            self._mode = VPGMode.BITMAP
            self._event(f"resync compare with the recovery site: compared "
                        f"{report.compared_bytes} bytes, {report.differing_bytes} bytes "
                        f"differ ({report.seconds:.1f} s)")
            self._wake.notify_all()

    def resync_failed(self, reason: str) -> None:
        """The recovery site could not compare (its journals unreadable, or it answered
        what this side refuses): every volume is resent whole, as after a crash before
        compares existed."""
        with self._lock:
            self._check_running()
            if self._mode != VPGMode.RESYNC_COMPARE:
                return
            for bm in self.bitmaps.values():
                bm.mark_all()
            self._resync = False
            self._save_state(clean=False)
            self._mode = VPGMode.BITMAP
            self._event(f"resync compare with the recovery site: it failed ({reason}): "
                        "every volume will be resent")
            self._wake.notify_all()

    # ---- awaitable variants: the blocking calls above, in a worker thread ----------------

    async def checkpoint_async(self, tag: str | None = None) -> Checkpoint:
        """`checkpoint()` for an event loop: it blocks (tens of ms, up to CHECKPOINT_WAIT
        while the ring is full) and would deadlock a loop that drains the ring."""
        return await asyncio.to_thread(self.checkpoint, tag)

    async def flush_async(self, timeout: float = 10.0) -> int:
        """`flush()` for an event loop (it blocks until sealing catches up)."""
        return await asyncio.to_thread(self.flush, timeout)

    def seal_for_drain(self, sent_seq: int) -> bool:
        """Seal what the pending bound allows; True when the VPG streams, has sealed every
        seq captured so far and holds no bundle above `sent_seq` (a link that delivered up
        to `sent_seq` is drained).  One atomic look, for `LocalLink.drain`."""
        with self._lock:
            self._check_running()
            if self._mode != VPGMode.STREAMING:
                return False
            self._seal()
            captured = self._live_ring().stats()["next_seq"] - 1
            # (a look, not a take: not through bundles_after)
            return self._last_seq >= captured and all(b.last_seq <= sent_seq
                                                      for b in self._pending)

    # ---- what is going on ----------------------------------------------------------------

    @property
    def events(self) -> tuple[str, ...]:
        """The last 100 events (mode changes, syncs, refusals), oldest first: a snapshot,
        safe to iterate from any thread."""
        with self._lock:
            return tuple(self._events)

    @property
    def mode(self) -> VPGMode:
        return self._mode

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def seal_cpu_seconds(self) -> float:
        """Thread CPU seconds the stream has spent sealing bundles (encoding included):
        the compression controller's measure of the sealer's load."""
        return self._seal_cpu

    @property
    def stream_rounds(self) -> int:
        """Rounds the stream thread has run since the VPG was made: an idle or stalled
        VPG adds about one per `bundle_age`, so a spinning thread shows here."""
        return self._rounds

    def checkpoint_state(self, ckpt: Checkpoint | int) -> CheckpointReport | None:
        """Where a tagged checkpoint this VPG took (or its id) stands: pending, durable
        (the recovery site acknowledged the bundle holding its marker, so it is in the
        journals, at `journal_seq`) or lost (`reason`, and an event said so).  A
        checkpoint carried through a fold is journaled under a later seq, flagged not
        crash-consistent.  None for automatic checkpoints, ids this VPG never took, and
        the oldest settled ones once 4096 newer have settled (zcore.vpg.promises)."""
        with self._lock:
            return self._tagged.report(ckpt.id if isinstance(ckpt, Checkpoint) else ckpt)

    def rpo_seconds(self) -> float:
        """Age of the oldest captured write not yet durable at the recovery site: after
        a fold, from the oldest write folded until the ack of the sync that resent it."""
        with self._lock:
            now = time.time_ns()
            oldest = now
            if self._unsynced_since_ns:
                oldest = self._unsynced_since_ns
            if self._pending:
                oldest = min(oldest, min(b.oldest_time_ns for b in self._pending))
            if self._ring is not None and self._ring.stats()["ring_used"] and self._last_seal_ns:
                oldest = min(oldest, self._last_seal_ns)
            return max(0.0, (now - oldest) / 1e9)

    def status(self) -> VPGStatus:
        with self._lock:
            if self._ring is not None and self._marking():
                self._mark(*self._ring.take_dirty())
            stats = self._ring.stats() if self._ring is not None else None
            rpo = self.rpo_seconds()
            return VPGStatus(
                name=self.name,
                mode=self._mode,
                rpo_seconds=rpo,
                rpo_alert=rpo > self.settings.rpo_alert_seconds,
                buffer_used=(stats["ring_used"] if stats else 0) + self._pending_bytes,
                buffer_bytes=self.settings.buffer_bytes,
                pending_bundles=len(self._pending),
                dirty_bytes=sum(bm.dirty_bytes for bm in self.bitmaps.values()),
                sync_total_bytes=self._sync_total,
                sync_done_bytes=self._sync_done,
                writes=stats["writes"] if stats else 0,
                bytes_written=stats["bytes"] if stats else 0,
                last_seq=self._last_seq,
                acked_seq=self._acked_seq,
                link_up=self._link_up,
                events=tuple(self._events),
                ring_used=stats["ring_used"] if stats else 0,
                ring_bytes=stats["ring_size"] if stats else 0,
                checkpoints_pending=self._tagged.pending,
                checkpoints_lost=self._tagged.lost,
                delta_sync=self._delta_report,
                resync=self._resync_report,
                link_codec=str(self.link_codec if self.settings.compression
                               else records.CodecChoice(records.Codec.NONE)),
                compression=dict(self._codec_use),
                bytes_saved=sum(u.data_bytes - u.encoded_bytes
                                for u in self._codec_use.values()),
            )

