"""A recording file layer under the journal, and the crash states built from its traces.

`Recorder(root)` patches the `os` functions the journal's Python code writes with (open,
pwrite, write, writev, pwritev, ftruncate, truncate, fsync, fdatasync, rename, replace,
unlink, dup, close), `io.open` for writing (pathlib's `write_bytes`) and the hole punch of
`zcore.fsutil` (recorded as a write of zeros: what the range reads as), performs every call
for real and appends what it did to files directly inside `root` to a trace.  Calls on
other paths pass through unrecorded.  The harness adds `("mark", ...)` events of its own
(what was acknowledged so far).

`crash_states(base, trace, rng, per_point)` replays a trace over a model of the directory
and yields, for every prefix of it, file sets a power loss could leave:

* a file's data as of its last fsync/fdatasync is kept; each later write, truncation or
  O_TRUNC is kept, dropped, or torn at 512-byte sectors (a random subset of the sectors it
  covers reaches the disk);
* directory entries (creations, renames, unlinks) are as of the last directory fsync, plus
  an in-order prefix of the later ones (metadata journaling keeps their order; the empty
  prefix is the strict POSIX case and always among the states).

Planted bugs rewrite a trace the way a broken journal would have written it, so the tests
can show the harness catches them (`plant`).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zcore import fsutil

SECTOR = 512
Event = tuple[Any, ...]

_PATCHED = ("open", "pwrite", "write", "writev", "pwritev", "ftruncate", "truncate", "fsync",
            "fdatasync", "rename", "replace", "unlink", "dup", "close")


class Recorder:
    """Record the file operations on the files directly inside `root` (a context manager).

    Events: ("create", name, ino) ("write", ino, offset, bytes) ("trunc", ino, size)
    ("sync", ino) ("dirsync",) ("rename", src, dst) ("unlink", name) ("mark", payload).
    `fail` (optional) is called as fail(opname, name) before each recorded operation and
    may raise an OSError to inject an error (see test_io_errors)."""

    DIR = -1

    def __init__(self, root: str | os.PathLike[str], fail: Any = None) -> None:
        self.root = os.path.realpath(root)
        self.events: list[Event] = []
        self.fail = fail
        self._names: dict[str, int] = {}  # live directory: name -> inode number
        for name in sorted(os.listdir(self.root)):
            self._names[name] = len(self._names)
        self._next_ino = len(self._names)
        self._fds: dict[int, int] = {}  # descriptor -> inode (or DIR)
        self._lock = threading.RLock()
        self._orig: dict[str, Any] = {}
        self._orig_io_open: Any = None
        self._orig_punch: Any = None

    # ---- bookkeeping ------------------------------------------------------------------------

    def _name(self, path: Any) -> str | None:
        """The entry name when `path` is directly inside root, "." for root itself."""
        if isinstance(path, int):
            return None
        p = os.path.realpath(os.fspath(path))
        if p == self.root:
            return "."
        parent, name = os.path.split(p)
        return name if parent == self.root else None

    def mark(self, payload: Any) -> None:
        with self._lock:
            self.events.append(("mark", payload))

    def _check(self, op: str, what: str) -> None:
        if self.fail is not None:
            self.fail(op, what)

    def _ino_name(self, ino: int) -> str:
        for name, i in self._names.items():
            if i == ino:
                return name
        return f"<ino {ino}>"

    # ---- the patched functions ------------------------------------------------------------

    def _open(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
        name = self._name(path)
        if name is None:
            return self._orig["open"](path, flags, mode, *a, **k)
        with self._lock:
            if name != ".":
                if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                    self._check("open", name)
            fd = self._orig["open"](path, flags, mode, *a, **k)
            if name == ".":
                self._fds[fd] = self.DIR
                return fd
            ino = self._names.get(name)
            if ino is None:
                ino = self._next_ino
                self._next_ino += 1
                self._names[name] = ino
                self.events.append(("create", name, ino))
            if flags & os.O_TRUNC:
                self.events.append(("trunc", ino, 0))
            self._fds[fd] = ino
            return fd

    def _data_op(self, fd: int, op: str, offset: int | None, data: bytes, call: Any) -> int:
        with self._lock:
            ino = self._fds.get(fd)
            if ino is None or ino == self.DIR:
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
            ino = self._fds.get(fd)
            if ino is not None and ino != self.DIR:
                self._check("truncate", self._ino_name(ino))
            self._orig["ftruncate"](fd, size)
            if ino is not None and ino != self.DIR:
                self.events.append(("trunc", ino, size))

    def _truncate(self, path: Any, size: int) -> None:
        if isinstance(path, int):
            return self._ftruncate(path, size)
        name = self._name(path)
        with self._lock:
            if name is not None and name in self._names:
                self._check("truncate", name)
            self._orig["truncate"](path, size)
            if name is not None and name in self._names:
                self.events.append(("trunc", self._names[name], size))

    def _sync(self, which: str, fd: int) -> None:
        with self._lock:
            ino = self._fds.get(fd)
            if ino is not None:
                self._check(which, "." if ino == self.DIR else self._ino_name(ino))
            self._orig[which](fd)
            if ino == self.DIR:
                self.events.append(("dirsync",))
            elif ino is not None:
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
            if s is None or d is None:
                return self._orig[which](src, dst, *a, **k)
            self._check("rename", d)
            self._orig[which](src, dst, *a, **k)
            self._names[d] = self._names.pop(s)
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
    """The files directly inside `root` (sorted by name, as the Recorder numbers them)."""
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def _apply(data: bytearray, op: Event, keep: set[int] | None = None) -> None:
    """Apply a write or truncation; `keep`, for a torn write, lists the sectors written."""
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


@dataclass
class _Model:
    """The durable state of the directory while a trace is replayed, and what is pending."""

    dir_durable: dict[str, int]
    durable: dict[int, bytearray]
    dir_pending: list[Event] = field(default_factory=list)
    pending: dict[int, list[Event]] = field(default_factory=dict)
    version: int = 0  # bumped by every step: with the choices made it identifies a state

    def step(self, ev: Event) -> None:
        self.version += 1
        kind = ev[0]
        if kind == "create":
            self.durable.setdefault(ev[2], bytearray())
            self.dir_pending.append(ev)
        elif kind in ("rename", "unlink"):
            self.dir_pending.append(ev)
        elif kind in ("write", "trunc"):
            self.pending.setdefault(ev[1], []).append(ev)
        elif kind == "sync":
            data = self.durable.setdefault(ev[1], bytearray())
            for op in self.pending.pop(ev[1], []):
                _apply(data, op)
        elif kind == "dirsync":
            self.dir_durable = _dir_apply(self.dir_durable, self.dir_pending)
            self.dir_pending = []

    def state(self, rng: random.Random, mode: str) -> tuple[dict[str, bytes], tuple]:
        """One crash state and a key that identifies it: mode "strict" (nothing pending
        survives), "all" (everything pending survives) or "random"."""
        if mode == "strict":
            cut = 0
        elif mode == "all":
            cut = len(self.dir_pending)
        else:
            cut = rng.randint(0, len(self.dir_pending))
        names = _dir_apply(self.dir_durable, self.dir_pending[:cut])
        out = {}
        key: list[Any] = [self.version, cut]
        for name, ino in sorted(names.items()):
            data = bytearray(self.durable.get(ino, b""))
            choices: list[Any] = [name, ino]
            for op in self.pending.get(ino, []):
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
            out[name] = bytes(data)
            key.append(tuple(choices))
        return out, tuple(key)


def _dir_apply(names: dict[str, int], ops: list[Event]) -> dict[str, int]:
    names = dict(names)
    for ev in ops:
        if ev[0] == "create":
            names[ev[1]] = ev[2]
        elif ev[0] == "rename":
            if ev[1] in names:
                names[ev[2]] = names.pop(ev[1])
        elif ev[0] == "unlink":
            names.pop(ev[1], None)
    return names


def crash_states(base: dict[str, bytes], trace: list[Event], rng: random.Random,
                 per_point: int) -> Iterator[tuple[int, list[Any], dict[str, bytes], tuple]]:
    """Yield (crash point, marks so far, files, key) for every prefix of `trace`: the
    strict and the all-pending states and `per_point` random ones (duplicates included:
    the caller dedupes by key, which names the durable state and every choice made)."""
    names = {name: i for i, name in enumerate(sorted(base))}
    model = _Model(dict(names), {i: bytearray(base[n]) for n, i in names.items()})
    marks: list[Any] = []
    for point in range(len(trace) + 1):
        if point:
            ev = trace[point - 1]
            if ev[0] == "mark":
                marks.append(ev[1])
                continue  # a mark changes nothing on disk: the previous states stand
            model.step(ev)
        for mode in ("strict", "all", *["random"] * per_point):
            files, key = model.state(rng, mode)
            yield point, list(marks), files, key


def materialize(files: dict[str, bytes], root: str) -> None:
    """Write a crash state into the empty directory `root`."""
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


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
