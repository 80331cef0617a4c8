"""The journal's value types and tunables: volumes, settings, status and reopen reports,
public segment information.  Pure data: every other journal module imports from here."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path

from zcore.errors import ConfigError
from zcore.records import SECTOR, Checkpoint

MAX_VOLUMES = 65536  # volume ids are 0..65535 (a u16 in index and wire, u32 in records)

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


def _number(what: str, value: object, *, integer: bool = False,
            optional: bool = False) -> None:
    """ConfigError unless `value` is an int (a finite int or float when not `integer`,
    None when `optional`); a bool is never a number here."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{what} must be {kind}, not {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, not {value!r}")


@dataclass(frozen=True)
class VolumeSpec:
    """A protected volume as the journal knows it: VPG-wide id, name, fixed size."""

    id: int
    name: str
    size: int

    def check(self) -> None:
        """ConfigError unless the id is in 0..65535, the name a non-empty string and the
        size a positive multiple of the sector size."""
        _number("volume id", self.id, integer=True)
        if not 0 <= self.id < MAX_VOLUMES:
            raise ConfigError(f"volume id {self.id} is outside 0..{MAX_VOLUMES - 1}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"volume {self.id} needs a name (a non-empty string), "
                              f"not {self.name!r}")
        _number(f"volume {self.name!r} size", self.size, integer=True)
        if self.size <= 0 or self.size % SECTOR:
            raise ConfigError(f"volume {self.name!r} size {self.size} is not a positive "
                              f"multiple of {SECTOR}")


def check_volumes(specs: Iterable[VolumeSpec]) -> list[VolumeSpec]:
    """The volume list of one journal, checked: at least one, each valid (VolumeSpec.check),
    ids and names unique.  ConfigError otherwise."""
    out = list(specs)
    if not out:
        raise ConfigError("a journal needs at least one volume")
    for v in out:
        v.check()
    if len({v.id for v in out}) != len(out) or len({v.name for v in out}) != len(out):
        raise ConfigError("volume ids and names must be unique")
    return out


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
        """ConfigError unless every field has its type and lies in its range."""
        _number("journal history", self.history_seconds)
        _number("journal hard limit", self.hard_limit_bytes, integer=True, optional=True)
        _number("journal hard limit percent", self.hard_limit_percent, optional=True)
        _number("journal warning threshold", self.warning_fraction)
        _number("segment size", self.segment_bytes, integer=True)
        _number("group commit size", self.group_commit_bytes, integer=True)
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

    @classmethod
    def from_dict(cls, data: object) -> JournalSettings:
        """Settings from their dict form (journal.meta, the wire), checked: ConfigError for
        a non-dict, an unknown field or any value `check` refuses."""
        if not isinstance(data, dict):
            raise ConfigError(f"journal settings must be an object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown journal settings: {', '.join(unknown)}")
        settings = cls(**data)
        settings.check()
        return settings


@dataclass(frozen=True)
class ReopenReport:
    """What reopening found: dropped torn tail, segments rebuilt without an index file."""

    dropped_bytes: int = 0
    dropped_segments: int = 0
    rescanned_segments: int = 0
    resumed_promotion: bool = False
    reason: str = ""
    # damage to committed data (a missing, extra or truncated segment, quarantined
    # records): what was found, the seq ranges affected ((lo, hi), hi None: unknown) and
    # the checkpoints whose image is no longer exact.  dropped_bytes never counts these.
    damage: tuple[str, ...] = ()
    damaged_seqs: tuple[tuple[int, int | None], ...] = ()
    inexact_checkpoints: tuple[int, ...] = ()


class HistoryState(StrEnum):
    """How much of the configured history the journal holds."""

    BUILDING = "building"  # younger than its history: the grace while history builds up
    OK = "ok"  # at least 85 %
    WARNING = "warning"  # at least 75 %
    ERROR = "error"  # less


@dataclass(frozen=True)
class JournalStatus:
    size_bytes: int
    records: int
    index_bytes: int
    oldest_checkpoint: Checkpoint | None
    newest_checkpoint: Checkpoint | None
    history_held_seconds: float
    history_configured_seconds: float
    history_state: HistoryState
    hard_limit_bytes: int | None
    warning_limit_bytes: int | None
    near_limit: bool
    full: bool
    durable_seq: int
    last_seq: int
    promoted_seq: int
    damaged_seqs: tuple[tuple[int, int | None], ...] = ()  # as in ReopenReport
    inexact_checkpoints: tuple[int, ...] = ()


@dataclass(frozen=True)
class SegmentInfo:
    """One segment file as `Journal.segments()` reports it (a snapshot)."""

    number: int
    path: Path
    size: int  # bytes, header included
    sealed: bool
    records: int
    min_seq: int  # 0 when the segment holds no record
    max_seq: int
