"""Type stubs of zcore._native.index: the extent index and point-in-time read-through.

Not thread-safe: the caller serialises every call on one ExtentIndex.  Native failures
raise the zcore.errors class mapped from the status (OutOfMemoryError, SequenceError,
OutOfRangeError, ChecksumError, TruncatedRecordError, NativeIOError...).
"""

from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, disjoint_base

from zcore._native.record import ExtentBatch

# numpy declares __buffer__ only for Python >= 3.12, hence the explicit uint8 arrays
_Buffer: TypeAlias = Buffer | npt.NDArray[np.uint8]
"""A readable C-contiguous buffer of unsigned bytes (bytes, bytearray, memoryview...)."""

_WritableBuffer: TypeAlias = Buffer | npt.NDArray[np.uint8]
"""A writable C-contiguous buffer of unsigned bytes; read-only ones raise BufferError."""

_Loader: TypeAlias = Callable[[int, int, int, int], _Buffer]
"""loader(segment, pos, stored, length) -> the verified, decompressed `length` bytes of
the LZ4 or zstd record whose header is at `pos` of segment `segment` (`stored` payload bytes)."""

@disjoint_base  # a cdef class: holds a C struct, cannot share a layout
class ExtentIndex:
    """Every journaled write of one journal, by volume, offset and seq."""

    def __init__(self) -> None: ...
    def set_segment_fd(self, segment: int, fd: int) -> None:
        """Register (fd >= 0) or forget (fd = -1) the descriptor of a segment file."""

    def set_replica_fd(self, volume: int, fd: int) -> None:
        """Register (or forget, with -1) the replica image of a volume; a volume without
        one reads as zeros where no journaled write covers it."""

    def set_replica_sums(
        self,
        volume: int,
        sums: npt.NDArray[np.uint32] | None,
        size: int,
        block: int,
        zero_full: int,
        zero_last: int,
    ) -> None:
        """Check every replica byte read from `volume` against `sums` (one uint32 per
        `block` bytes of the `size`-byte volume: CRC32C of the block ^ CRC32C of as many
        zero bytes); whole blocks are read and a failing one raises ReplicaChecksumError
        (volume, offset) with nothing returned.  The array is read in place; None forgets
        it."""

    def add(self, batch: ExtentBatch, ordered: bool = True) -> None:
        """Index the data records (WRITE, ZERO, SYNC) of a validated batch; seqs must
        ascend per volume across calls."""

    def add_array(self, extents: _Buffer, ordered: bool = True) -> None:
        """Index extents given as raw EXTENT_DTYPE bytes (a segment index file's entries);
        a structured numpy array must be passed as `arr.view(np.uint8)` or bytes."""

    def add_sorted(
        self,
        extents: _Buffer,
        segment: int,
        seg_len: int,
        volume_sizes: npt.NDArray[np.uint64],
        ordered: bool = True,
    ) -> None:
        """Adopt a sealed segment's data extents, sorted by (volume, offset, seq), as
        ready-made runs; every extent is checked first (CorruptRecordError, nothing
        added)."""

    def drop_before(self, seq: int) -> None:
        """Forget every extent with seq < `seq` (promoted into the replicas)."""

    @property
    def count(self) -> int:
        """Extents held."""

    @property
    def memory(self) -> int:
        """Bytes the native index holds allocated."""

    def plan(
        self, volume: int, offset: int, length: int, at: int
    ) -> list[tuple[int, int, int, int]]:
        """Fragments of a read of [offset, offset+length) as of checkpoint seq `at`:
        (dst, length, src, seq), ordered by dst, tiling the range; seq 0 = the replica
        (src is then the volume offset), else src is the offset in that record's data."""

    def kinds(
        self, volume: int, offset: int, length: int, at: int
    ) -> list[tuple[int, int, int]]:
        """What [offset, offset+length) is as of seq `at`: maximal runs (start, length,
        kind) by offset, tiling the range; kind 0 = the replica, else the type of the
        newest record there (REC_ZERO for zeroed ranges)."""

    def read(self, volume: int, offset: int, length: int, at: int, loader: _Loader) -> bytes:
        """Bytes of [offset, offset+length) of `volume` as of checkpoint seq `at`: the
        newest record with seq < `at` for each byte, else the replica.  `loader` is called
        only for LZ4 and zstd records.  Every journal byte returned has passed its CRC32C."""

    def read_into(
        self, volume: int, offset: int, buf: _WritableBuffer, at: int, loader: _Loader
    ) -> None:
        """Like read, into `buf`, whose length is the read's length; on failure `buf` is
        zeroed before the error is raised when the failure is in a native read."""
