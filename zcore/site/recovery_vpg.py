"""The recovery-site VPG: one object over the per-VM journals of a VPG (issue 10).

Sits above zcore.journal (one `Journal` per VM, fed by zcore.replication's receiver, which
appends each VM's part of every bundle, checkpoint markers included, to that VM's journal)
and below the site service's API, CLI and operations.  It answers the questions a person
asks of a VPG at the recovery site: which checkpoints can I recover to, the last one
before 14:05, how many per hour over 30 days, what state is the VPG in, and it opens a
view of every volume of every VM at one checkpoint.

A VPG checkpoint is usable when every journal of the VPG holds it durably: the same seq is
among every journal's checkpoints and every journal's durable seq is at or past it.  A
checkpoint one journal has promoted away (or never got) is not usable.

Cost.  A 30-day history holds about half a million checkpoints, so the usable ones are
kept as sorted numpy columns (seq, time key, flags, and the `Checkpoint` objects of the
first journal, shared rather than copied), updated incrementally: `refresh` reads each
journal's `status()` (O(segments)); when the first journal's newest checkpoint changed it
lists that journal's checkpoints and takes the new ones as candidates, and asks every
other journal for each candidate by id (a bisect) once it has passed that seq (O(new log
total)).  Listing, paging, `before`, `by_id` and `buckets` bisect the columns and filter
with vectorized numpy, so a page of n costs O(n + log total), never O(total) Python
work.  Memory: 25 bytes per usable checkpoint (about 12 MB for 500,000) plus what the
journals already hold.  (Listing the first journal's checkpoints is the journal's own
O(total) loop, about 0.3 us per checkpoint: `Journal` has no "checkpoints after seq"
call today; it runs only when a checkpoint arrived.)

Time.  Checkpoint times come from the protected site's clock.  Ranges, `before` and
buckets use a time key that never decreases along seq (the running maximum of the
times), so a clock stepping back cannot break the ordering bisect relies on; with a
monotonic clock the key is the checkpoint's own time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zcore.errors import CheckpointNotFoundError, ConfigError
from zcore.journal import Journal, JournalStatus, View
from zcore.records import Checkpoint, CheckpointKind

FLAG_TAGGED = 0x01
FLAG_CONSISTENT = 0x02
# The columns grow by doubling from this many rows; 5-second checkpoints fill it in ~1.4 h.
INITIAL_ROWS = 1024
# A filtered listing scans the candidate range in chunks of at least this many rows (or 4
# pages), so a selective filter on a long history stays vectorized and a `limit` stops it.
SCAN_CHUNK = 4096
# More candidates than this to decide at once (a VPG opened on a long history) and the
# other journals are listed once each instead of asked per checkpoint (a Python bisect
# of ~3 us each against ~0.3 us per listed checkpoint).
BULK_CHECK = 256
# buckets() refuses more buckets than this in one call (a chart has a few hundred).
MAX_BUCKETS = 100_000
# The journal directory marker a VPG directory's VM subdirectories hold.
JOURNAL_MARKER = "journal.meta"
# Throughput is the received-bytes rate over this window (seconds) of status() samples.
THROUGHPUT_WINDOW = 10.0
# Default RPO alert threshold (seconds): Zerto's default SLA alert is at 5 minutes.
DEFAULT_RPO_ALERT = 300.0


class RecoveryVPGState(StrEnum):
    """The state of a VPG as its recovery site sees it, most urgent first."""

    JOURNAL_FULL = "journal_full"
    SYNCING = "syncing"
    INITIALIZING = "initializing"  # no usable checkpoint yet
    RPO_NOT_MEETING_SLA = "rpo_not_meeting_sla"
    JOURNAL_NEAR_LIMIT = "journal_near_limit"
    HISTORY_NOT_MEETING_SLA = "history_not_meeting_sla"
    MEETING_SLA = "meeting_sla"


@dataclass(frozen=True)
class SyncProgress:
    """An initial, bitmap or delta sync as the replication layer reports it."""

    total_bytes: int
    done_bytes: int
    rate_bytes: float | None = None  # bytes per second, when known

    @property
    def eta_seconds(self) -> float | None:
        if not self.rate_bytes or self.rate_bytes <= 0:
            return None
        return max(0, self.total_bytes - self.done_bytes) / self.rate_bytes

    @property
    def done(self) -> bool:
        return self.done_bytes >= self.total_bytes


@dataclass(frozen=True)
class RecoveryVPGStatus:
    name: str
    state: RecoveryVPGState
    rpo_seconds: float | None  # None: no replication receiver was given
    rpo_alert_seconds: float
    checkpoints: int  # usable checkpoints
    oldest_checkpoint: Checkpoint | None
    newest_checkpoint: Checkpoint | None
    history_held_seconds: float
    history_configured_seconds: float
    history_state: str  # worst of the journals': "building", "ok", "warning", "error"
    journal_bytes: int  # sums over the VPG's journals
    journal_hard_limit_bytes: int | None  # None when any journal has no hard limit
    journal_warning_bytes: int | None
    near_limit: bool  # any journal past its warning threshold
    full: bool  # any journal full
    durable_seq: int  # every journal is durable up to here
    last_seq: int
    throughput_bytes: float | None  # received bytes per second (recent), when known
    sync: SyncProgress | None
    journals: dict[str, JournalStatus]


@dataclass(frozen=True)
class CheckpointBucket:
    """Checkpoints whose time falls in [start, end) (seconds since the epoch)."""

    start: float
    end: float
    count: int
    auto: int
    tagged: int
    inconsistent: int
    first_id: int | None
    last_id: int | None


def _ns(t: float) -> int:
    return round(t * 1e9)


def _flags(c: Checkpoint) -> int:
    return (FLAG_TAGGED if c.kind == CheckpointKind.TAGGED else 0) | (
        FLAG_CONSISTENT if c.consistent else 0)


def _kind(kind: str | CheckpointKind | None) -> CheckpointKind | None:
    if kind is None:
        return None
    try:
        return CheckpointKind(kind)
    except ValueError:
        raise ConfigError(f"unknown checkpoint kind {kind!r} (auto or tagged)") from None


class _Columns:
    """The usable checkpoints, sorted by seq: rows [lo, hi) of growable numpy columns."""

    def __init__(self) -> None:
        self.seq: npt.NDArray[np.int64] = np.zeros(INITIAL_ROWS, np.int64)
        self.key: npt.NDArray[np.int64] = np.zeros(INITIAL_ROWS, np.int64)
        self.flags: npt.NDArray[np.uint8] = np.zeros(INITIAL_ROWS, np.uint8)
        self.obj: npt.NDArray[np.object_] = np.empty(INITIAL_ROWS, object)
        self.lo = 0
        self.hi = 0

    def __len__(self) -> int:
        return self.hi - self.lo

    def extend(self, cs: list[Checkpoint]) -> None:
        """Append checkpoints whose seqs follow the last row's, in order."""
        n = len(cs)
        if not n:
            return
        while self.hi + n > len(self.seq):
            self._regrow(self.hi + n - self.lo)
        a, b = self.hi, self.hi + n
        last = int(self.key[a - 1]) if a > self.lo else 0
        times = np.fromiter((c.time_ns for c in cs), np.int64, n)
        times[0] = max(int(times[0]), last)
        self.seq[a:b] = np.fromiter((c.seq for c in cs), np.int64, n)
        self.key[a:b] = np.maximum.accumulate(times)
        self.flags[a:b] = np.fromiter((_flags(c) for c in cs), np.uint8, n)
        self.obj[a:b] = cs
        self.hi = b

    def _regrow(self, need: int) -> None:
        """Compact the live rows to the front; double the capacity while `need` rows
        would fill more than half of it."""
        n = len(self)
        cap = len(self.seq)
        while need > cap // 2:
            cap *= 2
        for name in ("seq", "key", "flags", "obj"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype) if old.dtype != object else np.empty(cap, object)
            new[:n] = old[self.lo:self.hi]
            setattr(self, name, new)
        self.lo, self.hi = 0, n

    def drop_below(self, seq: int) -> None:
        """Forget rows whose seq is below `seq` (promoted away in some journal)."""
        cut = self.lo + int(np.searchsorted(self.seq[self.lo:self.hi], seq, "left"))
        if cut > self.lo:
            self.obj[self.lo:cut] = None  # release the Checkpoint objects
            self.lo = cut

    def index(self, column: npt.NDArray[Any], value: int, side: str = "left") -> int:
        return self.lo + int(np.searchsorted(column[self.lo:self.hi], value, side))  # type: ignore[call-overload]


