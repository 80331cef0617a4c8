"""The VPG's stream thread: sealing the capture ring into bundles, checkpoint cadence,
seq reservation and the switches into and out of bitmap mode.

Sits on `VPGSyncs`, under the public `VPG` (zcore.vpg.group).  Each round, under the
VPG lock, seals committed ring entries into bundles (by size, or when the round finds
them older than `bundle_age`), cuts an automatic checkpoint when one is due, folds into
bitmaps on overflow, and drives a running sync.  Bundles carry one encoded part per VM
(the records of its volumes plus every checkpoint marker), so each recovery-site journal
appends its part exactly as received.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from zcore import records
from zcore.records import Checkpoint, CheckpointKind, Codec, CodecChoice
from zcore.vpg.core import Bundle, CodecUse, log
from zcore.vpg.settings import SEQ_RESERVE, VPGMode
from zcore.vpg.syncs import VPGSyncs


class VPGStream(VPGSyncs):
    """The stream thread's work (every method runs under `_lock`)."""

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._rounds += 1
                    busy = self._tick()
                    if not busy:
                        self._wake.wait(self.settings.bundle_age)
        except BaseException as exc:  # surfaced by status() and by every later call
            log.exception("VPG %s stream thread failed", self.name)
            self._error = exc
            self._event(f"stream stopped: {exc!r}")

    def _tick(self) -> bool:
        """One round of stream work; True when there may be more to do right away."""
        ring = self._live_ring()
        stats = ring.stats()
        if stats["next_seq"] + SEQ_RESERVE // 2 > self._seq_reserved:
            self._seq_reserved = stats["next_seq"] + SEQ_RESERVE
            self._save_state(clean=False)
        busy = False
        if self._mode in (VPGMode.STREAMING, VPGMode.BITMAP_SYNCING, VPGMode.INITIAL_SYNC):
            if stats["overflowed"]:
                self._fold_overflow()
                return True
            vols, offs, lens = ring.take_dirty()
            if vols.size:  # write errors: their ranges must be resent
                self._mark(vols, offs, lens)
                self._event(f"{vols.size} writes failed on a backing store: resending them")
                if self._mode == VPGMode.STREAMING:
                    self._begin_sync()
            busy = self._seal()
            now = time.monotonic()
            if now >= self._next_checkpoint:
                self._next_checkpoint = now + self.settings.checkpoint_interval
                self._marker(CheckpointKind.AUTO, None)
            if self._mode != VPGMode.STREAMING:
                busy = self._sync_step() or busy
            elif self._tagged.carried():  # the sync's finish found no room for them
                self._append_carried()
        elif self._marking():
            self._mark(*ring.take_dirty())
            # a delta sync (or a resync's compare) runs on the sender's connection: the
            # bitmap sync of what was written (or found different) meanwhile starts once
            # it is done (VPG.delta_done, VPG.resync_done)
            if (self._mode == VPGMode.BITMAP and self._link_up and self._pending_bytes == 0
                    and not self._sync_awaits_ack and not self._sync_held):
                self._begin_sync()
                busy = True
        if (self._mode != VPGMode.STREAMING and
                time.monotonic() - self._last_persist >= self.settings.bitmap_persist_interval):
            self.persist_bitmaps()
        return busy

    def _seal(self) -> bool:
        """Seal committed ring entries into bundles while the pending bound allows."""
        ring = self._live_ring()
        limit = self.settings.buffer_bytes // 2
        sealed = False
        names = self._vm_names
        vm_of_volume = self._vm_of_volume  # once per round, not once per bundle
        sizes: npt.NDArray[np.uint64] | None = None
        while self._pending_bytes < limit:
            # the link's encoding (zcore.replication.compression): LZ4 natively, or raw
            # natively and then zstd here (python-zstandard releases the GIL), or raw
            choice = (self.link_codec if self.settings.compression
                      else CodecChoice(Codec.NONE))
            cpu0 = time.thread_time()
            batch = ring.seal(self.settings.bundle_bytes, vm_of_volume, len(names),
                              choice.codec == Codec.LZ4, self.settings.lz4_min_saving)
            if batch is None:
                self._seal_cpu += time.thread_time() - cpu0
                break
            self._last_seal_ns = time.time_ns()
            if batch.entries == 0:
                self._seal_cpu += time.thread_time() - cpu0
                continue
            parts: list[bytes | bytearray] = list(batch.parts)
            encoded = batch.encoded_bytes
            if choice.codec == Codec.ZSTD:
                if sizes is None:
                    sizes = self._volume_sizes
                parts = [records.zstd_part(p, choice.level, sizes, self.settings.lz4_min_saving)
                         if p else p for p in parts]
                encoded = sum(len(p) for p in parts)
            self._seal_cpu += time.thread_time() - cpu0
            key = str(choice)
            use = self._codec_use.get(key, CodecUse())
            self._codec_use[key] = CodecUse(use.bundles + 1, use.data_bytes + batch.data_bytes,
                                            use.encoded_bytes + encoded)
            ckpts = tuple(Checkpoint.from_payload(seq, t, payload)
                          for seq, t, payload in batch.checkpoints)
            bundle = Bundle(
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                parts=dict(zip(names, parts, strict=True)),
                data_bytes=batch.data_bytes,
                encoded_bytes=encoded,
                oldest_time_ns=batch.oldest_time_ns,
                volumes=batch.volumes,
                offsets=batch.offsets,
                lengths=batch.lengths,
                checkpoints=ckpts,
                codec=choice,
            )
            self._pending.append(bundle)
            self._pending_bytes += bundle.encoded_bytes
            self._last_seq = bundle.last_seq
            sealed = True
            self._wake.notify_all()
            if self.on_checkpoint is not None:
                for c in ckpts:
                    self.on_checkpoint(c)
        return sealed and self._pending_bytes < limit

    @property
    def _vm_names(self) -> list[str]:
        return list(self.vms)

    @property
    def _volume_sizes(self) -> npt.NDArray[np.uint64]:
        out = np.zeros(len(self.volumes), dtype=np.uint64)
        for vid, vol in self.volumes.items():
            out[vid] = vol.size
        return out

    @property
    def _vm_of_volume(self) -> npt.NDArray[np.uint32]:
        index = {name: i for i, name in enumerate(self.vms)}
        out = np.zeros(len(self.volumes), dtype=np.uint32)
        for vid, vol in self.volumes.items():
            out[vid] = index[vol.vm]
        return out
