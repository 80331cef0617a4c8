"""A recording file layer under the journal and the backup repository, and the crash states
built from its traces.

`Recorder(root)` patches the `os` functions zcore's Python code writes with (open, pwrite,
write, writev, pwritev, ftruncate, truncate, fsync, fdatasync, rename, replace, unlink,
mkdir, rmdir, utime, dup, close), `io.open` for writing (pathlib's `write_bytes`) and the
hole punch of `zcore.fsutil` (recorded as a write of zeros: what the range reads as),
performs every call for real and appends what it did to files and directories anywhere
under `root` to a trace.  Names in the trace are paths relative to `root` (`/`-separated,
any depth; "." is `root` itself).  Calls on other paths pass through unrecorded.  The
harness adds `("mark", ...)` events of its own (what was acknowledged so far).

`crash_states(base, trace, rng, per_point)` replays a trace over a model of the tree and
yields, for every prefix of it, file sets a power loss could leave:

* a file's data as of its last fsync/fdatasync is kept; each later write, truncation or
  O_TRUNC is kept, dropped, or torn at 512-byte sectors (a random subset of the sectors it
  covers reaches the disk); a modification time set by `utime` is inode metadata, kept as
  of the file's last fsync, each later one kept or dropped (a file whose recorded utime
  survives comes as `Stamped` bytes, which `materialize` stamps);
* directory entries (creations, mkdirs, renames, unlinks, rmdirs) are entries of their
  parent directory: one becomes durable when its parent directory is fsynced after it (a
  rename across directories when both are); the entries of a crash state are the durable
  ones plus an in-order prefix of the later ones (metadata journaling keeps their order;
  the empty prefix is the strict POSIX case and always among the states);
* a path exists in a crash state only if every directory on its way from `root` does:
  a file in a directory whose own entry never became durable is lost with it.

A tree is a dict of relative paths: a file's bytes, or b"" at "dir/" (a trailing slash) for
a directory (`snapshot`, `materialize`; a flat journal directory has no such keys).

Planted bugs rewrite a trace the way a broken journal would have written it, so the tests
can show the harness catches them (`plant`).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zcore import fsutil

SECTOR = 512
ROOT = -1  # the inode number of `root` itself, in the Recorder and in the model
Event = tuple[Any, ...]

_PATCHED = ("open", "pwrite", "write", "writev", "pwritev", "ftruncate", "truncate", "fsync",
            "fdatasync", "rename", "replace", "unlink", "mkdir", "rmdir", "utime", "dup", "close")


def _parent(path: str) -> str:
    head, _, _ = path.rpartition("/")
    return head or "."


def _leaf(path: str) -> str:
    return path.rpartition("/")[2]


def tree_paths(root: str | os.PathLike[str]) -> list[str]:
    """Every path under `root`, relative, directories with a trailing "/", sorted: the
    order in which the Recorder and `crash_states` number a base's inodes."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out += [prefix + d + "/" for d in dirs]
        out += [prefix + f for f in files]
    return sorted(out)


