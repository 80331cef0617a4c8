"""The one file layer of zcore: every full read, full write, atomic replacement and
checked state file goes through these helpers, so a short read means one thing everywhere
and crash simulation or error injection reaches every file operation from one place.

Durability, stated plainly: `os.fsync` of a file makes its data durable; a creation,
rename or unlink is durable only after an `fsync` of its directory (`fsync_dir`).  POSIX
promises nothing about the order in which unsynced writes reach the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zcore._native import record
from zcore.errors import CorruptRecordError, FormatVersionError, TruncatedRecordError

if TYPE_CHECKING:  # collections.abc.Buffer is 3.12+; only the annotations need it
    from typing_extensions import Buffer

# one pread/pwrite call moves at most this much: Linux caps a call near 2 GiB anyway
_MAX_IO = 1 << 30


def pread_exact(fd: int, size: int, offset: int, *, what: str = "file") -> bytes:
    """`size` bytes at `offset`; a file that ends first raises `TruncatedRecordError`."""
    buf = bytearray(size)
    preadinto_exact(fd, buf, offset, what=what)
    return bytes(buf)


def preadinto_exact(fd: int, buf: Buffer, offset: int, *, what: str = "file") -> None:
    """Fill `buf` (any writable buffer) from `offset`; a file that ends first raises
    `TruncatedRecordError` naming `what`."""
    done = preadinto_upto(fd, buf, offset)
    if done != memoryview(buf).nbytes:
        raise TruncatedRecordError(f"{what} ends at {offset + done}, before "
                                   f"{offset + memoryview(buf).nbytes}")


def preadinto_upto(fd: int, buf: Buffer, offset: int) -> int:
    """Fill `buf` from `offset` until it is full or the file ends; returns the bytes read
    (fewer than `len(buf)` only at end of file: the caller decides what that means)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of `data` at `offset` (retrying short writes; errors raise `OSError`)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _MAX_IO], offset + done)


