"""What the NBD server serves: the `Backend` interface, its four implementations' glue,
and `Export` (a named backend) with the constructors the CLI and library use.

- `volume_export`: a protected volume (read-write; every write goes through
  `ProtectedVolume.write` and is captured; FLUSH and FUA make its backing store durable);
- `view_export`: a view of a volume at a checkpoint (read-only);
- `scratch_export`: the same view under a `zcore.recovery.ScratchOverlay` (writable, the
  writes kept apart from the journal and the replica and discarded on close: the basis
  of failover test);
- `overlay_export`: a view under a `zcore.recovery.DurableOverlay` (writable, the writes
  kept durably beside it, FLUSH and FUA honoured: a live failover's recovered volume);
- `file_export`: a plain file, for tools and tests.

Anything with the small `Backend` interface can be served.  Optional methods add what a
backend can do beyond it: `trim` (NBD_CMD_TRIM), `punch` (zeroing with no storage,
offered as fast zero: NBD_FLAG_SEND_FAST_ZERO) and `allocation` (NBD_CMD_BLOCK_STATUS in
the base:allocation context: holes and data).  Every kind here has `allocation`: files
and protected volumes from SEEK_DATA/SEEK_HOLE of their file, views from the journal's
records over the replica's holes, overlays from their own maps over the view.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zcore import records
from zcore.errors import ClosedError, ConfigError, OutOfRangeError
from zcore.fsutil import STATE_HOLE, STATE_ZERO, data_ranges, preadinto_upto, punch_hole, pwrite_all
from zcore.nbd.protocol import MAX_NAME, SECTOR

if TYPE_CHECKING:
    from zcore.journal import Journal


@runtime_checkable
class Backend(Protocol):
    """What an export serves.  Offsets and lengths of writes are sector-aligned and
    within `size` (the server checks before calling); reads are sector-aligned too.
    Optional methods (advertised to clients where present): `trim(offset, length)` as
    TRIM; `punch(offset, length)` (the range reads as zeros, nothing stored) as fast
    zero; `allocation(offset, length, max_extents) -> [(start, length, state)]` (runs
    by offset from `offset`, state a mask of `zcore.fsutil.STATE_HOLE | STATE_ZERO`;
    they may end early, never before the first run) as block status."""

    size: int
    readonly: bool

    def read_into(self, offset: int, buf: Any) -> None: ...

    def write(self, offset: int, data: Any) -> object: ...

    def write_zeroes(self, offset: int, length: int) -> object: ...

    def flush(self) -> None: ...  # may run in a worker thread (`Export.sync_in_thread`)

    def close(self) -> None: ...


_ZEROES = bytes(1 << 20)


class FileBackend:
    """A raw image file or block device, read-write unless `readonly` (for tools and
    tests: writes to it are not captured).  FLUSH is fdatasync."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 size: int | None = None) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if size is not None and not readonly:
            flags |= os.O_CREAT
        self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        try:
            if size is not None and not readonly and os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            if self.size <= 0 or self.size % SECTOR:
                raise ConfigError(f"{self.path}: size {self.size} is not a positive multiple "
                                  f"of {SECTOR}")
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    def read_into(self, offset: int, buf: Any) -> None:
        out = memoryview(buf).cast("B")
        done = preadinto_upto(self._fd, out, offset)
        if done < len(out):
            out[done:] = bytes(len(out) - done)  # a file shrunk under us reads as zeroes

    def write(self, offset: int, data: Any) -> int:
        view = records.byte_view(data)  # the one rule for write data: item size 1
        pwrite_all(self._fd, view, offset)
        return len(view)

    def write_zeroes(self, offset: int, length: int) -> int:
        for at in range(offset, offset + length, len(_ZEROES)):
            pwrite_all(self._fd, memoryview(_ZEROES)[: min(len(_ZEROES), offset + length - at)],
                       at)
        return length

    def trim(self, offset: int, length: int) -> int:
        """Deallocate the range (punch a hole; it reads as zeros)."""
        punch_hole(self._fd, offset, length)
        return length

    punch = trim

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        return file_allocation(self._fd, offset, length)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def file_allocation(fd: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(start, length, state) runs of [offset, offset + length) of the file `fd`: its data
    ranges as data, the rest holes that read as zeros."""
    out: list[tuple[int, int, int]] = []
    cur = offset
    for start, n in data_ranges(fd, offset, length):
        if start > cur:
            out.append((cur, start - cur, STATE_HOLE | STATE_ZERO))
        out.append((start, n, 0))
        cur = start + n
    if cur < offset + length:
        out.append((cur, offset + length - cur, STATE_HOLE | STATE_ZERO))
    return out


class VolumeBackend:
    """A `zcore.capture.ProtectedVolume`, read-write: every write is captured; FLUSH and
    FUA make the backing store durable.  Closes the volume only when it `owns` it."""

    readonly = False

    def __init__(self, volume: Any, *, owns: bool = False) -> None:
        self.volume = volume
        self.size = int(volume.size)
        self._owns = owns
        self.read_into = volume.read_into
        self.write = volume.write
        self.write_zeroes = volume.write_zeroes
        self.trim = volume.trim  # a zero record captured, a hole punched in the backing
        self.punch = volume.trim
        self.flush = volume.flush

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """The backing file's holes and data (a block device or a capture-only volume,
        whose source this export does not ask: all data)."""
        if self.volume.closed:
            raise ClosedError(f"volume {self.volume.name!r} is closed")
        if self.volume.fd < 0:
            return [(offset, length, 0)]
        return file_allocation(self.volume.fd, offset, length)

    def close(self) -> None:
        if self._owns:
            self.volume.close()


class ViewBackend:
    """One volume of a journal view (a point-in-time image), read-only."""

    readonly = True

    def __init__(self, view: Any, volume: int | str, *, owns: bool = True) -> None:
        self.view = view
        self.volume = volume
        self.size = int(view.size(volume))
        self._owns = owns

    def read_into(self, offset: int, buf: Any) -> None:
        self.view.read_into(self.volume, offset, buf)

    def write(self, offset: int, data: Any) -> int:
        raise PermissionError("a point-in-time view is read-only")

    def write_zeroes(self, offset: int, length: int) -> int:
        raise PermissionError("a point-in-time view is read-only")

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        runs: list[tuple[int, int, int]] = self.view.allocation(self.volume, offset, length,
                                                                 max_extents)
        return runs

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._owns:
            self.view.close()


class ExportKind(StrEnum):
    """What an export serves (informational: shown to people, not to NBD clients)."""

    VOLUME = "volume"
    VIEW = "view"
    SCRATCH = "scratch"
    OVERLAY = "overlay"
    FILE = "file"


@dataclass
class Export:
    """A named backend.  `owned`: the server closes the backend when it closes or drops
    the export.  `kind` is informational.  `blocking_reads`: a read may wait long (on a
    remote store: a backup repository), so it runs in a worker thread, not on the loop
    (the connection takes its next request once it is answered)."""

    name: str
    backend: Backend
    description: str = ""
    owned: bool = True
    kind: ExportKind = ExportKind.FILE
    blocking_reads: bool = False

    def __post_init__(self) -> None:
        raw = self.name.encode("utf-8")
        if len(raw) > MAX_NAME or "\0" in self.name:
            raise ConfigError(f"export name {self.name[:40]!r}... is longer than {MAX_NAME} "
                              "bytes or holds a NUL")
        if len(self.description.encode("utf-8")) > MAX_NAME:
            raise ConfigError(f"description of export {self.name!r} is too long")
        size = int(self.backend.size)
        if size <= 0 or size % SECTOR:
            raise ConfigError(f"export {self.name!r}: size {size} is not a positive multiple "
                              f"of {SECTOR}")

    @property
    def size(self) -> int:
        return int(self.backend.size)

    @property
    def readonly(self) -> bool:
        return bool(self.backend.readonly)

    @property
    def sync_in_thread(self) -> bool:
        """FLUSH and FUA run the backend's `flush` in a worker thread (it may block for
        long: an fdatasync), concurrently with other connections' requests; views and
        scratch overlays have nothing to make durable and flush inline."""
        return not self.readonly and self.kind in (ExportKind.VOLUME, ExportKind.FILE,
                                                   ExportKind.OVERLAY)

    @property
    def can_trim(self) -> bool:
        return not self.readonly and callable(getattr(self.backend, "trim", None))

    @property
    def can_fast_zero(self) -> bool:
        """WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO is served (by `punch`)."""
        return not self.readonly and callable(getattr(self.backend, "punch", None))

    @property
    def can_block_status(self) -> bool:
        """The base:allocation context is answered (by `allocation`)."""
        return callable(getattr(self.backend, "allocation", None))


def file_export(path: str | os.PathLike[str], name: str | None = None, *,
                readonly: bool = False) -> Export:
    """A raw file served as is (writes are not captured)."""
    backend = FileBackend(path, readonly=readonly)
    return Export(name if name is not None else os.path.basename(os.fspath(path)), backend,
                  f"raw file {os.fspath(path)}", kind=ExportKind.FILE)


def volume_export(volume: Any, name: str | None = None, *, owned: bool = False) -> Export:
    """A protected volume, read-write; every write is captured.  A capture-only
    volume's export is its hypervisor's mirror target; reads of it go to the source,
    over the network, so they run in a worker thread."""
    capture_only = getattr(volume, "source", None) is not None
    return Export(name if name is not None else volume.name, VolumeBackend(volume, owns=owned),
                  f"{'capture-only' if capture_only else 'protected'} volume {volume.name}",
                  owned=True, kind=ExportKind.VOLUME, blocking_reads=capture_only)


def view_export(journal: Journal, checkpoint: Any, volume: int | str,
                name: str | None = None) -> Export:
    """Volume `volume` of `journal` at `checkpoint`, read-only.  The export owns the view
    (it pins the checkpoint against promotion until the export is closed)."""
    spec = _volume_spec(journal, volume)
    view = journal.view(checkpoint)
    try:
        backend = ViewBackend(view, spec.id, owns=True)
        ckpt = view.checkpoint
        return Export(name if name is not None else f"{spec.name}@{ckpt.id}", backend,
                      _checkpoint_text(journal, spec.name, ckpt), kind=ExportKind.VIEW)
    except BaseException:
        view.close()
        raise


def scratch_export(journal: Journal, checkpoint: Any, volume: int | str,
                   name: str | None = None, *, limit_bytes: int | None = None,
                   directory: str | os.PathLike[str] | None = None) -> Export:
    """Volume `volume` of `journal` at `checkpoint` under a scratch overlay: writable, the
    writes discarded when the export closes; the journal and replica stay untouched."""
    from zcore.recovery import ScratchOverlay

    spec = _volume_spec(journal, volume)
    overlay = ScratchOverlay.open(journal, checkpoint, spec.id, limit_bytes=limit_bytes,
                                  directory=directory)
    ckpt = overlay.checkpoint
    try:
        return Export(name if name is not None else f"{spec.name}@{ckpt.id}-scratch", overlay,
                      "scratch overlay on " + _checkpoint_text(journal, spec.name, ckpt),
                      kind=ExportKind.SCRATCH)
    except BaseException:
        overlay.close()
        raise


def overlay_export(overlay: Any, name: str, *, owned: bool = True) -> Export:
    """A `zcore.recovery.DurableOverlay` served read-write: FLUSH and FUA make its writes
    durable (in a worker thread).  Closing the export closes the overlay when `owned`."""
    ckpt = overlay.checkpoint
    return Export(name, overlay, f"durable overlay on volume {overlay.volume} at checkpoint "
                  f"{ckpt.id}", owned=owned, kind=ExportKind.OVERLAY)


def _volume_spec(journal: Journal, volume: int | str) -> Any:
    for spec in journal.volumes.values():
        if volume in (spec.id, spec.name):
            return spec
    names = ", ".join(f"{v.name} (id {v.id})" for v in journal.volumes.values())
    raise OutOfRangeError(f"journal {journal.path} has no volume {volume!r}; it holds: "
                          f"{names or 'none'}")


def _checkpoint_text(journal: Journal, volume_name: str, ckpt: Any) -> str:
    tag = f" {ckpt.tag!r}" if ckpt.tag else ""
    return f"{journal.vm}/{volume_name} at checkpoint {ckpt.id}{tag} ({ckpt.kind})"
