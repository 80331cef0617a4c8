"""Object stores: where a backup repository's objects live (docs/format.md 10d.1).

The repository (store.py) needs only `put`, `get`, `exists`, `list`, `delete`, `lock`
(extend an object's retain-until), `retain_until`, `sync` and a writers' lock, so an S3
bucket can stand behind the same interface.  `DirectoryStore` is the embedded default: a
local directory or a mounted NFS/SMB share, one file per object.

Durability of a DirectoryStore (docs/format.md 10d.6): `put` writes a temporary file
`<name>.tmp-<random>` and starts its writeback, but neither fsyncs nor renames it; until
the next `sync()` this process sees the new bytes at the name (get, exists, list, lock all
look through the pending temporary file) and every other process still sees the old ones.
`sync()` then, in this order, fsyncs every pending temporary file, renames each over its
name, fsyncs every file whose retain-until changed, and fsyncs each directory touched.  So
a name only ever shows bytes that were durable before it pointed at them (never torn), a
crash before `sync()` leaves `*.tmp-*` leftovers that nothing reads and GC removes, and
the repository calls `sync()` before anything that depends on earlier objects (a
manifest after its chunks, a chunk deletion after the manifests').  One fsync per chunk at
sync time rather than at put time lets the disk write the chunks while later ones are
being sealed, and the fsyncs then find their data written.
Retain-until is the file's modification time (as NetApp SnapLock keeps it in the access
time): inode metadata, durable only once the file is fsynced, so `sync()` also fsyncs every
file `lock` changed; finished files are read-only (0444).  A store created with
`create=True` fsyncs the parent of every directory it made (the repository's own entry)."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from zcore.backup.errors import RetentionLockError
from zcore.errors import ConfigError, StateError
from zcore.fsutil import (
    fsync_dir,
    fsync_path,
    make_dirs,
    preadinto_upto,
    start_writeback,
    write_all,
)

TMP_MARK = ".tmp-"


class ObjectStore(Protocol):
    """The object interface a repository sits on (names are `/`-separated ASCII)."""

    def put(self, name: str, data: bytes | bytearray) -> None:
        """Store `data` at `name` (replacing it), atomically: a reader sees old or new;
        durable at the next `sync` (a store may also make it visible to other processes
        only then)."""

    def get(self, name: str) -> bytes:
        """The bytes at `name`; FileNotFoundError when there are none."""

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every name starting with `prefix` (a folder ending in `/`), unordered."""

    def delete(self, name: str) -> None:
        """Remove `name` (absent is fine); RetentionLockError before its retain-until."""

    def lock(self, name: str, until: float) -> None:
        """Extend `name`'s retain-until to `until` (epoch seconds); never shortens it."""

    def retain_until(self, name: str) -> float: ...

    def sync(self) -> None:
        """Make every put, delete and lock so far durable."""

    def writer(self) -> AbstractContextManager[None]:
        """Hold the writers' lock (one backup or prune at a time) for a `with` block."""

    def leftovers(self) -> Iterator[str]:
        """Names of interrupted writes (never read; garbage collection removes them)."""

    def remove_leftover(self, name: str) -> None: ...


