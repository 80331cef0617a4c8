"""Protected volumes: the write path on the protected site.

Sits at the very top of the data path.  `ProtectedVolume.write` is one native call: it
checks the range, orders the write against overlapping in-flight writes, gives it the
VPG-wide seq, writes the backing store and copies the data into the VPG's capture ring
(all with the GIL released).  The write is complete when the backing store has it;
replication is asynchronous (like DRBD protocol A).  Volumes are created and owned by a
`zcore.vpg.VPG`.

A capture-only volume has no backing store here: its data lives in a hypervisor (a
running QEMU's block node, zcore.hypervisor), which mirrors every guest write to the
volume's NBD export after writing its own disk.  Writes are then only captured, and
syncs read the hypervisor's disk through the volume's `VolumeSource`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from zcore import records
from zcore._native.capture import NO_BACKING
from zcore.errors import ClosedError, ConfigError, StateError
from zcore.fsutil import preadinto_upto
from zcore.records import check_int as check_int  # re-exported: its home is records

if TYPE_CHECKING:
    from zcore._native.capture import CaptureRing


class VolumeSource(Protocol):
    """Where a capture-only volume's bytes are (zcore.hypervisor.QemuDisk): what its
    syncs, compares and reads see.  Calls block; errors are zcore.errors exceptions."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill `buf` with the bytes at `offset`."""

    def zero_extents(self) -> Sequence[tuple[int, int]]:
        """Ranges the source knows read as zeros (holes): an initial sync skips them."""

    def changed_extents(self) -> Sequence[tuple[int, int]] | None:
        """Ranges written since the source last confirmed them durable at the recovery
        site, or None when it cannot tell (its dirty bitmap is gone)."""


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
    """One virtual disk of a protected VM, backed by a raw image file or block device, or
    capture-only over a `source` (then `path` is None and `fd` is NO_BACKING, < 0)."""

    def __init__(self, vm: str, volume_id: int, name: str,
                 path: str | os.PathLike[str] | None, size: int, *,
                 source: VolumeSource | None = None) -> None:
        volume_id = check_int("volume id", volume_id)
        size = check_int("volume size", size)
        if size <= 0 or size % records.SECTOR:
            raise ConfigError(f"volume {name!r}: size {size} is not a positive multiple of "
                              f"{records.SECTOR}")
        if (path is None) == (source is None):
            raise ConfigError(f"volume {name!r}: give a backing store or a source, not "
                              f"{'both' if source is not None else 'neither'}")
        if source is not None and source.size != size:
            raise ConfigError(f"volume {name!r}: its source holds {source.size} bytes, not "
                              f"the volume's {size}")
        if path is not None:
            actual = backing_size(path)
            if actual < size:
                raise ConfigError(f"volume {name!r}: backing store {path} holds {actual} "
                                  f"bytes, less than the volume's {size}")
        self.vm = vm
        self.id = volume_id
        self.name = name
        self.path = os.fspath(path) if path is not None else None
        self.size = size
        self.source = source
        # a capture-only volume's fd is NO_BACKING: the ring writes no backing store (a
        # closed volume's -1 is an error there, never taken for it)
        self._open = True
        self._fd = os.open(self.path, os.O_RDWR) if self.path is not None else NO_BACKING
        self._ring: CaptureRing | _NoRing = _NoRing(
            StateError(f"volume {name!r}: its VPG is not started"))

    def _attach(self, ring: CaptureRing | None) -> None:
        """Called by the VPG: route writes into `ring` (None detaches)."""
        self._ring = ring if ring is not None else _NoRing(
            StateError(f"volume {self.name!r}: its VPG is stopped"))

    @property
    def fd(self) -> int:
        """The backing store's descriptor (negative for a capture-only volume)."""
        return self._fd

    @property
    def ring(self) -> CaptureRing | None:
        """The capture ring this volume's writes go to; None while its VPG is stopped or
        the volume is closed."""
        return None if isinstance(self._ring, _NoRing) else self._ring

    @property
    def closed(self) -> bool:
        return not self._open

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
        """Bytes of the backing store or the source (reads are not captured)."""
        out = bytearray(check_int("read length", length))
        self.read_into(offset, out)
        return bytes(out)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        self._check_open()
        view = memoryview(buf).cast("B")
        offset = check_int("read offset", offset)
        records.check_range(offset, len(view), self.size)
        if self.source is not None:
            self.source.read_into(offset, view)
            return
        done = preadinto_upto(self._fd, view, offset)
        if done < len(view):
            raise ConfigError(f"backing store {self.path} ends before {offset + done}")

    def flush(self) -> None:
        """Make completed writes durable on the backing store (a capture-only volume's
        are the source's to keep: its hypervisor wrote them first)."""
        self._check_open()
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def _check_open(self) -> None:
        if not self._open:
            raise ClosedError(f"volume {self.name!r} is closed")

    def close(self) -> None:
        if self._open:
            self._open = False
            self._ring = _NoRing(ClosedError(f"volume {self.name!r} is closed"))
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"ProtectedVolume({self.vm}/{self.name}, id={self.id}, size={self.size})"
