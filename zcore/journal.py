"""The recovery site's per-VM journal: segments, checkpoints, views, promotion.

Sits at the end of the data path.  The receiver hands it bundles of records exactly as
the protected site encoded them (`append_encoded`); it validates every record natively,
appends the same bytes to the active segment and indexes them; `commit` is the group
commit that makes them durable.  `view(checkpoint).read(...)` returns a volume as of a
checkpoint: the replica image overlaid with every journaled write before the checkpoint,
newest wins (native planner).  Promotion moves the oldest writes into the replicas.

On-disk layout of a journal directory (docs/format.md):
    journal.meta               settings, volumes, promotion watermark (atomic JSON)
    seg-NNNNNNNN.zcj           segment: 64-byte header, then records
    seg-NNNNNNNN.zci           index of a sealed segment (extents + checkpoints)
    replica-NNNN.img           one sparse image per volume
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lz4.block
import numpy as np

from zcore import records
from zcore._native import record as _rec
from zcore._native.index import ExtentIndex
from zcore.errors import (
    CheckpointNotFoundError,
    ClosedError,
    ConfigError,
    CorruptRecordError,
    DurabilityError,
    FormatVersionError,
    JournalFullError,
    OutOfRangeError,
    StateError,
    TruncatedRecordError,
    ZcoreError,
    status_error,
)
from zcore.fsutil import atomic_write, fsync_dir
from zcore.records import Checkpoint

log = logging.getLogger(__name__)

META_NAME = "journal.meta"
META_FORMAT = "zcore-journal"
META_VERSION = 1
SEGMENT_MAGIC = b"ZCJSEG\r\n"
SEGMENT_VERSION = 1
INDEX_MAGIC = b"ZCJIDX\r\n"
INDEX_VERSION = 2  # v2: data extents sorted by (volume, offset, seq), checkpoint table
INDEX_V1 = 1  # v1: every extent in seq order, checkpoint blob; still read
SEGMENT_HEADER = struct.Struct("<8sII Q 16s Q 12x I")  # 64 bytes, crc last
INDEX_HEADER = struct.Struct("<8sII Q 16s Q II I I")  # 64 bytes, body crc, header crc
INDEX_TIMES = struct.Struct("<QQ")  # v1 body prefix: min_time, max_time
INDEX_STATS = struct.Struct("<QQQQQ")  # v2: min_time, max_time, min_seq, max_seq, records
INDEX_CKPT = struct.Struct("<QQQII")  # v2 entry: seq, pos, time_ns, stored, 0; payload follows
assert SEGMENT_HEADER.size == 64 and INDEX_HEADER.size == 64

HOUR = 3600.0
DAY = 24 * HOUR
MIN_HISTORY = HOUR
MAX_HISTORY = 30 * DAY

# 64 MiB segments: reopen scans at most one of them (about 10 ms at 6 GB/s) and a sealed
# segment's index file stays under 1 MiB even for 4 KiB writes.
DEFAULT_SEGMENT_BYTES = 64 << 20
# Commit when 8 MiB are unsynced: one fsync costs ~0.2 ms + 2.5 ms/MiB here, so larger
# groups only add latency (bench/harness.py journal: journal.append).
DEFAULT_GROUP_COMMIT_BYTES = 8 << 20
# Decompressed LZ4 payloads kept for read-through; random 4 KiB reads over compressed
# records otherwise decompress a whole record each time.
LZ4_CACHE_BYTES = 64 << 20
MAX_BUNDLE = 256 << 20


@dataclass(frozen=True)
class VolumeSpec:
    """A protected volume as the journal knows it: VPG-wide id, name, fixed size."""

    id: int
    name: str
    size: int


@dataclass
class JournalSettings:
    """Retention and limits of one journal (validated by `check`)."""

    history_seconds: float = DAY
    hard_limit_bytes: int | None = None
    hard_limit_percent: float | None = None  # of the VM's provisioned size
    warning_fraction: float = 0.8  # of the hard limit
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    group_commit_bytes: int = DEFAULT_GROUP_COMMIT_BYTES

    def check(self) -> None:
        if not MIN_HISTORY <= self.history_seconds <= MAX_HISTORY:
            raise ConfigError(
                f"journal history {self.history_seconds} s is outside 1 h to 30 days"
            )
        if self.hard_limit_bytes is not None and self.hard_limit_percent is not None:
            raise ConfigError("give the hard limit in bytes or in percent, not both")
        if self.hard_limit_bytes is not None and self.hard_limit_bytes < 4 << 20:
            raise ConfigError("the journal hard limit must be at least 4 MiB")
        if self.hard_limit_percent is not None and not 0 < self.hard_limit_percent <= 1000:
            raise ConfigError("the journal hard limit percent must be in (0, 1000]")
        if not 0 < self.warning_fraction < 1:
            raise ConfigError("the warning threshold must be a fraction of the hard limit")
        if self.segment_bytes < 1 << 20:
            raise ConfigError("segments must be at least 1 MiB")
        if self.group_commit_bytes < 0:
            raise ConfigError("group commit size cannot be negative")


@dataclass(frozen=True)
class ReopenReport:
    """What reopening found: dropped torn tail, segments rebuilt without an index file."""

    dropped_bytes: int = 0
    dropped_segments: int = 0
    rescanned_segments: int = 0
    resumed_promotion: bool = False
    reason: str = ""


@dataclass(frozen=True)
class JournalStatus:
    size_bytes: int
    records: int
    index_bytes: int
    oldest_checkpoint: Checkpoint | None
    newest_checkpoint: Checkpoint | None
    history_held_seconds: float
    history_configured_seconds: float
    history_state: str  # "ok", "warning" (< 85 %), "error" (< 75 %)
    hard_limit_bytes: int | None
    warning_limit_bytes: int | None
    near_limit: bool
    full: bool
    durable_seq: int
    last_seq: int
    promoted_seq: int


@dataclass
class _Segment:
    number: int
    path: Path
    fd: int
    size: int  # bytes, header included
    sealed: bool
    min_seq: int = 0
    max_seq: int = 0
    min_time: int = 0
    max_time: int = 0
    records: int = 0
    extents: list[np.ndarray] = field(default_factory=list)  # active segment only


@dataclass
class _SegmentIndex:
    """A sealed segment's index file, read and checked but not yet adopted."""

    min_time: int
    max_time: int
    min_seq: int
    max_seq: int
    records: int
    extents: memoryview  # EXTENT_DTYPE entries
    presorted: bool  # v2: data extents sorted by (volume, offset, seq)
    checkpoints: list[Checkpoint]


