"""The state every part of a VPG shares, and the records it hands out.

Sits at the bottom of the VPG class: `VPGCore` holds the definition, the capture ring,
the pending bundles, the mode and the counters, with the few helpers every layer above
uses (events, dirty marks, checkpoint markers, the state file).  The layers build on it
in one line, each calling only down: `VPGSyncs` (zcore.vpg.syncs: bitmap mode and
syncs) <- `VPGStream` (zcore.vpg.stream: the stream thread and sealing) <- `VPG`
(zcore.vpg.group: definition, lifetime and what links and users call).

Lock: `_lock` (an RLock, with the condition `_wake`) guards every attribute below; the
stream thread holds it for each round.  The capture ring has its own native lock, a
leaf: it is taken under `_lock`, never the other way round.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zcore import records
from zcore._native.capture import CaptureRing
from zcore.bitmap import DirtyBitmap
from zcore.capture import ProtectedVolume, check_int
from zcore.errors import StateError
from zcore.records import Checkpoint, CheckpointKind
from zcore.vpg.promises import TaggedCheckpoints
from zcore.vpg.settings import VPGMode, VPGSettings
from zcore.vpg.state import StateFiles

log = logging.getLogger("zcore.vpg")


@dataclass(frozen=True)
class Bundle:
    """Records sealed together: seqs first_seq..last_seq, one encoded part per VM."""

    first_seq: int
    last_seq: int
    parts: dict[str, bytes | bytearray]
    data_bytes: int
    encoded_bytes: int
    oldest_time_ns: int
    volumes: npt.NDArray[np.uint32]
    offsets: npt.NDArray[np.uint64]
    lengths: npt.NDArray[np.uint64]
    checkpoints: tuple[Checkpoint, ...]
    codec: records.CodecChoice = records.LZ4_CHOICE  # how its write payloads are encoded


@dataclass(frozen=True)
class CodecUse:
    """What one link encoding sealed (VPGStatus.compression): bundles, the data bytes
    they carry and the encoded bytes that went to the link."""

    bundles: int = 0
    data_bytes: int = 0
    encoded_bytes: int = 0


@dataclass(frozen=True)
class DeltaSyncReport:
    """What a finished delta sync moved (zcore.deltasync.SyncStats and the source's
    counts): the bytes of the 4 KiB blocks found different, and the frame bytes sent."""

    volumes: int
    differing_blocks: int
    differing_bytes: int
    bytes_sent: int  # every frame byte the protected site sent in the session
    bytes_received: int
    seconds: float


@dataclass(frozen=True)
class ResyncReport:
    """What the compare of a resync after an unclean restart found: the bytes compared
    (every volume whole) and those of the 4 KiB blocks that differ (marked dirty, sent
    by the bitmap sync after it), with the compare's own frame bytes and time."""

    volumes: int
    compared_bytes: int
    differing_bytes: int
    bytes_sent: int  # the compare's frame bytes, this side to the recovery site
    bytes_received: int
    seconds: float


@dataclass(frozen=True)
class VPGStatus:
    name: str
    mode: VPGMode
    rpo_seconds: float
    rpo_alert: bool
    buffer_used: int  # capture ring in use plus sealed, unacknowledged bundles
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
    ring_used: int = 0  # bytes of the capture ring in use...
    ring_bytes: int = 0  # ...of its size (half the buffer; 0 while stopped)
    checkpoints_pending: int = 0  # tagged checkpoints not yet in the recovery journals
    checkpoints_lost: int = 0  # tagged checkpoints lost since the VPG was made
    delta_sync: DeltaSyncReport | None = None  # the last delta sync's figures (this run)
    resync: ResyncReport | None = None  # the last unclean-restart compare's (this run)
    link_codec: str = "lz4"  # the encoding bundles are sealed with now ("zstd-3", "none")
    # sealed per encoding since start ("lz4", "zstd-3", "none"); bytes_saved: data bytes
    # less encoded bytes over all of them (headers and block-CRC tables included)
    compression: dict[str, CodecUse] = field(default_factory=dict)
    bytes_saved: int = 0


