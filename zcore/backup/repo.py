"""Object stores: where a backup repository's objects live (docs/format.md 10d.1).

The repository (store.py) needs only `put`, `get`, `exists`, `list`, `delete`, `lock`
(extend an object's retain-until), `retain_until`, `sync` and a writers' lock, so an S3
bucket can stand behind the same interface.  `DirectoryStore` is the embedded default: a
local directory or a mounted NFS/SMB share, one file per object.

Durability of a DirectoryStore: `put` writes a temporary file, fsyncs it and renames it
over the name, so a name never shows torn bytes; the renames and unlinks become durable
at `sync()` (one fsync per directory touched), which the repository calls before anything
that depends on them (a manifest after its chunks, a chunk deletion after the manifests').
Retain-until is the file's modification time (as NetApp SnapLock keeps it in the access
time): inode metadata, durable only once the file is fsynced, so `sync()` also fsyncs every
file `lock` changed; finished files are read-only (0444).  A store created with
`create=True` fsyncs the parent of every directory it made (the repository's own entry)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from zcore.backup.errors import RetentionLockError
from zcore.errors import ConfigError, StateError
from zcore.fsutil import fsync_dir, write_all

TMP_MARK = ".tmp-"


class ObjectStore(Protocol):
    """The object interface a repository sits on (names are `/`-separated ASCII)."""

    def put(self, name: str, data: bytes) -> None:
        """Store `data` at `name` (replacing it), atomically: a reader sees old or new."""

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
    """Objects as files under `root` (docs/format.md 10d.1)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root)
        if create:
            made = [p for p in (self.root, *self.root.parents) if not p.exists()]
            self.root.mkdir(parents=True, exist_ok=True)
            for d in reversed(made):  # each new directory's entry made durable in its parent
                fsync_dir(d.parent)
        elif not self.root.is_dir():
            raise ConfigError(f"backup repository {self.root} does not exist")
        self._dirty: set[Path] = set()
        self._locked: set[Path] = set()  # files whose mtime `lock` set since the last sync
        self._lock_fd = -1

    def _path(self, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"bad object name {name!r}")
        return self.root / name

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._touch(path.parent)

    def _touch(self, d: Path) -> None:
        """Mark `d` and its parents up to the root for `sync`: a directory made by `put`
        is durable only once its parent is synced too."""
        while d not in self._dirty and d != self.root and self.root in d.parents:
            self._dirty.add(d)
            d = d.parent

    def get(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                if TMP_MARK not in f:
                    yield f"{rel}/{f}"

    def delete(self, name: str) -> None:
        path = self._path(name)
        until = self.retain_until(name)
        if until > time.time():
            raise RetentionLockError(f"{name} is locked until {_when(until)}", until)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        self._touch(path.parent)

    def lock(self, name: str, until: float) -> None:
        path = self._path(name)
        st = path.stat()
        if until > st.st_mtime:
            os.utime(path, (st.st_atime, until))
            self._locked.add(path)

    def retain_until(self, name: str) -> float:
        """The file's modification time when it is in the future, else 0."""
        try:
            mtime = self._path(name).stat().st_mtime
        except FileNotFoundError:
            return 0.0
        return mtime if mtime > time.time() else 0.0

    def sync(self) -> None:
        for path in sorted(self._locked):  # their new mtime is inode metadata: fsync them
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted since
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._locked.clear()
        for d in sorted(self._dirty, key=lambda p: -len(p.parts)):
            if d.exists():
                fsync_dir(d)
        self._dirty.clear()
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
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                if TMP_MARK in f:
                    yield f if rel == "." else f"{rel}/{f}"

    def remove_leftover(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        self._touch(path.parent)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
