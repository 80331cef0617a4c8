"""Backups and restores (docs/format.md 10d.4, 10d.6), at the recovery site.

A backup reads a recovery VPG (zcore.site.recovery_vpg) at one checkpoint through journal
views; the protected site is never read.  The first backup of a VPG reads every chunk
(zero chunks are listed, not stored) but those `Journal.zero_ranges` vouches for (replica
holes no journaled write covers, whose block sums say zero: never read); a later one
asks each journal for the extents changed since its parent's checkpoint
(`Journal.changed_extents`) and reads only those, patching them onto the parent's chunks
(read back from the repository and verified), and reuses the parent's ids for every
chunk nothing touched.  When the parent's checkpoint was promoted away the backup reads
everything again, storing only chunks the repository lacks
(mode full-dedup).  Every manifest lists every chunk, so each backup restores alone.

Each chunk's whole pipeline (view read, zero test, hash, LZ4, AES-GCM, write) runs on one
of a small pool of threads, which release the GIL in the native parts (BLAKE3, LZ4 and
AES-GCM each scale to two threads on 1 MiB buffers, measured); the caller's thread only
collects the results in order (see `_Writer`).  Nothing in a worker waits on the disk:
chunks become durable at the store's `sync` (repo.py), once, before the manifest.

Why two workers once did not scale (issue 13, measured on the bench's 2 GiB volume): each
worker fsynced every chunk it wrote (blocked ~1.4 ms a chunk), allocated fresh megabyte
buffers for the read, the LZ4 output, a copy of it and the sealed object (page faults and
zeroing were half the system time), and read and compared the volume's zero half."""

from __future__ import annotations

import errno
import functools
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zcore.backup import format as fmt
from zcore.backup.store import Repository
from zcore.errors import CheckpointNotFoundError, ConfigError, CorruptRecordError
from zcore.fsutil import fsync_dir, make_dirs, pwrite_all, start_writeback
from zcore.journal import Journal, View
from zcore.records import Checkpoint
from zcore.site.recovery_vpg import RecoveryVPG

Progress = Callable[[int, int], None]
"""progress(bytes done, bytes in all): called as a backup or restore moves on."""

# Chunks being sealed and written at once: 2 cores, 2 workers (each runs a chunk's whole
# pipeline; nothing in it blocks on the disk); 8 in flight bounds memory to 8 chunks plus
# one reused read buffer per worker (8 + 2 MiB at the default size).
WORKERS = 2
IN_FLIGHT = 8
# A restore's workers: O_DIRECT writes block (~1 ms a MiB), so two more keep both cores
# decoding while two wait on the disk (1 GiB through O_DIRECT: 1.2 s with 2, 0.9 s with 4).
RESTORE_WORKERS = 4


class BackupMode:
    FULL = "full"
    INCREMENTAL = "incremental"
    FULL_DEDUP = "full-dedup"


@dataclass
class BackupStats:
    read_bytes: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    zero_chunks: int = 0
    chunks: int = 0


@dataclass
class BackupResult:
    """What `run_backup` did: the backup's name, its mode, its counters and wall time."""

    name: str
    mode: str
    checkpoint: Checkpoint
    parent: str | None
    stats: BackupStats = field(default_factory=BackupStats)
    seconds: float = 0.0


