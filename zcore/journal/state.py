"""The state every part of a Journal shares, declared once for the mixins that make up
the class (loader, committer, catalogue, read-through, retention; core.Journal sets it
up in its constructor).

Two locks guard it.  The append lock `_lock` (re-entrant) serialises appends, commits,
rotation, promotion, loading and the catalogue.  The index lock `_index_lock` serialises
every call on the native index (not thread-safe) and guards what a read uses: the
descriptors registered in the index, the LZ4 cache, the promotion target and `_closed`.
Order: the append lock before the index lock; reads take the index lock alone."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zcore._native.index import ExtentIndex
from zcore.journal.segments import Segment
from zcore.journal.settings import JournalSettings, ReopenReport, VolumeSpec
from zcore.records import Checkpoint

if TYPE_CHECKING:
    from zcore.journal.damage import Damage
    from zcore.journal.indexfile import SegmentIndex
    from zcore.journal.readthrough import Lz4Cache
    from zcore.journal.replica import ReplicaSums


class JournalState:
    path: Path
    journal_id: bytes
    vm: str
    settings: JournalSettings
    volumes: dict[int, VolumeSpec]
    created_ns: int
    promoted_seq: int
    last_seq: int
    durable_seq: int
    _lock: threading.RLock
    _index_lock: threading.Lock
    _lock_fd: int
    _meta: dict[str, Any]
    _by_name: dict[str, VolumeSpec]
    _volume_sizes: np.ndarray
    _index: ExtentIndex
    _segments: OrderedDict[int, Segment]
    _active: Segment
    _checkpoints: list[Checkpoint]
    _replica_fds: dict[int, int]
    _replica_sums: dict[int, ReplicaSums]
    integrity_notes: list[str]
    _pins: dict[int, int]
    _lz4_cache: Lz4Cache
    _unsynced: int
    _failed: BaseException | None
    _full: bool
    _closed: bool
    _closing: bool
    _report: ReopenReport
    _rescanned: int
    _loaded: threading.Event
    _load_error: BaseException | None
    _loader: threading.Thread | None
    _go: threading.Event
    _sync_cond: threading.Condition
    _sync_target: tuple[int, int, Segment, int] | None
    _mark_lock: threading.Lock
    _damage: tuple[Damage, ...]
    _damage_read: tuple[Damage, ...]
    _notes: list[str]
    _listed: dict[int, tuple[int, int]] | None
    _committer: threading.Thread | None

    if TYPE_CHECKING:  # provided by the other parts of Journal
        def _check_usable(self) -> None: ...
        def _check_open(self) -> None: ...
        def _new_segment(self, number: int) -> Segment: ...
        def _open_segment(self, seg: Segment) -> None: ...
        def _scan_segment(self, seg: Segment, last_seq: int, is_last: bool,
                          ordered: bool = True) -> tuple[int, str] | tuple[()]: ...
        def _read_segment_index(self, seg: Segment, last_seq: int) -> SegmentIndex | None: ...
        def _adopt_index(self, seg: Segment, parsed: SegmentIndex, ordered: bool) -> bool: ...
        def _promote_to(self, target: int) -> int: ...
        def _drop_segment(self, seg: Segment) -> None: ...
        def _drop_promoted(self) -> bool: ...
        def _write_manifest(self) -> None: ...
        def _listed_sealed(self) -> None: ...
        def _add_damage(self, found: list[Damage]) -> None: ...
        def _new_damage(self, found: list[Damage]) -> bool: ...
        def _reconcile(self, manifest: dict[str, Any], sizes: dict[int, int],
                       notes: list[str]) -> int: ...
        def _unpin(self, seq: int) -> None: ...
        def _volume(self, volume: int | str) -> VolumeSpec: ...
        def _load_lz4(self, segment: int, pos: int, stored: int, length: int) -> bytes: ...
        def wait_loaded(self, timeout: float | None = None) -> None: ...
        def commit(self) -> int: ...
        def promote(self, *, now: float | None = None, incoming: int = 0) -> int: ...
        def checkpoint_by_id(self, checkpoint_id: int) -> Checkpoint: ...