class VM:
    """A protected VM: a name and its volumes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.volumes: list[ProtectedVolume] = []

    def __repr__(self) -> str:
        return f"VM({self.name}, {len(self.volumes)} volumes)"


SyncItem = tuple[int, int, int]  # volume id, offset, length


class VPGCore:
    """The shared state of a VPG (see the module docstring for the layers on top)."""

    def __init__(self, name: str, state_dir: str | os.PathLike[str],
                 settings: VPGSettings | None = None) -> None:
        self.name = name
        self.settings = settings or VPGSettings()
        self.settings.check()
        self.files = StateFiles(state_dir)
        self.state_dir: Path = self.files.dir
        self.vms: dict[str, VM] = {}
        self.volumes: dict[int, ProtectedVolume] = {}
        self.bitmaps: dict[int, DirtyBitmap] = {}
        self._ring: CaptureRing | None = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[Bundle] = deque()
        self._pending_bytes = 0
        # the link's encoding, set by the sender's compression controller
        # (zcore.replication.compression) and read by the stream at each bundle
        self.link_codec: records.CodecChoice = records.LZ4_CHOICE
        self._codec_use: dict[str, CodecUse] = {}
        self._seal_cpu = 0.0  # thread CPU seconds the stream spent sealing bundles
        self._acked_seq = 0
        self._last_seq = 0
        self._mode = VPGMode.STOPPED
        self._link_up = True
        self._sync_held = False  # VPG.start(hold_sync=True) until VPG.release_sync
        self._skip_zero = False  # the replicas are still empty: zero blocks need not go
        self._initial = False  # an initial sync has not completed yet
        self._source_failed = False  # a sync read of a volume's source failed (said once)
        self._folds = 0  # times streaming stopped into the bitmaps (zcore.vpg.syncs._fold)
        self._delta = False  # a delta sync (reverse protection) has not completed yet
        self._delta_fresh = False  # ...and its next session must start over (after a crash)
        self._delta_report: DeltaSyncReport | None = None
        self._resync = False  # an unclean restart's compare has not completed yet
        self._resync_report: ResyncReport | None = None
        self._sync_iter: Iterator[SyncItem] | None = None
        self._sync_next: SyncItem | None = None
        self._sync_total = 0
        self._sync_done = 0
        self._unsynced_since_ns = 0  # oldest captured write not durable at the recovery site
        self._sync_acked_at = 0  # seq whose ack makes the finished sync's data durable
        self._handed_seq = 0  # the last seq of the newest bundle a link took
        self._sync_awaits_ack = 0  # after an overflow: the seq whose ack lets the sync begin
        self._tagged = TaggedCheckpoints()
        self._last_seal_ns = 0
        self._next_checkpoint = 0.0
        self._last_persist = 0.0
        self._seq_reserved = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._events: deque[str] = deque(maxlen=100)
        self._rounds = 0
        self.on_checkpoint: Callable[[Checkpoint], None] | None = None

    # ---- checks --------------------------------------------------------------------------

    def _require_stopped(self, what: str) -> None:
        if self._mode != VPGMode.STOPPED:
            raise StateError(f"cannot {what} while VPG {self.name} runs")

    def _check_running(self) -> None:
        if self._error is not None:
            raise StateError(f"VPG {self.name} stream failed: {self._error!r}")
        if self._mode == VPGMode.STOPPED:
            raise StateError(f"VPG {self.name} is not started")

    def _marking(self) -> bool:
        """Writes only mark dirty blocks now (bitmap mode, a delta sync, a compare)."""
        return self._mode.marking

    def _in_bitmap_mode(self) -> bool:
        """A method, not a comparison inline: the mode changes under calls that seal."""
        return self._mode == VPGMode.BITMAP

    def _live_ring(self) -> CaptureRing:
        """The ring of a started VPG (every caller runs between start and stop)."""
        ring = self._ring
        if ring is None:
            raise StateError(f"VPG {self.name} is not started")
        return ring

    # ---- shared helpers ------------------------------------------------------------------

    def _event(self, text: str) -> None:
        self._events.append(f"{time.strftime('%H:%M:%S')} {text}")
        log.info("VPG %s: %s", self.name, text)

    def _mark(self, vols: npt.NDArray[np.uint32], offs: npt.NDArray[np.uint64],
              lens: npt.NDArray[np.uint64]) -> None:
        for vid in np.unique(vols).tolist():
            sel = vols == vid
            self.bitmaps[vid].mark_many(offs[sel], lens[sel])

    def _marker(self, kind: CheckpointKind, tag: str | None, *,
                consistent: bool | None = None) -> Checkpoint | None:
        """Append a checkpoint marker to the ring; None when it has no room (or is in
        bitmap mode).  The marker is crash-consistent only while streaming (and never
        when `consistent` is False).

        `time_ns` is read just after the ring stamped the record: the journaled record's
        time is the ring's own reading, a few microseconds earlier."""
        consistent = self._mode == VPGMode.STREAMING and consistent is not False
        code = records.CKPT_TAGGED if kind == CheckpointKind.TAGGED else records.CKPT_AUTO
        payload = records.checkpoint_payload(code, consistent, tag)
        seq = self._live_ring().marker(payload)
        if seq is None:
            return None
        return Checkpoint(seq, seq, time.time_ns(), kind, tag or None, consistent)

    # ---- the state directory -------------------------------------------------------------

    def bitmap_path(self, vid: int) -> Path:
        """Where volume `vid`'s dirty bitmap is persisted (`vid` an int, else ConfigError)."""
        return self.files.bitmap_path(check_int("volume id", vid))

    def _definition(self) -> list[dict[str, Any]]:
        return [{"id": v.id, "vm": v.vm, "name": v.name, "size": v.size}
                for v in self.volumes.values()]

    def _save_state(self, *, clean: bool) -> None:
        self.files.save({
            "name": self.name,
            "volumes": self._definition(),
            "seq_reserved": self._seq_reserved,
            "clean": clean,
            "initial_sync_pending": self._initial,
            "delta_sync_pending": self._delta,
            "delta_sync_fresh": self._delta_fresh,
            "resync_pending": self._resync,
            "settings": asdict(self.settings),
        })

    def persist_bitmaps(self) -> None:
        """Write every bitmap now (crash-safe), with what is queued folded in."""
        with self._lock:
            self.files.persist_bitmaps(self.bitmaps)
            self._last_persist = time.monotonic()
