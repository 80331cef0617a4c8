"""The site scheduler: the periodic jobs of a running site.

Sits beside the REST API on the service's event loop, over zcore.site.runtime (what it
samples) and the database (where alerts, events and VPG states go).  Jobs:

- every `SAMPLE_INTERVAL` seconds, one sample of every VPG: RPO, throughput, journal
  bytes, history held (into the metric history, and kept as `last` for /metrics);
  protected VPGs' states into the database (syncing, protecting, error) with their new
  library events as site events; RPO SLA alerts raised and cleared; history SLA alerts
  at the recovery site;
- history retention of the recovery VPGs (zcore.site.retention), every minute;
- the metric history's snapshot, at most once a minute;
- the failover-test reminder of the recovery operations (zcore.site.operations), with
  every sample.

Every sample is taken in a worker thread (a VPG's status takes its lock, a journal's
status reads its segment table); database writes go through worker threads too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from zcore.errors import ZcoreError
from zcore.journal import HistoryState
from zcore.replication import ReplicationState, ReplicationStatus
from zcore.site.db import Severity, SiteDB, VpgRole, VpgState
from zcore.site.metrics import Series
from zcore.site.retention import RetentionReport, run_retention
from zcore.site.runtime import SiteRuntime
from zcore.vpg import VPGMode

log = logging.getLogger(__name__)

# Seconds between samples: the metric history's finest tier is 5 s wide.
SAMPLE_INTERVAL = 5.0
# A history SLA alert needs this many samples in a row short of history: a young journal's
# first seconds (created before its first checkpoint arrived) are no shortfall.
HISTORY_SAMPLES = 3
RPO_ALERT = "rpo_not_meeting_sla"
HISTORY_ALERT = "history_not_meeting_sla"


def history_short(state: str) -> bool:
    """Whether a recovery VPG's history state (RecoveryVPGStatus.history_state) falls short
    of its SLA: "warning" or "error"; "building" is the grace while a young VPG's history
    builds up (the alert fired 15 s after every VPG was created)."""
    return state in (HistoryState.WARNING, HistoryState.ERROR)


@dataclass
class Sample:
    """One VPG's figures at one sample (what /metrics exports)."""

    vpg: str
    role: str
    rpo_seconds: float | None = None
    throughput_in: float | None = None
    throughput_out: float | None = None
    journal_bytes: int | None = None
    history_seconds: float | None = None
    sync_progress: float | None = None
    bitmap_mode: bool = False
    state: str = ""
    rpo_alert: bool = False
    rpo_alert_seconds: float = 0.0
    history_ok: bool = True
    events: tuple[str, ...] = field(default_factory=tuple)
    connected: bool | None = None  # protected: the link to the recovery site
    last_error: str = ""


def new_events(before: tuple[str, ...], now: tuple[str, ...]) -> list[str]:
    """The events of `now` after those of `before` (both the tail of one event log,
    at most 100 long): the longest suffix of `before` that starts `now` is skipped."""
    for k in range(min(len(before), len(now)), 0, -1):
        if before[-k:] == now[:k]:
            return list(now[k:])
    return list(now)


