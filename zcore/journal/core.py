"""The Journal class: one VM's journal at the recovery site, composed of its parts
(loader, committer, catalogue, read-through, retention), with creation and opening,
the append path, rotation, status and closing.

The receiver hands it bundles of records exactly as the protected site encoded them
(`append_encoded`); it validates every record natively, appends the same bytes to the
active segment and indexes them; `commit` is the group commit that makes them durable.
`view(checkpoint).read(...)` returns a volume as of a checkpoint; promotion moves the
oldest writes into the replicas.  Locks: see zcore.journal.state."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from zcore import records
from zcore._native import record as _rec
from zcore._native.index import ExtentIndex
from zcore.errors import ClosedError, ConfigError, DurabilityError, status_error
from zcore.fsutil import fsync_dir, pwrite_all
from zcore.journal import adopt, indexfile, segments
from zcore.journal.catalogue import CatalogueMixin
from zcore.journal.changes import ChangesMixin
from zcore.journal.committer import CommitterMixin
from zcore.journal.damage import inexact
from zcore.journal.discard import DiscardMixin
from zcore.journal.loader import LoaderMixin
from zcore.journal.manifest import ManifestMixin, write_new_manifest
from zcore.journal.meta import (
    META_FORMAT,
    META_NAME,
    META_VERSION,
    check_meta,
    read_meta,
    write_meta,
)
from zcore.journal.readthrough import Lz4Cache, ReadThroughMixin
from zcore.journal.replica import ReplicaSums
from zcore.journal.retention import RetentionMixin
from zcore.journal.scrub import ScrubMixin
from zcore.journal.segments import Segment
from zcore.journal.settings import (
    MAX_BUNDLE,
    HistoryState,
    JournalSettings,
    JournalStatus,
    ReopenReport,
    SegmentInfo,
    VolumeSpec,
    check_volumes,
)
from zcore.records import Checkpoint


class Journal(LoaderMixin, CommitterMixin, CatalogueMixin, ChangesMixin, ReadThroughMixin,
              RetentionMixin, ManifestMixin, ScrubMixin, DiscardMixin):
    """One VM's journal.  Thread-safe; one process opens it at a time (flock)."""

    def __init__(self, path: Path, meta: dict[str, Any], lock_fd: int) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._index_lock = threading.Lock()
        self._lock_fd = lock_fd
        self._meta = meta
        checked = check_meta(path, meta)  # CorruptRecordError for any bad field
        self.journal_id = checked.journal_id
        self.vm = checked.vm
        self.settings = checked.settings
        self.volumes = {v.id: v for v in checked.volumes}
        self._by_name = {v.name: v for v in self.volumes.values()}
        self._volume_sizes = np.zeros(max(self.volumes) + 1, dtype=np.uint64)
        for v in self.volumes.values():
            self._volume_sizes[v.id] = v.size
        self.created_ns = checked.created_ns
        self.promoted_seq = checked.promoted_seq
        self._index = ExtentIndex()
        self._segments = OrderedDict()
        self._checkpoints = []
        self._replica_fds = {}
        self._replica_sums = {}
        self.integrity_notes = []  # what opening trusted once (see zcore.journal.replica)
        self._pins = {}
        self._lz4_cache = Lz4Cache()
        self.last_seq = 0
        self.durable_seq = 0
        self._unsynced = 0
        self._failed = None
        self._full = False
        self._closed = False
        self._closing = False
        self._report = ReopenReport()
        self._rescanned = 0
        # sealed segments' indexes load in the background after open (see loader)
        self._loaded = threading.Event()
        self._loaded.set()
        self._load_error = None
        self._loader = None
        self._go = threading.Event()
        # background group commit (see committer)
        self._sync_cond = threading.Condition(threading.Lock())
        self._sync_target = None
        self._committer = None
        self._mark_lock = threading.Lock()
        # what reopening found damaged (damage.py), and the manifest's sealed segments
        # (number -> (length, last seq); None while a v1 journal awaits its upgrade)
        self._damage = self._damage_read = ()
        self._listed = None
        self._notes: list[str] = []  # what reopening found wrong with the files

    # ---- creation and opening ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        volumes: Iterable[VolumeSpec | tuple[int, str, int]],
        *,
        vm: str = "vm",
        settings: JournalSettings | None = None,
        replica_files: Mapping[int, str | os.PathLike[str]] | None = None,
    ) -> Journal:
        """Create an empty journal (and sparse replicas) in the new or empty directory.

        `replica_files` (volume id -> file) adopts existing files as replicas instead:
        each is moved into the directory (zcore.fsutil.move_file) and its block sums are
        built from its bytes, so the journal's oldest point is the files' contents.  Each
        must be a regular file of its volume's size, else ConfigError before anything
        moves.  A crash midway loses no file; the same call again resumes
        (zcore.journal.adopt)."""
        settings = settings or JournalSettings()
        settings.check()
        specs = check_volumes(v if isinstance(v, VolumeSpec) else VolumeSpec(*v)
                              for v in volumes)
        if not isinstance(vm, str):
            raise ConfigError(f"vm must be a string, not {vm!r}")
        path = Path(path)
        adopted = adopt.plan(path, specs, replica_files)  # checked before anything moves
        path.mkdir(parents=True, exist_ok=True)
        if adopted:  # the directory's entry durable before any file moves into it
            fsync_dir(path.parent)
        adopt.check_empty(path, any(src.parent == path for src in adopted.values()))
        journal_id = uuid.uuid4().bytes
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "journal_id": journal_id.hex(),
            "vm": vm,
            "created_ns": time.time_ns(),
            "volumes": [asdict(v) for v in specs],
            "settings": asdict(settings),
            "promoted_seq": 0,
            "promote_target": 0,
        }
        for v in specs:
            _create_replica(path, v, journal_id, adopted.get(v.id))
        write_new_manifest(path, journal_id)  # before meta: 7.7
        write_meta(path, meta)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Journal:
        """Open a journal, truncating a torn tail and finishing an interrupted promotion."""
        path = Path(path)
        if not (path / META_NAME).exists():
            raise ConfigError(f"{path} holds no journal ({META_NAME} missing)")
        # the lock is on the directory: journal.meta is replaced (a new inode) by every
        # metadata update, which would silently release a lock held on the file
        lock_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ConfigError(f"journal {path} is open in another process") from None
        journal = None
        try:
            meta = read_meta(path)
            journal = cls(path, meta, lock_fd)
            journal._load()
            journal._go.set()  # the background loader starts only once open has returned
        except BaseException:
            if journal is not None:  # a damaged journal must not leak its descriptors
                journal._release()
            else:
                os.close(lock_fd)
            raise
        return journal

    # ---- appending -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"journal {self.path} is closed")
        if self._failed is not None:
            raise DurabilityError(
                f"journal {self.path} stopped after an fsync failure ({self._failed}); "
                "reopen it to recover"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"journal {self.path} is closed")

    def append_encoded(self, bundle: bytes | bytearray | memoryview, *,
                       flags: int = records.FLAGS_KNOWN) -> int:
        """Append a bundle of records encoded by the protected site, byte for byte.

        Every record is validated first (checksums, order, volume ranges, record flags
        within `flags`: those of the peer's wire protocol); a bundle with one bad record is
        refused whole.  Returns the bundle's last seq; it is durable
        once `commit` (or the automatic group commit) has returned a seq at least as high.
        """
        with self._lock:
            self._check_usable()
            size = len(bundle)
            if size == 0:
                return self.last_seq
            if size > MAX_BUNDLE:
                raise ConfigError(f"bundle of {size} bytes exceeds the {MAX_BUNDLE}-byte limit")
            self._make_room(size)
            seg = self._active
            if seg.records and seg.size + size > self._segment_limit():
                seg = self._rotate()
            batch = _rec.scan(bundle, seg.size, seg.number, self.last_seq, self._volume_sizes,
                              flags)
            if (not batch.status and seg.version < segments.SEGMENT_VERSION
                    and np.any(batch.array()["flags"] & (records.FLAGS_KNOWN
                                                         & ~segments.record_flags(seg.version)))):
                # a segment of an older version cannot hold these records: they go to one
                # of the current version (format.md 2)
                seg = self._rotate() if seg.records else self._restamp(seg)
                batch = _rec.scan(bundle, seg.size, seg.number, self.last_seq,
                                  self._volume_sizes, flags)
            if batch.status:
                raise status_error(
                    batch.status,
                    f"refusing bundle: record at byte {batch.consumed} of {size} is invalid",
                )
            arr = batch.array()
            checkpoints = self._batch_checkpoints(arr, bundle, seg.size)  # may refuse it
            try:
                pwrite_all(seg.fd, bundle, seg.size)
            except OSError:
                os.ftruncate(seg.fd, seg.size)  # no partial bundle stays behind
                raise
            self._take_batch(seg, batch, arr, checkpoints)
            seg.size += size
            self.last_seq = batch.last_seq
            self._unsynced += size
            group = self.settings.group_commit_bytes
            if group and self._unsynced >= group:
                self._commit_in_background()
            return self.last_seq

    def append(
        self,
        writes: Iterable[tuple[int | str, int, bytes | bytearray | memoryview]],
        *,
        compress: bool = True,
    ) -> int:
        """Journal local writes (volume, offset, data), numbering them after the last seq.

        For tests, tools and the demo; replication appends with `append_encoded`."""
        with self._lock:
            self._check_usable()
            seq = self.last_seq
            now = time.time_ns()
            parts = []
            for volume, offset, data in writes:
                spec = self._volume(volume)
                data = records.byte_view(data)  # item size 1: refused before any write
                records.check_range(offset, len(data), spec.size)
                seq += 1
                parts.append(records.encode_write(spec.id, seq, offset, data, now,
                                                  compress=compress))
            return self.append_encoded(b"".join(parts)) if parts else self.last_seq

    def checkpoint(self, tag: str | None = None, *, consistent: bool = True) -> Checkpoint:
        """Append a checkpoint marker (tagged when `tag` is given) after the last write."""
        with self._lock:
            self._check_usable()
            kind = records.CKPT_TAGGED if tag else records.CKPT_AUTO
            seq = self.last_seq + 1
            self.append_encoded(records.encode_checkpoint(seq, time.time_ns(), kind,
                                                          consistent, tag))
            return self._checkpoints[-1]

    # ---- segments ------------------------------------------------------------------------

    def _segment_limit(self) -> int:
        limit = self.settings.segment_bytes
        hard = self.hard_limit_bytes
        if hard is not None:
            limit = max(1 << 20, min(limit, hard // 4))
        return limit

    def _rotate(self) -> Segment:
        """Seal the active segment (fsync, then its index file) and start the next one."""
        self.commit()
        old = self._active
        old.sealed = True
        try:
            indexfile.write_index(old, self.journal_id)
            old.extents = []
            self._active = self._new_segment(old.number + 1)
            self._listed_sealed()  # the manifest names it after it exists (manifest.py)
        except OSError as exc:  # appending on would go to a segment marked sealed
            raise self._stop(exc, f"sealing segment {old.path}") from exc
        return self._active

    def _restamp(self, seg: Segment) -> Segment:
        """Rewrite the header of the empty active segment `seg`, of an older version, as
        the current version's (one 64-byte write inside the first sector, so a crash
        leaves the old header or the new one; either is a valid empty segment)."""
        head = segments.pack_header(seg.number, self.journal_id)
        try:
            pwrite_all(seg.fd, head, 0)
            os.fdatasync(seg.fd)
        except OSError as exc:
            raise self._stop(exc, f"rewriting the header of {seg.path}") from exc
        seg.version, seg.head, seg.marked_end = segments.SEGMENT_VERSION, head[:48], 0
        return seg

    def _new_segment(self, number: int) -> Segment:
        seg = segments.create_segment(self.path, number, self.journal_id)
        self._segments[number] = seg
        with self._index_lock:
            self._index.set_segment_fd(number, seg.fd)
        return seg

    def segments(self) -> list[SegmentInfo]:
        """The segment files, oldest first, as they are now (waits for the index load:
        a sealed segment's seqs are known only then)."""
        self.wait_loaded()
        with self._lock:
            self._check_open()
            return [SegmentInfo(s.number, s.path, s.size, s.sealed, s.records,
                                s.min_seq if s.records else 0, s.max_seq if s.records else 0)
                    for s in self._segments.values()]

    # ---- status and lifetime -------------------------------------------------------------

    def status(self, *, now: float | None = None) -> JournalStatus:
        self.wait_loaded()
        with self._lock:
            self._check_open()
            now = time.time() if now is None else now
            oldest = self._checkpoints[0] if self._checkpoints else None
            newest = self._checkpoints[-1] if self._checkpoints else None
            configured = self.settings.history_seconds
            held = max(0.0, now - oldest.time) if oldest else 0.0
            # a journal younger than its history is building it up: no judgement yet
            # (the first checkpoints may come only after hours of initial sync)
            if now - self.created_ns / 1e9 < configured:
                state = HistoryState.BUILDING
            else:
                ratio = held / configured
                state = (HistoryState.OK if ratio >= 0.85 else
                         HistoryState.WARNING if ratio >= 0.75 else HistoryState.ERROR)
            hard = self.hard_limit_bytes
            warn = int(hard * self.settings.warning_fraction) if hard is not None else None
            size = self.size_bytes
            with self._index_lock:
                index_bytes = self._index.memory
            return JournalStatus(
                size_bytes=size,
                records=sum(s.records for s in self._segments.values()),
                index_bytes=index_bytes,
                oldest_checkpoint=oldest,
                newest_checkpoint=newest,
                history_held_seconds=held,
                history_configured_seconds=configured,
                history_state=state,
                hard_limit_bytes=hard,
                warning_limit_bytes=warn,
                near_limit=warn is not None and size >= warn,
                full=self._full,
                durable_seq=self.durable_seq,
                last_seq=self.last_seq,
                promoted_seq=self.promoted_seq,
                damaged_seqs=tuple((d.seq_lo, d.seq_hi) for d in self._damage),
                inexact_checkpoints=inexact(self._damage, (c.seq for c in self._checkpoints)),
            )

    @property
    def failed(self) -> BaseException | None:
        """The I/O error that stopped the journal (None while it works): every call that
        changes it raises DurabilityError until it is reopened."""
        return self._failed

    @property
    def index_count(self) -> int:
        self.wait_loaded()
        with self._index_lock:
            return self._index.count

    @property
    def index_memory(self) -> int:
        self.wait_loaded()
        with self._index_lock:
            return self._index.memory

    def close(self) -> None:
        """Commit what is appended and release every file.  Open views become unusable."""
        loader = self._loader
        if loader is not None and loader.is_alive():
            self._closing = True
            loader.join()
        error: DurabilityError | None = None
        with self._lock:
            if self._closed:
                return
            if self._failed is None:
                try:
                    self.commit()
                    self._sync_mark()
                except DurabilityError as exc:
                    error = exc
        self._stop_committer()  # without the lock: the committer takes it to finish
        with self._lock:
            if not self._closed:
                self._release()
        if error is not None:
            raise error

    def _release(self) -> None:
        """Close every descriptor the journal holds, its lock last."""
        with self._index_lock:  # no read is using a descriptor while they close
            self._closed = True
            for seg in self._segments.values():
                if seg.fd >= 0:
                    self._index.set_segment_fd(seg.number, -1)
                    os.close(seg.fd)
                    seg.fd = -1
            for volume, fd in self._replica_fds.items():
                self._index.set_replica_fd(volume, -1)
                os.close(fd)
            for volume, sums in self._replica_sums.items():
                self._index.set_replica_sums(volume, None, 0, 0, 0, 0)
                sums.close()
            self._segments.clear()
            self._replica_fds.clear()
            self._replica_sums.clear()
        os.close(self._lock_fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_replica(path: Path, v: VolumeSpec, journal_id: bytes, adopted: Path | None) -> None:
    """Volume `v`'s replica and its sums in a new journal: an empty sparse image, or the
    `adopted` file moved in (zcore.journal.adopt), its sums built from its bytes so reads
    and the scrub check it."""
    if adopted is not None:
        replica = adopt.place(path, v.id, adopted)
        fd = os.open(replica, os.O_RDONLY)
        try:
            ReplicaSums.create(path, v.id, v.size, journal_id, fd).close()
        finally:
            os.close(fd)
        return
    fd = os.open(path / f"replica-{v.id:04d}.img", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, v.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    ReplicaSums.create(path, v.id, v.size, journal_id).close()