def _pread_all(fd: int, size: int, pos: int = 0) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 30), pos)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        pos += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Journal:
    """One VM's journal.  Thread-safe; one process opens it at a time (flock)."""

    def __init__(self, path: Path, meta: dict, lock_fd: int) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self._meta = meta
        self.journal_id = bytes.fromhex(meta["journal_id"])
        self.vm = meta["vm"]
        self.settings = JournalSettings(**meta["settings"])
        self.volumes = {
            int(v["id"]): VolumeSpec(int(v["id"]), v["name"], int(v["size"]))
            for v in meta["volumes"]
        }
        self._by_name = {v.name: v for v in self.volumes.values()}
        self._volume_sizes = np.zeros(max(self.volumes) + 1, dtype=np.uint64)
        for v in self.volumes.values():
            self._volume_sizes[v.id] = v.size
        self.created_ns = int(meta["created_ns"])
        self.promoted_seq = int(meta["promoted_seq"])
        self._index = ExtentIndex()
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._checkpoints: list[Checkpoint] = []
        self._replica_fds: dict[int, int] = {}
        self._pins: dict[int, int] = {}
        self._lz4_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lz4_cache_bytes = 0
        self.last_seq = 0
        self.durable_seq = 0
        self._unsynced = 0
        self._failed: BaseException | None = None
        self._full = False
        self._closed = False
        self._closing = False
        self._report = ReopenReport()
        # sealed segments' indexes load in the background after open (see _load)
        self._loaded = threading.Event()
        self._loaded.set()
        self._load_error: BaseException | None = None
        self._loader: threading.Thread | None = None
        self._go = threading.Event()
        # background group commit (see _commit_in_background)
        self._sync_cond = threading.Condition(threading.Lock())
        self._sync_target: tuple[int, int] | None = None
        self._committer: threading.Thread | None = None

    # ---- creation and reopening ---------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        volumes: Iterable[VolumeSpec | tuple[int, str, int]],
        *,
        vm: str = "vm",
        settings: JournalSettings | None = None,
    ) -> Journal:
        """Create an empty journal (and sparse replicas) in the new or empty directory."""
        settings = settings or JournalSettings()
        settings.check()
        specs = [v if isinstance(v, VolumeSpec) else VolumeSpec(*v) for v in volumes]
        if not specs:
            raise ConfigError("a journal needs at least one volume")
        ids = [v.id for v in specs]
        if len(set(ids)) != len(ids) or len({v.name for v in specs}) != len(specs):
            raise ConfigError("volume ids and names must be unique")
        for v in specs:
            if not 0 <= v.id < 65536:
                raise ConfigError(f"volume id {v.id} is outside 0..65535")
            if v.size <= 0 or v.size % records.SECTOR:
                raise ConfigError(f"volume {v.name!r} size {v.size} is not a positive "
                                  f"multiple of {records.SECTOR}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise ConfigError(f"{path} is not empty: open an existing journal with Journal.open")
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "journal_id": uuid.uuid4().hex,
            "vm": vm,
            "created_ns": time.time_ns(),
            "volumes": [asdict(v) for v in specs],
            "settings": asdict(settings),
            "promoted_seq": 0,
            "promote_target": 0,
        }
        for v in specs:
            fd = os.open(path / f"replica-{v.id:04d}.img", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, v.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        cls._write_meta(path, meta)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Journal:
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
            meta = cls._read_meta(path)
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

    @staticmethod
    def _write_meta(path: Path, meta: dict) -> None:
        body = json.dumps(meta, sort_keys=True)
        crc = _rec.crc32c(body.encode())
        atomic_write(path / META_NAME, json.dumps({"meta": meta, "crc32c": crc}).encode())

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            doc = json.loads((path / META_NAME).read_bytes())
            meta = doc["meta"]
            crc = doc["crc32c"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptRecordError(f"{path / META_NAME} is unreadable: {exc}") from None
        if _rec.crc32c(json.dumps(meta, sort_keys=True).encode()) != crc:
            raise CorruptRecordError(f"{path / META_NAME} fails its checksum")
        if meta.get("format") != META_FORMAT:
            raise CorruptRecordError(f"{path / META_NAME} is not a zcore journal")
        if meta.get("version") != META_VERSION:
            raise FormatVersionError(f"journal format version {meta.get('version')} is not "
                                     f"supported (this build reads {META_VERSION})")
        return meta

    def _load(self) -> None:
        """Open what appends need now: metadata, replicas, every segment's descriptor and
        size, and the tail segment (scanned, torn tail truncated).  The sealed segments'
        index files load in a background thread, so opening does not grow with the amount
        journaled; reads, views, promotion and listings wait for it (`wait_loaded`)."""
        for v in self.volumes.values():
            fd = os.open(self.path / f"replica-{v.id:04d}.img", os.O_RDWR)
            self._replica_fds[v.id] = fd
            self._index.set_replica_fd(v.id, fd)
        sizes = {}  # segment number -> file size; other names are not this journal's
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if (len(name) == 16 and name.startswith("seg-") and name.endswith(".zcj")
                        and name[4:12].isdigit()):
                    sizes[int(name[4:12])] = entry.stat().st_size
        numbers = sorted(sizes)
        dropped = dropped_segments = 0
        reason = ""
        if numbers and self._tail_segment_torn(numbers[-1]):
            # a crash while rotation created the newest segment, before its header was
            # durable; records are only appended after that, so it held nothing
            number = numbers.pop()
            seg_path = self.path / f"seg-{number:08d}.zcj"
            dropped += seg_path.stat().st_size
            dropped_segments += 1
            reason = f"segment {number} has a torn header"
            seg_path.unlink()
            fsync_dir(self.path)
        for number in numbers:  # sealed ones get their descriptor from the loader
            seg_path = self.path / f"seg-{number:08d}.zcj"
            self._segments[number] = _Segment(number, seg_path, -1, sizes[number], sealed=True)
        if numbers:
            self._open_segment(self._segments[numbers[-1]])
            if len(numbers) > 1:
                self._open_segment(self._segments[numbers[-2]])
        sealed = numbers[:-1]
        background = bool(sealed)
        prev_max = self._sealed_tail_max_seq(sealed[-1]) if sealed else 0
        if prev_max is None:
            # the newest sealed segment cannot vouch for its last seq: load everything now
            self._load_sealed(sealed, ordered=True)
            background = False
            prev_max = max((self._segments[n].max_seq for n in sealed), default=0)
        if numbers:
            tail = self._segments[numbers[-1]]
            tail.sealed = False  # collect extents: it is the active segment again
            outcome = self._scan_segment(tail, prev_max, is_last=True)
            if outcome:
                dropped += outcome[0]
                reason = outcome[1]
            last_seq = tail.max_seq if tail.records else prev_max
            self._active = tail
            # the tail may hold records a crashed process appended but never committed:
            # they are in the page cache, not necessarily on disk, until this sync
            try:
                os.fdatasync(tail.fd)
            except OSError as exc:
                raise DurabilityError(f"fsync of {tail.path} failed: {exc}") from exc
        else:
            last_seq = 0
            self._active = self._new_segment(1)
        # a promotion may have emptied every segment: numbering continues above it
        self.last_seq = self.durable_seq = max(last_seq, self.promoted_seq - 1)
        self._report = ReopenReport(dropped, dropped_segments, 0, False, reason)
        if background:
            self._loaded.clear()
            self._loader = threading.Thread(target=self._load_in_background,
                                            args=(sealed, prev_max),
                                            name=f"journal-load-{self.vm}", daemon=True)
            self._loader.start()
        else:
            self._finish_load()

    def _open_segment(self, seg: _Segment) -> None:
        seg.fd = os.open(seg.path, os.O_RDWR)
        seg.size = os.fstat(seg.fd).st_size
        self._index.set_segment_fd(seg.number, seg.fd)

    def _sealed_tail_max_seq(self, number: int) -> int | None:
        """Last seq of the newest sealed segment, from its (checked) v2 index file."""
        seg = self._segments[number]
        try:
            data = seg.path.with_suffix(".zci").read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < 64 + INDEX_STATS.size:
            return None
        (magic, version, hsize, num, jid, seg_len, _count, _ckpt, body_crc,
         crc) = INDEX_HEADER.unpack(data[:64])
        if (magic != INDEX_MAGIC or _rec.crc32c(data[:60]) != crc or hsize != 64
                or version != INDEX_VERSION or num != number or jid != self.journal_id
                or seg_len != seg.size or _rec.crc32c(memoryview(data)[64:]) != body_crc):
            return None
        _t0, _t1, min_seq, max_seq, nrecords = INDEX_STATS.unpack_from(data, 64)
        return max_seq if nrecords and max_seq >= min_seq else None

    def _load_sealed(self, numbers: list[int], *, ordered: bool) -> int:
        """Index the sealed segments `numbers` (oldest first) from their index files,
        rescanning (and re-indexing) those without a valid one.  Holds the lock one
        segment at a time.  Returns how many were rescanned."""
        last_seq = rescanned = 0
        for number in numbers:
            if self._closing:
                break
            seg = self._segments[number]
            parsed = self._read_segment_index(seg, last_seq)  # file I/O without the lock
            with self._lock:
                if self._closing:
                    break
                if seg.fd < 0:
                    self._open_segment(seg)
                if parsed is None or not self._adopt_index(seg, parsed, ordered):
                    seg.sealed = False  # collect the extents the rebuilt index needs
                    self._scan_segment(seg, last_seq, is_last=False, ordered=ordered)
                    self._seal_index(seg)
                    seg.sealed = True
                    rescanned += 1
                if seg.records:
                    last_seq = seg.max_seq
        self._rescanned = rescanned
        return last_seq

    def _load_in_background(self, numbers: list[int], expected_last: int) -> None:
        self._go.wait()  # leave the GIL to the opening thread until open() returns
        try:
            last = self._load_sealed(numbers, ordered=False)
            with self._lock:
                if self._closing:
                    return
                if last != expected_last:
                    raise CorruptRecordError(
                        f"journal {self.path}: sealed segments end at seq {last}, their "
                        f"newest index says {expected_last}")
                self._finish_load()
        except BaseException as exc:  # surfaced by every call that waits for the index
            self._load_error = exc
        finally:
            self._loaded.set()

    def _finish_load(self) -> None:
        self._check_contiguous()
        self._checkpoints.sort(key=lambda c: c.seq)
        if self.promoted_seq:
            self._index.drop_before(self.promoted_seq)
        self._checkpoints = [c for c in self._checkpoints if c.seq >= self.promoted_seq]
        resumed = False
        target = int(self._meta.get("promote_target", 0))
        if target > self.promoted_seq:  # a promotion was interrupted: finish it first
            self._promote_to(target)
            resumed = True
        r = self._report
        self._report = ReopenReport(r.dropped_bytes, r.dropped_segments,
                                    getattr(self, "_rescanned", 0), resumed, r.reason)

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait until the sealed segments' indexes are loaded; raises what loading found
        (a damaged sealed segment) and StateError on timeout.  Do not call with the
        journal's lock held."""
        if not self._loaded.wait(timeout):
            raise StateError(f"journal {self.path} is still loading its index")
        if self._load_error is not None:
            err = self._load_error
            raise err.with_traceback(None) if isinstance(err, ZcoreError) else \
                CorruptRecordError(f"loading journal {self.path} failed: {err!r}")

    @property
    def reopen_report(self) -> ReopenReport:
        """What opening found (waits for the background index load)."""
        self.wait_loaded()
        return self._report

    def _check_contiguous(self) -> None:
        """Refuse a gap in the segment numbers that promotion cannot have left.

        Promotion deletes the segments whose records are all below the new watermark
        (with one directory fsync at the end, so a crash may leave any subset of them).
        A missing segment after one that is itself wholly promoted is such a leftover;
        after any other segment it is a lost file, and reading on would return stale
        data where its writes were newest."""
        segs = list(self._segments.values())
        for before, after in itertools.pairwise(segs):
            if after.number != before.number + 1 and before.max_seq >= self.promoted_seq:
                raise CorruptRecordError(
                    f"journal {self.path} lacks segment(s) {before.number + 1} to "
                    f"{after.number - 1}; the journal needs a resync from there")

    def _check_segment_header(self, seg: _Segment, head: bytes) -> bool:
        if len(head) < 64:
            return False
        magic, version, hsize, number, jid, _created, crc = SEGMENT_HEADER.unpack(head[:64])
        if _rec.crc32c(head[:60]) != crc or magic != SEGMENT_MAGIC:
            return False
        if version != SEGMENT_VERSION:
            raise FormatVersionError(f"segment {seg.path} has format version {version}")
        if hsize != 64 or number != seg.number or jid != self.journal_id:
            raise CorruptRecordError(f"segment {seg.path} belongs to another journal or slot")
        return True

    def _tail_segment_torn(self, number: int) -> bool:
        """True when the newest segment file is no longer than a header and that header is
        not valid: the only state a crash can leave a segment's header in.  A damaged
        header in front of records is media damage, which _scan_segment reports."""
        seg_path = self.path / f"seg-{number:08d}.zcj"
        with open(seg_path, "rb") as f:
            head = f.read(65)
        if len(head) > 64:
            return False
        return not self._check_segment_header(_Segment(number, seg_path, -1, len(head), False),
                                              head)

    def _scan_segment(self, seg: _Segment, last_seq: int, is_last: bool,
                      ordered: bool = True):
        """Full validation of one segment.  Returns (dropped bytes, reason) when the tail
        segment had a torn tail, () when the segment is whole."""
        data = _pread_all(seg.fd, seg.size)
        if not self._check_segment_header(seg, data):
            raise CorruptRecordError(f"segment {seg.path} has a damaged header; the journal "
                                     "needs a resync from that segment")
        batch = _rec.scan(memoryview(data)[64:], 64, seg.number, last_seq, self._volume_sizes)
        arr = batch.array()
        self._take_batch(seg, batch, arr, self._batch_checkpoints(arr, data, 0), ordered)
        end = 64 + batch.consumed
        if batch.status == 0:
            return ()
        if not is_last:
            # sealed segments were fsynced before they were sealed: this is media damage
            raise status_error(batch.status, f"sealed segment {seg.path} is damaged at "
                               f"byte {end}; the journal needs a resync from that point")
        os.ftruncate(seg.fd, end)
        os.fsync(seg.fd)
        dropped = seg.size - end
        seg.size = end
        reason = status_error(batch.status, f"torn tail of segment {seg.number} at {end}")
        return dropped, str(reason)

    def _batch_checkpoints(self, arr: np.ndarray, buf, buf_pos: int) -> list[Checkpoint]:
        """Decode the checkpoint records of a validated batch (extents `arr`), raising
        CorruptRecordError on a payload that breaks the format.  `buf` holds the batch's
        bytes, `buf_pos` the file position of buf[0]."""
        out = []
        for rec in arr[arr["type"] == records.REC_CHECKPOINT]:
            at = int(rec["pos"]) - buf_pos
            payload = memoryview(buf)[at + 64 : at + 64 + int(rec["stored"])]
            out.append(Checkpoint.from_payload(int(rec["seq"]), records.record_time(buf, at),
                                               payload))
        return out

    def _take_batch(self, seg: _Segment, batch, arr: np.ndarray,
                    checkpoints: list[Checkpoint], ordered: bool = True) -> None:
        """Index a validated batch (extents `arr`, decoded `checkpoints`) and learn its
        segment statistics.  Nothing here refuses the batch: check it before writing it."""
        n = len(batch)
        if not n:
            return
        self._index.add(batch, ordered)
        if not seg.sealed:
            seg.extents.append(arr)
        if not seg.records:
            seg.min_seq = int(arr["seq"][0])
            seg.min_time = batch.min_time
        seg.min_time = min(seg.min_time, batch.min_time)
        seg.max_seq = batch.last_seq
        seg.max_time = max(seg.max_time, batch.max_time)
        seg.records += n
        self._checkpoints.extend(checkpoints)

    def _load_segment_index(self, seg: _Segment, last_seq: int, ordered: bool = True) -> bool:
        """Read, check and adopt a sealed segment's .zci; False when it is missing or does
        not match (the caller rescans the segment)."""
        parsed = self._read_segment_index(seg, last_seq)
        return parsed is not None and self._adopt_index(seg, parsed, ordered)

    def _read_segment_index(self, seg: _Segment, last_seq: int) -> _SegmentIndex | None:
        """Read and check a sealed segment's .zci without changing any state (the
        background loader calls it without the lock).  None when it is missing or does
        not match."""
        try:
            data = seg.path.with_suffix(".zci").read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < 64 + INDEX_TIMES.size:
            return None
        (magic, version, hsize, number, jid, seg_len, count, ckpt_bytes, body_crc,
         crc) = INDEX_HEADER.unpack(data[:64])
        if magic != INDEX_MAGIC or _rec.crc32c(data[:60]) != crc or hsize != 64:
            return None
        if version not in (INDEX_V1, INDEX_VERSION) or number != seg.number \
                or jid != self.journal_id:
            return None
        body = memoryview(data)[64:]
        if _rec.crc32c(body) != body_crc or seg_len != seg.size:
            return None
        try:
            if version == INDEX_VERSION:
                return self._parse_index_v2(seg, last_seq, body, count, ckpt_bytes)
            return self._parse_index_v1(seg, last_seq, body, count, ckpt_bytes)
        except (struct.error, CorruptRecordError):
            return None

    def _parse_index_v2(self, seg: _Segment, last_seq: int, body: memoryview, count: int,
                        ckpt_bytes: int) -> _SegmentIndex | None:
        esize = records.EXTENT_DTYPE.itemsize
        if len(body) != INDEX_STATS.size + count * esize + ckpt_bytes:
            return None
        min_time, max_time, min_seq, max_seq, nrecords = INDEX_STATS.unpack_from(body)
        if nrecords and (min_seq <= last_seq or max_seq < min_seq or nrecords < count):
            return None
        checkpoints = []
        blob = body[INDEX_STATS.size + count * esize :]
        at = 0
        while at < len(blob):
            seq, pos, t, stored, zero = INDEX_CKPT.unpack_from(blob, at)
            at += INDEX_CKPT.size
            if zero or not min_seq <= seq <= max_seq or pos >= seg.size \
                    or at + stored > len(blob):
                return None
            checkpoints.append(Checkpoint.from_payload(seq, t, blob[at : at + stored]))
            at += stored
        extents = body[INDEX_STATS.size : INDEX_STATS.size + count * esize]
        return _SegmentIndex(min_time, max_time, min_seq, max_seq, nrecords, extents, True,
                             checkpoints)

    def _parse_index_v1(self, seg: _Segment, last_seq: int, body: memoryview, count: int,
                        ckpt_bytes: int) -> _SegmentIndex | None:
        esize = records.EXTENT_DTYPE.itemsize
        if len(body) != INDEX_TIMES.size + count * esize + ckpt_bytes:
            return None
        min_time, max_time = INDEX_TIMES.unpack_from(body)
        extents = body[INDEX_TIMES.size : INDEX_TIMES.size + count * esize]
        arr = np.frombuffer(extents, dtype=records.EXTENT_DTYPE)
        min_seq = max_seq = 0
        if count:
            seqs = arr["seq"]
            if seqs[0] <= last_seq or np.any(np.diff(seqs.astype(np.int64)) <= 0):
                return None
            if np.any(arr["segment"] != seg.number) or np.any(arr["pos"] >= seg.size):
                return None
            min_seq, max_seq = int(seqs[0]), int(seqs[-1])
        blob = body[INDEX_TIMES.size + count * esize :]
        checkpoints = []
        at = 0
        for rec in arr[arr["type"] == records.REC_CHECKPOINT]:
            stored = int(rec["stored"])
            (t,) = struct.unpack_from("<Q", blob, at)
            if at + 8 + stored > len(blob):
                return None
            checkpoints.append(
                Checkpoint.from_payload(int(rec["seq"]), t, blob[at + 8 : at + 8 + stored]))
            at += 8 + stored
        if at != len(blob):
            return None
        return _SegmentIndex(min_time, max_time, min_seq, max_seq, count, extents, False,
                             checkpoints)

    def _adopt_index(self, seg: _Segment, parsed: _SegmentIndex, ordered: bool) -> bool:
        """Put a checked index file's extents, statistics and checkpoints in place."""
        try:
            if parsed.presorted:
                self._index.add_sorted(parsed.extents, seg.number, seg.size,
                                       self._volume_sizes, ordered)
            else:
                self._index.add_array(parsed.extents, ordered)
        except CorruptRecordError:
            return False
        seg.min_time, seg.max_time = parsed.min_time, parsed.max_time
        seg.min_seq, seg.max_seq, seg.records = parsed.min_seq, parsed.max_seq, parsed.records
        self._checkpoints.extend(parsed.checkpoints)
        return True

    def _seal_index(self, seg: _Segment) -> None:
        """Write the .zci of a segment whose records are all durable.  No fsync: the file
        only spares a rescan, and a torn or missing one is rebuilt by rescanning."""
        arr = (np.concatenate(seg.extents) if seg.extents
               else np.empty(0, dtype=records.EXTENT_DTYPE))
        is_ckpt = arr["type"] == records.REC_CHECKPOINT
        data = arr[~is_ckpt]
        data = data[np.lexsort((data["seq"], data["offset"], data["volume"]))]
        blob = bytearray()
        for rec in arr[is_ckpt]:
            raw = os.pread(seg.fd, 64 + int(rec["stored"]), int(rec["pos"]))
            _rec.verify_payload(raw[:64], raw[64:])
            blob += INDEX_CKPT.pack(int(rec["seq"]), int(rec["pos"]),
                                    records.record_time(raw, 0), int(rec["stored"]), 0)
            blob += raw[64:]
        body = (INDEX_STATS.pack(seg.min_time, seg.max_time, seg.min_seq, seg.max_seq,
                                 seg.records) + data.tobytes() + bytes(blob))
        head = INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 64, seg.number, self.journal_id,
                                 seg.size, len(data), len(blob), _rec.crc32c(body), 0)
        head = head[:60] + struct.pack("<I", _rec.crc32c(head[:60]))
        zci = seg.path.with_suffix(".zci")
        tmp = zci.with_name(zci.name + ".tmp")
        tmp.write_bytes(head + body)
        os.replace(tmp, zci)
        seg.extents = []

    def _new_segment(self, number: int) -> _Segment:
        seg_path = self.path / f"seg-{number:08d}.zcj"
        fd = os.open(seg_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 64, number, self.journal_id,
                                   time.time_ns(), 0)
        head = head[:60] + struct.pack("<I", _rec.crc32c(head[:60]))
        try:
            os.pwrite(fd, head, 0)
            os.fsync(fd)
            fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise
        seg = _Segment(number, seg_path, fd, 64, sealed=False)
        self._segments[number] = seg
        self._index.set_segment_fd(number, fd)
        return seg

    # ---- appending -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"journal {self.path} is closed")
        if self._failed is not None:
            raise DurabilityError(
                f"journal {self.path} stopped after an fsync failure ({self._failed}); "
                "reopen it to recover"
            )

    def append_encoded(self, bundle: bytes | bytearray | memoryview) -> int:
        """Append a bundle of records encoded by the protected site, byte for byte.

        Every record is validated first (checksums, order, volume ranges); a bundle with
        one bad record is refused whole.  Returns the bundle's last seq; it is durable
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
            batch = _rec.scan(bundle, seg.size, seg.number, self.last_seq, self._volume_sizes)
            if batch.status:
                raise status_error(
                    batch.status,
                    f"refusing bundle: record at byte {batch.consumed} of {size} is invalid",
                )
            arr = batch.array()
            checkpoints = self._batch_checkpoints(arr, bundle, seg.size)  # may refuse it
            written = os.pwrite(seg.fd, bundle, seg.size)
            if written != size:
                os.ftruncate(seg.fd, seg.size)
                raise DurabilityError(f"short write to {seg.path}: {written} of {size} bytes")
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

    def commit(self) -> int:
        """Group commit: make every appended record durable; returns the durable seq."""
        with self._lock:
            self._check_usable()
            self._unsynced = 0
            if self.durable_seq == self.last_seq:
                return self.durable_seq
            target = self.last_seq
            try:
                os.fdatasync(self._active.fd)
            except OSError as exc:
                self._failed = exc
                raise DurabilityError(f"fsync of {self._active.path} failed: {exc}") from exc
            self.durable_seq = max(self.durable_seq, target)
            return self.durable_seq

    def _commit_in_background(self) -> None:
        """The automatic group commit: the committer thread fsyncs the active segment
        while appends go on (the fsync of one group overlaps the writes of the next).
        `durable_seq` moves only when that fsync has returned; a failure stops the
        journal like any failed fsync.  Rotation and `commit` sync synchronously."""
        self._unsynced = 0
        # the committer gets its own descriptor: promotion may close the segment's before
        # the fsync runs, and a closed number can be reused by another file
        fd = os.dup(self._active.fd)
        with self._sync_cond:
            if self._sync_target is not None:
                os.close(self._sync_target[1])
            self._sync_target = (self.last_seq, fd)
            if self._committer is None:
                self._committer = threading.Thread(target=self._run_committer,
                                                   name=f"journal-commit-{self.vm}",
                                                   daemon=True)
                self._committer.start()
            self._sync_cond.notify()

    def _run_committer(self) -> None:
        while True:
            with self._sync_cond:
                while self._sync_target is None and not self._closing:
                    self._sync_cond.wait()
                if self._sync_target is None:
                    return
                (seq, fd), self._sync_target = self._sync_target, None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._failed = exc
                log.error("journal %s: background fsync failed: %s", self.path, exc)
                return
            finally:
                os.close(fd)
            with self._lock:
                if not self._closing and seq > self.durable_seq:
                    self.durable_seq = seq

    def _stop_committer(self) -> None:
        with self._sync_cond:
            self._closing = True
            if self._sync_target is not None:
                os.close(self._sync_target[1])
            self._sync_target = None
            self._sync_cond.notify()
        if self._committer is not None:
            self._committer.join()
            self._committer = None

    def _segment_limit(self) -> int:
        limit = self.settings.segment_bytes
        hard = self.hard_limit_bytes
        if hard is not None:
            limit = max(1 << 20, min(limit, hard // 4))
        return limit

    def _rotate(self) -> _Segment:
        """Seal the active segment (fsync, then its index file) and start the next one."""
        self.commit()
        old = self._active
        old.sealed = True
        try:
            self._seal_index(old)
            self._active = self._new_segment(old.number + 1)
        except OSError as exc:  # appending on would go to a segment marked sealed
            raise self._stop(exc, f"sealing segment {old.path}") from exc
        return self._active

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoints(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        tag: str | None = None,
        kind: str | None = None,
        consistent: bool | None = None,
    ) -> list[Checkpoint]:
        """Checkpoints still in the journal, oldest first, filtered by wall-clock range
        (seconds since the epoch, inclusive), tag substring, kind and consistency."""
        if kind not in (None, "auto", "tagged"):
            raise ConfigError(f"unknown checkpoint kind {kind!r}")
        self.wait_loaded()
        with self._lock:
            out = []
            for c in self._checkpoints:
                if start is not None and c.time < start:
                    continue
                if end is not None and c.time > end:
                    continue
                if tag is not None and (c.tag is None or tag not in c.tag):
                    continue
                if kind is not None and c.kind != kind:
                    continue
                if consistent is not None and c.consistent != consistent:
                    continue
                out.append(c)
            return out

    def latest_checkpoint(self, *, consistent: bool = True) -> Checkpoint:
        self.wait_loaded()
        with self._lock:
            for c in reversed(self._checkpoints):
                if c.consistent or not consistent:
                    return c
        raise CheckpointNotFoundError(f"journal {self.path} holds no checkpoint yet")

    def checkpoint_by_id(self, checkpoint_id: int) -> Checkpoint:
        self.wait_loaded()
        with self._lock:
            lo, hi = 0, len(self._checkpoints)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._checkpoints[mid].seq < checkpoint_id:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < len(self._checkpoints) and self._checkpoints[lo].seq == checkpoint_id:
                return self._checkpoints[lo]
        raise CheckpointNotFoundError(
            f"checkpoint {checkpoint_id} is not in journal {self.path} "
            f"(promoted past {self.promoted_seq}, or never taken)"
        )

    # ---- reading -------------------------------------------------------------------------

    def view(self, checkpoint: Checkpoint | int) -> View:
        """A read-only image of every volume as of `checkpoint`; pins it against promotion
        until closed."""
        self.wait_loaded()
        with self._lock:
            self._check_open()
            cid = checkpoint.id if isinstance(checkpoint, Checkpoint) else int(checkpoint)
            ckpt = self.checkpoint_by_id(cid)
            target = max(self.promoted_seq, int(self._meta.get("promote_target", 0)))
            if ckpt.seq < target:
                raise CheckpointNotFoundError(f"checkpoint {cid} is being promoted away")
            self._pins[ckpt.seq] = self._pins.get(ckpt.seq, 0) + 1
            return View(self, ckpt)

    def _unpin(self, seq: int) -> None:
        with self._lock:
            left = self._pins.get(seq, 0) - 1
            if left > 0:
                self._pins[seq] = left
            else:
                self._pins.pop(seq, None)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"journal {self.path} is closed")

    def _volume(self, volume: int | str) -> VolumeSpec:
        spec = self._by_name.get(volume) if isinstance(volume, str) else self.volumes.get(volume)
        if spec is None:
            raise OutOfRangeError(f"journal {self.path} has no volume {volume!r}")
        return spec

    def _read(self, at: int, volume: int | str, offset: int, length: int, out=None):
        spec = self._volume(volume)
        records.check_range(offset, length, spec.size)
        with self._lock:
            self._check_open()
            if out is None:
                return self._index.read(spec.id, offset, length, at, self._load_lz4)
            self._index.read_into(spec.id, offset, out, at, self._load_lz4)
            return out

    def _load_lz4(self, segment: int, pos: int, stored: int, length: int) -> bytes:
        key = (segment, pos)
        data = self._lz4_cache.get(key)
        if data is not None:
            self._lz4_cache.move_to_end(key)
            return data
        seg = self._segments.get(segment)
        if seg is None:
            raise CorruptRecordError(f"record at segment {segment} pos {pos}: segment is gone")
        raw = os.pread(seg.fd, 64 + stored, pos)
        if len(raw) != 64 + stored:
            raise TruncatedRecordError(f"segment {seg.path} ends inside the record at {pos}")
        _rec.verify_payload(raw[:64], memoryview(raw)[64:])
        try:
            data = lz4.block.decompress(memoryview(raw)[64:], uncompressed_size=length)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptRecordError(f"LZ4 record at {seg.path}:{pos} fails to decode") from exc
        if len(data) != length:
            raise CorruptRecordError(f"LZ4 record at {seg.path}:{pos} decodes to a wrong size")
        self._lz4_cache[key] = data
        self._lz4_cache_bytes += length
        while self._lz4_cache_bytes > LZ4_CACHE_BYTES:
            _, old = self._lz4_cache.popitem(last=False)
            self._lz4_cache_bytes -= len(old)
        return data

    # ---- retention and promotion ---------------------------------------------------------

    @property
    def provisioned_bytes(self) -> int:
        return sum(v.size for v in self.volumes.values())

    @property
    def hard_limit_bytes(self) -> int | None:
        s = self.settings
        if s.hard_limit_bytes is not None:
            return s.hard_limit_bytes
        if s.hard_limit_percent is not None:
            return int(self.provisioned_bytes * s.hard_limit_percent / 100)
        return None

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def _min_pin(self) -> int | None:
        return min(self._pins) if self._pins else None

    def _make_room(self, incoming: int) -> None:
        hard = self.hard_limit_bytes
        if hard is None or self.size_bytes + incoming <= hard:
            self._full = False
            return
        if not self._loaded.is_set():  # promotion needs the whole index (and our lock)
            raise JournalFullError(f"journal {self.path} passed its hard limit while its "
                                   "index is still loading; retry shortly")
        self.promote(incoming=incoming)
        if self.size_bytes + incoming > hard:
            self._full = True
            pin = self._min_pin()
            why = f"a view pins checkpoint {pin}" if pin is not None else "nothing to promote"
            raise JournalFullError(
                f"journal {self.path} is full ({self.size_bytes} of {hard} bytes) and cannot "
                f"promote: {why}"
            )
        self._full = False

    def promote(self, *, now: float | None = None, incoming: int = 0) -> int:
        """Promote what retention asks for: writes older than the history, and the oldest
        segments while the journal (plus `incoming` bytes) passes its hard limit.
        Never past a pinned checkpoint.  Returns the new promotion watermark."""
        self.wait_loaded()
        with self._lock:
            self._check_usable()
            now_ns = int((time.time() if now is None else now) * 1e9)
            cutoff = now_ns - int(self.settings.history_seconds * 1e9)
            target = self.promoted_seq
            for c in self._checkpoints:
                if c.time_ns > cutoff:
                    break
                target = max(target, c.seq)
            for seg in self._segments.values():
                if seg.records and seg.max_time <= cutoff and seg is not self._active:
                    target = max(target, seg.max_seq + 1)
            if self._checkpoints:
                # history alone never passes the newest checkpoint: when the stream stops
                # (a disaster at the protected site) it must stay to fail over to
                target = min(target, max(self.promoted_seq, self._checkpoints[-1].seq))
            hard = self.hard_limit_bytes
            if hard is not None:
                size = self.size_bytes + incoming
                for seg in self._segments.values():
                    if size <= hard:
                        break
                    if seg is self._active:
                        # the active segment goes whole: promote it and start afresh
                        target = max(target, self.last_seq + 1)
                        break
                    target = max(target, seg.max_seq + 1)
                    size -= seg.size
            pin = self._min_pin()
            if pin is not None:
                target = min(target, pin)
            return self._promote_to(target)

    def promote_to(self, seq: int) -> int:
        """Promote every write with seq < `seq` (bounded by pins and the last seq)."""
        self.wait_loaded()
        with self._lock:
            self._check_usable()
            pin = self._min_pin()
            if pin is not None and seq > pin:
                raise JournalFullError(f"cannot promote to {seq}: a view pins checkpoint {pin}")
            return self._promote_to(min(seq, self.last_seq + 1))

    def _promote_to(self, target: int) -> int:
        if target <= self.promoted_seq:
            return self.promoted_seq
        self.commit()
        try:
            return self._apply_promotion(target)
        except DurabilityError:
            raise
        except OSError as exc:
            # a replica write or fsync failed: retrying could "succeed" over lost pages,
            # so stop; reopening redoes the promotion from promote_target
            raise self._stop(exc, f"promotion to seq {target}") from exc

    def _stop(self, exc: OSError, doing: str) -> DurabilityError:
        """Enter the failed state after an I/O error that may have lost written data."""
        self._failed = exc
        return DurabilityError(f"{doing} failed ({exc}); journal {self.path} stops until "
                               "it is reopened")

    def _apply_promotion(self, target: int) -> int:
        self._meta["promote_target"] = target
        self._write_meta(self.path, self._meta)
        touched: set[int] = set()
        zeros = b""
        buf = bytearray()  # one buffer for every segment: fresh 64 MiB buffers page-fault
        for seg in list(self._segments.values()):
            if not seg.records or seg.min_seq >= target:
                continue
            if seg.max_seq < self.promoted_seq:
                continue
            if len(buf) < seg.size:
                buf = bytearray(seg.size)
            view = memoryview(buf)[: seg.size]
            if os.preadv(seg.fd, [view], 0) != seg.size:
                raise TruncatedRecordError(f"segment {seg.path} is shorter than recorded")
            batch = _rec.scan(view[64:], 64, seg.number, 0, self._volume_sizes)
            if batch.status:
                raise status_error(batch.status, f"promoting from segment {seg.path}")
            arr = batch.array()
            columns = zip(arr["seq"].tolist(), arr["type"].tolist(), arr["flags"].tolist(),
                          arr["volume"].tolist(), arr["offset"].tolist(),
                          arr["length"].tolist(), arr["pos"].tolist(), arr["stored"].tolist(),
                          strict=True)
            for seq, kind, flags, volume, offset, length, pos, stored in columns:
                if seq >= target:
                    break
                if seq < self.promoted_seq or kind == records.REC_CHECKPOINT:
                    continue
                pos += 64
                if kind == records.REC_ZERO:
                    if len(zeros) < length:
                        zeros = bytes(length)
                    payload = memoryview(zeros)[:length]
                elif flags & records.FLAG_LZ4:
                    try:
                        payload = lz4.block.decompress(view[pos : pos + stored],
                                                       uncompressed_size=length)
                    except lz4.block.LZ4BlockError:
                        payload = b""
                    if len(payload) != length:
                        raise CorruptRecordError(f"LZ4 record seq {seq} in {seg.path} does not "
                                                 f"decode to its {length} bytes")
                else:
                    start = pos + _rec.blockcrc_table_size(length)
                    payload = view[start : start + length]
                if os.pwrite(self._replica_fds[volume], payload, offset) != length:
                    raise OSError(errno.EIO, f"short write to the replica of volume {volume}")
                touched.add(volume)
            del view, batch
        for volume in touched:
            os.fsync(self._replica_fds[volume])
        self.promoted_seq = target
        self._meta["promoted_seq"] = target
        self._write_meta(self.path, self._meta)
        self._index.drop_before(target)
        self._checkpoints = [c for c in self._checkpoints if c.seq >= target]
        self._lz4_cache.clear()
        self._lz4_cache_bytes = 0
        for seg in list(self._segments.values()):
            if seg is self._active or seg.max_seq >= target:
                continue
            self._drop_segment(seg)
        if self._active.records and self._active.max_seq < target:
            # everything journaled is in the replicas: restart with an empty segment
            old = self._active
            self._active = self._new_segment(old.number + 1)
            self._drop_segment(old)
        fsync_dir(self.path)
        return target

    def _drop_segment(self, seg: _Segment) -> None:
        """Delete a fully promoted segment (the caller fsyncs the directory once)."""
        self._index.set_segment_fd(seg.number, -1)
        os.close(seg.fd)
        seg.path.with_suffix(".zci").unlink(missing_ok=True)
        seg.path.unlink()
        del self._segments[seg.number]

    # ---- status and lifetime -------------------------------------------------------------

    def status(self, *, now: float | None = None) -> JournalStatus:
        self.wait_loaded()
        with self._lock:
            now = time.time() if now is None else now
            oldest = self._checkpoints[0] if self._checkpoints else None
            newest = self._checkpoints[-1] if self._checkpoints else None
            configured = self.settings.history_seconds
            held = max(0.0, now - oldest.time) if oldest else 0.0
            # a young journal cannot hold more history than it has lived
            expected = min(configured, max(0.0, now - self.created_ns / 1e9))
            ratio = held / expected if expected > 0 else 1.0
            state = "ok" if ratio >= 0.85 else "warning" if ratio >= 0.75 else "error"
            hard = self.hard_limit_bytes
            warn = int(hard * self.settings.warning_fraction) if hard is not None else None
            size = self.size_bytes
            return JournalStatus(
                size_bytes=size,
                records=sum(s.records for s in self._segments.values()),
                index_bytes=self._index.memory,
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
            )

    @property
    def index_count(self) -> int:
        self.wait_loaded()
        return self._index.count

    @property
    def index_memory(self) -> int:
        self.wait_loaded()
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
        self._closed = True
        for seg in self._segments.values():
            if seg.fd >= 0:
                self._index.set_segment_fd(seg.number, -1)
                os.close(seg.fd)
        for volume, fd in self._replica_fds.items():
            self._index.set_replica_fd(volume, -1)
            os.close(fd)
        self._segments.clear()
        self._replica_fds.clear()
        os.close(self._lock_fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class View:
    """A volume image as of a checkpoint: replica overlaid with the journal, read-only."""

    def __init__(self, journal: Journal, checkpoint: Checkpoint) -> None:
        self.journal = journal
        self.checkpoint = checkpoint
        self._closed = False

    def read(self, volume: int | str, offset: int, length: int) -> bytes:
        """`length` bytes of `volume` at `offset` as they were at the checkpoint."""
        self._check()
        return self.journal._read(self.checkpoint.seq, volume, offset, length)

    def read_into(self, volume: int | str, offset: int, buf) -> None:
        """Fill the writable buffer `buf` from `volume` at `offset`."""
        self._check()
        self.journal._read(self.checkpoint.seq, volume, offset, len(memoryview(buf)), buf)

    def size(self, volume: int | str) -> int:
        return self.journal._volume(volume).size

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("view is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.journal._unpin(self.checkpoint.seq)

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
