"""Durable overlays: the read-write volume a recovered VM runs production on after a live
failover, over a journal view at the failover's checkpoint.

Sits beside the scratch overlay (zcore.recovery.scratch or zcore/recovery.py) and under
the failover operation (zcore.recovery.failover), which serves it over NBD
(`zcore.nbd.exports.overlay_export`).  Unlike the scratch overlay its writes survive a
crash of the site service: what FLUSH (or a FUA write) acknowledged is never lost.

On disk, in the overlay's own directory:
    overlay.data   a sparse file of the volume's size: a written sector's bytes sit at
                   their own offset (a rewritten sector overwrites its place)
    overlay.log    the map: an append-only log of 24-byte records
                   (kind u8, 3 pad bytes, first sector u64, end sector u64, CRC32C u32 of
                   the 20 bytes before it), kind 1 = written, 2 = zeroed, 3 = trimmed

Order.  A write goes to overlay.data at once and its map change is kept in memory; a
flush (FLUSH, FUA) then (1) fdatasyncs overlay.data, (2) appends the map records of every
change since the last flush to overlay.log, (3) fdatasyncs overlay.log, and only then
acknowledges.  A map record thus never reaches the disk before the data it maps.
Open replays the log up to its first short or damaged record (a torn tail: the flush that
wrote it was never acknowledged), then rewrites it compacted (the runs of the replayed
map) with `atomic_write`.

What a crash at any point leaves: every change a flush acknowledged is in the log with
its data durable before it; a change never flushed is either absent (the sector reads as
it did at the last flush: the view, zeroes, or the data of a flushed write at that place)
or, for a sector a flushed write mapped already, overwritten in place by a later write
(it reads as one of the values the sector held since that flush).  Like a disk: an
unflushed write may or may not be there, a flushed one is.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pyroaring import BitMap64

from zcore import records
from zcore._native import record as _rec
from zcore.bitmap import id_runs
from zcore.errors import ClosedError, ConfigError, StateError
from zcore.fsutil import atomic_write, fsync_dir, preadinto_upto, pwrite_all, write_all
from zcore.journal import View
from zcore.recovery.scratch import overlay_allocation

if TYPE_CHECKING:
    from typing_extensions import Buffer

SECTOR = records.SECTOR
DATA_NAME = "overlay.data"
LOG_NAME = "overlay.log"
KIND_WRITTEN, KIND_ZEROED, KIND_TRIMMED = 1, 2, 3
_HEAD = struct.Struct("<B3xQQ")
_RECORD = struct.Struct("<B3xQQI")
RECORD_SIZE = _RECORD.size
_FOLD_CHUNK = 4 << 20  # bytes copied per step when folding into a replica


def _crc(data: bytes) -> int:
    return int(_rec.crc32c(data))


def encode_record(kind: int, s0: int, s1: int) -> bytes:
    head = _HEAD.pack(kind, s0, s1)
    return head + struct.pack("<I", _crc(head))


def _runs(bitmap: BitMap64, start: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of set members of `bitmap` inside [start, end)."""
    if start >= end or not bitmap.range_cardinality(start, end):
        return []
    sub = bitmap & BitMap64(range(start, end))
    arr = np.frombuffer(sub.to_array(), dtype=np.uint64)
    starts, ends = id_runs(arr)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


