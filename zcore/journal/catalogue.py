"""The checkpoint catalogue: the checkpoints still in the journal, oldest first, and the
ways to find them (by time range, tag, kind, consistency, id, newest).

A mixin of Journal; the list itself (`_checkpoints`, sorted by seq once loaded) is kept
by the loader, the append path and promotion."""

from __future__ import annotations

import bisect

from zcore.errors import CheckpointNotFoundError, ConfigError
from zcore.journal.state import JournalState
from zcore.records import Checkpoint, CheckpointKind, check_int


def matches(c: Checkpoint, start: float | None, end: float | None, tag: str | None,
            kind: str | None, consistent: bool | None) -> bool:
    """True when `c` passes every filter given (None: no filter)."""
    if start is not None and c.time < start:
        return False
    if end is not None and c.time > end:
        return False
    if tag is not None and (c.tag is None or tag not in c.tag):
        return False
    if kind is not None and c.kind != kind:
        return False
    return consistent is None or c.consistent == consistent


class CatalogueMixin(JournalState):
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
        if kind is not None and kind not in tuple(CheckpointKind):
            raise ConfigError(f"unknown checkpoint kind {kind!r}")
        self.wait_loaded()
        with self._lock:
            self._check_open()
            return [c for c in self._checkpoints
                    if matches(c, start, end, tag, kind, consistent)]

    def latest_checkpoint(self, *, consistent: bool = True) -> Checkpoint:
        self.wait_loaded()
        with self._lock:
            self._check_open()
            for c in reversed(self._checkpoints):
                if c.consistent or not consistent:
                    return c
        raise CheckpointNotFoundError(f"journal {self.path} holds no checkpoint yet")

    def checkpoint_by_id(self, checkpoint_id: int) -> Checkpoint:
        checkpoint_id = check_int("checkpoint id", checkpoint_id)
        self.wait_loaded()
        with self._lock:
            self._check_open()
            i = bisect.bisect_left(self._checkpoints, checkpoint_id, key=lambda c: c.seq)
            if i < len(self._checkpoints) and self._checkpoints[i].seq == checkpoint_id:
                return self._checkpoints[i]
        raise CheckpointNotFoundError(
            f"checkpoint {checkpoint_id} is not in journal {self.path} "
            f"(promoted past {self.promoted_seq}, or never taken)"
        )
