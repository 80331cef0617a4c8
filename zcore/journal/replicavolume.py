"""A journal's replica as a delta-sync target volume (zcore.deltasync.TargetVolume).

Sits between the recovery site's receiver (zcore.replication.receiver), which runs the
target side of a reversed VPG's delta sync, and the journal: reads come from the replica
file (its holes skipped through SEEK_DATA), writes go through `Journal.replica_write` so
the block sums stay equal to the bytes, and `flush` is `Journal.replica_sync`.  Only a
journal that holds no records may be a target (its replica is then the volume)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zcore.errors import StateError
from zcore.fsutil import preadinto_exact
from zcore.journal.replica import data_extents

if TYPE_CHECKING:
    from zcore.journal.core import Journal


class ReplicaVolume:
    """Volume `volume` of `journal`'s replicas, read and written for a delta sync."""

    def __init__(self, journal: Journal, volume: int) -> None:
        if not journal.empty:
            raise StateError(f"journal {journal.path} holds records: its replicas are not "
                             "the volumes, a delta sync cannot write them")
        self.journal = journal
        self.volume = journal.volumes[volume]
        self._fd = journal._replica_fds[volume]

    @property
    def size(self) -> int:
        return self.volume.size

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        preadinto_exact(self._fd, buf, offset, what=f"replica of volume {self.volume.id}")

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        return data_extents(self._fd, start, end)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.journal.replica_write(self.volume.id, offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.journal.replica_zero(self.volume.id, offset, length)

    def flush(self) -> None:
        self.journal.replica_sync()
