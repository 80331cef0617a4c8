"""Virtual protection groups: the VPG write-order stream on the protected site.

Sits between the protected volumes and the link to the recovery site.  A VPG owns the
capture ring shared by all its volumes (one seq order for the whole group), a stream
thread that seals the ring into bundles (by size or age) and adds automatic checkpoints,
and the dirty bitmaps it falls back to when the buffer overflows or the link is declared
down.  A bitmap sync resends the dirty blocks as sync records; checkpoints taken while
it runs are flagged not crash-consistent, and a consistent one closes it.

Bundles carry one encoded part per VM (the records of its volumes plus every checkpoint
marker), so each recovery-site journal appends its part exactly as received.
`LocalLink` feeds a VPG into journals in the same process (tests, the demo).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zcore import records
from zcore._native.capture import MODE_BITMAP, MODE_STREAM, CaptureRing
from zcore.bitmap import DEFAULT_MAX_BYTES, DirtyBitmap
from zcore.capture import ProtectedVolume, backing_size
from zcore.errors import (
    ConfigError,
    CorruptRecordError,
    FormatVersionError,
    StateError,
)
from zcore.fsutil import atomic_write
from zcore.journal import Journal, JournalSettings, VolumeSpec

log = logging.getLogger(__name__)

STATE_NAME = "vpg.json"
STATE_FORMAT = "zcore-vpg"
STATE_VERSION = 1
# Seqs are reserved in blocks persisted ahead of use, so a restart after a crash never
# reuses a seq the recovery site may already hold.
SEQ_RESERVE = 1 << 24
PRIORITIES = ("high", "medium", "low")
# How long checkpoint() waits for room in a full capture buffer before giving up.
CHECKPOINT_WAIT = 10.0
# A sync reads into the ring only while this fraction of it (1/SYNC_HEADROOM) stays free
# for the guest's writes: a quarter of a 4 MiB buffer's ring holds 0.5 MiB of writes
# arriving between two seals.
SYNC_HEADROOM = 4


@dataclass
class VPGSettings:
    """Everything a VPG is tuned by (validated by `check`)."""

    checkpoint_interval: float = 5.0  # seconds between automatic checkpoints
    journal: JournalSettings = field(default_factory=JournalSettings)  # for the recovery site
    compression: bool = True
    lz4_min_saving: float = records.LZ4_MIN_SAVING
    buffer_bytes: int = 256 << 20  # bound on captured-but-unacknowledged bytes
    bundle_bytes: int = 1 << 20  # seal a bundle at this size...
    bundle_age: float = 0.02  # ...or when its oldest write is this old (seconds)
    priority: str = "medium"
    rpo_alert_seconds: float = 15.0
    bitmap_max_bytes: int = DEFAULT_MAX_BYTES  # per volume, before coarsening
    bitmap_persist_interval: float = 10.0
    sync_chunk_bytes: int = 1 << 20  # largest sync record

    def check(self) -> None:
        if not 0.1 <= self.checkpoint_interval <= 3600:
            raise ConfigError("checkpoint interval must be 0.1 s to 1 h")
        self.journal.check()
        if not 0 <= self.lz4_min_saving < 1:
            raise ConfigError("lz4_min_saving is a fraction in [0, 1)")
        if self.buffer_bytes < 4 << 20 or self.buffer_bytes % 128:
            raise ConfigError("buffer must be at least 4 MiB and a multiple of 128 bytes")
        if not 64 << 10 <= self.bundle_bytes <= self.buffer_bytes // 4:
            raise ConfigError("bundle size must be 64 KiB to a quarter of the buffer")
        if not 0.001 <= self.bundle_age <= 10:
            raise ConfigError("bundle age must be 1 ms to 10 s")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"priority must be one of {PRIORITIES}")
        if self.rpo_alert_seconds <= 0:
            raise ConfigError("the RPO alert threshold must be positive")
        if self.sync_chunk_bytes % 4096 or not 4096 <= self.sync_chunk_bytes <= records.MAX_WRITE:
            raise ConfigError("sync chunk must be a multiple of 4 KiB up to the write limit")
        # a sync record must fit the capture ring (half the buffer) with room to spare, or
        # the bitmap sync retries it forever
        if self.sync_chunk_bytes > self.buffer_bytes // 4:
            raise ConfigError("sync chunk must be at most a quarter of the buffer")


@dataclass(frozen=True)
class CheckpointInfo:
    seq: int
    time_ns: int
    consistent: bool
    tag: str | None


@dataclass(frozen=True)
class Bundle:
    """Records sealed together: seqs first_seq..last_seq, one encoded part per VM."""

    first_seq: int
    last_seq: int
    parts: dict[str, bytearray]
    data_bytes: int
    encoded_bytes: int
    oldest_time_ns: int
    volumes: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    checkpoints: tuple[CheckpointInfo, ...]


@dataclass(frozen=True)
class VPGStatus:
    name: str
    mode: str  # "streaming", "bitmap", "bitmap_syncing", "initial_sync", "stopped"
    rpo_seconds: float
    rpo_alert: bool
    buffer_used: int
    buffer_bytes: int
    pending_bundles: int
    dirty_bytes: int
    sync_total_bytes: int
    sync_done_bytes: int
    writes: int
    bytes_written: int
    last_seq: int
    acked_seq: int
    link_up: bool
    events: tuple[str, ...]


class VM:
    """A protected VM: a name and its volumes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.volumes: list[ProtectedVolume] = []

    def __repr__(self) -> str:
        return f"VM({self.name}, {len(self.volumes)} volumes)"


