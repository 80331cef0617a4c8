"""Adaptive compression on the replication link (protected side, issue 14).

Beside the sender (zcore.replication.sender) and the site-wide throttle
(zcore.replication.throttle): the controller samples, every `WINDOW` seconds, how long the
sender waited for the link (the throttle's grants and the socket's drain, while it had
bundles to send) and how much CPU the VPG's stream thread spent sealing, and sets the
encoding the stream seals the next bundles with (`VPG.link_codec`):

- the link is the bottleneck and the sealer has CPU to spare: zstd, at a level the spare
  CPU affords (more bytes through the same link), climbing or stepping down a ladder of
  levels as the sealer's load allows;
- the sealer is the bottleneck and the link is not: no compression (raw records, the
  cheapest to seal);
- otherwise LZ4, the default.

`choose` is the whole decision, a pure function of the smoothed load and the current
choice (with hysteresis, so a load near a threshold does not flip it every window).  A
peer that speaks wire protocol v1 has no zstd record (docs/format.md 2, 10.3): there the
choice is LZ4 or none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from zcore.records import LZ4_CHOICE, Codec, CodecChoice

# Seconds between decisions, and the smoothing of the load over them (the weight of the
# newest window).  Half a second is some 10 bundles at 20 MB/s: long enough to average
# the throttle's bursts, short enough to follow a workload change within seconds.
WINDOW = 0.5
SMOOTHING = 0.5

# The link is the bottleneck when the sender waited for it this fraction of the time
# (it is close to 1 when bundles queue behind a saturated link, close to 0 otherwise);
# zstd stays on until the wait falls below LINK_FREE.
LINK_BOUND = 0.5
LINK_FREE = 0.2
# The sealer is the bottleneck at this many CPU seconds per second (one core nearly
# full); raw sealing stays on until its load falls below CPU_FREE.
CPU_BOUND = 0.85
CPU_FREE = 0.6
# zstd costs 3-4 times LZ4's CPU per byte: it is turned on only while sealing with LZ4
# takes less than ZSTD_ENTER of a core, at level ZSTD_START.  Then the level climbs the
# ladder while the link stays the bottleneck and the spare CPU affords it: the sealer's
# load at the next level is predicted from its load now and the levels' relative CPU per
# byte (records.ZSTD_LEVELS' measurements: 250, 175 and 65 MB/s per core), and the step
# is taken when the prediction is under ZSTD_CLIMB of a core; a level whose sealing takes
# ZSTD_BUDGET of a core or more steps down one.  The gap between the two is the
# hysteresis (the prediction overestimates: raw sealing does not grow with the level).
ZSTD_ENTER = 0.2
ZSTD_START = 3
ZSTD_LADDER = {1: 1.0, 3: 1.4, 6: 3.8}
ZSTD_CLIMB = 0.5
ZSTD_BUDGET = 0.65


class Sealer(Protocol):
    """What the controller needs of a VPG (zcore.vpg.VPG has it)."""

    link_codec: CodecChoice

    @property
    def seal_cpu_seconds(self) -> float: ...


@dataclass(frozen=True)
class LinkLoad:
    """The smoothed load the decision is made on."""

    link_wait: float  # fraction of wall time the sender waited for the link
    sealer_busy: float  # CPU seconds the sealer used per second


def choose(load: LinkLoad, current: CodecChoice, zstd_allowed: bool = True) -> CodecChoice:
    """The link's encoding for `load`, given the `current` one (see the module doc)."""
    zstd_now = current.codec == Codec.ZSTD
    link_bound = load.link_wait >= (LINK_FREE if zstd_now else LINK_BOUND)
    cpu_bound = load.sealer_busy >= (CPU_FREE if current.codec == Codec.NONE else CPU_BOUND)
    if cpu_bound and not link_bound:
        return CodecChoice(Codec.NONE)
    if link_bound and zstd_allowed and not cpu_bound:
        if zstd_now:
            return CodecChoice(Codec.ZSTD, zstd_level(current.level, load.sealer_busy))
        if load.sealer_busy < ZSTD_ENTER:
            return CodecChoice(Codec.ZSTD, ZSTD_START)
    return LZ4_CHOICE


def zstd_level(level: int, sealer_busy: float) -> int:
    """The next zstd level on ZSTD_LADDER for a sealer `sealer_busy` at `level` (a level
    off the ladder counts as the highest rung below it)."""
    rungs = sorted(ZSTD_LADDER)
    at = max([r for r in rungs if r <= level], default=rungs[0])
    i = rungs.index(at)
    if sealer_busy >= ZSTD_BUDGET:
        return rungs[max(0, i - 1)]
    if i + 1 < len(rungs):
        up = rungs[i + 1]
        if sealer_busy * ZSTD_LADDER[up] / ZSTD_LADDER[at] < ZSTD_CLIMB:
            return up
    return at


class CompressionController:
    """Feeds `choose` from one VPG's sender and applies its choice to the VPG.

    The sender adds the seconds it waited for the link (`waited`); `tick` (called at
    least every WINDOW seconds) closes a window, smooths the load and decides."""

    def __init__(self, vpg: Sealer, *, enabled: bool = True) -> None:
        self.vpg = vpg
        self.enabled = enabled  # False: the VPG keeps LZ4 (benchmark baseline, tests)
        self.zstd_allowed = False  # set when the handshake agreed wire protocol v2
        self.load = LinkLoad(0.0, 0.0)
        self.decisions = 0
        self._wait = 0.0
        self._t0 = time.monotonic()
        self._cpu0 = vpg.seal_cpu_seconds

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def tick(self, now: float | None = None) -> CodecChoice:
        """Close the window when it is WINDOW long; returns the VPG's encoding."""
        now = time.monotonic() if now is None else now
        span = now - self._t0
        if span < WINDOW:
            return self.vpg.link_codec
        cpu = self.vpg.seal_cpu_seconds
        sample = LinkLoad(min(1.0, self._wait / span), (cpu - self._cpu0) / span)
        a = SMOOTHING
        self.load = LinkLoad(a * sample.link_wait + (1 - a) * self.load.link_wait,
                             a * sample.sealer_busy + (1 - a) * self.load.sealer_busy)
        self._wait, self._t0, self._cpu0 = 0.0, now, cpu
        if self.enabled:
            self.vpg.link_codec = choose(self.load, self.vpg.link_codec, self.zstd_allowed)
        elif self.vpg.link_codec != LZ4_CHOICE:
            self.vpg.link_codec = LZ4_CHOICE
        if not self.zstd_allowed and self.vpg.link_codec.codec == Codec.ZSTD:
            self.vpg.link_codec = LZ4_CHOICE
        self.decisions += 1
        return self.vpg.link_codec

    def reset(self, zstd_allowed: bool) -> None:
        """A new session: what the peer allows, and a fresh window."""
        self.zstd_allowed = zstd_allowed
        if not zstd_allowed and self.vpg.link_codec.codec == Codec.ZSTD:
            self.vpg.link_codec = LZ4_CHOICE
        self._wait, self._t0, self._cpu0 = 0.0, time.monotonic(), self.vpg.seal_cpu_seconds


