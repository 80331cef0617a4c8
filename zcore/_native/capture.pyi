"""Capture ring (csrc/zc_capture.c) and the bundle encoder that drains it."""

from typing import Self, TypeAlias, TypedDict

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, disjoint_base

_Buffer: TypeAlias = Buffer | npt.NDArray[np.uint8]

MODE_STREAM: int
MODE_BITMAP: int
NO_BACKING: int

class _Stats(TypedDict):
    writes: int
    bytes: int
    ring_used: int
    ring_size: int
    next_seq: int
    dirty_pending: int
    mode: int
    overflowed: bool

@disjoint_base
class SealedBatch:
    """Records drained from the ring: one encoded bundle part per VM, and what they cover."""

    @property
    def parts(self) -> list[bytearray]: ...
    @property
    def first_seq(self) -> int: ...
    @property
    def last_seq(self) -> int: ...
    @property
    def oldest_time_ns(self) -> int: ...
    @property
    def data_bytes(self) -> int: ...
    @property
    def encoded_bytes(self) -> int: ...
    @property
    def volumes(self) -> npt.NDArray[np.uint32]: ...
    @property
    def offsets(self) -> npt.NDArray[np.uint64]: ...
    @property
    def lengths(self) -> npt.NDArray[np.uint64]: ...
    @property
    def checkpoints(self) -> list[tuple[int, int, bytes]]:
        """(seq, time_ns, payload) of each checkpoint marker."""
    @property
    def entries(self) -> int: ...

@disjoint_base
class CaptureRing:
    """The VPG-wide capture buffer: seqs, write-order fidelity, overflow to a dirty log."""

    # __cinit__ takes the arguments: at runtime they reach __new__, not __init__
    def __new__(cls, ring_bytes: int, first_seq: int = 1) -> Self: ...
    def write(self, fd: int, volume: int, size: int, offset: int, data: _Buffer) -> int:
        """Write `data` at `offset` of the backing `fd` and capture it; returns its seq."""
    def zero(self, fd: int, volume: int, size: int, offset: int, length: int) -> int:
        """Punch `length` bytes at `offset` of the backing `fd` and capture a zero record;
        returns its seq."""
    def sync(self, fd: int, volume: int, offset: int, length: int,
             skip_zero: bool = False) -> int | None:
        """Read a range into the stream as a sync record; None when it cannot go now."""
    def watch(self, volume: int, offset: int, length: int) -> int:
        """Begin a sync of a range read from an outside source; returns the watch id."""
    def sync_from(self, watch: int, length: int, data: _Buffer | None,
                  skip_zero: bool = False) -> int | None:
        """Append a watched range as a sync record: its seq, 0 if spoiled, None if not now."""
    def unwatch(self, watch: int) -> None:
        """Drop a watch."""
    def marker(self, payload: _Buffer) -> int | None:
        """Append a checkpoint marker; None when the ring is full or in bitmap mode."""
    def close(self) -> None:
        """Refuse every later write (StateError), sync read and marker (None), and wait
        until no write is in flight."""
    def set_mode(self, mode: int) -> int:
        """Switch between MODE_STREAM and MODE_BITMAP; returns the previous mode."""
    def take_dirty(
        self,
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """Ranges written while not streaming: (volumes, offsets, lengths)."""
    def stats(self) -> _Stats: ...
    def discard(
        self, checkpoints: list[tuple[int, int, bytes]] | None = None,
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], npt.NDArray[np.uint64], int]:
        """Drop every committed entry; (volumes, offsets, lengths, oldest time_ns).  The
        dropped checkpoint markers go to `checkpoints` as (seq, time_ns, payload)."""
    def seal(self, max_bytes: int, vm_of_volume: npt.NDArray[np.uint32], nvms: int,
             compress: bool, min_saving: float) -> SealedBatch | None:
        """Drain up to `max_bytes` of committed entries into per-VM bundle parts."""
