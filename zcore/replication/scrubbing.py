"""The recovery site's background scrub: every journal the site holds is checked by
`Journal.scrub` on a timer, in a worker thread, at a bounded rate, and what it finds is
logged and kept as events (`ScrubTimer.events`).

Sits beside zcore.replication.recovery_site, which starts it with the server and stops
it first when the server stops (a scrub in progress ends at its next chunk).  The
journals keep serving appends and reads meanwhile: the scrub reads through its own
descriptors and takes the journal's locks a chunk at a time (zcore.journal.scrub).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from zcore.errors import ClosedError, ZcoreError
from zcore.journal import Journal, ScrubReport

log = logging.getLogger(__name__)

# Once a day: a full pass reads every journal and replica byte; at the default rate a
# site holding 2 TiB takes about half a day, well inside the interval.
DEFAULT_SCRUB_INTERVAL = 86400.0
# Bytes per second each scrub may read: about a tenth of what the journal disks here
# sustain (0.3-0.4 GB/s durable appends, docs/DESIGN.md), so replication keeps its pace.
DEFAULT_SCRUB_RATE = 48e6


@dataclass(frozen=True)
class ScrubEvent:
    """One journal's scrub result: when, which VPG and VM, and the report."""

    time: float
    vpg: str
    vm: str
    report: ScrubReport


class ScrubTimer:
    """Scrubs the journals that `journals()` lists ((vpg, vm, journal) triples), one
    after another, every `interval` seconds at `rate` bytes/s."""

    def __init__(self, journals: Callable[[], list[tuple[str, str, Journal]]], *,
                 interval: float = DEFAULT_SCRUB_INTERVAL,
                 rate: float | None = DEFAULT_SCRUB_RATE) -> None:
        self.journals = journals
        self.interval = interval
        self.rate = rate
        self.events: deque[ScrubEvent] = deque(maxlen=1000)
        self.rounds = 0
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._round: asyncio.Future[list[ScrubEvent]] | None = None

    def start(self) -> None:
        """Start the timer on the running event loop."""
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the timer and wait for a scrub in progress to end."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._round is not None:  # the worker thread runs on: wait for it to see stop
            await asyncio.wait([self._round])
            self._round = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.interval)
            self._round = asyncio.ensure_future(asyncio.to_thread(self.run_once))
            await asyncio.shield(self._round)
            self._round = None

    def run_once(self) -> list[ScrubEvent]:
        """Scrub every journal once (in the caller's thread); returns the new events."""
        new = []
        for vpg, vm, journal in self.journals():
            if self._stop.is_set():
                break
            try:
                report = journal.scrub(rate_bytes_per_s=self.rate, stop=self._stop)
            except ClosedError:
                continue  # detached while the round went on
            except ZcoreError as exc:
                log.error("scrub of VPG %s VM %s failed: %s", vpg, vm, exc)
                continue
            event = ScrubEvent(time.time(), vpg, vm, report)
            self.events.append(event)
            new.append(event)
            if report.clean:
                log.info("scrub of VPG %s VM %s: clean (%d bytes in %.1f s%s)", vpg, vm,
                         report.bytes_read, report.seconds,
                         "" if report.complete else ", stopped early")
            for d in report.damage:
                log.error("scrub of VPG %s VM %s: %s damage in %s at %d+%d%s: %s", vpg, vm,
                          d.kind, d.file, d.offset, d.length,
                          f" seqs {d.seqs[0]}..{d.seqs[1]}" if d.seqs else "", d.detail)
        self.rounds += 1
        return new
