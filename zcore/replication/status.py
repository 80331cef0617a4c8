"""What a VPG's replication reports: its state (`ReplicationState`), the status record
the protected site's sender (zcore.replication.sender) builds from the VPG's own status
and the link, and the recent acknowledged-throughput meter behind it."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from zcore.vpg import VPGStatus


class ReplicationState(StrEnum):
    """The replication state of one VPG, most pressing first (a StrEnum: it compares equal
    to its string value, as states did before the enum)."""

    PAUSED = "paused"  # the user paused replication
    INITIALIZING = "initializing"  # the initial sync runs
    DELTA_SYNCING = "delta_syncing"  # the delta sync of reverse protection runs
    BITMAP_SYNCING = "bitmap_syncing"  # resending what the dirty bitmaps mark
    DISCONNECTED = "disconnected"  # the recovery site is unreachable
    RPO_NOT_MEETING_SLA = "rpo_not_meeting_sla"  # streaming, RPO above its alert
    MEETING_SLA = "meeting_sla"  # streaming within the RPO alert

    @property
    def syncing(self) -> bool:
        """A sync runs: the recovery site is not yet consistent with the volumes (no
        checkpoint of the current data is possible until it ends)."""
        return self in (ReplicationState.INITIALIZING, ReplicationState.DELTA_SYNCING,
                        ReplicationState.BITMAP_SYNCING)


def replication_state(vpg: VPGStatus, connected: bool, paused: bool) -> ReplicationState:
    """The state a VPG with status `vpg` is in, over a link that is or is not up."""
    if paused:
        return ReplicationState.PAUSED
    if vpg.mode == "initial_sync":
        return ReplicationState.INITIALIZING
    if vpg.mode == "delta_sync":
        return ReplicationState.DELTA_SYNCING
    # an unclean restart's compare is the first step of its bitmap sync
    if vpg.mode in ("bitmap_syncing", "resync_compare") or (vpg.mode == "bitmap"
                                                             and connected):
        return ReplicationState.BITMAP_SYNCING
    if not connected:
        return ReplicationState.DISCONNECTED
    if vpg.rpo_alert:
        return ReplicationState.RPO_NOT_MEETING_SLA
    return ReplicationState.MEETING_SLA


@dataclass(frozen=True)
class ReplicationStatus:
    vpg: str
    state: ReplicationState
    rpo_seconds: float
    throughput_bytes: float  # acknowledged data bytes per second (recent)
    buffer_used: int
    buffer_bytes: int
    sent_seq: int
    acked_seq: int
    connected: bool
    sync_total_bytes: int
    sync_done_bytes: int
    last_error: str
    # adaptive compression (zcore.replication.compression): the encoding bundles are
    # sealed with now ("lz4", "zstd-3", "none"), the data bytes less the bytes sent to the
    # link since start, per encoding sent {bundles, data_bytes, encoded_bytes}, and the
    # smoothed load behind the choice
    codec: str = "lz4"
    bytes_saved: int = 0
    compression: dict[str, dict[str, int]] = field(default_factory=dict)
    link_wait: float = 0.0  # fraction of time the sender waited for the link
    sealer_busy: float = 0.0  # CPU seconds per second the stream spent sealing
    # seconds before zstd (or its next level) is tried again after a step up that did
    # not deliver more data through the link (0: nothing held)
    zstd_held_seconds: float = 0.0
    zstd_held_at: str = ""  # the encoding it is held at ("lz4", "zstd-3"; "": none)
    protocol: int = 0  # wire protocol version of the session (0: none yet)


@dataclass
class ThroughputMeter:
    """Bytes per second over the last `window` seconds."""

    window: float = 2.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        self.samples.append((now, nbytes))
        self._expire(now)

    def value(self) -> float:
        self._expire(time.monotonic())
        return sum(n for _, n in self.samples) / self.window

    def _expire(self, now: float) -> None:
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()