class RecoveryVPG:
    """One VPG at the recovery site, over its per-VM journals (thread-safe).

    `journals` maps each VM's name to its open `Journal`; `open(path)` opens every VM
    subdirectory of a VPG directory instead (and closes them in `close`).  `rpo`,
    `received_bytes` and `sync_progress` are optional callables the replication layer
    provides: seconds of RPO, the receiver's byte counter, the sync in progress.
    `refresh_interval` bounds how often queries refresh from the journals (0: always)."""

    def __init__(
        self,
        name: str,
        journals: Mapping[str, Journal],
        *,
        rpo: Callable[[], float | None] | None = None,
        received_bytes: Callable[[], int] | None = None,
        sync_progress: Callable[[], SyncProgress | None] | None = None,
        rpo_alert_seconds: float = DEFAULT_RPO_ALERT,
        refresh_interval: float = 0.0,
        owns_journals: bool = False,
    ) -> None:
        if not journals:
            raise ConfigError(f"VPG {name} has no journals")
        self.name = name
        self._journals = dict(journals)
        self._vms = list(self._journals)
        self._rpo = rpo
        self._received = received_bytes
        self._sync = sync_progress
        self.rpo_alert_seconds = rpo_alert_seconds
        self.refresh_interval = refresh_interval
        self._owns = owns_journals
        self._lock = threading.RLock()
        self._cols = _Columns()
        n = len(self._vms)
        self._pending: deque[Checkpoint] = deque()  # the first journal's, not decided yet
        self._seen_ckpt = 0  # newest checkpoint seq taken from the first journal
        self._seen = [0] * n  # each journal's checkpoints are known up to this seq
        self._durable = [0] * n
        self._statuses: list[JournalStatus] = []
        self._last_refresh = -math.inf
        self._rate: deque[tuple[float, int]] = deque()
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, name: str | None = None, **kwargs: Any) -> RecoveryVPG:
        """Open every VM journal under a VPG directory (one subdirectory per VM, as the
        replication receiver lays them out); the VPG closes them in `close`."""
        path = Path(path)
        dirs = sorted(p for p in path.iterdir() if (p / JOURNAL_MARKER).exists()) \
            if path.is_dir() else []
        if not dirs:
            raise ConfigError(f"{path} holds no VM journals (no subdirectory with "
                              f"{JOURNAL_MARKER})")
        journals: dict[str, Journal] = {}
        try:
            for d in dirs:
                journals[d.name] = Journal.open(d)
        except BaseException:
            for j in journals.values():
                j.close()
            raise
        return cls(name or path.name, journals, owns_journals=True, **kwargs)

    @property
    def vms(self) -> list[str]:
        return list(self._vms)

    @property
    def journals(self) -> dict[str, Journal]:
        return dict(self._journals)

    # ---- keeping up with the journals --------------------------------------------------

    def refresh(self) -> None:
        """Take in what the journals gained (and lost to promotion) since the last call.

        Only the first journal's checkpoints are listed (when its newest one changed):
        they are the candidates, since a checkpoint it lacks is not usable; each other
        journal is asked for a candidate by id (a bisect) once it has passed that seq."""
        with self._lock:
            self._statuses = [j.status() for j in self._journals.values()]
            first = self._statuses[0].newest_checkpoint
            if first is not None and first.seq > self._seen_ckpt:
                self._take_new(self._journals[self._vms[0]].checkpoints())
            floor = 0
            for i, st in enumerate(self._statuses):
                self._seen[i] = max(self._seen[i], st.last_seq)
                self._durable[i] = max(self._durable[i], st.durable_seq)
                oldest = st.oldest_checkpoint
                # below its oldest checkpoint a journal holds none any more; holding none
                # at all, it holds none up to what it has seen
                floor = max(floor, oldest.seq if oldest is not None else self._seen[i] + 1)
            self._cols.drop_below(floor)
            while self._pending and self._pending[0].seq < floor:
                self._pending.popleft()
            self._merge()
            self._last_refresh = time.monotonic()

    def _take_new(self, listed: list[Checkpoint]) -> None:
        seen = self._seen_ckpt
        lo, hi = 0, len(listed)
        while lo < hi:  # first listed checkpoint past the ones already taken
            mid = (lo + hi) // 2
            if listed[mid].seq <= seen:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(listed):
            self._pending.extend(listed[lo:])
            self._seen_ckpt = listed[-1].seq

    def _merge(self) -> None:
        """Move the candidates every journal holds durably into the columns, in seq
        order; drop those some journal has passed without.  Stops at the first candidate
        a journal has not reached yet, or holds but not durably."""
        bound = min(min(self._seen), min(self._durable))
        pending = self._pending
        ready: list[Checkpoint] = []
        while pending and pending[0].seq <= bound:
            ready.append(pending.popleft())
        if not ready:
            return
        keep = np.ones(len(ready), bool)
        seqs = np.fromiter((c.seq for c in ready), np.int64, len(ready))
        for vm in self._vms[1:]:
            j = self._journals[vm]
            if len(ready) > BULK_CHECK:  # one listing beats many bisects (e.g. at open)
                held = np.fromiter((c.seq for c in j.checkpoints()), np.int64)
                keep &= np.isin(seqs, held, assume_unique=True)
                continue
            for k, c in enumerate(ready):
                if keep[k]:
                    try:
                        j.checkpoint_by_id(c.seq)
                    except CheckpointNotFoundError:
                        keep[k] = False  # this journal went past it without it
        self._cols.extend([c for c, ok in zip(ready, keep.tolist(), strict=True) if ok])

    def _fresh(self) -> _Columns:
        if self._closed:
            raise ConfigError(f"VPG {self.name} is closed")
        if time.monotonic() - self._last_refresh >= self.refresh_interval:
            self.refresh()
        return self._cols

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoints(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        tag: str | None = None,
        kind: str | CheckpointKind | None = None,
        consistent: bool | None = None,
        after_id: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Checkpoint]:
        """Usable checkpoints, oldest first (or newest first), filtered by time range
        (seconds since the epoch, inclusive), tag substring, kind and consistency.

        Paged: `limit` rows after the checkpoint `after_id` in listing order (the cursor is
        the last id of the previous page; it need not still exist)."""
        with self._lock:
            self._fresh()
            lo_ns = None if start is None else _ns(start)
            hi_ns = None if end is None else _ns(end)
            return self._select(lo_ns, hi_ns, tag, _kind(kind), consistent, after_id,
                                limit, newest_first)

    def count(self, *, start: float | None = None, end: float | None = None,
              tag: str | None = None, kind: str | CheckpointKind | None = None,
              consistent: bool | None = None) -> int:
        """How many usable checkpoints `checkpoints` would list without a limit."""
        with self._lock:
            cols = self._fresh()
            lo_ns = None if start is None else _ns(start)
            hi_ns = None if end is None else _ns(end)
            if tag is not None:  # the tag test is per checkpoint: count what matches
                return len(self._select(lo_ns, hi_ns, tag, _kind(kind), consistent, None,
                                        None, False))
            lo, hi = self._bounds(lo_ns, hi_ns, None, False)
            mask, want = self._flag_filter(_kind(kind), consistent)
            if not mask:
                return hi - lo
            return int(np.count_nonzero((cols.flags[lo:hi] & mask) == want))

    def _bounds(self, lo_ns: int | None, hi_ns: int | None, after_id: int | None,
                newest_first: bool) -> tuple[int, int]:
        cols = self._cols
        lo, hi = cols.lo, cols.hi
        if lo_ns is not None:
            lo = cols.index(cols.key, lo_ns, "left")
        if hi_ns is not None:
            hi = cols.index(cols.key, hi_ns, "right")
        if after_id is not None:
            if newest_first:
                hi = min(hi, cols.index(cols.seq, after_id, "left"))
            else:
                lo = max(lo, cols.index(cols.seq, after_id, "right"))
        return lo, max(lo, hi)

    @staticmethod
    def _flag_filter(kind: CheckpointKind | None, consistent: bool | None,
                     tagged_only: bool = False) -> tuple[int, int]:
        mask = want = 0
        if kind is not None or tagged_only:
            mask |= FLAG_TAGGED
            want |= FLAG_TAGGED if tagged_only or kind == CheckpointKind.TAGGED else 0
        if consistent is not None:
            mask |= FLAG_CONSISTENT
            want |= FLAG_CONSISTENT if consistent else 0
        return mask, want

    def _select(self, lo_ns: int | None, hi_ns: int | None, tag: str | None,
                kind: CheckpointKind | None, consistent: bool | None,
                after_id: int | None, limit: int | None,
                newest_first: bool) -> list[Checkpoint]:
        cols = self._cols
        lo, hi = self._bounds(lo_ns, hi_ns, after_id, newest_first)
        if limit is not None and limit < 0:
            raise ConfigError(f"limit {limit} is negative")
        if tag is not None and kind == CheckpointKind.AUTO:
            return []  # an automatic checkpoint has no tag
        mask, want = self._flag_filter(kind, consistent, tagged_only=tag is not None)
        if not mask:  # no filter: one slice
            if limit is not None:
                lo, hi = (max(lo, hi - limit), hi) if newest_first else (lo, min(hi, lo + limit))
            rows = cols.obj[lo:hi]
            return list((rows[::-1] if newest_first else rows).tolist())
        out: list[Checkpoint] = []
        chunk = max(SCAN_CHUNK, 4 * (limit or 0))
        pos = hi if newest_first else lo
        while (pos > lo if newest_first else pos < hi) and (limit is None or len(out) < limit):
            a, b = (max(lo, pos - chunk), pos) if newest_first else (pos, min(hi, pos + chunk))
            pos = a if newest_first else b
            idx = np.flatnonzero((cols.flags[a:b] & mask) == want) + a
            if newest_first:
                idx = idx[::-1]
            found = cols.obj[idx].tolist()
            if tag is not None:
                found = [c for c in found if c.tag is not None and tag in c.tag]
            out.extend(found)
        return out if limit is None else out[:limit]

    def latest(self, *, kind: str | CheckpointKind | None = None, tagged: bool = False,
               consistent: bool | None = None) -> Checkpoint:
        """The newest usable checkpoint (of that kind, tagged, consistent or not)."""
        k = CheckpointKind.TAGGED if tagged else _kind(kind)
        found = self.checkpoints(kind=k, consistent=consistent, limit=1, newest_first=True)
        if not found:
            raise CheckpointNotFoundError(self._none_message(k, consistent))
        return found[0]

    def before(self, t: float, *, kind: str | CheckpointKind | None = None,
               consistent: bool | None = None) -> Checkpoint:
        """The last usable checkpoint strictly before time `t` (seconds since the epoch)."""
        with self._lock:
            self._fresh()
            found = self._select(None, _ns(t) - 1, None, _kind(kind), consistent, None, 1,
                                 True)
            if not found:
                raise CheckpointNotFoundError(
                    self._none_message(_kind(kind), consistent) + f" before {t:.3f}")
            return found[0]

    def by_id(self, checkpoint_id: int) -> Checkpoint:
        with self._lock:
            cols = self._fresh()
            i = cols.index(cols.seq, checkpoint_id)
            if i < cols.hi and int(cols.seq[i]) == checkpoint_id:
                c: Checkpoint = cols.obj[i]
                return c
            held = (f"it holds {len(cols)} usable checkpoints, ids {int(cols.seq[cols.lo])} "
                    f"to {int(cols.seq[cols.hi - 1])}") if len(cols) else "it holds none yet"
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id} is not usable in VPG {self.name}: {held}")

    def _none_message(self, kind: CheckpointKind | None, consistent: bool | None) -> str:
        what = " ".join(w for w in ("consistent" if consistent else
                                    "inconsistent" if consistent is False else "",
                                    kind.value if kind else "") if w)
        return f"VPG {self.name} holds no usable {what + ' ' if what else ''}checkpoint"

    def buckets(self, start: float, end: float, width_seconds: float) -> list[CheckpointBucket]:
        """Counts of usable checkpoints per time bucket [start + k*width, start +
        (k+1)*width) covering [start, end): auto, tagged, inconsistent, first and last id."""
        if not width_seconds > 0 or not end > start:
            raise ConfigError("buckets need end > start and a positive width")
        nb = math.ceil((end - start) / width_seconds)
        if nb > MAX_BUCKETS:
            raise ConfigError(f"{nb} buckets asked for; the limit is {MAX_BUCKETS}")
        with self._lock:
            cols = self._fresh()
            edges = np.array([_ns(start + k * width_seconds) for k in range(nb)]
                             + [_ns(end)], np.int64)
            key = cols.key[cols.lo:cols.hi]
            idx = np.searchsorted(key, edges, "left") + cols.lo
            a, b = int(idx[0]), int(idx[-1])
            flags = cols.flags[a:b]
            rel = idx - a
            counts = np.diff(idx)
            # tagged and inconsistent rows are few: count them by bisecting their positions
            tagged_at = np.flatnonzero(flags & FLAG_TAGGED)
            incons_at = np.flatnonzero((flags & FLAG_CONSISTENT) == 0)
            n_tag = np.diff(np.searchsorted(tagged_at, rel, "left"))
            n_inc = np.diff(np.searchsorted(incons_at, rel, "left"))
            out = []
            for k in range(nb):
                n = int(counts[k])
                out.append(CheckpointBucket(
                    start=start + k * width_seconds,
                    end=min(end, start + (k + 1) * width_seconds),
                    count=n, auto=n - int(n_tag[k]), tagged=int(n_tag[k]),
                    inconsistent=int(n_inc[k]),
                    first_id=int(cols.seq[idx[k]]) if n else None,
                    last_id=int(cols.seq[idx[k + 1] - 1]) if n else None))
            return out

    # ---- status --------------------------------------------------------------------------

    def status(self, *, now: float | None = None) -> RecoveryVPGStatus:
        now = time.time() if now is None else now
        with self._lock:
            self._fresh()
            cols = self._cols
            sts = dict(zip(self._vms, self._statuses, strict=True))
            oldest = cols.obj[cols.lo] if len(cols) else None
            newest = cols.obj[cols.hi - 1] if len(cols) else None
        rpo = self._rpo() if self._rpo is not None else None
        sync = self._sync() if self._sync is not None else None
        held = max(0.0, now - oldest.time) if oldest is not None else 0.0
        order = ("building", "ok", "warning", "error")
        history_state = max((s.history_state for s in sts.values()), key=order.index)
        hard = [s.hard_limit_bytes for s in sts.values()]
        warn = [s.warning_limit_bytes for s in sts.values()]
        full = any(s.full for s in sts.values())
        near = any(s.near_limit for s in sts.values())
        if full:
            state = RecoveryVPGState.JOURNAL_FULL
        elif sync is not None and not sync.done:
            state = RecoveryVPGState.SYNCING
        elif newest is None:
            state = RecoveryVPGState.INITIALIZING
        elif rpo is not None and rpo > self.rpo_alert_seconds:
            state = RecoveryVPGState.RPO_NOT_MEETING_SLA
        elif near:
            state = RecoveryVPGState.JOURNAL_NEAR_LIMIT
        elif history_state in ("warning", "error"):  # not while history builds up
            state = RecoveryVPGState.HISTORY_NOT_MEETING_SLA
        else:
            state = RecoveryVPGState.MEETING_SLA
        return RecoveryVPGStatus(
            name=self.name, state=state, rpo_seconds=rpo,
            rpo_alert_seconds=self.rpo_alert_seconds, checkpoints=len(cols),
            oldest_checkpoint=oldest, newest_checkpoint=newest,
            history_held_seconds=held,
            history_configured_seconds=max(s.history_configured_seconds for s in sts.values()),
            history_state=history_state,
            journal_bytes=sum(s.size_bytes for s in sts.values()),
            journal_hard_limit_bytes=None if None in hard else sum(h or 0 for h in hard),
            journal_warning_bytes=None if None in warn else sum(w or 0 for w in warn),
            near_limit=near, full=full,
            durable_seq=min(s.durable_seq for s in sts.values()),
            last_seq=max(s.last_seq for s in sts.values()),
            throughput_bytes=self._throughput(), sync=sync, journals=sts)

    def _throughput(self) -> float | None:
        if self._received is None:
            return None
        t, total = time.monotonic(), int(self._received())
        with self._lock:
            rate = self._rate
            rate.append((t, total))
            while len(rate) > 2 and t - rate[1][0] >= THROUGHPUT_WINDOW:
                rate.popleft()
            t0, b0 = rate[0]
            return (total - b0) / (t - t0) if t > t0 else 0.0

    # ---- views -----------------------------------------------------------------------------

    @contextmanager
    def views(self, checkpoint: Checkpoint | int) -> Iterator[VPGViews]:
        """A `View` of every volume of every VM at one usable checkpoint; every journal is
        pinned (no promotion past it) until the block ends."""
        cid = checkpoint.id if isinstance(checkpoint, Checkpoint) else int(checkpoint)
        ckpt = self.by_id(cid)
        opened: dict[str, View] = {}
        try:
            for vm, j in self._journals.items():
                opened[vm] = j.view(ckpt.id)
            yield VPGViews(ckpt, opened)
        finally:
            for v in opened.values():
                v.close()

    def close(self) -> None:
        """Forget the checkpoints; close the journals if this VPG opened them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cols = _Columns()
            if self._owns:
                for j in self._journals.values():
                    j.close()

    def __enter__(self) -> RecoveryVPG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VPGViews:
    """Views of every VM of a VPG at one checkpoint (see `RecoveryVPG.views`)."""

    def __init__(self, checkpoint: Checkpoint, views: dict[str, View]) -> None:
        self.checkpoint = checkpoint
        self._views = views

    def __getitem__(self, vm: str) -> View:
        try:
            return self._views[vm]
        except KeyError:
            raise ConfigError(f"no VM {vm!r} in this VPG (VMs: "
                              f"{', '.join(self._views)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def read(self, vm: str, volume: int | str, offset: int, length: int) -> bytes:
        """`length` bytes of `volume` of `vm` at `offset`, as they were at the checkpoint."""
        return self[vm].read(volume, offset, length)
