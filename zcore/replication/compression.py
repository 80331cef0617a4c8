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

`choose` is the decision, a pure function of the smoothed load and the current choice
(with hysteresis, so a load near a threshold does not flip it every window).  The wait
alone cannot tell a slow link from a slow receiver or a host short of CPU, where zstd's
extra CPU slows the sealer and the guest and the same link carries fewer data bytes: so
every step up (LZ4 to zstd, or a zstd level up the ladder) is a trial the controller
judges on the data bytes the link then delivers per second, and undoes if it did not pay.
A peer that speaks wire protocol v1 has no zstd record (docs/format.md 2, 10.3): there the
choice is LZ4 or none.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

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
# A step up waits for TRIAL_WINDOWS windows in a row under the present choice, ended
# within REFERENCE_AGE, in which the sender waited for the link at least LINK_BOUND of
# the time (their data rate is the link's, not the demand's; windows under LZ4 count
# while the controller is off, and across a new session).  It is judged on the data
# bytes sent per second over TRIAL_WINDOWS windows after the first one (in which the
# sender re-encodes the backlog sealed before the step): under ZSTD_PAYS of the rate
# before, the step is undone and not tried again for ZSTD_RETRY seconds, doubled on each
# failure within ZSTD_RETRY_MAX of the last hold's end, up to ZSTD_RETRY_MAX (the host's
# load may change; a link that did get slower in the trial costs one hold at the lower
# level).  A judged window in which the sender waited less than LINK_FREE of the time
# measured the demand: the trial ends without a verdict and goes back to the choice
# before it.
TRIAL_WINDOWS = 2
REFERENCE_AGE = 2.0  # seconds: a reference window that ended longer ago is stale
ZSTD_PAYS = 0.95
ZSTD_RETRY = 30.0
ZSTD_RETRY_MAX = 480.0


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


class Window(NamedTuple):
    """One closed window: what the link delivered in it, under which choice."""

    data: int  # data bytes sent
    seconds: float
    end: float  # time.monotonic() when it closed
    codec: CodecChoice  # the VPG's encoding during it


def data_rate(windows: Iterable[Window]) -> float:
    """Data bytes per second over `windows`."""
    return sum(w.data for w in windows) / sum(w.seconds for w in windows)


def rank(choice: CodecChoice) -> int:
    """How hard `choice` compresses: its zstd level, 0 for LZ4 or none."""
    return choice.level if choice.codec == Codec.ZSTD else 0


@dataclass
class Trial:
    """A step up being judged: the choice it left, the data rate under that, and the
    windows since the step (the first one, sending what was sealed before, is not
    judged)."""

    before: CodecChoice
    to: CodecChoice
    rate_before: float  # data bytes sent per second under `before`
    windows: int = 0  # windows closed since the step
    judged: list[Window] = field(default_factory=list)

    def rate(self) -> float:
        return data_rate(self.judged)


