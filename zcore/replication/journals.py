"""The recovery site's journal work: one `VPGReceiver` per attached VPG holds its
journals (one per VM) and the bundles received for them; a site-wide pool of worker
threads (`JournalWorkers`) appends them.

Bundles arrive from the connections (zcore.replication.receiver) on the event loop; a
worker appends every VM part to its journal, skipping records a journal already holds
(so a resend is never applied twice), commits all journals once per batch (group
commit) and only then acknowledges the batch's last seq back through the connection.

Threads: the pool has a fixed number of workers whatever the number of VPGs (a site
of 300 VPGs held 300 journal threads when each VPG had its own).  A VPG is in the
pool's run queue at most once and is taken by one worker at a time, so each VPG's
bundles are applied in the order they arrived, while different VPGs run in parallel
up to the pool's size.  A worker takes one VPG's whole queue as one batch, then moves
on, so a busy VPG does not starve the others.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zcore import wire
from zcore.errors import JournalFullError, ZcoreError
from zcore.journal import Journal
from zcore.journal.history import RetentionEvent, RetentionKeeper

if TYPE_CHECKING:
    from zcore.replication.receiver import RecoveryConnection

log = logging.getLogger(__name__)


@dataclass
class ReceiverStats:
    bundles: int = 0
    bytes: int = 0
    acked_seq: int = 0
    connected: bool = False
    peer: str = ""


# a received bundle waiting for the worker: (connection, channel, bundle, payload bytes)
_Queued = tuple["RecoveryConnection", int, wire.BundleFrame, int]


def default_workers() -> int:
    """Journal workers of a site: enough to overlap the fsyncs of several VPGs (the
    work is mostly fdatasync and LZ4-free appends, GIL released), bounded whatever the
    number of VPGs."""
    return min(16, max(4, 2 * (os.cpu_count() or 1)))


class JournalWorkers:
    """A fixed pool of threads applying the queued bundles of every VPG of a site."""

    def __init__(self, threads: int | None = None, name: str = "journal-worker") -> None:
        self.size = threads or default_workers()
        self._ready: deque[VPGReceiver] = deque()  # VPGs with queued work, each once
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(self.size)]
        for t in self._threads:
            t.start()

    def schedule(self, receiver: VPGReceiver) -> None:
        """Put a VPG that has queued work in the run queue (the caller made sure it is
        neither queued nor running)."""
        with self._cond:
            self._ready.append(receiver)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stop:
                    self._cond.wait()
                if not self._ready:
                    return
                receiver = self._ready.popleft()
            receiver._work()

    def close(self) -> None:
        """Stop the workers once the run queue is empty (close every VPG first)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()


class VPGReceiver:
    """One VPG on the recovery site: its journals and the bundles waiting for them.
    Without `workers`, the VPG gets a pool of one thread of its own."""

    def __init__(self, name: str, owner: str, vms: list[str],
                 journals: dict[str, Journal], workers: JournalWorkers | None = None,
                 on_event: Callable[[RetentionEvent], None] | None = None) -> None:
        self.name = name
        self.owner = owner  # the site id that owns the VPG
        self.vms = vms  # VM names in ATTACH order (a bundle part's vm index)
        self.journals = journals
        # history retention of the VPG's journals (zcore.journal.history); the recovery
        # site runs its rounds on a timer, in a worker thread
        self.retention = RetentionKeeper(name, journals, on_event=on_event)
        self.stats = ReceiverStats()
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self._scheduled = False  # in the run queue or being applied by a worker
        self._closed = False
        self._own_workers = workers is None
        self._workers = workers if workers is not None else JournalWorkers(1, f"journal-{name}")
        self.conn: RecoveryConnection | None = None  # the connection attached now

    def durable_seq(self) -> int:
        """Every journal holds every one of its records up to this seq, durably."""
        return max(self.stats.acked_seq, min(j.durable_seq for j in self.journals.values()))

    def max_seq(self) -> int:
        return max(j.last_seq for j in self.journals.values())

    def submit(self, conn: RecoveryConnection, channel: int, bundle: wire.BundleFrame,
               size: int) -> None:
        """Queue a bundle received on `conn` for the worker (called on the event loop)."""
        with self._cond:
            self._queue.append((conn, channel, bundle, size))
            if self._scheduled:
                return
            self._scheduled = True
        self._workers.schedule(self)

    def _work(self) -> None:
        """One batch (everything queued now), on a worker; then back in the run queue
        if more arrived meanwhile."""
        with self._cond:
            batch = list(self._queue)
            self._queue.clear()
        try:
            self._apply(batch)
        finally:
            with self._cond:
                again = bool(self._queue)
                self._scheduled = again
                if not again:
                    self._cond.notify_all()
            if again:
                self._workers.schedule(self)

    def _apply(self, batch: list[_Queued]) -> None:
        touched: set[str] = set()
        done: list[tuple[RecoveryConnection, int, int, int]] = []
        for conn, channel, bundle, size in batch:
            if conn.closed:
                continue
            try:
                for vm_index, part in bundle.parts:
                    journal = self.journals[self.vms[vm_index]]
                    fresh = _skip_existing(part, journal.last_seq)
                    if len(fresh):
                        journal.append_encoded(fresh, flags=conn.record_flags)
                        touched.add(self.vms[vm_index])
            except JournalFullError as exc:
                conn.fail_threadsafe(f"VPG {self.name}: {exc}", channel)
                continue
            except ZcoreError as exc:
                conn.fail_threadsafe(f"VPG {self.name}: bundle refused: {exc}")
                continue
            done.append((conn, channel, bundle.last_seq, size))
        try:
            for vm in touched:
                self.journals[vm].commit()
        except ZcoreError as exc:  # fsync failed: stop acknowledging, surface it
            log.error("VPG %s: commit failed: %s", self.name, exc)
            for conn, *_ in done:
                conn.fail_threadsafe(f"VPG {self.name}: journal commit failed: {exc}")
            return
        for conn, channel, seq, size in done:
            self.stats.bundles += 1
            self.stats.bytes += size
            self.stats.acked_seq = max(self.stats.acked_seq, seq)
            conn.ack_threadsafe(channel, seq, size)

    def quiesce(self) -> None:
        """Wait until every bundle queued so far is applied (or skipped, its connection
        closed): nothing is appended to the journals behind the caller's back until the
        next `submit` (blocking: a worker thread)."""
        with self._cond:
            while self._scheduled:
                self._cond.wait()

    def close(self) -> None:
        """Wait until the queue is applied, then close the journals."""
        with self._cond:
            self._closed = True
            while self._scheduled:
                self._cond.wait()
        if self._own_workers:
            self._workers.close()
        for j in self.journals.values():
            j.close()


def _skip_existing(part: memoryview, last_seq: int) -> memoryview:
    """The records of `part` with seq > last_seq (a resend after a reconnect)."""
    if len(part) < 64:
        return part
    for seq, pos in wire.iter_records(part):
        if seq > last_seq:
            return part[pos:]
    return part[len(part):]
