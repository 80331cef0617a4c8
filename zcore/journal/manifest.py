"""`journal.manifest` (docs/format.md 7.7): the journal's durable record of its own
segment files (the active one, and each sealed one's length and last seq) and of the
damage reopening found, so that a missing, extra or truncated segment is reported as
damage, never opened as if it were clean.  Also removing the segments promotion emptied.

A checked state file (zcore.fsutil.write_state/read_state: atomic, CRC'd), rewritten
whole: it changes only when a segment is sealed, promotion deletes segments, or reopen
finds damage, so its cost is one small atomic write per 64 MiB journaled.

Order relative to the files (crash-safe):
- rotation: the old segment is fdatasynced and its .zci written, the new segment created
  (header and directory fsynced), then the manifest names it active; an unnamed newer
  segment holding no record is a rotation's leftover and is deleted at reopen;
- promotion: the watermark (journal.meta), then a new active segment if the old one is
  wholly promoted, then the manifest without the promoted segments, then the unlinks; an
  unnamed segment below the oldest named one is a promotion's leftover, deleted at reopen.

A mixin of Journal, run under the append lock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zcore.errors import CorruptRecordError
from zcore.fsutil import fsync_dir, read_state, write_state
from zcore.journal import segments
from zcore.journal.damage import Damage
from zcore.journal.state import JournalState

MANIFEST_NAME = "journal.manifest"
MANIFEST_FORMAT = "zcore-journal-manifest"
MANIFEST_VERSION = 1


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checked manifest of the journal directory `path`, None when it has none (a v1
    journal); CorruptRecordError when it is damaged or malformed."""
    if not (path / MANIFEST_NAME).exists():
        return None
    doc = read_state(path / MANIFEST_NAME, MANIFEST_FORMAT, (MANIFEST_VERSION,))
    try:
        active = int(doc["active"])
        sealed = [(int(n), int(length), int(last)) for n, length, last in doc["sealed"]]
        damaged = [Damage.from_json(d) for d in doc["damaged"]]
        journal_id = bytes.fromhex(doc["journal_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptRecordError(f"{path / MANIFEST_NAME} is malformed: {exc!r}") from None
    return {"journal_id": journal_id, "active": active, "sealed": sealed,
            "damaged": damaged}


def write_new_manifest(path: Path, journal_id: bytes) -> None:
    """The manifest of a journal being created: no segment yet (active 0)."""
    write_state(path / MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_VERSION,
                {"journal_id": journal_id.hex(), "active": 0, "sealed": [], "damaged": []})


class ManifestMixin(JournalState):
    def _write_manifest(self) -> None:
        """Atomically record the segment set and the known damage (needs `_listed`)."""
        assert self._listed is not None
        meta = {
            "journal_id": self.journal_id.hex(),
            "active": self._active.number,
            "sealed": [[n, length, last] for n, (length, last) in sorted(self._listed.items())],
            "damaged": [d.to_json() for d in self._damage],
        }
        write_state(self.path / MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_VERSION, meta)

    def _listed_sealed(self) -> None:
        """Rotation sealed the previous active segment: name it in the manifest with its
        length and last seq, and the new active segment (a v1 journal not yet upgraded
        writes no manifest: its upgrade records the segments once they are loaded)."""
        if self._listed is None:
            return
        for seg in self._segments.values():
            if seg.sealed and seg.number not in self._listed and seg is not self._active:
                self._listed[seg.number] = (seg.size, seg.max_seq)
        self._write_manifest()

    def _reconcile(self, manifest: dict[str, Any], sizes: dict[int, int],
                   notes: list[str]) -> int:
        """Check the segment files found (`sizes`, changed in place) against the manifest
        before anything is opened: delete what a crash of rotation or promotion left,
        set aside files it does not name, and record what is missing as damage.
        Returns the number of the active segment."""
        if manifest["journal_id"] != self.journal_id:
            raise CorruptRecordError(f"{self.path / MANIFEST_NAME} belongs to another journal")
        listed: dict[int, tuple[int, int]] = {n: (ln, s) for n, ln, s in manifest["sealed"]}
        active = int(manifest["active"])
        self._damage = self._damage_read = tuple(manifest["damaged"])
        floor = self.promoted_seq
        oldest = min(listed) if listed else active
        for n in sorted(sizes):
            if n in listed or n == active:
                continue
            path = segments.segment_path(self.path, n)
            if n < oldest or (n == active + 1 and sizes[n] <= 64):
                # a promotion's (wholly below the watermark) or rotation's (no record yet)
                path.with_suffix(".zci").unlink(missing_ok=True)
                path.unlink()
            else:
                os.replace(path, path.with_name(path.name + ".unlisted"))
                notes.append(f"segment {n} is not in the manifest: set aside as "
                             f"{path.name}.unlisted, its records ignored")
            del sizes[n]
            fsync_dir(self.path)
        prev_last = floor - 1
        for n, (length, last) in sorted(listed.items()):
            if n not in sizes:
                del listed[n]
                if last >= floor:
                    lo = max(prev_last + 1, floor, 1)
                    self._add_damage([Damage(lo, last,
                                             why=f"segment {n} (seqs {lo}..{last}) is missing")])
            elif sizes[n] != length:
                notes.append(f"segment {n} is {sizes[n]} bytes, the manifest says {length}")
            prev_last = max(prev_last, last)
        if active and active not in sizes:
            lo = max(prev_last + 1, floor, 1)
            self._add_damage([Damage(lo, None, why=f"active segment {active} is missing: "
                                     f"its records from seq {lo} on are lost")])
        self._listed = listed
        return active

    def _add_damage(self, found: list[Damage]) -> None:
        if found:
            self._damage = tuple(dict.fromkeys(self._damage + tuple(found)))

    def _new_damage(self, found: list[Damage]) -> bool:
        """Record damage a later pass (promotion) found that reopening had not: True when
        there was any (the caller refuses what it was doing, so no damaged record is
        copied anywhere unrecorded; the next attempt steps over it)."""
        new = [d for d in found if d not in self._damage]
        if not new:
            return False
        self._add_damage(new)
        if self._listed is not None:
            self._write_manifest()
            self._damage_read = self._damage
        return True

    def _drop_promoted(self) -> bool:
        """Delete every segment whose records are all below the promotion watermark (the
        replicas hold them): what a promotion frees, and what a crash between its
        watermark and its unlinks left behind.  The active segment, if wholly promoted,
        is replaced by a new empty one first, and the manifest written before the
        unlinks.  Needs the whole index loaded (a sealed segment's seqs are known only
        then).  Returns True when a file was deleted."""
        floor = self.promoted_seq
        victims = [s for s in self._segments.values()
                   if s is not self._active and s.max_seq < floor]
        if self._active.records and self._active.max_seq < floor:
            old = self._active
            self._active = self._new_segment(old.number + 1)
            victims.append(old)
        if not victims:
            return False
        if self._listed is not None:
            for seg in victims:
                self._listed.pop(seg.number, None)
            self._write_manifest()
        for seg in victims:
            self._drop_segment(seg)
        fsync_dir(self.path)
        return True