class CompressionController:
    """Feeds `choose` from one VPG's sender, judges its steps up and applies its choice
    to the VPG.

    The sender adds the seconds it waited for the link (`waited`) and the data bytes of
    each bundle it sent (`sent`); `tick` (called at least every WINDOW seconds) closes a
    window, smooths the load and decides.  A step up stays only once judged to pay: a
    trial cut short (the link freed, the session ended, the controller was turned off)
    goes back to the choice before it; one cut short because the step's own CPU made
    `choose` step down is judged on the windows it had."""

    def __init__(self, vpg: Sealer, *, enabled: bool = True) -> None:
        self.vpg = vpg
        self.zstd_allowed = False  # set when the handshake agreed wire protocol v2
        self.load = LinkLoad(0.0, 0.0)
        self.decisions = 0
        self.trial: Trial | None = None
        self.ceiling: CodecChoice | None = None  # after a step that did not pay...
        self.held_until = 0.0  # ...until this time.monotonic()
        self.failed_steps = 0  # steps undone since start
        self._retry = ZSTD_RETRY
        # the last link-bound windows in a row: those under the present choice and fresh
        # are what a step up is judged against
        self._recent: deque[Window] = deque(maxlen=TRIAL_WINDOWS)
        self._wait = 0.0
        self._data = 0
        self._t0 = time.monotonic()
        self._cpu0 = vpg.seal_cpu_seconds
        self.enabled = enabled

    @property
    def enabled(self) -> bool:
        """False: the VPG seals LZ4 from now on (benchmark baselines, tests)."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._enabled = on
        if not on:
            self._abandon()
            self.vpg.link_codec = LZ4_CHOICE

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def sent(self, data_bytes: int) -> None:
        self._data += data_bytes

    def held_seconds(self, now: float | None = None) -> float:
        """Seconds until a step up past `ceiling` may be tried again (0: none held)."""
        now = time.monotonic() if now is None else now
        return max(0.0, self.held_until - now) if self.ceiling is not None else 0.0

    def tick(self, now: float | None = None) -> CodecChoice:
        """Close the window when it is WINDOW long; returns the VPG's encoding."""
        now = time.monotonic() if now is None else now
        span = now - self._t0
        if span < WINDOW:
            return self.vpg.link_codec
        cpu = self.vpg.seal_cpu_seconds
        current = self.vpg.link_codec
        window = Window(self._data, span, now, current)
        sample = LinkLoad(min(1.0, self._wait / span), (cpu - self._cpu0) / span)
        a = SMOOTHING
        self.load = LinkLoad(a * sample.link_wait + (1 - a) * self.load.link_wait,
                             a * sample.sealer_busy + (1 - a) * self.load.sealer_busy)
        self._wait, self._data, self._t0, self._cpu0 = 0.0, 0, now, cpu
        if self.ceiling is not None and now >= self.held_until:
            self.ceiling = None
        if self.trial is None:
            if sample.link_wait >= LINK_BOUND:
                self._recent.append(window)
            else:
                self._recent.clear()  # a window the link did not bound: the demand
        if self.enabled and self.zstd_allowed:
            choice = self._judged(choose(self.load, current), current, window,
                                  sample.link_wait, now)
        else:
            self._abandon()
            current = self.vpg.link_codec
            choice = choose(self.load, current, zstd_allowed=False) if self.enabled \
                else LZ4_CHOICE
        self.vpg.link_codec = choice
        self.decisions += 1
        return choice

    def _judged(self, choice: CodecChoice, current: CodecChoice, window: Window,
                link_wait: float, now: float) -> CodecChoice:
        """`choose`'s `choice` after the trial of the last step up and any hold."""
        trial = self.trial
        if trial is not None:
            trial.windows += 1
            if trial.windows > 1:
                trial.judged.append(window)
            if link_wait < LINK_FREE:  # this window measured the demand: no verdict
                self.trial = None
                return trial.before if rank(choice) >= rank(trial.before) else choice
            if rank(choice) < rank(trial.to):
                # the step's own CPU made choose step down: judged on what it had
                if not trial.judged:
                    trial.judged.append(window)
            elif trial.windows <= TRIAL_WINDOWS:
                return trial.to  # no further step until this one is judged
            self.trial = None
            if trial.rate() < ZSTD_PAYS * trial.rate_before:
                self._fail(trial.before, now)
                return trial.before if rank(choice) >= rank(trial.before) else choice
            self._recent.clear()
            self._recent.extend(trial.judged[-TRIAL_WINDOWS:])
            self._retry = ZSTD_RETRY
            if rank(choice) < rank(trial.to):
                return choice
            current = trial.to
        if current.codec == Codec.NONE and choice.codec == Codec.ZSTD:
            return LZ4_CHOICE  # from raw, LZ4 first: zstd is judged against it
        if self.ceiling is not None and rank(choice) > rank(self.ceiling):
            choice = self.ceiling if self.ceiling.codec == Codec.ZSTD else LZ4_CHOICE
        if rank(choice) > rank(current):
            fresh = [w for w in self._recent
                     if w.codec == current and now - w.end <= REFERENCE_AGE]
            if len(fresh) < TRIAL_WINDOWS:
                return current  # not yet the link-bound windows to judge the step against
            self.trial = Trial(current, choice, data_rate(fresh))
            self._recent.clear()  # in a row: none from before the trial counts after it
        return choice

    def _fail(self, before: CodecChoice, now: float) -> None:
        """A step up did not pay: hold at `before`.  Failures in a row (each within
        ZSTD_RETRY_MAX of the last hold's end) double the hold."""
        if now - self.held_until > ZSTD_RETRY_MAX:
            self._retry = ZSTD_RETRY
        self.failed_steps += 1
        self.ceiling, self.held_until = before, now + self._retry
        self._retry = min(2 * self._retry, ZSTD_RETRY_MAX)

    def _abandon(self) -> None:
        """An unjudged step up does not stay: back to the choice before it."""
        if self.trial is not None and self.vpg.link_codec == self.trial.to:
            self.vpg.link_codec = self.trial.before
        self.trial = None

    def reset(self, zstd_allowed: bool) -> None:
        """A new session: what the peer allows, and a fresh window (a hold stays: it is
        about the path and the hosts, not the session)."""
        self._abandon()
        self.zstd_allowed = zstd_allowed
        if not zstd_allowed and self.vpg.link_codec.codec == Codec.ZSTD:
            self.vpg.link_codec = LZ4_CHOICE
        self._wait, self._data = 0.0, 0
        self._t0, self._cpu0 = time.monotonic(), self.vpg.seal_cpu_seconds