class Recorder:
    """Record the file operations on the files and directories under `root` (a context
    manager).

    Events: ("create", path, ino) ("mkdir", path, ino) ("write", ino, offset, bytes)
    ("trunc", ino, size) ("sync", ino) ("dirsync", dirpath) ("rename", src, dst)
    ("unlink", path) ("rmdir", path) ("utime", ino, mtime) ("mark", payload).
    `fail` (optional) is called as fail(opname, name) before each recorded operation and
    may raise an OSError to inject an error (see test_io_errors)."""

    DIR = ROOT

    def __init__(self, root: str | os.PathLike[str], fail: Any = None) -> None:
        self.root = os.path.realpath(root)
        self.events: list[Event] = []
        self.fail = fail
        self._names: dict[str, int] = {}  # live tree: path -> inode number
        self._dirs: set[int] = {ROOT}  # the inodes that are directories
        for i, path in enumerate(tree_paths(self.root)):
            self._names[path.rstrip("/")] = i
            if path.endswith("/"):
                self._dirs.add(i)
        self._next_ino = len(self._names)
        self._fds: dict[int, int] = {}  # descriptor -> inode (ROOT or a directory's too)
        self._lock = threading.RLock()
        self._orig: dict[str, Any] = {}
        self._orig_io_open: Any = None
        self._orig_punch: Any = None

    # ---- bookkeeping ------------------------------------------------------------------------

    def _name(self, path: Any) -> str | None:
        """The path relative to root when `path` is under it, "." for root itself."""
        if isinstance(path, int):
            return None
        p = os.path.realpath(os.fspath(path))
        if p == self.root:
            return "."
        if not p.startswith(self.root + os.sep):
            return None
        return p[len(self.root) + 1:].replace(os.sep, "/")

    def mark(self, payload: Any) -> None:
        with self._lock:
            self.events.append(("mark", payload))

    def _check(self, op: str, what: str) -> None:
        if self.fail is not None:
            self.fail(op, what)

    def _ino_name(self, ino: int) -> str:
        if ino == ROOT:
            return "."
        for name, i in self._names.items():
            if i == ino:
                return name
        return f"<ino {ino}>"

    def _new_ino(self, name: str, directory: bool) -> int:
        ino = self._next_ino
        self._next_ino += 1
        self._names[name] = ino
        if directory:
            self._dirs.add(ino)
        return ino

    def _forget(self, name: str) -> None:
        """Drop `name` and, for a directory, every path below it."""
        self._names.pop(name, None)
        below = name + "/"
        for p in [p for p in self._names if p.startswith(below)]:
            del self._names[p]

    # ---- the patched functions ------------------------------------------------------------

    def _open(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
        name = self._name(path)
        if name is None:
            return self._orig["open"](path, flags, mode, *a, **k)
        with self._lock:
            ino = ROOT if name == "." else self._names.get(name)
            if ino not in self._dirs and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT
                                                  | os.O_TRUNC):
                self._check("open", name)
            fd = self._orig["open"](path, flags, mode, *a, **k)
            if ino is None and stat.S_ISDIR(os.fstat(fd).st_mode):
                ino = self._new_ino(name, True)  # made unseen (not by os.mkdir): no event
            if ino is None:
                ino = self._new_ino(name, False)
                self.events.append(("create", name, ino))
            if ino in self._dirs:
                self._fds[fd] = ino
                return fd
            if flags & os.O_TRUNC:
                self.events.append(("trunc", ino, 0))
            self._fds[fd] = ino
            return fd

    def _file_ino(self, fd: int) -> int | None:
        ino = self._fds.get(fd)
        return None if ino is None or ino in self._dirs else ino

    def _data_op(self, fd: int, op: str, offset: int | None, data: bytes, call: Any) -> int:
        with self._lock:
            ino = self._file_ino(fd)
            if ino is None:
                return call()
            self._check(op, self._ino_name(ino))
            if offset is None:
                offset = os.lseek(fd, 0, os.SEEK_CUR)
            n = call()
            if n:
                self.events.append(("write", ino, offset, bytes(data[:n])))
            return n

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        buf = bytes(memoryview(data).cast("B"))
        return self._data_op(fd, "write", offset, buf,
                             lambda: self._orig["pwrite"](fd, data, offset))

    def _write(self, fd: int, data: Any) -> int:
        buf = bytes(memoryview(data).cast("B"))
        return self._data_op(fd, "write", None, buf, lambda: self._orig["write"](fd, data))

    def _writev(self, fd: int, buffers: Any) -> int:
        buf = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._data_op(fd, "write", None, buf, lambda: self._orig["writev"](fd, buffers))

    def _pwritev(self, fd: int, buffers: Any, offset: int, *a: Any) -> int:
        buf = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._data_op(fd, "write", offset, buf,
                             lambda: self._orig["pwritev"](fd, buffers, offset, *a))

    def _punch(self, fd: int, offset: int, length: int) -> bool:
        done: list[bool] = []

        def call() -> int:
            done.append(self._orig_punch(fd, offset, length))
            return length if done[0] else 0  # not punched: the zeros written are recorded

        self._data_op(fd, "write", offset, bytes(length), call)
        return done[0]

    def _ftruncate(self, fd: int, size: int) -> None:
        with self._lock:
            ino = self._file_ino(fd)
            if ino is not None:
                self._check("truncate", self._ino_name(ino))
            self._orig["ftruncate"](fd, size)
            if ino is not None:
                self.events.append(("trunc", ino, size))

    def _truncate(self, path: Any, size: int) -> None:
        if isinstance(path, int):
            return self._ftruncate(path, size)
        name = self._name(path)
        with self._lock:
            ino = None if name is None else self._names.get(name)
            if ino in self._dirs:
                ino = None
            if ino is not None:
                self._check("truncate", name or "")
            self._orig["truncate"](path, size)
            if ino is not None:
                self.events.append(("trunc", ino, size))

    def _sync(self, which: str, fd: int) -> None:
        with self._lock:
            ino = self._fds.get(fd)
            if ino is not None:
                self._check(which, self._ino_name(ino))
            self._orig[which](fd)
            if ino is None:
                return
            if ino in self._dirs:
                self.events.append(("dirsync", self._ino_name(ino)))
            else:
                self.events.append(("sync", ino))

    def _fsync(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self._sync("fsync", fd)

    def _fdatasync(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self._sync("fdatasync", fd)

    def _rename_op(self, which: str, src: Any, dst: Any, *a: Any, **k: Any) -> None:
        s, d = self._name(src), self._name(dst)
        with self._lock:
            if s is None or d is None or s not in self._names:
                return self._orig[which](src, dst, *a, **k)
            self._check("rename", d)
            self._orig[which](src, dst, *a, **k)
            moved = {p[len(s):]: i for p, i in self._names.items() if p.startswith(s + "/")}
            ino = self._names[s]
            self._forget(s)
            self._forget(d)
            self._names[d] = ino
            for rest, i in moved.items():
                self._names[d + rest] = i
            self.events.append(("rename", s, d))

    def _rename(self, src: Any, dst: Any, *a: Any, **k: Any) -> None:
        self._rename_op("rename", src, dst, *a, **k)

    def _replace(self, src: Any, dst: Any, *a: Any, **k: Any) -> None:
        self._rename_op("replace", src, dst, *a, **k)

    def _unlink(self, path: Any, *a: Any, **k: Any) -> None:
        name = self._name(path)
        with self._lock:
            if name is None or name not in self._names:
                return self._orig["unlink"](path, *a, **k)
            self._check("unlink", name)
            self._orig["unlink"](path, *a, **k)
            del self._names[name]
            self.events.append(("unlink", name))

    def _mkdir(self, path: Any, mode: int = 0o777, *a: Any, **k: Any) -> None:
        name = self._name(path)
        with self._lock:
            if name is None or name == ".":
                return self._orig["mkdir"](path, mode, *a, **k)
            self._check("mkdir", name)
            self._orig["mkdir"](path, mode, *a, **k)  # FileExistsError: nothing recorded
            ino = self._new_ino(name, True)
            self.events.append(("mkdir", name, ino))

    def _rmdir(self, path: Any, *a: Any, **k: Any) -> None:
        name = self._name(path)
        with self._lock:
            if name is None or name not in self._names:
                return self._orig["rmdir"](path, *a, **k)
            self._check("rmdir", name)
            self._orig["rmdir"](path, *a, **k)
            self._forget(name)
            self.events.append(("rmdir", name))

    def _utime(self, path: Any, times: Any = None, *a: Any, **k: Any) -> None:
        if isinstance(path, int):
            ino = self._file_ino(path)
        else:
            name = self._name(path)
            ino = None if name is None else self._names.get(name)
        with self._lock:
            if ino is None or ino in self._dirs:
                return self._orig["utime"](path, times, *a, **k)
            self._check("utime", self._ino_name(ino))
            self._orig["utime"](path, times, *a, **k)
            if times is not None:
                mtime = float(times[1])
            elif k.get("ns") is not None:
                mtime = k["ns"][1] / 1e9
            else:
                mtime = os.stat(path).st_mtime
            self.events.append(("utime", ino, mtime))

    def _dup(self, fd: int) -> int:
        with self._lock:
            new = self._orig["dup"](fd)
            if fd in self._fds:
                self._fds[new] = self._fds[fd]
            return new

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._orig["close"](fd)

    def _io_open(self, file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        name = self._name(file) if not isinstance(file, int) else None
        if name is None or name == "." or not set(mode) & set("wax+"):
            return self._orig_io_open(file, mode, *a, **k)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if "w" in mode else 0)
        fd = os.open(file, flags, 0o644)  # the patched open: recorded
        return _RecordedFile(fd)

    # ---- installing -------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        for fn in _PATCHED:
            self._orig[fn] = getattr(os, fn)
            setattr(os, fn, getattr(self, "_" + fn))
        self._orig_io_open = io.open
        io.open = self._io_open
        self._orig_punch = fsutil._punch
        fsutil._punch = self._punch
        return self

    def __exit__(self, *exc: object) -> None:
        for fn, orig in self._orig.items():
            setattr(os, fn, orig)
        io.open = self._orig_io_open
        fsutil._punch = self._orig_punch


class _RecordedFile(io.RawIOBase):
    """What `io.open(..., "wb")` returns under a Recorder: writes go through os.write."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


# ---- crash states -------------------------------------------------------------------------


def snapshot(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """The tree under `root`: relative path -> bytes, b"" at "dir/" for a directory (sorted
    by path, as the Recorder numbers them)."""
    out = {}
    for path in tree_paths(root):
        if path.endswith("/"):
            out[path] = b""
        else:
            with open(os.path.join(root, path), "rb") as f:
                out[path] = f.read()
    return out


class Stamped(bytes):
    """A file's bytes in a crash state, with the modification time a recorded `utime` left
    on it (as epoch seconds): `materialize` sets it."""

    mtime: float

    def __new__(cls, data: bytes, mtime: float) -> Stamped:
        obj = super().__new__(cls, data)
        obj.mtime = mtime
        return obj


def _apply(data: bytearray, op: Event, keep: Iterable[int] | None = None) -> None:
    """Apply a write or truncation; `keep`, for a torn write, lists the sectors written."""
    if op[0] == "utime":
        return  # metadata: see _Model.state
    if op[0] == "trunc":
        size = op[2]
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
        return
    _, _, offset, payload = op
    end = offset + len(payload)
    if keep is None:
        pieces = [(offset, end)]
    else:
        pieces = []
        for s in sorted(keep):
            lo, hi = max(offset, s * SECTOR), min(end, (s + 1) * SECTOR)
            if lo < hi:
                pieces.append((lo, hi))
    for lo, hi in pieces:
        if len(data) < hi:
            data.extend(bytes(hi - len(data)))
        data[lo:hi] = payload[lo - offset : hi - offset]


Entries = dict[int, dict[str, int]]  # directory inode -> {name: inode}


@dataclass
class _DirOp:
    """A directory entry operation: ("link", dir, name, ino), ("drop", dir, name) or
    ("move", sdir, sname, ddir, dname); durable once every directory in `waits` has been
    fsynced after it."""

    op: tuple[Any, ...]
    waits: set[int]


def _dir_apply(entries: Entries, ops: list[_DirOp], copied: set[int]) -> None:
    """Apply `ops` to `entries` in place, copying each directory's dict before its first
    change unless it is in `copied` (so a state can start from the durable entries)."""

    def mine(d: int) -> dict[str, int]:
        if d not in copied:
            entries[d] = dict(entries.get(d, {}))
            copied.add(d)
        return entries[d]

    for o in ops:
        op = o.op
        if op[0] == "link":
            mine(op[1])[op[2]] = op[3]
        elif op[0] == "drop":
            if op[2] in entries.get(op[1], {}):
                del mine(op[1])[op[2]]
        elif op[0] == "move":
            if op[2] in entries.get(op[1], {}):
                ino = mine(op[1]).pop(op[2])
                mine(op[3])[op[4]] = ino


@dataclass
class _Model:
    """The durable state of the tree while a trace is replayed, and what is pending."""

    entries: Entries  # durable directory entries
    durable: dict[int, bytearray]
    dirs: set[int]
    live: dict[str, int]  # the tree as the trace has it now: path -> inode
    dir_pending: list[_DirOp] = field(default_factory=list)
    pending: dict[int, list[Event]] = field(default_factory=dict)
    version: int = 0  # bumped by every step: with the choices made it identifies a state
    _frozen: dict[int, bytes] = field(default_factory=dict)  # durable bytes, as bytes
    mtimes: dict[int, float] = field(default_factory=dict)  # durable utime of an inode

    def _where(self, path: str) -> tuple[int, str]:
        parent = _parent(path)
        return (ROOT if parent == "." else self.live[parent]), _leaf(path)

    def _live_move(self, src: str, dst: str | None) -> None:
        below = src + "/"
        moved = {p: i for p, i in self.live.items() if p == src or p.startswith(below)}
        for p in moved:
            del self.live[p]
        if dst is not None:
            for p in [p for p in self.live if p == dst or p.startswith(dst + "/")]:
                del self.live[p]
            for p, i in moved.items():
                self.live[dst + p[len(src):]] = i

    def step(self, ev: Event) -> None:
        self.version += 1
        kind = ev[0]
        if kind in ("create", "mkdir"):
            d, leaf = self._where(ev[1])
            self.live[ev[1]] = ev[2]
            if kind == "mkdir":
                self.dirs.add(ev[2])
            else:
                self.durable.setdefault(ev[2], bytearray())
            self.dir_pending.append(_DirOp(("link", d, leaf, ev[2]), {d}))
        elif kind == "rename":
            if ev[1] not in self.live:
                return
            sd, sleaf = self._where(ev[1])
            dd, dleaf = self._where(ev[2])
            self._live_move(ev[1], ev[2])
            self.dir_pending.append(_DirOp(("move", sd, sleaf, dd, dleaf), {sd, dd}))
        elif kind in ("unlink", "rmdir"):
            if ev[1] not in self.live:
                return
            d, leaf = self._where(ev[1])
            self._live_move(ev[1], None)
            self.dir_pending.append(_DirOp(("drop", d, leaf), {d}))
        elif kind in ("write", "trunc", "utime"):
            self.pending.setdefault(ev[1], []).append(ev)
        elif kind == "sync":
            data = self.durable.setdefault(ev[1], bytearray())
            ops = self.pending.pop(ev[1], [])
            for op in ops:
                if op[0] == "utime":
                    self.mtimes[ev[1]] = op[2]
                _apply(data, op)
            if ops:
                self._frozen.pop(ev[1], None)
        elif kind == "dirsync":
            path = ev[1] if len(ev) > 1 else "."
            d = ROOT if path == "." else self.live.get(path)
            if d is None:
                return
            done, left = [], []
            for o in self.dir_pending:
                o.waits.discard(d)
                (left if o.waits else done).append(o)
            _dir_apply(self.entries, done, set())
            self.dir_pending = left

    def _bytes(self, ino: int) -> bytes:
        b = self._frozen.get(ino)
        if b is None:
            b = self._frozen[ino] = bytes(self.durable.get(ino, b""))
        return b

    def state(self, rng: random.Random, mode: str) -> tuple[dict[str, bytes], tuple]:
        """One crash state and a key that identifies it: mode "strict" (nothing pending
        survives), "all" (everything pending survives) or "random"."""
        if mode == "strict":
            cut = 0
        elif mode == "all":
            cut = len(self.dir_pending)
        else:
            cut = rng.randint(0, len(self.dir_pending))
        entries = dict(self.entries)
        _dir_apply(entries, self.dir_pending[:cut], set())
        out: dict[str, bytes] = {}
        key: list[Any] = [self.version, cut]
        for path, ino in _walk(entries, self.dirs):
            if ino in self.dirs:
                out[path + "/"] = b""
                key.append((path, ino))
                continue
            choices: list[Any] = [path, ino]
            ops = self.pending.get(ino, [])
            mtime = self.mtimes.get(ino)
            if not ops:
                out[path] = self._bytes(ino) if mtime is None else Stamped(self._bytes(ino),
                                                                           mtime)
                key.append(tuple(choices))
                continue
            data = bytearray(self.durable.get(ino, b""))
            for op in ops:
                if op[0] == "utime":
                    kept = mode == "all" or (mode == "random" and rng.random() < 0.5)
                    if kept:
                        mtime = op[2]
                    choices.append(int(kept))
                    continue
                if mode == "strict":
                    choices.append(0)
                    continue
                if mode == "all":
                    _apply(data, op)
                    choices.append(1)
                    continue
                choice = rng.random()
                if choice < 0.4:
                    _apply(data, op)
                    choices.append(1)
                elif choice < 0.7 and op[0] == "write" and len(op[3]) > SECTOR:
                    first = op[2] // SECTOR
                    last = (op[2] + len(op[3]) - 1) // SECTOR
                    keep = frozenset(s for s in range(first, last + 1) if rng.random() < 0.5)
                    _apply(data, op, keep)
                    choices.append(keep)
                else:
                    choices.append(0)
            out[path] = bytes(data) if mtime is None else Stamped(bytes(data), mtime)
            key.append(tuple(choices))
        return out, tuple(key)


def _walk(entries: Entries, dirs: set[int]) -> list[tuple[str, int]]:
    """Every (path, inode) reachable from the root through `entries`, sorted by path: what
    a crash state holds (an entry in an unreachable directory is lost with it)."""
    out: list[tuple[str, int]] = []
    todo: list[tuple[str, int]] = [("", ROOT)]
    seen = {ROOT}
    while todo:
        prefix, d = todo.pop()
        for name, ino in entries.get(d, {}).items():
            path = prefix + name
            out.append((path, ino))
            if ino in dirs and ino not in seen:
                seen.add(ino)
                todo.append((path + "/", ino))
    out.sort()
    return out


def _model_of(base: dict[str, bytes]) -> _Model:
    entries: Entries = {ROOT: {}}
    dirs: set[int] = set()
    live: dict[str, int] = {}
    durable: dict[int, bytearray] = {}
    mtimes: dict[int, float] = {}
    for i, path in enumerate(sorted(base)):
        name = path.rstrip("/")
        parent = _parent(name)
        entries.setdefault(ROOT if parent == "." else live[parent], {})[_leaf(name)] = i
        live[name] = i
        if path.endswith("/"):
            dirs.add(i)
            entries.setdefault(i, {})
        else:
            durable[i] = bytearray(base[path])
            if isinstance(base[path], Stamped):
                mtimes[i] = base[path].mtime  # type: ignore[attr-defined]
    return _Model(entries, durable, dirs, live, mtimes=mtimes)


def crash_states(base: dict[str, bytes], trace: list[Event], rng: random.Random,
                 per_point: int, points: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, list[Any], dict[str, bytes], tuple]]:
    """Yield (crash point, marks so far, files, key) for every prefix of `trace` (or those
    `points` accepts): the strict and the all-pending states and `per_point` random ones
    (duplicates included: the caller dedupes by key, which names the durable state and
    every choice made)."""
    model = _model_of(base)
    marks: list[Any] = []
    for point in range(len(trace) + 1):
        if point:
            ev = trace[point - 1]
            if ev[0] == "mark":
                marks.append(ev[1])
                if point < len(trace):
                    continue  # a mark changes nothing on disk: the previous states stand
                # the trace ends with a mark: its last states again, under every mark (the
                # same keys as before it: a caller that dedupes by key alone skips them)
            else:
                model.step(ev)
        if points is not None and not points(point):
            continue
        for mode in ("strict", "all", *["random"] * per_point):
            files, key = model.state(rng, mode)
            yield point, list(marks), files, key


def materialize(files: dict[str, bytes], root: str) -> None:
    """Write a crash state (a tree, see `snapshot`) into the empty directory `root`."""
    for path, data in sorted(files.items()):
        full = os.path.join(root, path)
        if path.endswith("/"):
            os.makedirs(full, exist_ok=True)
            continue
        if "/" in path:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        if isinstance(data, Stamped):
            os.utime(full, (data.mtime, data.mtime))


# ---- planted bugs -------------------------------------------------------------------------


def plant(trace: list[Event], bug: str, names: dict[int, str] | None = None) -> list[Event]:
    """The trace a journal with `bug` would have left:

    "skip-fsync"     no fsync/fdatasync of segment data (.zcj files) reaches the disk;
    "skip-dirfsync"  no directory fsync reaches the disk;
    "reorder-rename" each rename is issued right after its source file is created, before
                     the data written to it (and its fsync)."""
    inames = dict(names or {})
    for ev in trace:
        if ev[0] == "create":
            inames[ev[2]] = ev[1]
    if bug == "skip-fsync":
        return [ev for ev in trace
                if not (ev[0] == "sync" and inames.get(ev[1], "").endswith(".zcj"))]
    if bug == "skip-dirfsync":
        return [ev for ev in trace if ev[0] != "dirsync"]
    if bug == "reorder-rename":
        out = list(trace)
        for ev in trace:
            if ev[0] != "rename":
                continue
            j = out.index(ev)
            created = next((k for k in range(j - 1, -1, -1)
                            if out[k][0] == "create" and out[k][1] == ev[1]), None)
            if created is not None:
                out.pop(j)
                out.insert(created + 1, ev)
        return out
    raise ValueError(f"unknown planted bug {bug!r}")


@contextlib.contextmanager
def recording(root: str | os.PathLike[str], fail: Any = None) -> Iterator[Recorder]:
    with Recorder(root, fail) as rec:
        yield rec