def write_all(fd: int, data: Buffer) -> None:
    """Write all of `data` at the descriptor's position."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view[:_MAX_IO]):]


def _sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux (or not glibc): start_writeback is a no-op
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing the dirty pages of `fd` in [offset, offset + length) (length 0: to the
    end) to the disk, without waiting: Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`.
    A hint, never a durability promise (it writes no metadata and flushes no disk cache):
    the `fsync` that must still follow finds the data already written and returns sooner.
    Its errors are ignored (the fsync reports them); a no-op where the call is missing."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Make the data and metadata of the file at `path` durable (opened read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """`mkdir -p path`, each directory it creates made durable in its parent."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(made):
        fsync_dir(d.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, directory fsync.  After a
    crash the file holds either the old or the new bytes, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- checked state files (docs/format.md 7.2) ---------------------------------------------

def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def _crc32c(data: bytes) -> int:
    return int(record.crc32c(data))


def write_state(path: str | os.PathLike[str], fmt: str, version: int,
                meta: dict[str, Any]) -> None:
    """Atomically replace the checked state file `path` with `meta`, stamped with its
    format name and version: `{"meta": {...}, "crc32c": N}`, the CRC32C over the canonical
    JSON of `meta` (docs/format.md 7.2)."""
    meta = {**meta, "format": fmt, "version": version}
    body = json.dumps({"meta": meta, "crc32c": _crc32c(_canonical(meta))}).encode()
    atomic_write(path, body)


def read_state(path: str | os.PathLike[str], fmt: str,
               versions: int | tuple[int, ...]) -> dict[str, Any]:
    """The `meta` object of the checked state file `path`.  A file that does not parse,
    fails its CRC or is of another format raises `CorruptRecordError`; a version not in
    `versions` raises `FormatVersionError`; a missing file raises `FileNotFoundError`."""
    path = Path(path)
    known = (versions,) if isinstance(versions, int) else versions
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
        meta, crc = doc["meta"], doc["crc32c"]
        if not isinstance(meta, dict) or type(crc) is not int:
            raise TypeError("meta must be an object and crc32c an integer")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptRecordError(f"{path} is unreadable: {exc}") from None
    if _crc32c(_canonical(meta)) != crc:
        raise CorruptRecordError(f"{path} fails its checksum")
    if meta.get("format") != fmt:
        raise CorruptRecordError(f"{path} is not a {fmt} file (format {meta.get('format')!r})")
    version = meta.get("version")
    if type(version) is not int or version not in known:
        raise FormatVersionError(f"{path}: {fmt} format version {version!r} is not "
                                 f"supported (this build reads {', '.join(map(str, known))})")
    return meta


# ---- moving a file ------------------------------------------------------------------------

_COPY_CHUNK = 1 << 20  # bytes per copy step of a cross-file-system move


def move_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move the file `src` to `dst`, durably: a hard link and an unlink of `src` (a rename
    that can never replace an existing `dst`), or across file systems (EXDEV) a
    sparse copy (only the data extents SEEK_DATA/SEEK_HOLE report, and within them no
    all-zero 1 MiB chunk is written: holes stay holes), fsynced, then `src` unlinked.
    Both directories are fsynced.  An existing `dst` raises `FileExistsError` and leaves
    both files as they were.  A crash during a copy leaves `src` whole (and perhaps a
    partial `dst.tmp-move`, which a retry replaces)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists: refusing to move {src} over it")
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a regular file")
    try:
        os.link(src, dst)  # like rename, but never replaces an existing dst
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(f"{dst} exists: refusing to move {src} over it") from None
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        _copy_sparse(src, dst)
    fsync_dir(dst.parent)
    os.unlink(src)
    fsync_dir(src.parent)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy `src` to a temporary file beside `dst` (holes kept), fsync it and link it in
    place (refusing an existing `dst`)."""
    tmp = dst.with_name(dst.name + ".tmp-move")
    sfd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dfd, size)
            buf = bytearray(_COPY_CHUNK)
            zero = bytes(_COPY_CHUNK)
            for start, end in _extents(sfd, size):
                for pos in range(start, end, _COPY_CHUNK):
                    n = min(_COPY_CHUNK, end - pos)
                    view = memoryview(buf)[:n]
                    preadinto_exact(sfd, view, pos, what=str(src))
                    if view != zero[:n]:
                        pwrite_all(dfd, view, pos)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    try:
        os.link(tmp, dst)
    except FileExistsError:
        os.unlink(tmp)
        raise FileExistsError(f"{dst} exists: refusing to move {src} over it") from None
    os.unlink(tmp)


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of `fd` that may hold data (the whole file without
    SEEK_DATA)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)] if size else []
    return out


# ---- sparse files: allocation and holes ---------------------------------------------------

# The allocation states of a byte range, as bits (the values of NBD's base:allocation
# context, so the NBD server passes them through): a hole has no storage; a zero range
# reads as zeros.  A hole of a regular file is both; 0 is allocated data.
STATE_HOLE = 1
STATE_ZERO = 2


def data_ranges(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The (start, length) ranges of [offset, offset + length) of the file `fd` that may
    hold data, in order; the rest is holes (reading zeros).  From SEEK_DATA and SEEK_HOLE;
    a file system without them (EINVAL, ENOTSUP, or a block device, which reports the
    whole device as data) gives the whole range as data.  Past the end of the file is a
    hole."""
    end = offset + length
    if offset < 0 or length < 0:
        raise ValueError(f"range {offset}+{length} is negative")
    out: list[tuple[int, int]] = []
    pos = offset
    try:
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or past pos
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            out.append((start, stop - start))
            pos = stop
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ESPIPE):
            return [(offset, length)] if length else []
        raise
    return out


_libc: Any = None
_ffi: Any = None
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate() -> tuple[Any, Any]:
    """cffi's handle on the C library's fallocate (the os module has posix_fallocate
    only, which cannot punch)."""
    global _libc, _ffi
    if _libc is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef("int fallocate(int fd, int mode, long offset, long len);")
        _libc = ffi.dlopen(None)
        _ffi = ffi
    return _ffi, _libc


def _punch(fd: int, offset: int, length: int) -> bool:
    """The fallocate call of `punch_hole`: False when the file system cannot punch.  One
    function, so crash simulation and error injection see every punch (tests/reliability
    records it as a write of zeros)."""
    ffi, libc = _fallocate()
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ffi.errno
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(code, f"punching a hole at {offset}+{length}: {os.strerror(code)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of the file `fd`, which reads as zeros after
    (fallocate PUNCH_HOLE | KEEP_SIZE: the file's size stays).  A file system that cannot
    punch (EOPNOTSUPP) gets the range written with zeros instead, so the bytes are the
    same either way; other errors raise `OSError`.  Not durable until an fsync."""
    if offset < 0 or length < 0:
        raise ValueError(f"range {offset}+{length} is negative")
    if length == 0 or _punch(fd, offset, length):
        return
    zero = bytes(min(length, _COPY_CHUNK))
    for pos in range(offset, offset + length, len(zero)):
        pwrite_all(fd, memoryview(zero)[: min(len(zero), offset + length - pos)], pos)


# sun_path holds 108 bytes including the terminating NUL
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def short_socket_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A path naming the Unix socket `path` that fits in sun_path: `path` itself when
    short, else /proc/self/fd/N/NAME through a descriptor of its directory, open while in
    use (it holds for bind and connect alike)."""
    path = Path(path)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