class VPG:
    """A consistency group: every write of every volume in one seq order."""

    def __init__(self, name: str, state_dir: str | os.PathLike,
                 settings: VPGSettings | None = None) -> None:
        self.name = name
        self.settings = settings or VPGSettings()
        self.settings.check()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.vms: dict[str, VM] = {}
        self.volumes: dict[int, ProtectedVolume] = {}
        self.bitmaps: dict[int, DirtyBitmap] = {}
        self._ring: CaptureRing | None = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[Bundle] = deque()
        self._pending_bytes = 0
        self._acked_seq = 0
        self._last_seq = 0
        self._mode = "stopped"
        self._link_up = True
        self._skip_zero = False  # the replicas are still empty: zero blocks need not go
        self._initial = False  # an initial sync has not completed yet
        self._sync_iter = None
        self._sync_total = 0
        self._sync_done = 0
        self._unsynced_since_ns = 0
        self._last_seal_ns = 0
        self._next_checkpoint = 0.0
        self._last_persist = 0.0
        self._seq_reserved = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._events: deque[str] = deque(maxlen=100)
        self.on_checkpoint: Callable[[CheckpointInfo], None] | None = None

    # ---- definition ----------------------------------------------------------------------

    def add_vm(self, name: str) -> VM:
        with self._lock:
            self._require_stopped("add a VM")
            if not name or name in self.vms:
                raise ConfigError(f"VM name {name!r} is empty or already in VPG {self.name}")
            vm = self.vms[name] = VM(name)
            return vm

    def add_volume(self, vm: VM | str, name: str, path: str | os.PathLike,
                   size: int | None = None) -> ProtectedVolume:
        """Protect the raw image or block device at `path` (size: the whole store)."""
        with self._lock:
            self._require_stopped("add a volume")
            vm_obj = self.vms.get(vm if isinstance(vm, str) else vm.name)
            if vm_obj is None:
                raise ConfigError(f"VPG {self.name} has no VM {vm!r}")
            if any(v.name == name for v in vm_obj.volumes):
                raise ConfigError(f"VM {vm_obj.name} already has a volume {name!r}")
            if size is None:
                size = backing_size(path) // records.SECTOR * records.SECTOR
            volume_id = len(self.volumes)
            if volume_id >= 65536:
                raise ConfigError("a VPG holds at most 65536 volumes")
            volume = ProtectedVolume(vm_obj.name, volume_id, name, path, size)
            vm_obj.volumes.append(volume)
            self.volumes[volume_id] = volume
            return volume

    def journal_volumes(self, vm: str) -> list[VolumeSpec]:
        """The volumes a recovery-site journal of `vm` holds."""
        return [VolumeSpec(v.id, v.name, v.size) for v in self.vms[vm].volumes]

    def _require_stopped(self, what: str) -> None:
        if self._mode != "stopped":
            raise StateError(f"cannot {what} while VPG {self.name} runs")

    # ---- lifetime ------------------------------------------------------------------------

    def start(self, *, initial_sync: bool = False, min_seq: int = 0) -> None:
        """Start capturing.  `initial_sync` copies the volumes' current contents (zero
        blocks skipped) before the first consistent checkpoint; `min_seq` is the highest
        seq the recovery site already holds.  A restart after a clean stop resumes the
        persisted bitmaps; after a crash every volume is resent whole."""
        with self._lock:
            self._require_stopped("start")
            if not self.volumes:
                raise ConfigError(f"VPG {self.name} protects no volume")
            state = self._load_state()
            s = self.settings
            for vid, vol in self.volumes.items():
                self.bitmaps[vid] = DirtyBitmap(vol.size, max_bytes=s.bitmap_max_bytes)
            if state is None:
                self._skip_zero = self._initial = initial_sync
                if initial_sync:
                    for bm in self.bitmaps.values():
                        bm.mark_all()
                    self._event("initial sync of every volume")
            elif state["clean"]:
                # zero blocks may be skipped only while the replicas hold nothing: after a
                # restart, part of an initial sync (or writes since) may be journaled
                self._skip_zero = False
                self._initial = bool(state.get("initial_sync_pending"))
                self._load_bitmaps()
            else:
                self._skip_zero = False
                self._initial = bool(state.get("initial_sync_pending"))
                for bm in self.bitmaps.values():
                    bm.mark_all()
                self._event("unclean shutdown: every volume will be resent")
            first_seq = max(int(state["seq_reserved"]) if state else 1, min_seq + 1)
            self._seq_reserved = first_seq + SEQ_RESERVE
            self._last_seq = first_seq - 1
            self._acked_seq = max(self._acked_seq, min_seq)
            self._ring = CaptureRing(self._ring_bytes(), first_seq)
            dirty = any(self.bitmaps.values())
            self._mode = "bitmap" if dirty else "streaming"
            if dirty:
                self._ring.set_mode(MODE_BITMAP)
                self._unsynced_since_ns = time.time_ns()
            self._save_state(clean=False)
            for vol in self.volumes.values():
                vol._attach(self._ring)
            self._stopping = False
            self._error = None
            self._next_checkpoint = time.monotonic() + s.checkpoint_interval
            self._last_persist = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"vpg-{self.name}",
                                            daemon=True)
            self._thread.start()

    def _ring_bytes(self) -> int:
        return self.settings.buffer_bytes // 2 // 64 * 64

    def stop(self) -> None:
        """Clean shutdown: fold everything not yet acknowledged into the bitmaps, persist
        them, and mark the state clean (the next start resumes with a bitmap sync)."""
        with self._lock:
            if self._mode == "stopped":
                return
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for vol in self.volumes.values():
                vol._attach(None)
            # a writer may still hold the ring (looked up before the detach, or waiting on
            # an overlapping write): refuse it and let in-flight writes finish, so every
            # completed write is folded below
            self._ring.close()
            self._fold(reason=None)
            for vid, bm in self.bitmaps.items():
                bm.persist(self._bitmap_path(vid), vid)
            self._save_state(clean=True)
            self._ring = None
            self._mode = "stopped"
            self._sync_iter = None

    def close(self) -> None:
        """Stop, then close every volume."""
        self.stop()
        for vol in self.volumes.values():
            vol.close()

    # ---- persistence ---------------------------------------------------------------------

    def _bitmap_path(self, vid: int) -> Path:
        return self.state_dir / f"bitmap-{vid:04d}.zcb"

    def _definition(self) -> list[dict]:
        return [{"id": v.id, "vm": v.vm, "name": v.name, "size": v.size}
                for v in self.volumes.values()]

    def _load_state(self) -> dict | None:
        path = self.state_dir / STATE_NAME
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_bytes())
        except ValueError as exc:
            raise CorruptRecordError(f"{path} is unreadable: {exc}") from None
        if doc.get("format") != STATE_FORMAT:
            raise CorruptRecordError(f"{path} is not a zcore VPG state file")
        if doc.get("version") != STATE_VERSION:
            raise FormatVersionError(f"{path} has version {doc.get('version')}")
        if doc.get("volumes") != self._definition():
            raise ConfigError(f"{path} describes other volumes than VPG {self.name} has now")
        return doc

    def _save_state(self, *, clean: bool) -> None:
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "name": self.name,
            "volumes": self._definition(),
            "seq_reserved": self._seq_reserved,
            "clean": clean,
            "initial_sync_pending": self._initial,
            "settings": asdict(self.settings),
        }
        atomic_write(self.state_dir / STATE_NAME, json.dumps(doc, indent=1).encode())

    def _load_bitmaps(self) -> None:
        for vid, vol in self.volumes.items():
            path = self._bitmap_path(vid)
            if not path.exists():  # a clean stop persists every bitmap: this one was lost
                self.bitmaps[vid].mark_all()
                self._event(f"bitmap of volume {vol.name} is missing ({path}): "
                            "the whole volume will be resent")
                continue
            try:
                self.bitmaps[vid] = DirtyBitmap.load(
                    path, volume_size=vol.size, volume_id=vid,
                    max_bytes=self.settings.bitmap_max_bytes)
            except CorruptRecordError as exc:
                self.bitmaps[vid].mark_all()
                self._event(f"bitmap of volume {vol.name} is unreadable ({exc}): "
                            "the whole volume will be resent")

    def persist_bitmaps(self) -> None:
        """Write every bitmap now (crash-safe), with what is queued folded in."""
        with self._lock:
            for vid, bm in self.bitmaps.items():
                bm.persist(self._bitmap_path(vid), vid)
            self._last_persist = time.monotonic()

    # ---- the stream thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    busy = self._tick()
                    if not busy:
                        self._wake.wait(self.settings.bundle_age)
        except BaseException as exc:  # surfaced by status() and by every later call
            log.exception("VPG %s stream thread failed", self.name)
            self._error = exc
            self._event(f"stream stopped: {exc!r}")

    def _tick(self) -> bool:
        """One round of stream work; True when there may be more to do right away."""
        ring = self._ring
        assert ring is not None
        stats = ring.stats()
        if stats["next_seq"] + SEQ_RESERVE // 2 > self._seq_reserved:
            self._seq_reserved = stats["next_seq"] + SEQ_RESERVE
            self._save_state(clean=False)
        busy = False
        if self._mode in ("streaming", "bitmap_syncing", "initial_sync"):
            if stats["overflowed"]:
                self._fold("buffer overflow")
                return True
            vols, offs, lens = ring.take_dirty()
            if vols.size:  # write errors: their ranges must be resent
                self._mark(vols, offs, lens)
                self._event(f"{vols.size} writes failed on a backing store: resending them")
                if self._mode == "streaming":
                    self._begin_sync()
            busy = self._seal()
            now = time.monotonic()
            if now >= self._next_checkpoint:
                self._next_checkpoint = now + self.settings.checkpoint_interval
                self._marker(records.CKPT_AUTO, None)
            if self._mode != "streaming":
                busy = self._sync_step() or busy
        elif self._mode == "bitmap":
            vols, offs, lens = ring.take_dirty()
            self._mark(vols, offs, lens)
            if self._link_up and self._pending_bytes == 0:
                self._begin_sync()
                busy = True
        if (self._mode != "streaming" and
                time.monotonic() - self._last_persist >= self.settings.bitmap_persist_interval):
            self.persist_bitmaps()
        return busy

    def _seal(self) -> bool:
        """Seal committed ring entries into bundles while the pending bound allows."""
        ring = self._ring
        limit = self.settings.buffer_bytes // 2
        sealed = False
        while self._pending_bytes < limit:
            batch = ring.seal(self.settings.bundle_bytes, self._vm_of_volume, len(self._vm_names),
                              self.settings.compression, self.settings.lz4_min_saving)
            if batch is None:
                break
            self._last_seal_ns = time.time_ns()
            if batch.entries == 0:
                continue
            ckpts = tuple(self._checkpoint_info(seq, t, payload)
                          for seq, t, payload in batch.checkpoints)
            bundle = Bundle(
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                parts=dict(zip(self._vm_names, batch.parts, strict=True)),
                data_bytes=batch.data_bytes,
                encoded_bytes=batch.encoded_bytes,
                oldest_time_ns=batch.oldest_time_ns,
                volumes=batch.volumes,
                offsets=batch.offsets,
                lengths=batch.lengths,
                checkpoints=ckpts,
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

    @staticmethod
    def _checkpoint_info(seq: int, time_ns: int, payload: bytes) -> CheckpointInfo:
        marker = records.decode_checkpoint_payload(payload)
        return CheckpointInfo(seq, time_ns, marker.consistent, marker.tag)

    @property
    def _vm_names(self) -> list[str]:
        return list(self.vms)

    @property
    def _vm_of_volume(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.vms)}
        out = np.zeros(len(self.volumes), dtype=np.uint32)
        for vid, vol in self.volumes.items():
            out[vid] = index[vol.vm]
        return out

    def _marker(self, kind: int, tag: str | None) -> int | None:
        consistent = self._mode == "streaming"
        payload = records.checkpoint_payload(kind, consistent, tag)
        return self._ring.marker(payload)

    def _mark(self, vols: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> None:
        for vid in np.unique(vols).tolist():
            sel = vols == vid
            self.bitmaps[vid].mark_many(offs[sel], lens[sel])

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
                if oldest and (not self._unsynced_since_ns or oldest < self._unsynced_since_ns):
                    self._unsynced_since_ns = oldest
                if ring.stats()["ring_used"] == 0:
                    break
                time.sleep(0.0001)
            vols, offs, lens = ring.take_dirty()
            self._mark(vols, offs, lens)
        for b in self._pending:
            self._mark(b.volumes, b.offsets, b.lengths)
            for c in b.checkpoints:
                if c.tag:
                    self._event(f"tagged checkpoint {c.tag!r} (seq {c.seq}) was not delivered "
                                "before the fold: it is lost")
            if b.oldest_time_ns and (not self._unsynced_since_ns
                                     or b.oldest_time_ns < self._unsynced_since_ns):
                self._unsynced_since_ns = b.oldest_time_ns
        self._pending.clear()
        self._pending_bytes = 0
        if not self._unsynced_since_ns:
            self._unsynced_since_ns = time.time_ns()
        self._sync_iter = None
        if reason is not None:
            self._mode = "bitmap"
            self._event(f"bitmap mode: {reason}")
            self._wake.notify_all()

    def _begin_sync(self) -> None:
        self._ring.set_mode(MODE_STREAM)
        self._mode = "initial_sync" if self._initial else "bitmap_syncing"
        self._sync_total = sum(bm.dirty_bytes for bm in self.bitmaps.values())
        self._sync_done = 0
        self._sync_iter = self._sync_extents()
        self._sync_next = None
        self._event(f"{self._mode.replace('_', ' ')} of {self._sync_total} bytes started")

    def _sync_extents(self):
        chunk = self.settings.sync_chunk_bytes
        for vid, bm in self.bitmaps.items():
            for offset, length in bm.extents(max_length=chunk):
                yield vid, offset, length

    def _sync_step(self) -> bool:
        """Send dirty blocks as sync records while the ring has room, leaving a part of it
        free for the guest's writes (else the first write after each refill overflows it
        and the sync starts over)."""
        ring = self._ring
        budget = self.settings.buffer_bytes // 8
        sent = 0
        while sent < budget:
            item = self._sync_next or next(self._sync_iter, None)
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
        self._mode = "streaming"
        self._skip_zero = self._initial = False
        self._sync_iter = None
        self._unsynced_since_ns = 0
        self._marker(records.CKPT_AUTO, None)
        self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval
        self._save_state(clean=False)
        for vid in self.bitmaps:
            self._bitmap_path(vid).unlink(missing_ok=True)
        self._event(f"{was.replace('_', ' ')} complete: consistent checkpoint emitted")

    def _event(self, text: str) -> None:
        self._events.append(f"{time.strftime('%H:%M:%S')} {text}")
        log.info("VPG %s: %s", self.name, text)

    # ---- what links and users call -------------------------------------------------------

    def _check_running(self) -> None:
        if self._error is not None:
            raise StateError(f"VPG {self.name} stream failed: {self._error!r}")
        if self._mode == "stopped":
            raise StateError(f"VPG {self.name} is not started")

    def checkpoint(self, tag: str | None = None) -> int:
        """Take a tagged (or, without a tag, automatic) checkpoint now; returns its seq.
        Raises StateError in bitmap mode, where no checkpoint can be taken."""
        with self._lock:
            self._check_running()
            if self._mode == "bitmap":
                raise StateError(f"VPG {self.name} is in bitmap mode: no checkpoint possible")
            kind = records.CKPT_TAGGED if tag else records.CKPT_AUTO
            deadline = time.monotonic() + CHECKPOINT_WAIT
            while True:
                seq = self._marker(kind, tag)
                if seq is not None:
                    self._wake.notify_all()
                    return seq
                if self._mode == "bitmap":  # the ring overflowed under us
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
            if self._mode != "bitmap":
                self._fold(reason)

    def link_up(self) -> None:
        """The recovery site is back: a bitmap sync starts when the queue is empty."""
        with self._lock:
            self._link_up = True
            self._wake.notify_all()

    def bundles_after(self, seq: int) -> list[Bundle]:
        """Pending bundles with seqs above `seq` (what a sender has not sent yet)."""
        with self._lock:
            return [b for b in self._pending if b.last_seq > seq]

    def wait_bundles(self, after_seq: int, timeout: float) -> list[Bundle]:
        """Like bundles_after, waiting up to `timeout` seconds for at least one."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [b for b in self._pending if b.last_seq > after_seq]
                left = deadline - time.monotonic()
                if found or left <= 0 or self._stopping or self._mode == "stopped":
                    return found
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
            self._wake.notify_all()

    def flush(self, timeout: float = 10.0) -> int:
        """Seal everything captured so far; returns the last seq sealed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check_running()
            target = self._ring.stats()["next_seq"] - 1
            while self._last_seq < target and self._mode != "bitmap":
                if time.monotonic() > deadline:
                    raise StateError(f"VPG {self.name}: sealing did not catch up in {timeout} s")
                self._seal()
                if self._last_seq < target:
                    self._wake.wait(0.001)
            return self._last_seq

    @property
    def events(self) -> tuple[str, ...]:
        """The last 100 events (mode changes, syncs, refusals), oldest first: a snapshot,
        safe to iterate from any thread."""
        with self._lock:
            return tuple(self._events)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    def rpo_seconds(self) -> float:
        """Age of the oldest captured write not yet durable at the recovery site."""
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
            if self._ring is not None and self._mode == "bitmap":
                self._mark(*self._ring.take_dirty())
            stats = self._ring.stats() if self._ring is not None else {}
            rpo = self.rpo_seconds()
            return VPGStatus(
                name=self.name,
                mode=self._mode,
                rpo_seconds=rpo,
                rpo_alert=rpo > self.settings.rpo_alert_seconds,
                buffer_used=stats.get("ring_used", 0) + self._pending_bytes,
                buffer_bytes=self.settings.buffer_bytes,
                pending_bundles=len(self._pending),
                dirty_bytes=sum(bm.dirty_bytes for bm in self.bitmaps.values()),
                sync_total_bytes=self._sync_total,
                sync_done_bytes=self._sync_done,
                writes=stats.get("writes", 0),
                bytes_written=stats.get("bytes", 0),
                last_seq=self._last_seq,
                acked_seq=self._acked_seq,
                link_up=self._link_up,
                events=tuple(self._events),
            )


class LocalLink:
    """Feeds a VPG's bundles into its VMs' journals in this process: the whole protected
    -to-journal path without a network (tests, the demo)."""

    def __init__(self, vpg: VPG, journals: dict[str, Journal]) -> None:
        missing = set(vpg.vms) - set(journals)
        if missing:
            raise ConfigError(f"no journal for VM(s) {sorted(missing)}")
        self.vpg = vpg
        self.journals = journals
        self.sent_seq = max((j.last_seq for j in journals.values()), default=0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    @classmethod
    def create_journals(cls, vpg: VPG, root: str | os.PathLike) -> dict[str, Journal]:
        """Open (or create) one journal per VM of `vpg` under `root/<vm>`."""
        out = {}
        for name in vpg.vms:
            path = Path(root) / name
            if (path / "journal.meta").exists():
                out[name] = Journal.open(path)
            else:
                out[name] = Journal.create(path, vpg.journal_volumes(name), vm=name,
                                           settings=vpg.settings.journal)
        return out

    def pump(self, timeout: float = 0.0) -> int:
        """Deliver pending bundles (waiting up to `timeout` for one), commit, ack.
        Returns the number of bundles delivered."""
        bundles = self.vpg.wait_bundles(self.sent_seq, timeout)
        bundles = [b for b in bundles if b.first_seq > self.sent_seq]
        for b in bundles:
            for vm, part in b.parts.items():
                if part:
                    self.journals[vm].append_encoded(part)
            self.sent_seq = b.last_seq
        if bundles:
            for j in self.journals.values():
                j.commit()
            self.vpg.ack(self.sent_seq)
        return len(bundles)

    def start(self) -> None:
        def run() -> None:
            try:
                while not self._stop.is_set():
                    self.pump(timeout=0.05)
            except BaseException as exc:
                log.exception("local link of VPG %s failed", self.vpg.name)
                self.error = exc

        self._stop.clear()
        self._thread = threading.Thread(target=run, name=f"link-{self.vpg.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise StateError(f"local link failed: {self.error!r}") from self.error

    def drain(self, timeout: float = 30.0) -> int:
        """Seal and deliver everything captured so far (link thread stopped); returns the
        last seq the journals hold.

        It pumps while it seals: with nothing acknowledging them, bundles stop being sealed
        at the VPG's pending bound.  Done when the VPG streams, has sealed every captured
        seq and no sealed bundle is left undelivered."""
        vpg = self.vpg
        deadline = time.monotonic() + timeout
        while True:
            with vpg._lock:
                vpg._check_running()
                done = False
                if vpg._mode == "streaming":
                    vpg._seal()
                    captured = vpg._ring.stats()["next_seq"] - 1
                    done = vpg._last_seq >= captured and not vpg.bundles_after(self.sent_seq)
            if done:
                return self.sent_seq
            if time.monotonic() > deadline:
                raise StateError(f"VPG {vpg.name} did not drain in {timeout} s "
                                 f"(mode {vpg.mode})")
            self.pump(timeout=0.005)