class _Writer:
    """Runs each chunk's whole pipeline (read from the view, hash, dedup, seal, store) on a
    worker thread, results collected in order.  The whole pipeline in one thread, rather
    than a reader handing chunks to sealers, because a thread that hands off and waits for
    the GIL again waits out the switch interval (5 ms) behind the sealers' C calls."""

    def __init__(self, repo: Repository, stats: BackupStats) -> None:
        self.repo = repo
        self.stats = stats
        self.seen: set[str] = set()
        self.force: set[str] = set()  # ids whose stored copy was found damaged
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="zcore-backup")
        self._zeros: dict[int, bytes] = {}
        self._local = threading.local()

    def buffer(self, n: int) -> bytearray:
        """This worker's read buffer of `n` bytes, reused chunk after chunk: a fresh 1 MiB
        buffer per chunk costs the kernel 256 page faults and a zeroing each time (half
        the system time of a full backup, measured).  Valid until its thread's next job."""
        bufs: dict[int, bytearray] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get(n)
        if buf is None:
            buf = bufs[n] = bytearray(n)
        return buf

    def read(self, n: int) -> None:
        with self._lock:
            self.stats.read_bytes += n

    def add(self, data: bytes | bytearray) -> str | None:
        """Store `data` as a chunk unless it is zero or already held; its id (worker
        threads call this)."""
        n = len(data)
        zeros = self._zeros.get(n)
        if zeros is None:
            zeros = self._zeros.setdefault(n, bytes(n))
        if data == zeros:
            with self._lock:
                self.stats.chunks += 1
                self.stats.zero_chunks += 1
            return None
        cid = self.repo.chunk_id(data)
        with self._lock:
            self.stats.chunks += 1
            if cid in self.seen:
                return cid
            self.seen.add(cid)
            forced = cid in self.force
        if not forced and self.repo.has_chunk(cid):
            return cid
        stored = self.repo.put_chunk(cid, data, replace=forced)
        with self._lock:
            self.stats.new_chunks += 1
            self.stats.new_bytes += stored
        return cid

    def run(self, jobs: Iterable[tuple[int, Callable[[], str | None]]],
            progress: Callable[[int], None]) -> Iterator[tuple[int, str | None]]:
        """Run (index, job) pairs, IN_FLIGHT at a time; yields (index, result) in order."""
        flying: deque[tuple[int, Future[str | None]]] = deque()
        try:
            for idx, job in jobs:
                if len(flying) >= IN_FLIGHT:
                    i, f = flying.popleft()
                    yield i, f.result()
                    progress(i)
                flying.append((idx, self._pool.submit(job)))
            while flying:
                i, f = flying.popleft()
                yield i, f.result()
                progress(i)
        finally:
            for _, f in flying:
                f.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _extents_by_chunk(extents: Iterable[tuple[int, int]], cs: int
                      ) -> dict[int, list[tuple[int, int]]]:
    """Changed extents cut at chunk boundaries: chunk index -> [(offset in chunk, len)]."""
    out: dict[int, list[tuple[int, int]]] = {}
    for off, n in extents:
        end = off + n
        while off < end:
            idx = off // cs
            stop = min(end, (idx + 1) * cs)
            out.setdefault(idx, []).append((off - idx * cs, stop - off))
            off = stop
    return out


