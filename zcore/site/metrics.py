"""Metric history: the figures a person watches, per VPG, for charts (issue 10).

Sits beside the site service's scheduler and API: the scheduler samples each VPG every few
seconds (RPO, throughput in and out, journal bytes, history held) and `record`s the
values; the API's metric-history endpoint (and the browser UI's charts) `query` them.

Each VPG keeps one ring per tier; a tier is a bucket width and a number of buckets:

    5 s  x   720  = the last hour
    1 min x 1440  = the last day
    10 min x 4320 = the last 30 days

Every sample updates its bucket in every tier (count, sum, min, max), so a coarse bucket's
average is the mean of the raw samples that fell in it, not a mean of means, and its min
and max are the raw extremes.  `query` picks the finest tier whose window still reaches
back to the start of the range (or the tier matching a requested resolution).

Memory, bounded and fixed per VPG: each bucket slot holds its bucket number (int32) and,
per series, a count (uint32), a sum (float64), a min and a max (float32, charts need no
more precision): 4 + 20 * series bytes.  With the default tiers (6,480 slots) and the five
default series that is 6,480 * 104 B = 674 KB per VPG, allocated at the VPG's first sample
and never grown; `forget` releases it.

Persistence: `save` writes one snapshot of every ring (the filled slots only, LZ4 and
base64 inside a checked state file, zcore.fsutil.write_state) and `MetricHistory.open`
loads it; `maybe_save` saves at most every `save_interval` seconds and the service calls
it from a worker thread (a snapshot of many VPGs is a few MB of I/O); `close` saves.
A damaged snapshot is set aside (renamed *.damaged), reported in `load_error` and the
log, and the history starts fresh: charts lose their past, the site keeps running.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import numpy.typing as npt

from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError
from zcore.fsutil import read_state, write_state

log = logging.getLogger(__name__)

STATE_FORMAT = "zcore-metric-history"
STATE_VERSION = 1
# A snapshot at most this often (seconds) through maybe_save: a minute of chart lost at a
# crash, against a few MB written per minute on a large site.
DEFAULT_SAVE_INTERVAL = 60.0
# Bounds on what a snapshot may declare before anything is allocated from it.
MAX_SLOTS = 1 << 20
MAX_SERIES = 64


class Series(StrEnum):
    """The figures a person watches for a VPG."""

    RPO = "rpo_seconds"
    THROUGHPUT_IN = "throughput_in_bytes"  # bytes per second into the VPG's journals
    THROUGHPUT_OUT = "throughput_out_bytes"  # bytes per second sent (protected side)
    JOURNAL_BYTES = "journal_bytes"
    HISTORY_SECONDS = "history_seconds"


@dataclass(frozen=True)
class Tier:
    """`slots` buckets of `width` seconds: a window of width * slots seconds."""

    width: float
    slots: int

    @property
    def span(self) -> float:
        return self.width * self.slots


DEFAULT_TIERS = (Tier(5.0, 720), Tier(60.0, 1440), Tier(600.0, 4320))
DEFAULT_SERIES = tuple(Series)


@dataclass(frozen=True)
class MetricSeries:
    """One series of one VPG over a range: a row per non-empty bucket, oldest first."""

    vpg: str
    series: str
    resolution: float  # bucket width, seconds
    times: list[float]  # bucket starts, seconds since the epoch
    min: list[float]
    avg: list[float]
    max: list[float]
    count: list[int]


_COLUMNS = (("count", np.uint32), ("sum", np.float64), ("min", np.float32),
            ("max", np.float32))


class _Ring:
    """One tier of one VPG: slot = bucket % slots; a slot is valid for the bucket it
    names, and only while that bucket is inside the window ending at `newest`."""

    def __init__(self, tier: Tier, nseries: int) -> None:
        self.tier = tier
        self.newest = -1
        self.bucket: npt.NDArray[np.int32] = np.full(tier.slots, -1, np.int32)
        self.count: npt.NDArray[np.uint32] = np.zeros((tier.slots, nseries), np.uint32)
        self.sum: npt.NDArray[np.float64] = np.zeros((tier.slots, nseries), np.float64)
        self.min: npt.NDArray[np.float32] = np.zeros((tier.slots, nseries), np.float32)
        self.max: npt.NDArray[np.float32] = np.zeros((tier.slots, nseries), np.float32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bucket, self.count, self.sum, self.min, self.max))

    def add(self, b: int, col: int, value: float) -> None:
        slots = self.tier.slots
        if b <= self.newest - slots:
            return  # older than this tier's window
        slot = b % slots
        if self.bucket[slot] != b:
            self.bucket[slot] = b
            self.count[slot] = 0
            self.sum[slot] = 0.0
        n = int(self.count[slot, col])
        if n == 0:
            self.min[slot, col] = self.max[slot, col] = value
        else:
            if value < self.min[slot, col]:
                self.min[slot, col] = value
            if value > self.max[slot, col]:
                self.max[slot, col] = value
        self.count[slot, col] = n + 1
        self.sum[slot, col] += value
        self.newest = max(self.newest, b)

    def first_held(self) -> int:
        """The oldest bucket number the window can hold."""
        return self.newest - self.tier.slots + 1

    def valid_slots(self) -> npt.NDArray[np.intp]:
        b = self.bucket.astype(np.int64)
        return np.flatnonzero((b >= 0) & (b > self.newest - self.tier.slots))


def _pack(a: npt.NDArray[Any]) -> str:
    return base64.b64encode(lz4.block.compress(a.tobytes(), store_size=False)).decode()


def _unpack(text: Any, dtype: Any, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    if not isinstance(text, str):
        raise CorruptRecordError("a metric-history column is not a string")
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        raw = lz4.block.decompress(base64.b64decode(text, validate=True),
                                   uncompressed_size=size)
    except (ValueError, lz4.block.LZ4BlockError) as exc:
        raise CorruptRecordError(f"a metric-history column does not decode: {exc}") from None
    if len(raw) != size:
        raise CorruptRecordError("a metric-history column has the wrong length")
    return np.frombuffer(raw, dtype).reshape(shape).copy()


class MetricHistory:
    """Time series per VPG at a few resolutions (see the module docstring); thread-safe.

    `path` is the snapshot file (None: in memory only)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 tiers: tuple[Tier, ...] = DEFAULT_TIERS,
                 series: tuple[str, ...] = DEFAULT_SERIES,
                 save_interval: float = DEFAULT_SAVE_INTERVAL) -> None:
        if not tiers or any(t.width <= 0 or not 0 < t.slots <= MAX_SLOTS for t in tiers):
            raise ConfigError("metric tiers need positive widths and 1.. slots each")
        if list(tiers) != sorted(tiers, key=lambda t: t.width):
            raise ConfigError("metric tiers must go from the finest to the coarsest")
        if not series or len(set(series)) != len(series) or len(series) > MAX_SERIES:
            raise ConfigError(f"metric series must be 1 to {MAX_SERIES} distinct names")
        self.path = None if path is None else Path(path)
        self.tiers = tuple(tiers)
        self.series = tuple(str(s) for s in series)
        self._col = {s: i for i, s in enumerate(self.series)}
        self.save_interval = save_interval
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one writer of the state file at a time
        self._vpgs: dict[str, list[_Ring]] = {}
        self._dirty = False
        self._last_save = time.monotonic()

    @property
    def bytes_per_vpg(self) -> int:
        """Memory one VPG's rings take (fixed at its first sample)."""
        per_slot = 4 + len(self.series) * sum(np.dtype(d).itemsize for _, d in _COLUMNS)
        return sum(t.slots for t in self.tiers) * per_slot

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for rings in self._vpgs.values() for r in rings)

    @property
    def vpgs(self) -> list[str]:
        with self._lock:
            return sorted(self._vpgs)

    # ---- recording and querying --------------------------------------------------------

    def _column(self, series: str) -> int:
        try:
            return self._col[str(series)]
        except KeyError:
            raise ConfigError(f"unknown metric series {series!r} (known: "
                              f"{', '.join(self.series)})") from None

    def record(self, vpg: str, series: str, value: float, now: float | None = None) -> None:
        """One sample of `series` for `vpg` at time `now` (seconds since the epoch)."""
        col = self._column(series)
        value = float(value)
        if not math.isfinite(value):
            return  # a chart has no point for an unknown figure
        now = time.time() if now is None else now
        if now < 0:
            raise ConfigError(f"metric sample time {now} is before the epoch")
        with self._lock:
            rings = self._vpgs.get(vpg)
            if rings is None:
                rings = self._vpgs[vpg] = [_Ring(t, len(self.series)) for t in self.tiers]
            for ring in rings:
                ring.add(int(now // ring.tier.width), col, value)
            self._dirty = True

    def forget(self, vpg: str) -> None:
        """Drop a VPG's history (the VPG was deleted)."""
        with self._lock:
            if self._vpgs.pop(vpg, None) is not None:
                self._dirty = True

    def _pick(self, rings: list[_Ring], start: float, resolution: float | None) -> _Ring:
        if resolution is not None:
            for ring in rings:
                if ring.tier.width >= resolution:
                    return ring
            return rings[-1]
        for ring in rings:  # the bucket holding `start` itself may have aged out of the
            # window: a range of exactly a tier's span (the UI's last hour) keeps its tier
            if ring.newest >= 0 and ring.first_held() <= math.floor(start / ring.tier.width) + 1:
                return ring
        return rings[-1]

    def query(self, vpg: str, series: str, start: float, end: float,
              resolution: float | None = None) -> MetricSeries:
        """Buckets of `series` for `vpg` that overlap [start, end], from the finest
        tier that reaches back to `start` (or the finest at least `resolution` wide)."""
        col = self._column(series)
        if not end >= start:
            raise ConfigError(f"metric range ends ({end}) before it starts ({start})")
        with self._lock:
            rings = self._vpgs.get(vpg)
            if rings is None:
                width = self.tiers[0].width if resolution is None else resolution
                return MetricSeries(vpg, str(series), width, [], [], [], [], [])
            ring = self._pick(rings, start, resolution)
            w, slots = ring.tier.width, ring.tier.slots
            b0 = max(math.floor(start / w), ring.first_held(), 0)
            b1 = min(math.floor(end / w), ring.newest)
            if b1 < b0:
                return MetricSeries(vpg, str(series), w, [], [], [], [], [])
            wanted = np.arange(b0, b1 + 1, dtype=np.int64)
            idx = wanted % slots
            count = ring.count[idx, col]
            ok = (ring.bucket[idx].astype(np.int64) == wanted) & (count > 0)
            idx, wanted, count = idx[ok], wanted[ok], count[ok]
            avg = ring.sum[idx, col] / count
            return MetricSeries(
                vpg, str(series), w, (wanted * w).astype(np.float64).tolist(),
                ring.min[idx, col].astype(np.float64).tolist(), avg.tolist(),
                ring.max[idx, col].astype(np.float64).tolist(), count.tolist())

    # ---- persistence ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every ring's filled slots, as the state file's meta."""
        with self._lock:
            vpgs: dict[str, Any] = {}
            for name, rings in self._vpgs.items():
                tiers = []
                for ring in rings:
                    s = ring.valid_slots()
                    tiers.append({"newest": ring.newest, "slots": len(s),
                                  "index": _pack(s.astype(np.int32)),
                                  "bucket": _pack(ring.bucket[s]),
                                  **{c: _pack(getattr(ring, c)[s]) for c, _ in _COLUMNS}})
                vpgs[name] = tiers
            self._dirty = False
        return {"tiers": [[t.width, t.slots] for t in self.tiers],
                "series": list(self.series), "vpgs": vpgs}

    def save(self) -> None:
        """Write the snapshot now (atomic replacement of the state file)."""
        if self.path is None:
            return
        with self._save_lock:
            meta = self.snapshot()
            write_state(self.path, STATE_FORMAT, STATE_VERSION, meta)
            self._last_save = time.monotonic()

    def maybe_save(self) -> bool:
        """Save when something changed and `save_interval` has passed since the last save;
        True when it saved."""
        if self.path is None or not self._dirty:
            return False
        if time.monotonic() - self._last_save < self.save_interval:
            return False
        self.save()
        return True

    def close(self) -> None:
        """Save a last snapshot (the service's stop)."""
        if self._dirty:
            self.save()

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> MetricHistory:
        """A history from its snapshot; a damaged one raises CorruptRecordError (another
        format version FormatVersionError), a missing one FileNotFoundError."""
        history = cls(path, **kwargs)
        meta = read_state(path, STATE_FORMAT, STATE_VERSION)
        history._restore(meta)
        return history

    @classmethod
    def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> MetricHistory:
        """The history of a starting service: loaded from `path` when it exists; a damaged
        snapshot is renamed *.damaged, reported (`load_error`, the log), and the history
        starts fresh."""
        path = Path(path)
        try:
            return cls.load(path, **kwargs)
        except FileNotFoundError:
            return cls(path, **kwargs)
        except (CorruptRecordError, FormatVersionError) as exc:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.error("metric history %s is damaged (%s): set aside as %s; charts start "
                      "afresh", path, exc, aside)
            history = cls(path, **kwargs)
            history.load_error = f"{exc} (set aside as {aside})"
            return history

    def _restore(self, meta: dict[str, Any]) -> None:
        if meta.get("tiers") != [[t.width, t.slots] for t in self.tiers] or \
                meta.get("series") != list(self.series):
            log.warning("metric history %s was kept with other tiers or series: starting "
                        "afresh", self.path)
            return
        vpgs = meta.get("vpgs")
        if not isinstance(vpgs, dict):
            raise CorruptRecordError(f"{self.path}: no VPG table")
        restored = {}
        for name, tiers in vpgs.items():
            if not isinstance(tiers, list) or len(tiers) != len(self.tiers):
                raise CorruptRecordError(f"{self.path}: VPG {name!r} has no ring per tier")
            restored[name] = [self._restore_ring(t, doc) for t, doc in
                              zip(self.tiers, tiers, strict=True)]
        with self._lock:
            self._vpgs = restored

    def _restore_ring(self, tier: Tier, doc: Any) -> _Ring:
        ring = _Ring(tier, len(self.series))
        try:
            n, newest = int(doc["slots"]), int(doc["newest"])
            if not 0 <= n <= tier.slots:
                raise ValueError(f"{n} slots in a tier of {tier.slots}")
            idx = _unpack(doc["index"], np.int32, (n,)).astype(np.int64)
            if n and (idx.min() < 0 or idx.max() >= tier.slots):
                raise ValueError("slot index outside the tier")
            bucket = _unpack(doc["bucket"], np.int32, (n,))
            if n and ((bucket < 0).any() or (bucket.astype(np.int64) % tier.slots != idx).any()):
                raise ValueError("a bucket sits in another bucket's slot")
            ring.bucket[idx] = bucket
            for c, dtype in _COLUMNS:
                getattr(ring, c)[idx] = _unpack(doc[c], dtype, (n, len(self.series)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecordError(f"{self.path}: a metric ring is malformed: {exc}") \
                from None
        ring.newest = newest
        return ring
