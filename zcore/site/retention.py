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
from zcore.journal.history import (
    DEFAULT_INTERVAL,
    RetentionEvent,
    RetentionKeeper,
    RetentionReport,
)
from zcore.site.recovery_vpg import RecoveryVPG

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_INTERVAL", "RetentionEvent", "RetentionReport", "apply_retention",
           "keeper_for", "retention_target", "run_retention"]


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


def keeper_for(vpg: RecoveryVPG, *,
               on_event: Callable[[RetentionEvent], None] | None = None) -> RetentionKeeper:
    """The retention mechanism of zcore.journal.history for `vpg`: rounds that find their
    target in the VPG's catalogue, refresh it after promoting and report state changes."""
    return RetentionKeeper(vpg.name, lambda: vpg.journals,
                           target=lambda now: retention_target(vpg, now=now),
                           refresh=vpg.refresh, on_event=on_event)


async def run_retention(vpgs: Callable[[], Iterable[RecoveryVPG]], stop: asyncio.Event, *,
                        interval: float = DEFAULT_INTERVAL,
                        on_report: Callable[[RetentionReport], None] | None = None,
                        on_event: Callable[[RetentionEvent], None] | None = None,
                        clock: Callable[[], float] = time.time) -> None:
    """The scheduler's retention loop: every `interval` seconds, one round over the VPGs
    `vpgs()` returns, each in a worker thread, until `stop` is set; `on_report` gets
    every round that promoted or skipped something, `on_event` every change of a
    journal's history or limit state (zcore.journal.history.RetentionEvent)."""
    keepers: dict[int, tuple[RecoveryVPG, RetentionKeeper]] = {}
    while not stop.is_set():
        current = list(vpgs())
        keepers = {id(v): keepers.get(id(v)) or (v, keeper_for(v, on_event=on_event))
                   for v in current}
        for vpg in current:
            if stop.is_set():
                return
            keeper = keepers[id(vpg)][1]
            try:
                report = await asyncio.to_thread(keeper.run_round, now=clock())
            except ZcoreError as exc:  # a closed VPG (deleted meanwhile) or a bad journal
                log.warning("retention of VPG %s skipped: %s", vpg.name, exc)
                continue
            if on_report is not None and (report.promoted or report.skipped):
                on_report(report)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
