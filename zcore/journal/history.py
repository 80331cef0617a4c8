"""History retention of a group of journals (one VPG's, one journal per VM): the one
mechanism that promotes what aged past the history and reports the journals' history
and journal-full states as events.  It sits beside the journal and above it: it only
calls public Journal methods.  The recovery site runs it on a timer
(zcore.replication.recovery_site); the site service's scheduler drives the same rounds
through zcore.site.retention.

The rule is group-wide: promote every journal to the same checkpoint, the newest usable
one (every journal holds it durably) whose time is at or before now - history.  So
  - the group keeps its configured history: its oldest kept checkpoint is at or before
    now - history;
  - the journals drop the same checkpoints: one promoted away in one journal is unusable
    in all, so promoting journals apart only wastes the others' space;
  - a stopped stream (a disaster at the protected site) keeps its last usable
    checkpoint: the target is a usable checkpoint and promotion keeps it.  Each
    journal's own `promote()` keeps that journal's newest checkpoint, which need not be
    usable when another journal lags: applied per journal it could leave the group none.
A journal whose views pin a checkpoint below the target is skipped this round (reported)
and catches up in a later one.

Events.  A `RetentionKeeper` remembers each journal's last history state (building while
the journal is younger than its history, then ok, warning or error: zcore.journal's
status) and its limit state (ok, near the limit, full), and reports every change as a
`RetentionEvent`, so an alert is raised once when history falls short or the journal
fills, and once more when it recovers.

Blocking: promotion reads segments, writes and fsyncs replicas.  Every function here
runs in the caller's thread: call it from a worker thread, never on an event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from zcore.errors import CheckpointNotFoundError, JournalFullError, ZcoreError
from zcore.journal.core import Journal
from zcore.journal.settings import HistoryState, JournalStatus

log = logging.getLogger(__name__)

# Seconds between retention rounds: checkpoints come every few seconds and history is
# kept for hours, so a minute late costs at most a minute of extra journal.
DEFAULT_INTERVAL = 60.0


class EventKind(StrEnum):
    """What a retention event is about."""

    HISTORY = "history"  # a journal's history state changed (HistoryState values)
    LIMIT = "limit"  # a journal's size state changed (LimitState values)
    PROMOTION_FAILED = "promotion_failed"  # a journal could not promote (stopped, damaged)


class LimitState(StrEnum):
    """A journal's size against its hard limit."""

    OK = "ok"
    NEAR_LIMIT = "near_limit"
    FULL = "full"


@dataclass(frozen=True)
class RetentionEvent:
    """One change of state of one journal of a group, as a retention round saw it."""

    group: str
    vm: str
    kind: EventKind
    state: str  # the new state (a HistoryState or LimitState value; "error" for failures)
    previous: str | None  # None on the first round that saw the journal
    message: str


@dataclass(frozen=True)
class RetentionReport:
    """What one retention round did to one group (a VPG)."""

    vpg: str
    target_seq: int | None  # None: no usable checkpoint is old enough
    promoted: dict[str, int] = field(default_factory=dict)  # VM -> new promotion watermark
    skipped: dict[str, str] = field(default_factory=dict)  # VM -> why (a pinning view...)
    events: list[RetentionEvent] = field(default_factory=list)


def group_history(journals: Mapping[str, Journal]) -> float:
    """The history a group keeps: the longest its journals are configured for."""
    return max(j.settings.history_seconds for j in journals.values())


def usable_target(journals: Mapping[str, Journal], *, now: float | None = None,
                  history_seconds: float | None = None) -> int | None:
    """The seq of the newest checkpoint at or before now - history that every journal of
    the group holds durably (None when none is that old).  Costs one pass over the first
    journal's checkpoints; a caller that keeps a catalogue of usable checkpoints (the
    site's RecoveryVPG) passes its own target to `apply_retention` instead."""
    if not journals:
        return None
    now = time.time() if now is None else now
    history = group_history(journals) if history_seconds is None else history_seconds
    first, *others = journals.values()
    for c in reversed(first.checkpoints(end=now - history)):
        if all(j.durable_seq >= c.seq for j in journals.values()) and all(
                _holds(j, c.seq) for j in others):
            return c.seq
    return None


def _holds(journal: Journal, seq: int) -> bool:
    try:
        journal.checkpoint_by_id(seq)
    except CheckpointNotFoundError:
        return False
    return True


