"""Test helpers shared by the journal tests: simulating a crash of the process."""

from __future__ import annotations

import os

from zcore.journal import Journal


def quiesce(journal: Journal) -> None:
    """Stop the journal's background threads (index loader, group committer) without
    letting them change anything more, as a crash would."""
    journal._closing = True
    journal._go.set()
    if journal._loader is not None:
        journal._loader.join()
    journal._stop_committer()


def abandon(journal: Journal) -> None:
    """Simulate a crash of the process: stop the background threads, then release the
    journal's descriptors (and its lock) without committing, sealing or writing anything."""
    quiesce(journal)
    for seg in journal._segments.values():
        if seg.fd >= 0:
            os.close(seg.fd)
    for fd in journal._replica_fds.values():
        os.close(fd)
    for sums in journal._replica_sums.values():
        sums.close()
    journal._replica_sums.clear()
    os.close(journal._lock_fd)
    journal._segments.clear()
    journal._replica_fds.clear()
    journal._closed = True
