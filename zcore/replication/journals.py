"""The recovery site's per-VPG journal worker: one `VPGReceiver` per attached VPG holds
its journals (one per VM) and a thread that appends received bundles to them.

Bundles arrive from the connections (zcore.replication.receiver) on the event loop; the
worker appends every VM part to its journal, skipping records a journal already holds
(so a resend is never applied twice), commits all journals once per batch (group
commit) and only then acknowledges the batch's last seq back through the connection.
"""

from __future__ import annotations

import logging
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


class VPGReceiver:
    """One VPG on the recovery site: its journals and the worker thread appending to them."""

    def __init__(self, name: str, owner: str, vms: list[str],
                 journals: dict[str, Journal],
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
        self._stop = False
        self.conn: RecoveryConnection | None = None  # the connection attached now
        self._thread = threading.Thread(target=self._run, name=f"journal-{name}", daemon=True)
        self._thread.start()

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
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            self._apply(batch)

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
                        journal.append_encoded(fresh)
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

    def close(self) -> None:
        """Stop the worker once the queue is applied, then close the journals."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
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