class DurableOverlay:
    """A read-write volume: `view`'s volume `volume` under the durable overlay kept in
    `directory` (created, or reopened with its flushed writes).  Thread-safe; `flush` may
    run in a worker thread concurrently with reads and writes.  With no view (and the
    volume's `size`) it only folds: reads of what it did not write are refused."""

    readonly = False

    def __init__(self, view: View | None, volume: int | str,
                 directory: str | os.PathLike[str], *, owns_view: bool = False,
                 size: int | None = None) -> None:
        self.view = view
        self.volume = volume
        if view is not None:
            size = int(view.size(volume))
        elif size is None:
            raise ConfigError("an overlay without a view (to fold it) needs its size")
        self.size = size
        self.directory = Path(directory)
        self._owns_view = owns_view
        self._lock = threading.Lock()  # the maps and the pending list
        self._flush_lock = threading.Lock()  # one flush at a time; never held with _lock
        self._written = BitMap64()
        self._zeroed = BitMap64()
        self._pending: list[bytes] = []  # map records since the last flush, in order
        self._closed = False
        fresh = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if fresh:
            fsync_dir(self.directory.parent)
        self._data_fd = os.open(self.directory / DATA_NAME,
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(self._data_fd).st_size != self.size:
                os.ftruncate(self._data_fd, self.size)
            self.replayed = self._replay()
            self._log_fd = os.open(self.directory / LOG_NAME,
                                   os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except BaseException:
            os.close(self._data_fd)
            raise

    # ---- opening -------------------------------------------------------------------------

    def _replay(self) -> int:
        """Apply the log's records up to its first torn one, then rewrite it compacted;
        returns the records applied."""
        path = self.directory / LOG_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        applied = 0
        sectors = self.size // SECTOR
        for at in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE):
            kind, s0, s1, crc = _RECORD.unpack_from(raw, at)
            if crc != _crc(raw[at : at + _HEAD.size]) or kind not in (1, 2, 3) \
                    or not s0 < s1 <= sectors:
                break  # a torn tail: the flush that wrote it was never acknowledged
            self._apply(kind, s0, s1)
            applied += 1
        out = [encode_record(KIND_WRITTEN, a, b) for a, b in _runs(self._written, 0, sectors)]
        out += [encode_record(KIND_ZEROED, a, b) for a, b in _runs(self._zeroed, 0, sectors)]
        os.fdatasync(self._data_fd)  # what the compacted log maps is durable first
        atomic_write(path, b"".join(out))
        return applied

    def _apply(self, kind: int, s0: int, s1: int) -> None:
        if kind == KIND_WRITTEN:
            self._written.add_range(s0, s1)
            self._zeroed.remove_range(s0, s1)
        elif kind == KIND_ZEROED:
            self._zeroed.add_range(s0, s1)
            self._written.remove_range(s0, s1)
        else:
            self._zeroed.remove_range(s0, s1)
            self._written.remove_range(s0, s1)

    @property
    def checkpoint(self) -> records.Checkpoint:
        if self.view is None:
            raise StateError("an overlay opened without its view has no checkpoint")
        return self.view.checkpoint

    @property
    def written_bytes(self) -> int:
        with self._lock:
            return len(self._written) * SECTOR

    @property
    def zeroed_bytes(self) -> int:
        with self._lock:
            return len(self._zeroed) * SECTOR

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, offset: int, length: int) -> tuple[int, int]:
        if self._closed:
            raise ClosedError("durable overlay is closed")
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
        with self._lock:
            s0, s1 = self._check(offset, len(out))
            in_file = self._written.range_cardinality(s0, s1)
            zeroed = self._zeroed.range_cardinality(s0, s1)
            if in_file + zeroed < s1 - s0:
                if self.view is None:
                    raise StateError("an overlay opened without its view reads only what "
                                     "it wrote")
                self.view.read_into(self.volume, offset, out)
            for a, b in _runs(self._written, s0, s1):
                self._pread(out[(a - s0) * SECTOR : (b - s0) * SECTOR], a * SECTOR)
            if zeroed:
                arr = np.frombuffer(out, dtype=np.uint8)
                for a, b in _runs(self._zeroed, s0, s1):
                    arr[(a - s0) * SECTOR : (b - s0) * SECTOR] = 0

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """(start, length, state) runs of the range (`zcore.recovery.scratch.
        overlay_allocation`): the overlay's writes are data, its zeroes holes, the rest as
        the view says (data, for an overlay opened without its view)."""
        with self._lock:
            self._check(offset, length)
            view = self.view

            def under(off: int, n: int, cap: int) -> list[tuple[int, int, int]]:
                if view is None:
                    return [(off, n, 0)]
                return view.allocation(self.volume, off, n, cap)

            return overlay_allocation(self._written, self._zeroed, under, offset, length,
                                      max_extents)

    def punch(self, offset: int, length: int) -> int:
        """Zero the range with no storage (what a fast zero asks for): `write_zeroes`."""
        return self.write_zeroes(offset, length)

    def _pread(self, out: memoryview, pos: int) -> None:
        done = preadinto_upto(self._data_fd, out, pos)
        if done < len(out):
            raise OSError(f"overlay data file {self.directory / DATA_NAME} ended at "
                          f"{pos + done}")

    # ---- writing -------------------------------------------------------------------------

    def write(self, offset: int, data: Buffer) -> int:
        data = records.byte_view(data)
        with self._lock:
            s0, s1 = self._check(offset, len(data))
            pwrite_all(self._data_fd, data, offset)
            self._apply(KIND_WRITTEN, s0, s1)
            self._pending.append(encode_record(KIND_WRITTEN, s0, s1))
            return len(data)

    def write_zeroes(self, offset: int, length: int) -> int:
        with self._lock:
            s0, s1 = self._check(offset, length)
            self._apply(KIND_ZEROED, s0, s1)
            self._pending.append(encode_record(KIND_ZEROED, s0, s1))
            return length

    def trim(self, offset: int, length: int) -> int:
        """Forget the overlay's writes in the range: it reads as the view again."""
        with self._lock:
            s0, s1 = self._check(offset, length)
            self._apply(KIND_TRIMMED, s0, s1)
            self._pending.append(encode_record(KIND_TRIMMED, s0, s1))
            return length

    def flush(self) -> None:
        """Make every write and map change so far durable (see the module docstring)."""
        with self._flush_lock:
            with self._lock:
                if self._closed:
                    raise ClosedError("durable overlay is closed")
                pending, self._pending = self._pending, []
            os.fdatasync(self._data_fd)  # (1) the data, before any record that maps it
            if pending:
                write_all(self._log_fd, b"".join(pending))  # (2) the map records
                os.fdatasync(self._log_fd)  # (3) then the flush is acknowledged

    # ---- folding and closing -------------------------------------------------------------

    def runs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Byte ranges (offset, length) written and zeroed by the overlay."""
        with self._lock:
            end = self.size // SECTOR
            w = [(a * SECTOR, (b - a) * SECTOR) for a, b in _runs(self._written, 0, end)]
            z = [(a * SECTOR, (b - a) * SECTOR) for a, b in _runs(self._zeroed, 0, end)]
        return w, z

    def fold_into(self, write: Callable[[int, memoryview], object]) -> int:
        """Write the overlay's changes through `write(offset, data)` into the image at the
        checkpoint (the replica: the result is the recovered volume); the caller makes it
        durable.  Returns the bytes written.  Idempotent: a crash during it is repaired
        by folding again."""
        written, zeroed = self.runs()
        done = 0
        buf = memoryview(bytearray(_FOLD_CHUNK))
        for offset, length in written:
            for at in range(offset, offset + length, _FOLD_CHUNK):
                n = min(_FOLD_CHUNK, offset + length - at)
                self._pread(buf[:n], at)
                write(at, buf[:n])
                done += n
        zero = memoryview(bytes(_FOLD_CHUNK))
        for offset, length in zeroed:
            for at in range(offset, offset + length, _FOLD_CHUNK):
                n = min(_FOLD_CHUNK, offset + length - at)
                write(at, zero[:n])
                done += n
        return done

    def close(self) -> None:
        """Close the files (unflushed writes stay as a crash would leave them: callers
        flush first) and an owned view."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._data_fd)
            os.close(self._log_fd)
        if self._owns_view and self.view is not None:
            self.view.close()

    def __enter__(self) -> DurableOverlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_overlay(directory: str | os.PathLike[str]) -> None:
    """Delete an overlay's files and its directory (the overlay must be closed)."""
    path = Path(directory)
    for name in (LOG_NAME, DATA_NAME):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        pass
    fsync_dir(path.parent)
