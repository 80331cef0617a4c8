"""What a VPG is tuned by, its modes, and the tuning constants of the protected site.

Sits under every other module of `zcore.vpg`: plain data, no threads, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from zcore import records
from zcore.bitmap import DEFAULT_MAX_BYTES
from zcore.errors import ConfigError
from zcore.journal import JournalSettings

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


class VPGMode(StrEnum):
    """What a VPG's stream is doing (a StrEnum: compares equal to the bare strings)."""

    STOPPED = "stopped"
    STREAMING = "streaming"  # every write goes to the recovery site in seq order
    BITMAP = "bitmap"  # writes only mark dirty blocks: link down or buffer overflowed
    BITMAP_SYNCING = "bitmap_syncing"  # resending the dirty blocks, then streaming again
    INITIAL_SYNC = "initial_sync"  # copying the volumes whole at protection start
    # comparing block hashes with the recovery site's replicas, which hold an older copy
    # (reverse protection), and sending what differs; writes meanwhile only mark dirty
    # blocks, which the bitmap sync after it sends
    DELTA_SYNC = "delta_sync"
    # after an unclean restart: comparing block hashes of the volumes with the recovery
    # site's journals at their newest state, marking what differs dirty; writes meanwhile
    # only mark dirty blocks; the bitmap sync after it sends them all as ordinary writes
    RESYNC_COMPARE = "resync_compare"

    @property
    def syncing(self) -> bool:
        return self in (VPGMode.BITMAP_SYNCING, VPGMode.INITIAL_SYNC, VPGMode.DELTA_SYNC,
                        VPGMode.RESYNC_COMPARE)

    @property
    def marking(self) -> bool:
        """True in the modes where writes only mark dirty blocks (no checkpoint)."""
        return self in (VPGMode.BITMAP, VPGMode.DELTA_SYNC, VPGMode.RESYNC_COMPARE)

    @property
    def label(self) -> str:
        """The mode as words, for events ("bitmap syncing")."""
        return self.value.replace("_", " ")


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