class Scheduler:
    """Runs the site's periodic jobs until `stop`."""

    def __init__(self, db: SiteDB, runtime: SiteRuntime) -> None:
        self.db = db
        self.rt = runtime
        self.last: dict[str, Sample] = {}
        self._events: dict[str, tuple[str, ...]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._short: dict[str, int] = {}  # samples in a row short of history, per VPG
        self._links: dict[str, bool] = {}  # protected VPGs: link up at the last sample
        self._refused: tuple[str, ...] = ()  # the recovery site's refusals seen so far
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.operations: Any = None  # zcore.site.operations.RecoveryOperations

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._sampling(), name="zcore-sampling"),
            loop.create_task(run_retention(lambda: list(self.rt.recovery_vpgs.values()),
                                           self._stop, on_report=self._retained),
                             name="zcore-retention"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _sampling(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sample_once()
            except Exception:  # a bad round is logged; the next one runs
                log.exception("site sampling failed")
            try:
                await asyncio.wait_for(self._stop.wait(), SAMPLE_INTERVAL)
            except TimeoutError:
                pass

    async def sample_once(self) -> None:
        # a sender's status is read on the loop, which owns its throughput meter (the
        # VPG lock it takes is held for one stream round at most)
        senders = {name: e.replication.status() for name, e in self.rt.protected.items()}
        samples = await asyncio.to_thread(self._take_samples, senders)
        self.last = {s.vpg: s for s in samples}
        refused = tuple(self.rt.recovery.refused) if self.rt.recovery is not None else ()
        fresh, self._refused = new_events(self._refused, refused), refused
        await asyncio.to_thread(self._record, samples, fresh)
        if self.operations is not None:
            await self.operations.remind_once()

    # -- in a worker thread --------------------------------------------------------------

    def _take_samples(self, senders: dict[str, ReplicationStatus]) -> list[Sample]:
        out = []
        for name, s in senders.items():
            entry = self.rt.protected.get(name)
            if entry is None:
                continue
            try:
                vs = entry.vpg.status()
            except ZcoreError as exc:
                log.warning("VPG %s: no status: %s", name, exc)
                continue
            total = s.sync_total_bytes
            out.append(Sample(
                name, str(VpgRole.PROTECTED), rpo_seconds=s.rpo_seconds,
                throughput_out=s.throughput_bytes,
                sync_progress=(s.sync_done_bytes / total if total else 0.0)
                if vs.mode.syncing else None,
                bitmap_mode=vs.mode in (VPGMode.BITMAP, VPGMode.BITMAP_SYNCING),
                state=str(s.state), rpo_alert=vs.rpo_alert,
                rpo_alert_seconds=entry.vpg.settings.rpo_alert_seconds, events=vs.events,
                connected=s.connected, last_error=s.last_error))
        for name, rvpg in list(self.rt.recovery_vpgs.items()):
            try:
                st = rvpg.status()
            except ZcoreError as exc:
                log.warning("VPG %s: no status: %s", name, exc)
                continue
            rpo = st.rpo_seconds
            if rpo is None and st.newest_checkpoint is not None:  # an upper bound: the age
                rpo = max(0.0, time.time() - st.newest_checkpoint.time)  # of the newest one
            out.append(Sample(
                name, str(VpgRole.RECOVERY), rpo_seconds=rpo,
                throughput_in=st.throughput_bytes, journal_bytes=st.journal_bytes,
                history_seconds=st.history_held_seconds, state=str(st.state),
                history_ok=not history_short(st.history_state)))
        return out

    def _record(self, samples: list[Sample], refused: list[str]) -> None:
        metrics = self.rt.metrics
        now = time.time()
        for reason in refused:
            self.db.add_event("replication_refused", f"replication refused: {reason}",
                              severity=Severity.WARNING)
        for s in samples:
            if metrics is not None:
                for series, value in ((Series.RPO, s.rpo_seconds),
                                      (Series.THROUGHPUT_IN, s.throughput_in),
                                      (Series.THROUGHPUT_OUT, s.throughput_out),
                                      (Series.JOURNAL_BYTES, s.journal_bytes),
                                      (Series.HISTORY_SECONDS, s.history_seconds)):
                    if value is not None:
                        metrics.record(s.vpg, series, value, now)
            try:
                if s.role == VpgRole.PROTECTED:
                    self._protected_db(s)
                else:
                    short = self._short[s.vpg] = 0 if s.history_ok else \
                        self._short.get(s.vpg, 0) + 1
                    self._alert(s.vpg, HISTORY_ALERT, short >= HISTORY_SAMPLES,
                                f"VPG {s.vpg} holds less history than configured")
            except ZcoreError as exc:  # deleted meanwhile, or the database is away
                log.warning("VPG %s: recording its sample failed: %s", s.vpg, exc)
        if metrics is not None:
            metrics.maybe_save()

    def _protected_db(self, s: Sample) -> None:
        for text in new_events(self._events.get(s.vpg, ()), s.events):
            severity = Severity.WARNING if "lost" in text or "failed" in text else Severity.INFO
            self.db.add_event("vpg_event", text, vpg=s.vpg, severity=severity)
        self._events[s.vpg] = s.events
        if s.connected is not None and self._links.get(s.vpg) != s.connected:
            if s.connected:
                self.db.add_event("link_up", f"VPG {s.vpg}: connected to its recovery site",
                                  vpg=s.vpg)
            elif s.vpg in self._links:
                self.db.add_event("link_down", f"VPG {s.vpg}: link to its recovery site "
                                  f"lost: {s.last_error or 'no reason given'}", vpg=s.vpg,
                                  severity=Severity.WARNING)
            self._links[s.vpg] = s.connected
        self._alert(s.vpg, RPO_ALERT, s.rpo_alert,
                    f"VPG {s.vpg}: RPO {s.rpo_seconds or 0:.1f} s is above its "
                    f"{s.rpo_alert_seconds:g} s SLA")
        record = self.db.get_vpg(s.vpg)
        if record.state in (VpgState.PAUSED, VpgState.DELETING, VpgState.CREATING):
            return
        want = VpgState.SYNCING if ReplicationState(s.state).syncing else VpgState.PROTECTING
        if record.state != want:
            self.db.update_vpg(s.vpg, state=want)

    def _alert(self, vpg: str, code: str, active: bool, text: str) -> None:
        current = [a for a in self.db.list_alerts(vpg=vpg, active=True) if a.code == code]
        if active and not current:
            self.db.raise_alert(code, text, vpg=vpg, severity=Severity.WARNING)
            self.db.add_event(code, text, vpg=vpg, severity=Severity.WARNING)
        elif not active:
            for alert in current:
                self.db.clear_alert(alert.id)
                self.db.add_event(f"{code}_cleared", f"VPG {vpg}: alert cleared", vpg=vpg)

    def _retained(self, report: RetentionReport) -> None:
        text = (f"retention promoted {len(report.promoted)} journal(s) to seq "
                f"{report.target_seq}")
        if report.skipped:
            text += f"; skipped: {', '.join(f'{k}: {v}' for k, v in report.skipped.items())}"
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(
            self.db.add_event, "retention", text, vpg=report.vpg,
            severity=Severity.WARNING if report.skipped else Severity.INFO))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