class DirectoryStore:
    """Objects as files under `root` (docs/format.md 10d.1).  `put`, `get`, `exists`,
    `lock` and `retain_until` may be called from several threads at once; `sync`,
    `delete`, `list` and `leftovers` only while no put runs."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root)
        if create:
            make_dirs(self.root)  # each new directory's entry durable in its parent
        elif not self.root.is_dir():
            raise ConfigError(f"backup repository {self.root} does not exist")
        self._dirty: set[Path] = set()
        self._pending: dict[Path, Path] = {}  # name's path -> its unsynced temporary file
        self._locked: set[Path] = set()  # paths whose retain-until changed since the sync
        self._mu = threading.Lock()  # guards the three sets above
        self._local = threading.local()  # each thread's get_view buffer
        self._lock_fd = -1

    def _path(self, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"bad object name {name!r}")
        return self.root / name

    def _current(self, path: Path) -> Path:
        """The file holding `path`'s bytes as this process sees them."""
        with self._mu:
            return self._pending.get(path, path)

    def put(self, name: str, data: bytes | bytearray) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            write_all(fd, data)
            start_writeback(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        with self._mu:
            older = self._pending.get(path)
            self._pending[path] = tmp
            self._touch(path.parent)
        if older is not None:  # put twice before a sync: the first never gets the name
            older.unlink(missing_ok=True)

    def _touch(self, d: Path) -> None:
        """Mark `d` and its parents up to the root for `sync` (under `_mu`): a directory
        made by `put` is durable only once its parent is synced too."""
        while d not in self._dirty and d != self.root and self.root in d.parents:
            self._dirty.add(d)
            d = d.parent

    def get(self, name: str) -> bytes:
        path = self._path(name)
        return self._current(path).read_bytes()

    def get_view(self, name: str) -> memoryview:
        """The bytes at `name` read into this thread's reused buffer, valid until the
        thread's next `get_view` (how the repository reads chunks: a fresh buffer per
        chunk costs page faults and zeroing in the kernel every time)."""
        fd = os.open(self._current(self._path(name)), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            buf: bytearray | None = getattr(self._local, "buf", None)
            if buf is None or len(buf) < size + 1:
                buf = bytearray(size + 1)
                if size < 1 << 25:  # chunk-sized: kept for the next one
                    self._local.buf = buf
            view = memoryview(buf)[:size + 1]  # one byte over: a file grown is seen
            n = preadinto_upto(fd, view, 0)
        finally:
            os.close(fd)
        return view[:n]

    def exists(self, name: str) -> bool:
        path = self._path(name)
        return self._current(path).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        with self._mu:
            pending = {p for p in self._pending if base in p.parents}
        if base.is_dir():
            for dirpath, _dirs, files in os.walk(base):
                d = Path(dirpath)
                rel = d.relative_to(self.root).as_posix()
                for f in files:
                    if TMP_MARK not in f:
                        pending.discard(d / f)
                        yield f"{rel}/{f}"
        for p in pending:  # put since the last sync, not yet at their names
            yield p.relative_to(self.root).as_posix()

    def delete(self, name: str) -> None:
        path = self._path(name)
        until = self.retain_until(name)
        if until > time.time():
            raise RetentionLockError(f"{name} is locked until {_when(until)}", until)
        with self._mu:
            tmp = self._pending.pop(path, None)
            self._locked.discard(path)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        with self._mu:
            self._touch(path.parent)

    def lock(self, name: str, until: float) -> None:
        path = self._path(name)
        current = self._current(path)
        st = current.stat()
        if until > st.st_mtime:
            os.utime(current, (st.st_atime, until))
            with self._mu:
                self._locked.add(path)

    def retain_until(self, name: str) -> float:
        """The file's modification time when it is in the future, else 0."""
        try:
            mtime = self._current(self._path(name)).stat().st_mtime
        except FileNotFoundError:
            return 0.0
        return mtime if mtime > time.time() else 0.0

    def sync(self) -> None:
        """Every put, lock and delete so far made durable: the pending temporary files
        fsynced, then renamed over their names (so no name shows bytes that are not
        durable), the files whose retain-until changed fsynced, then the directories."""
        with self._mu:
            pending = sorted(self._pending.items())
            locked = self._locked - self._pending.keys()
            self._locked = set()
        for _path, tmp in pending:
            fsync_path(tmp)
        for path, tmp in pending:
            os.replace(tmp, path)
            with self._mu:
                if self._pending.get(path) == tmp:
                    del self._pending[path]
        for path in sorted(locked):
            if path.exists():
                fsync_path(path)
        with self._mu:
            dirty = sorted(self._dirty, key=lambda p: -len(p.parts))
            self._dirty.clear()
        for d in dirty:
            if d.exists():
                fsync_dir(d)
        fsync_dir(self.root)

    @contextmanager
    def writer(self) -> Iterator[None]:
        if self._lock_fd >= 0:
            raise StateError(f"backup repository {self.root} is already locked here "
                             f"(in use by this process)")
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(f"backup repository {self.root} is in use by another "
                                 f"backup or prune; try again when it ends") from None
            raise
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = -1
            os.close(fd)

    def leftovers(self) -> Iterator[str]:
        """Temporary files of writes that never reached `sync` in any process (this
        process's pending puts are not leftovers)."""
        with self._mu:
            mine = set(self._pending.values())
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                if TMP_MARK in f and Path(dirpath) / f not in mine:
                    yield f if rel == "." else f"{rel}/{f}"

    def remove_leftover(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        with self._mu:
            self._touch(path.parent)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
