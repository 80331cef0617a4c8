"""The journal's record of its own files: which segments exist, and removing the ones
promotion has emptied (docs/format.md 7.6, 8.5).

A mixin of Journal, run under the append lock."""

from __future__ import annotations

from zcore.fsutil import fsync_dir
from zcore.journal.state import JournalState


class ManifestMixin(JournalState):
    def _drop_promoted(self) -> bool:
        """Delete every segment whose records are all below the promotion watermark (the
        replicas hold them): what a promotion frees, and what a crash between its
        watermark and its unlinks left behind.  The active segment, if wholly promoted,
        is replaced by a new empty one first.  Needs the whole index loaded (a sealed
        segment's seqs are known only then).  Returns True when a file was deleted."""
        floor = self.promoted_seq
        victims = [s for s in self._segments.values()
                   if s is not self._active and s.max_seq < floor]
        if self._active.records and self._active.max_seq < floor:
            old = self._active
            self._active = self._new_segment(old.number + 1)
            victims.append(old)
        for seg in victims:
            self._drop_segment(seg)
        if victims:
            fsync_dir(self.path)
        return bool(victims)
