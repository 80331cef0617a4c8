"""Scratch overlays: writable point-in-time images over a journal view.

Part of the recovery package (zcore.recovery); sits on the journal (zcore.journal), beside
the NBD front-end that serves its overlays.
A view (`Journal.view`) is a read-only image of a volume at a checkpoint.  A scratch
overlay makes one volume of a view writable without touching what it overlays: the
writes land in a sparse temporary file of its own, kept apart from the journal and the
replica, and are discarded when the overlay closes.  It is what a failover test runs a
recovered VM on, and what the NBD front-end serves as a writable point-in-time export.
Any read-only `Image` can stand under it: a backup served for instant access is one
(zcore.backup.access).

This module holds the overlay and `ScratchBudget`, a byte budget several overlays share
(a failover test bounds the scratch use of a whole VPG with one).  The operations built
on the overlay live beside it in zcore.recovery.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pyroaring import BitMap64

from zcore import records
from zcore.bitmap import id_runs
from zcore.errors import ClosedError, ConfigError, ScratchLimitError
from zcore.fsutil import STATE_HOLE, STATE_ZERO, preadinto_upto, pwrite_all
from zcore.journal import Journal
from zcore.records import Checkpoint

if TYPE_CHECKING:
    from typing_extensions import Buffer

SECTOR = records.SECTOR
# Default scratch limit when none is given: capped by the volume's own size, which the
# overlay can never pass (a rewritten sector reuses its place in the scratch file).
DEFAULT_SCRATCH_LIMIT = 16 << 30


class Image(Protocol):
    """What an overlay reads beneath its writes: a journal `View`, or a backup's volumes
    read through the repository (zcore.backup.access.BackupImage)."""

    @property
    def checkpoint(self) -> Checkpoint: ...

    def size(self, volume: int | str) -> int: ...

    def read_into(self, volume: int | str, offset: int, buf: Any) -> None: ...

    def allocation(self, volume: int | str, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]: ...

    def close(self) -> None: ...


class ScratchBudget:
    """A scratch-space budget shared by several overlays (thread-safe): every overlay
    given it reserves the bytes a write newly stores before storing them, and a write
    that would pass `limit_bytes` over all of them raises `ScratchLimitError`."""

    def __init__(self, limit_bytes: int, name: str = "scratch budget") -> None:
        if limit_bytes < 0:
            raise ConfigError(f"scratch limit {limit_bytes} cannot be negative")
        self.limit_bytes = int(limit_bytes)
        self.name = name
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, nbytes: int, what: str) -> None:
        with self._lock:
            if self._used + nbytes > self.limit_bytes:
                raise ScratchLimitError(
                    f"{self.name}: {what} would use {self._used + nbytes} bytes, over the "
                    f"limit of {self.limit_bytes} ({self._used} in use)")
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)


def _runs(bitmap: BitMap64, start: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of set members of `bitmap` inside [start, end)."""
    sub = bitmap & BitMap64(range(start, end))
    if not sub:
        return []
    arr = np.frombuffer(sub.to_array(), dtype=np.uint64)
    if len(arr) == end - start:
        return [(start, end)]
    starts, ends = id_runs(arr)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def overlay_allocation(written: BitMap64, zeroed: BitMap64,
                       under: Any, offset: int, length: int,
                       max_extents: int) -> list[tuple[int, int, int]]:
    """(start, length, state) runs of [offset, offset + length) (sector-aligned) of an
    overlay whose sectors in `written` are data of its own and in `zeroed` zeroes with no
    storage (holes that read as zeros, `zcore.fsutil.STATE_HOLE | STATE_ZERO`); the rest
    is as `under(offset, length, max_extents)` says (the view's allocation, or data when
    there is none).  The runs may stop early once more than `max_extents` are found (the
    first `max_extents` are then whole)."""
    s0, s1 = offset // SECTOR, (offset + length) // SECTOR
    own = sorted([(a, b, 0) for a, b in _runs(written, s0, s1)]
                 + [(a, b, STATE_HOLE | STATE_ZERO) for a, b in _runs(zeroed, s0, s1)])
    out: list[tuple[int, int, int]] = []

    def add(start: int, n: int, state: int) -> None:
        if out and out[-1][2] == state and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n, state)
        elif n:
            out.append((start, n, state))

    cur = s0
    for a, b, state in [*own, (s1, s1, -1)]:
        if a > cur:
            gap0, gap = cur * SECTOR, (a - cur) * SECTOR
            runs = under(gap0, gap, max_extents)
            for start, n, st in runs:
                add(start, n, st)
            if not runs or runs[-1][0] + runs[-1][1] < gap0 + gap:
                return out  # the view stopped early: so does this answer
        if state >= 0:
            add(a * SECTOR, (b - a) * SECTOR, state)
        cur = b
        if len(out) > max_extents:  # one past the cap: the runs before it are whole
            break
    return out


