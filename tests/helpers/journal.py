"""Test helpers shared by the journal tests: simulating a crash of the process, and
making a segment's durable-length mark older, as a crash before the next group commit
leaves it (docs/format.md 7.3)."""

from __future__ import annotations

import os
from pathlib import Path

from zcore.journal import Journal, segments


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


def set_mark(segment: Path, end: int, seq: int) -> None:
    """Rewrite the durable-length mark of the v2 segment file `segment` to say that its
    first `end` bytes (records up to `seq`) were durable: the records after `end` read as
    a crash's unsynced tail."""
    with open(segment, "r+b") as f:
        head = f.read(64)
        mark = segments.pack_mark(head[:48], end, seq)
        assert mark is not None
        f.seek(segments.MARK_AT)
        f.write(mark)


def journal_files(path: Path) -> list[Path]:
    """Every file of the journal directory `path` a crash simulation must keep or tear:
    journal.meta, journal.manifest, segments, index files, replicas (and the .tmp files
    an interrupted atomic write leaves)."""
    return sorted(p for p in Path(path).iterdir() if p.is_file())
