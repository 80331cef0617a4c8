"""History retention of recovery-site VPGs: the site scheduler's periodic job (issue 10).

Sits between the site service's scheduler and zcore.journal's promotion.  Nothing else
promotes for history today (a journal promotes on its own only when an append would pass
its hard limit), so without this job a journal grows until it is full.

The rule is VPG-wide: promote every journal of the VPG to the same checkpoint, the newest
usable one that is at least `history` old.  So
  - the VPG keeps its configured history: its oldest kept checkpoint is at or before
    now - history;
  - the journals drop the same checkpoints: one promoted away in one journal is unusable
    in all, so promoting journals apart only wastes the others' space;
  - a stopped stream (a disaster at the protected site) keeps its last usable checkpoint:
    the target is a usable checkpoint and promotion keeps it.  Each journal's own
    `promote()` keeps that journal's newest checkpoint, which need not be usable when
    another journal lags: applied per journal it could leave the VPG none.
A journal whose views pin a checkpoint below the target is skipped this round (reported)
and catches up in a later one.

Blocking: promotion reads segments, writes and fsyncs replicas.  `apply_retention` runs
it in the caller's thread; `run_retention` is the scheduler loop, which calls it through
`asyncio.to_thread` so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from zcore.errors import JournalFullError, ZcoreError
from zcore.site.recovery_vpg import RecoveryVPG

log = logging.getLogger(__name__)

# Seconds between retention rounds: checkpoints come every few seconds and history is
# kept for hours, so a minute late costs at most a minute of extra journal.
DEFAULT_INTERVAL = 60.0


@dataclass(frozen=True)
class RetentionReport:
    """What one retention round did to one VPG."""

    vpg: str
    target_seq: int | None  # None: no usable checkpoint is old enough
    promoted: dict[str, int] = field(default_factory=dict)  # VM -> new promotion watermark
    skipped: dict[str, str] = field(default_factory=dict)  # VM -> why (a pinning view...)


def retention_target(vpg: RecoveryVPG, *, now: float | None = None,
                     history_seconds: float | None = None) -> int | None:
    """The seq every journal of `vpg` may be promoted to: the newest usable checkpoint
    whose time is at or before now - history (history: the journals' configured one).
    None when no usable checkpoint is that old."""
    now = time.time() if now is None else now
    if history_seconds is None:
        history_seconds = vpg.status(now=now).history_configured_seconds
    found = vpg.checkpoints(end=now - history_seconds, newest_first=True, limit=1)
    return found[0].seq if found else None


def apply_retention(vpg: RecoveryVPG, *, now: float | None = None,
                    history_seconds: float | None = None) -> RetentionReport:
    """Promote every journal of `vpg` to `retention_target` (blocking: worker thread)."""
    target = retention_target(vpg, now=now, history_seconds=history_seconds)
    if target is None:
        return RetentionReport(vpg.name, None)
    promoted: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for vm, journal in vpg.journals.items():
        if journal.status().promoted_seq >= target:
            continue
        try:
            promoted[vm] = journal.promote_to(target)
        except JournalFullError as exc:  # a view pins an older checkpoint
            skipped[vm] = str(exc)
        except ZcoreError as exc:  # a stopped journal: its own error says how to recover
            skipped[vm] = str(exc)
            log.error("retention of VPG %s: journal of VM %s: %s", vpg.name, vm, exc)
    if promoted:
        vpg.refresh()
    return RetentionReport(vpg.name, target, promoted, skipped)


async def run_retention(vpgs: Callable[[], Iterable[RecoveryVPG]], stop: asyncio.Event, *,
                        interval: float = DEFAULT_INTERVAL,
                        on_report: Callable[[RetentionReport], None] | None = None,
                        clock: Callable[[], float] = time.time) -> None:
    """The scheduler's retention loop: every `interval` seconds, one round over the VPGs
    `vpgs()` returns, each in a worker thread, until `stop` is set; `on_report` gets
    every round that promoted or skipped something."""
    while not stop.is_set():
        for vpg in list(vpgs()):
            if stop.is_set():
                return
            try:
                report = await asyncio.to_thread(apply_retention, vpg, now=clock())
            except ZcoreError as exc:  # a closed VPG (deleted meanwhile) or a bad journal
                log.warning("retention of VPG %s skipped: %s", vpg.name, exc)
                continue
            if on_report is not None and (report.promoted or report.skipped):
                on_report(report)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