class ScratchOverlay:
    """A writable overlay on one volume of a view (any `Image`); its writes are discarded
    on close.

    Writes go to a sparse, already-unlinked temporary file at their own offsets, and three
    roaring bitmaps of 512-byte sectors say where each sector's current bytes are: in the
    scratch file (`written`), zeroes (`zeroed`, from write_zeroes, nothing stored), or
    still in the view.  Reads merge the three.  The view, the journal and the replica
    are only ever read.

    `limit_bytes` bounds the scratch file's disk use (sectors it ever stored); a write
    that would pass it raises `ScratchLimitError` and changes nothing.  A shared
    `budget` (ScratchBudget) bounds the sum over every overlay given it the same way;
    the overlay gives its bytes back on `discard` and `close`.  Zeroing and trimming cost
    no scratch space.  Thread-safe.
    """

    readonly = False

    def __init__(
        self,
        view: Image,
        volume: int | str,
        *,
        limit_bytes: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        owns_view: bool = False,
        budget: ScratchBudget | None = None,
    ) -> None:
        self.view = view
        self.budget = budget
        self.volume = volume
        self.size = view.size(volume)
        if limit_bytes is None:
            limit_bytes = min(DEFAULT_SCRATCH_LIMIT, self.size)
        if limit_bytes < 0:
            raise ConfigError(f"scratch limit {limit_bytes} cannot be negative")
        self.limit_bytes = int(limit_bytes)
        self._owns_view = owns_view
        self._lock = threading.Lock()
        self._file = tempfile.TemporaryFile(
            prefix="zcore-scratch-", dir=None if directory is None else os.fspath(directory))
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, self.size)
        self._written = BitMap64()  # sectors whose bytes are in the scratch file
        self._zeroed = BitMap64()  # sectors that read as zeroes
        self._used = BitMap64()  # sectors the scratch file ever stored: its disk use
        self._closed = False

    @classmethod
    def open(
        cls,
        journal: Journal,
        checkpoint: Checkpoint | int,
        volume: int | str,
        **kwargs: Any,
    ) -> ScratchOverlay:
        """Overlay on a view of `journal` at `checkpoint` that the overlay owns (and closes)."""
        view = journal.view(checkpoint)
        try:
            return cls(view, volume, owns_view=True, **kwargs)
        except BaseException:
            view.close()
            raise

    @property
    def checkpoint(self) -> Checkpoint:
        return self.view.checkpoint

    @property
    def written_bytes(self) -> int:
        """Bytes whose current content lives in the scratch file."""
        with self._lock:
            return len(self._written) * SECTOR

    @property
    def zeroed_bytes(self) -> int:
        with self._lock:
            return len(self._zeroed) * SECTOR

    @property
    def used_bytes(self) -> int:
        """Scratch space in use, the figure `limit_bytes` bounds."""
        with self._lock:
            return len(self._used) * SECTOR

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, offset: int, length: int) -> tuple[int, int]:
        if self._closed:
            raise ClosedError("scratch overlay is closed")
        records.check_range(offset, length, self.size)
        return offset // SECTOR, (offset + length) // SECTOR

    # ---- reading -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: Buffer) -> None:
        """Fill `buf` from `offset`: overlay writes and zeroes over the view."""
        out = memoryview(buf).cast("B")
        length = len(out)
        with self._lock:
            s0, s1 = self._check(offset, length)
            count = s1 - s0
            in_file = self._written.range_cardinality(s0, s1)
            zeroed = self._zeroed.range_cardinality(s0, s1)
            if in_file == 0 and zeroed == 0:
                self.view.read_into(self.volume, offset, out)
                return
            if in_file == count:
                self._pread(out, offset)
                return
            if zeroed == count:
                np.frombuffer(out, dtype=np.uint8)[:] = 0
                return
            if in_file + zeroed < count:
                self.view.read_into(self.volume, offset, out)
            for a, b in _runs(self._written, s0, s1):
                self._pread(out[(a - s0) * SECTOR : (b - s0) * SECTOR], a * SECTOR)
            if zeroed:
                arr = np.frombuffer(out, dtype=np.uint8)
                for a, b in _runs(self._zeroed, s0, s1):
                    arr[(a - s0) * SECTOR : (b - s0) * SECTOR] = 0

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """(start, length, state) runs of the range (`overlay_allocation`): the overlay's
        writes are data, its zeroes holes, the rest as the view says."""
        with self._lock:
            self._check(offset, length)

            def under(off: int, n: int, cap: int) -> list[tuple[int, int, int]]:
                return self.view.allocation(self.volume, off, n, cap)

            return overlay_allocation(self._written, self._zeroed, under, offset, length,
                                      max_extents)

    def punch(self, offset: int, length: int) -> int:
        """Zero the range with no storage (what a fast zero asks for): `write_zeroes`."""
        return self.write_zeroes(offset, length)

    def _pread(self, out: memoryview, pos: int) -> None:
        done = preadinto_upto(self._fd, out, pos)
        if done < len(out):  # the file has the volume's size: this is not expected
            raise OSError(f"scratch file ended at {pos + done}")

    # ---- writing -------------------------------------------------------------------------

    def write(self, offset: int, data: Buffer) -> int:
        """Keep `data` at `offset` in the overlay; returns the bytes written."""
        data = records.byte_view(data)  # the one rule for write data: item size 1
        length = len(data)
        with self._lock:
            s0, s1 = self._check(offset, length)
            new = (s1 - s0) - self._used.range_cardinality(s0, s1)
            if new and (len(self._used) + new) * SECTOR > self.limit_bytes:
                raise ScratchLimitError(
                    f"scratch overlay of volume {self.volume!r}: writing {length} bytes at "
                    f"{offset} would use {(len(self._used) + new) * SECTOR} bytes, over its "
                    f"limit of {self.limit_bytes}"
                )
            if new and self.budget is not None:
                self.budget.reserve(new * SECTOR, f"writing {length} bytes at {offset} to "
                                    f"volume {self.volume!r}")
            try:
                pwrite_all(self._fd, data, offset)
            except BaseException:
                if new and self.budget is not None:
                    self.budget.release(new * SECTOR)
                raise
            self._written.add_range(s0, s1)
            self._used.add_range(s0, s1)
            self._zeroed.remove_range(s0, s1)
            return length

    def write_zeroes(self, offset: int, length: int) -> int:
        """Make the range read as zeroes (costs no scratch space)."""
        with self._lock:
            s0, s1 = self._check(offset, length)
            self._zeroed.add_range(s0, s1)
            self._written.remove_range(s0, s1)
            return length

    def trim(self, offset: int, length: int) -> int:
        """Forget the overlay's writes in the range: it reads as the view again."""
        with self._lock:
            s0, s1 = self._check(offset, length)
            self._zeroed.remove_range(s0, s1)
            self._written.remove_range(s0, s1)
            return length

    def flush(self) -> None:
        """Nothing to make durable: the overlay is discarded on close by design."""
        if self._closed:
            raise ClosedError("scratch overlay is closed")

    def discard(self) -> None:
        """Drop every overlay write now; the overlay reads as its view again."""
        with self._lock:
            if self._closed:
                raise ClosedError("scratch overlay is closed")
            self._release()
            self._written.clear()
            self._zeroed.clear()
            self._used.clear()
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)

    def _release(self) -> None:
        if self.budget is not None:
            self.budget.release(len(self._used) * SECTOR)

    def close(self) -> None:
        """Discard the overlay's writes (the scratch file goes) and close an owned view."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()
            self._file.close()
            self._written.clear()
            self._zeroed.clear()
            self._used.clear()
        if self._owns_view:
            self.view.close()

    def __enter__(self) -> ScratchOverlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