def _zero_chunks(zeros: Iterable[tuple[int, int]], cs: int, size: int) -> set[int]:
    """Indexes of the chunks that lie wholly inside the ranges `zeros`."""
    out: set[int] = set()
    for off, n in zeros:
        end = off + n
        first = -(-off // cs)
        last = end // cs if end < size else -(-size // cs)
        out.update(range(first, last))
    return out


def _backup_volume(repo: Repository, view: View, vol: int, size: int,
                   base: list[str | None] | None, changes: list[tuple[int, int]] | None,
                   w: _Writer, progress: Callable[[int], None],
                   zeros: Callable[[], list[tuple[int, int]]]) -> list[str | None]:
    """The chunk list of one volume; `zeros()` gives the ranges a full read may skip as
    zeros (`Journal.zero_ranges`), asked only when the volume is read whole."""
    cs = repo.chunk_size
    count = -(-size // cs)

    def length(idx: int) -> int:
        return min(cs, size - idx * cs)

    def whole(idx: int) -> Callable[[], str | None]:
        def job() -> str | None:
            buf = w.buffer(length(idx))
            view.read_into(vol, idx * cs, buf)
            w.read(len(buf))
            return w.add(buf)
        return job

    def done(idx: int) -> None:
        progress(length(idx))

    if base is None or changes is None:
        skip = _zero_chunks(zeros(), cs, size)
        out: list[str | None] = [None] * count
        if skip:
            with w._lock:
                w.stats.chunks += len(skip)
                w.stats.zero_chunks += len(skip)
            progress(sum(length(i) for i in skip))
        for idx, cid in w.run(((i, whole(i)) for i in range(count) if i not in skip), done):
            out[idx] = cid
        return out
    out = list(base)
    touched = _extents_by_chunk(changes, cs)
    with w._lock:
        w.stats.chunks += count - len(touched)
        w.stats.zero_chunks += sum(1 for i, c in enumerate(base)
                                   if c is None and i not in touched)

    def patch(idx: int) -> Callable[[], str | None]:
        return lambda: _patch_chunk(repo, view, vol, idx * cs, length(idx), base[idx],
                                    touched[idx], w)

    for idx, cid in w.run(((i, patch(i)) for i in sorted(touched)), done):
        out[idx] = cid
    progress(sum(length(i) for i in range(count) if i not in touched))
    return out


def _patch_chunk(repo: Repository, view: View, vol: int, start: int, length: int,
                 old: str | None, parts: list[tuple[int, int]], w: _Writer) -> str | None:
    """A touched chunk: the parent's bytes with the changed extents read over them; a
    parent chunk that fails to read is read whole from the view instead (and rewritten)."""
    try:
        buf = bytearray(length) if old is None else bytearray(repo.get_chunk(old))
        if len(buf) != length:
            raise CorruptRecordError(f"chunk {old} has {len(buf)} bytes, not {length}")
    except CorruptRecordError:
        if old is not None:
            with w._lock:
                w.force.add(old)
        buf = bytearray(length)
        view.read_into(vol, start, buf)
        w.read(length)
        return w.add(buf)
    mv = memoryview(buf)
    for off, n in parts:
        view.read_into(vol, start + off, mv[off:off + n])
        w.read(n)
    return w.add(buf)


def checkpoint_doc(c: Checkpoint) -> dict[str, Any]:
    return {"id": c.id, "seq": c.seq, "time_ns": c.time_ns, "kind": str(c.kind),
            "tag": c.tag, "consistent": c.consistent}


def _pick_parent(repo: Repository, vpg: str, ckpt: Checkpoint, parent: str | None,
                 full: bool) -> dict[str, Any] | None:
    if full:
        return None
    if parent is not None:
        m = repo.manifest(parent)
        if m["vpg"] != vpg or m["checkpoint"]["seq"] > ckpt.seq:
            raise ConfigError(f"backup {parent} is not an older backup of VPG {vpg}")
        return m
    older = [b for b in repo.backups() if b.vpg == vpg and b.checkpoint["seq"] <= ckpt.seq]
    if not older:
        return None
    best = max(older, key=lambda b: (b.checkpoint["seq"], b.time_ns))
    return repo.manifest(best.name)


def _changes(journal: Journal, parent: dict[str, Any] | None, ckpt: Checkpoint,
             vol: int) -> list[tuple[int, int]] | None:
    if parent is None:
        return None
    try:
        return journal.changed_extents(parent["checkpoint"]["id"], ckpt.id, vol)
    except CheckpointNotFoundError:
        return None


def _parent_chunks(parent: dict[str, Any] | None, vm: str, journal_id: str, vol: int,
                   size: int, cs: int) -> list[str | None] | None:
    """The parent's chunk list of the volume, when the parent read the same journal (its
    checkpoint ids mean the same writes) with the same volume size and chunk size."""
    if parent is None or parent["chunk_size"] != cs:
        return None
    for v in parent["vms"]:
        if v["name"] == vm and v.get("journal_id") == journal_id:
            for x in v["volumes"]:
                if x["id"] == vol and x["size"] == size:
                    return list(x["chunks"])
    return None


def run_backup(repo: Repository, vpg: RecoveryVPG, checkpoint: Checkpoint | int | None = None,
               *, retain_until: float = 0.0, parent: str | None = None, full: bool = False,
               progress: Progress | None = None) -> BackupResult:
    """Back up every volume of every VM of `vpg` at `checkpoint` (default: the newest
    usable one) into `repo`; incremental from `parent` (default: the newest older backup
    of the VPG) unless `full`.  `retain_until` (epoch seconds) locks the backup and
    every chunk it lists until then.  Holds the repository's writers' lock."""
    t0 = time.monotonic()
    with repo.writer():
        vpg.refresh()
        ckpt = vpg.latest() if checkpoint is None else vpg.by_id(
            checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint)
        base = _pick_parent(repo, vpg.name, ckpt, parent, full)
        stats = BackupStats()
        with vpg.views(ckpt) as views:
            vms, mode = _read_vms(repo, vpg, views, ckpt, base, stats, progress)
        now_ns = time.time_ns()
        name = fmt.new_backup_name(now_ns)
        for_lock = {c for vm in vms for v in vm["volumes"] for c in v["chunks"] if c}
        repo.store.sync()
        if retain_until > 0:
            for cid in for_lock:
                repo.store.lock(fmt.chunk_name(cid), retain_until)
        parent_name = str(base["backup"]) if base else None
        manifest = {"backup": name, "repo_id": repo.repo_id, "vpg": vpg.name,
                    "checkpoint": checkpoint_doc(ckpt), "time_ns": now_ns,
                    "retain_until": retain_until, "parent": parent_name,
                    "mode": mode, "chunk_size": repo.chunk_size, "vms": vms,
                    "stats": asdict(stats)}
        repo.put_manifest(manifest)
        if retain_until > 0:
            repo.store.lock(fmt.manifest_name(name), retain_until)
        repo.store.sync()
        repo.write_index()
    return BackupResult(name, mode, ckpt, parent_name, stats, time.monotonic() - t0)


def _read_vms(repo: Repository, vpg: RecoveryVPG, views: Any, ckpt: Checkpoint,
              base: dict[str, Any] | None, stats: BackupStats, progress: Progress | None
              ) -> tuple[list[dict[str, Any]], str]:
    journals = vpg.journals
    total = sum(v.size for j in journals.values() for v in j.volumes.values())
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    mode = BackupMode.FULL if base is None else BackupMode.INCREMENTAL
    w = _Writer(repo, stats)
    vms: list[dict[str, Any]] = []
    try:
        for vm in vpg.vms:
            journal, view = journals[vm], views[vm]
            jid = journal.journal_id.hex()
            vols = []
            for spec in sorted(journal.volumes.values(), key=lambda s: s.id):
                old = _parent_chunks(base, vm, jid, spec.id, spec.size, repo.chunk_size)
                changes = _changes(journal, base, ckpt, spec.id) if old is not None else None
                if base is not None and changes is None:
                    mode = BackupMode.FULL_DEDUP
                zeros = functools.partial(journal.zero_ranges, ckpt, spec.id)
                chunks = _backup_volume(repo, view, spec.id, spec.size, old, changes, w,
                                        step, zeros)
                vols.append({"id": spec.id, "name": spec.name, "size": spec.size,
                             "chunks": chunks})
            vms.append({"name": vm, "journal_id": jid, "volumes": vols})
    finally:
        w.close()
    return vms, mode


# ---- restore ----------------------------------------------------------------------------

def restore(repo: Repository, backup: str, dest: str | os.PathLike[str], *,
            vms: Iterable[str] | None = None, progress: Progress | None = None
            ) -> list[Path]:
    """Restore `backup` to volume images `dest/<vm>/<volume>.img` (sparse; every chunk
    decrypted and verified).  Images are written as `.partial` files and renamed only
    when complete: on any error every partial file is removed and nothing is left; when
    it returns, the images and the directories it made are durable."""
    m = repo.manifest(backup)
    chosen = None if vms is None else set(vms)
    plan = [(vm["name"], v) for vm in m["vms"] if chosen is None or vm["name"] in chosen
            for v in vm["volumes"]]
    if chosen is not None and chosen - {vm for vm, _ in plan}:
        raise ConfigError(f"backup {backup} has no VM {sorted(chosen - {vm for vm, _ in plan})}")
    dest = Path(dest)
    total = sum(v["size"] for _, v in plan)
    partials: list[tuple[Path, Path]] = []
    done = 0
    try:
        for vm, v in plan:
            final = dest / vm / f"{v['name']}.img"
            if final.exists():
                raise ConfigError(f"{final} already exists; restore into an empty directory")
            make_dirs(final.parent)  # durable: a restored image's path survives a crash
            part = final.with_name(final.name + ".partial")
            partials.append((part, final))
            _restore_volume(repo, v, m["chunk_size"], part)
            done += v["size"]
            if progress is not None:
                progress(done, total)
        for part, final in partials:
            os.replace(part, final)
            fsync_dir(final.parent)
    except BaseException:
        for part, _ in partials:
            part.unlink(missing_ok=True)
        raise
    return [final for _, final in partials]


def restore_volume(repo: Repository, backup: str, vm: str, volume: str,
                   path: str | os.PathLike[str]) -> Path:
    """Restore one volume of `backup` to the image file `path` (which must not exist),
    verified; written as `.partial` and renamed when complete, removed on any error."""
    m = repo.manifest(backup)
    found = [v for x in m["vms"] if x["name"] == vm for v in x["volumes"]
             if v["name"] == volume]
    if not found:
        raise ConfigError(f"backup {backup} has no volume {volume!r} of VM {vm!r}")
    final = Path(path)
    if final.exists():
        raise ConfigError(f"{final} already exists")
    part = final.with_name(final.name + ".partial")
    try:
        _restore_volume(repo, found[0], m["chunk_size"], part)
        os.replace(part, final)
        fsync_dir(final.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return final


class _DirectWriter:
    """Writes a restored image with O_DIRECT where it can: straight from a page-aligned
    per-thread buffer to the disk, without filling the page cache (on the bench machine a
    buffered gigabyte into a new file took 7 s, 3 s of it system time, and the same
    through O_DIRECT 1.2 s).  A write O_DIRECT cannot take (a length off its alignment,
    a file system that refuses it) goes through the ordinary descriptor instead, its
    writeback started at once.  Either way only the fsync that follows makes it durable."""

    ALIGN = 4096  # offsets and lengths of O_DIRECT writes: a multiple of the block size

    def __init__(self, path: Path, fd: int, cs: int) -> None:
        self.fd = fd
        self.cs = cs
        self._local = threading.local()
        self.direct = -1
        if hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # EINVAL: no O_DIRECT on this file system (tmpfs)
                pass

    def write(self, data: bytes, offset: int) -> None:
        n = len(data)
        if self.direct >= 0 and n % self.ALIGN == 0 and offset % self.ALIGN == 0 \
                and n <= self.cs:
            buf: mmap.mmap | None = getattr(self._local, "buf", None)
            if buf is None:
                buf = self._local.buf = mmap.mmap(-1, -(-self.cs // self.ALIGN) * self.ALIGN)
            view = memoryview(buf)[:n]
            try:
                view[:] = data
                pwrite_all(self.direct, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                view.release()
        pwrite_all(self.fd, data, offset)
        start_writeback(self.fd, offset, n)  # the final fsync finds it written

    def close(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1


def _restore_volume(repo: Repository, v: dict[str, Any], cs: int, path: Path) -> None:
    """Each chunk fetched, verified and written by one worker (see _Writer on why); the
    image is sparse: zero chunks are never written.  More workers than for a backup, as
    an O_DIRECT write holds its worker until the disk has the chunk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size: int = v["size"]
    out = _DirectWriter(path, fd, cs)

    def put(idx: int, cid: str) -> None:
        data = repo.get_chunk(cid)
        if len(data) != min(cs, size - idx * cs):
            raise CorruptRecordError(f"chunk {cid} ({idx} of a {size}-byte volume) holds "
                                     f"{len(data)} bytes")
        out.write(data, idx * cs)

    try:
        os.ftruncate(fd, size)
        chunks: list[str | None] = v["chunks"]
        with ThreadPoolExecutor(RESTORE_WORKERS, thread_name_prefix="zcore-restore") as pool:
            flying: deque[Future[None]] = deque()
            try:
                for i, c in enumerate(chunks):
                    if c is None:
                        continue
                    if len(flying) >= IN_FLIGHT:
                        flying.popleft().result()
                    flying.append(pool.submit(put, i, c))
                while flying:
                    flying.popleft().result()
            finally:
                for f in flying:
                    f.cancel()
        os.fsync(fd)
    finally:
        out.close()
        os.close(fd)
