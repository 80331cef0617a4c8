"""History retention of recovery-site VPGs: the site scheduler's periodic job (issue 10).

Sits between the site service's scheduler and the one retention mechanism beside the
journal, zcore.journal.history (its docstring states the VPG-wide rule: every journal
promoted to the newest usable checkpoint at least `history` old).  This module adds what
the site knows: a RecoveryVPG's catalogue of usable checkpoints finds the target by
bisection, and the VPG is refreshed after a round that promoted.

Blocking: promotion reads segments, writes and fsyncs replicas.  `apply_retention` runs
it in the caller's thread; `run_retention` is the scheduler loop, which calls it through
`asyncio.to_thread` so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from zcore.errors import ZcoreError
from zcore.journal import history
from zcore.journal.history import DEFAULT_INTERVAL, RetentionReport
from zcore.site.recovery_vpg import RecoveryVPG

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_INTERVAL", "RetentionReport", "apply_retention", "retention_target",
           "run_retention"]


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
    report = history.apply_retention(vpg.name, vpg.journals, target)
    if report.promoted:
        vpg.refresh()
    return report


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