def apply_retention(name: str, journals: Mapping[str, Journal],
                    target: int | None) -> RetentionReport:
    """Promote every journal of the group `name` to `target` (blocking: worker thread).
    A journal a view pins, or one that stopped, is skipped and reported."""
    if target is None:
        return RetentionReport(name, None)
    promoted: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for vm, journal in journals.items():
        if journal.promoted_seq >= target:
            continue
        try:
            promoted[vm] = journal.promote_to(target)
        except JournalFullError as exc:  # a view pins an older checkpoint
            skipped[vm] = str(exc)
        except ZcoreError as exc:  # a stopped journal: its own error says how to recover
            skipped[vm] = str(exc)
            log.error("retention of %s: journal of VM %s: %s", name, vm, exc)
    return RetentionReport(name, target, promoted, skipped)


def limit_state(status: JournalStatus) -> LimitState:
    if status.full:
        return LimitState.FULL
    return LimitState.NEAR_LIMIT if status.near_limit else LimitState.OK


class RetentionKeeper:
    """Retention of one group of journals, round after round, with the states it saw.

    `journals` is the group (or a callable returning it, for a group whose journals
    change); `target(now)` overrides how the target is found (default: usable_target);
    `on_event` receives every event, `refresh` is called after a round that promoted.
    Thread-safe: rounds are serialised."""

    def __init__(self, name: str,
                 journals: Mapping[str, Journal] | Callable[[], Mapping[str, Journal]], *,
                 target: Callable[[float], int | None] | None = None,
                 on_event: Callable[[RetentionEvent], None] | None = None,
                 refresh: Callable[[], None] | None = None) -> None:
        self.name = name
        self._journals = journals
        self._target = target
        self.on_event = on_event
        self._refresh = refresh
        self._states: dict[tuple[str, EventKind], str] = {}
        self._lock = threading.Lock()

    @property
    def journals(self) -> Mapping[str, Journal]:
        return self._journals() if callable(self._journals) else self._journals

    def run_round(self, *, now: float | None = None) -> RetentionReport:
        """One round: promote what aged past the history, then report state changes."""
        now = time.time() if now is None else now
        with self._lock:
            journals = dict(self.journals)
            target = (self._target(now) if self._target is not None
                      else usable_target(journals, now=now))
            report = apply_retention(self.name, journals, target)
            if report.promoted and self._refresh is not None:
                self._refresh()
            failed = {vm: why for vm, why in report.skipped.items() if "pins" not in why}
            changes = [self._change(vm, EventKind.PROMOTION_FAILED,
                                   "error" if vm in failed else "ok",
                                    failed.get(vm, "promotion works again"))
                       for vm in journals]
            for vm, journal in journals.items():
                changes += self._journal_events(vm, journal, now)
            events = [e for e in changes if e is not None]
        for event in events:
            log.log(logging.INFO if event.state in ("ok", "building") else logging.WARNING,
                    "%s VM %s: %s", self.name, event.vm, event.message)
            if self.on_event is not None:
                self.on_event(event)
        return RetentionReport(report.vpg, report.target_seq, report.promoted,
                               report.skipped, events)

    def _journal_events(self, vm: str, journal: Journal,
                        now: float) -> list[RetentionEvent | None]:
        try:
            st = journal.status(now=now)
        except ZcoreError as exc:  # closed or stopped meanwhile: the next round retries
            log.debug("retention of %s: status of VM %s: %s", self.name, vm, exc)
            return []
        history = st.history_state
        limit = limit_state(st)
        held_h, want_h = st.history_held_seconds / 3600, st.history_configured_seconds / 3600
        return [
            self._change(vm, EventKind.HISTORY, history.value,
                         f"history {history.value}: {held_h:.2f} h held of {want_h:.2f} h"
                         + (" (building up)" if history == HistoryState.BUILDING else "")),
            self._change(vm, EventKind.LIMIT, limit.value,
                         f"journal {limit.value.replace('_', ' ')}: {st.size_bytes} bytes"
                         f" of {st.hard_limit_bytes} (warning at {st.warning_limit_bytes})"),
        ]

    def _change(self, vm: str, kind: EventKind, state: str,
                message: str) -> RetentionEvent | None:
        """An event when the (vm, kind) state differs from the last one seen.  A first
        sighting of a good state is not news; a first bad one is."""
        key = (vm, kind)
        previous = self._states.get(key)
        self._states[key] = state
        if state == previous:
            return None
        if previous is None and state in ("ok", "building"):
            return None
        return RetentionEvent(self.name, vm, kind, state, previous, message)

    def states(self) -> dict[tuple[str, EventKind], str]:
        """The last state seen of each (VM, kind)."""
        with self._lock:
            return dict(self._states)
