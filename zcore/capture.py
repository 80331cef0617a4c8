"""Protected volumes: the write path on the protected site.

Sits at the very top of the data path.  `ProtectedVolume.write` is one native call: it
checks the range, orders the write against overlapping in-flight writes, gives it the
VPG-wide seq, writes the backing store and copies the data into the VPG's capture ring
(all with the GIL released).  The write is complete when the backing store has it;
replication is asynchronous (like DRBD protocol A).  Volumes are created and owned by a
`zcore.vpg.VPG`.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from zcore import records
from zcore.errors import ClosedError, ConfigError, StateError
from zcore.fsutil import preadinto_upto
from zcore.records import check_int as check_int  # re-exported: its home is records

if TYPE_CHECKING:
    from zcore._native.capture import CaptureRing


class _NoRing:
    """Stands in for the capture ring before the VPG starts and after the volume closes."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def write(self, *args: object) -> int:
        raise self.error

    def zero(self, *args: object) -> int:
        raise self.error


def backing_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a raw image file or block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size
    finally:
        os.close(fd)


class ProtectedVolume:
    """One virtual disk of a protected VM, backed by a raw image file or block device."""

    def __init__(self, vm: str, volume_id: int, name: str, path: str | os.PathLike[str],
                 size: int) -> None:
        volume_id = check_int("volume id", volume_id)
        size = check_int("volume size", size)
        if size <= 0 or size % records.SECTOR:
            raise ConfigError(f"volume {name!r}: size {size} is not a positive multiple of "
                              f"{records.SECTOR}")
        actual = backing_size(path)
        if actual < size:
            raise ConfigError(f"volume {name!r}: backing store {path} holds {actual} bytes, "
                              f"less than the volume's {size}")
        self.vm = vm
        self.id = volume_id
        self.name = name
        self.path = os.fspath(path)
        self.size = size
        self._fd = os.open(self.path, os.O_RDWR)
        self._ring: CaptureRing | _NoRing = _NoRing(
            StateError(f"volume {name!r}: its VPG is not started"))

    def _attach(self, ring: CaptureRing | None) -> None:
        """Called by the VPG: route writes into `ring` (None detaches)."""
        self._ring = ring if ring is not None else _NoRing(
            StateError(f"volume {self.name!r}: its VPG is stopped"))

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def ring(self) -> CaptureRing | None:
        """The capture ring this volume's writes go to; None while its VPG is stopped or
        the volume is closed."""
        return None if isinstance(self._ring, _NoRing) else self._ring

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write sector-aligned `data` at `offset` and capture it; returns its seq.  An
        offset that is not an int (a bool, a float) is a ConfigError; nothing is written."""
        if type(offset) is not int:
            offset = check_int("write offset", offset)
        # the ring checks the buffer natively (records.byte_view's rule: contiguous,
        # item size 1), saving the protected VM a memoryview per write
        try:
            return self._ring.write(self._fd, self.id, self.size, offset, data)
        except BufferError:
            raise ConfigError("write data must be a contiguous buffer of bytes; copy it "
                              "to bytes first") from None

    def write_zeroes(self, offset: int, length: int) -> int:
        """Zero a sector-aligned range (captured as a zero record, no payload)."""
        offset = check_int("write offset", offset)
        length = check_int("write length", length)
        records.check_range(offset, length, self.size)
        seq = 0
        chunk = min(length, records.MAX_WRITE)
        zeros = bytes(chunk)
        for at in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - at)
            seq = self.write(at, memoryview(zeros)[:n])
        return seq

    def trim(self, offset: int, length: int) -> int:
        """Zero a sector-aligned range by punching a hole in the backing store, captured
        as zero records (no payload): what TRIM and fast zero of the volume's NBD export
        do.  The replica gets the range as a hole too, at promotion
        (zcore.journal.retention).  Returns the last record's seq (0 for no bytes)."""
        offset = check_int("trim offset", offset)
        length = check_int("trim length", length)
        records.check_range(offset, length, self.size)
        seq = 0
        for at in range(offset, offset + length, records.MAX_WRITE):
            seq = self._ring.zero(self._fd, self.id, self.size, at,
                                  min(records.MAX_WRITE, offset + length - at))
        return seq

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the backing store (reads are not captured)."""
        self._check_open()
        offset = check_int("read offset", offset)
        length = check_int("read length", length)
        records.check_range(offset, length, self.size)
        return os.pread(self._fd, length, offset)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        self._check_open()
        view = memoryview(buf).cast("B")
        offset = check_int("read offset", offset)
        records.check_range(offset, len(view), self.size)
        done = preadinto_upto(self._fd, view, offset)
        if done < len(view):
            raise ConfigError(f"backing store {self.path} ends before {offset + done}")

    def flush(self) -> None:
        """Make completed writes durable on the backing store."""
        self._check_open()
        os.fdatasync(self._fd)

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ClosedError(f"volume {self.name!r} is closed")

    def close(self) -> None:
        if self._fd >= 0:
            self._ring = _NoRing(ClosedError(f"volume {self.name!r} is closed"))
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"ProtectedVolume({self.vm}/{self.name}, id={self.id}, size={self.size})"
