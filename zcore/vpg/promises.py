"""Tagged checkpoints as promises: which of a VPG's tagged checkpoints are durable or lost.

Sits beside `VPGCore` (zcore.vpg.core), which holds one `TaggedCheckpoints`.  A tagged
checkpoint the user took is tracked from the moment its marker enters the capture ring
until the recovery site acknowledges the bundle that holds it (durable) or the VPG can
no longer deliver it (lost, with an event).  A fold does not end the promise: the marker
is carried through the bitmap sync and appended again after the sync's last record,
under a new seq and flagged not crash-consistent (docs/format.md 4.7).

"Durable" means the bundle holding the marker was acknowledged while this VPG held it,
never merely that `acked_seq` passed the checkpoint's seq: seqs a fold discarded are
never sent, so later acks pass them too.  Plain data, no locks: the VPG's `_lock`
guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import StrEnum

from zcore.records import Checkpoint

# Settled (durable or lost) checkpoints remembered for `VPG.checkpoint_state`; the
# oldest are forgotten first.  Unsettled ones are always kept.
SETTLED_KEPT = 4096


class CheckpointState(StrEnum):
    """Where a user's tagged checkpoint stands (`VPG.checkpoint_state`)."""

    PENDING = "pending"  # captured, or carried through a fold: not in the journals yet
    DURABLE = "durable"  # the recovery site acknowledged the bundle that holds its marker
    LOST = "lost"  # it will never reach the journals (an event said why)


@dataclass(frozen=True)
class CheckpointReport:
    """What `VPG.checkpoint_state` says about one tagged checkpoint.

    `checkpoint` is the checkpoint as `VPG.checkpoint` returned it.  `journal_seq` is the
    seq its marker has (or will have) in the recovery journals: its own seq, or a later
    one once it was carried through a fold; None while it is carried (not in the stream)
    or once it is lost.  `consistent` is the journaled marker's flag: False once carried,
    since the image at the marker also holds writes made after the checkpoint was taken.
    `reason` says why it is lost or carried ("" otherwise)."""

    checkpoint: Checkpoint
    state: CheckpointState
    journal_seq: int | None
    consistent: bool
    reason: str = ""


class TaggedCheckpoints:
    """The tracked tagged checkpoints of one VPG, by id (see the module docstring)."""

    def __init__(self) -> None:
        self._open: dict[int, CheckpointReport] = {}  # pending, by id
        self._settled: OrderedDict[int, CheckpointReport] = OrderedDict()
        self._by_seq: dict[int, int] = {}  # marker seq in the stream -> checkpoint id
        self._carried: list[int] = []  # ids waiting to be appended after a sync
        self.lost = 0

    def taken(self, ckpt: Checkpoint) -> None:
        """`ckpt`'s marker entered the ring."""
        self._open[ckpt.id] = CheckpointReport(ckpt, CheckpointState.PENDING, ckpt.seq,
                                               ckpt.consistent)
        self._by_seq[ckpt.seq] = ckpt.id

    def report(self, ckpt_id: int) -> CheckpointReport | None:
        return self._open.get(ckpt_id) or self._settled.get(ckpt_id)

    @property
    def pending(self) -> int:
        """Tracked checkpoints neither durable nor lost yet."""
        return len(self._open)

    def carry(self, marker_seq: int, reason: str) -> CheckpointReport | None:
        """The marker at `marker_seq` was dropped by a fold: carry its checkpoint to the
        end of the next sync.  None when no tracked checkpoint has that marker."""
        ckpt_id = self._by_seq.pop(marker_seq, None)
        if ckpt_id is None:
            return None
        report = self._open[ckpt_id] = replace(
            self._open[ckpt_id], journal_seq=None, consistent=False, reason=reason)
        self._carried.append(ckpt_id)
        return report

    def carried(self) -> list[CheckpointReport]:
        """The carried checkpoints, oldest first."""
        return [self._open[i] for i in self._carried]

    def appended(self, ckpt_id: int, marker: Checkpoint) -> None:
        """A carried checkpoint's marker entered the ring again as `marker`."""
        self._carried.remove(ckpt_id)
        self._open[ckpt_id] = replace(self._open[ckpt_id], journal_seq=marker.seq,
                                      consistent=marker.consistent)
        self._by_seq[marker.seq] = ckpt_id

    def acknowledged(self, markers: tuple[Checkpoint, ...]) -> None:
        """The recovery site acknowledged a bundle holding `markers`."""
        for m in markers:
            ckpt_id = self._by_seq.pop(m.seq, None)
            if ckpt_id is not None:
                self._settle(replace(self._open.pop(ckpt_id), state=CheckpointState.DURABLE))

    def lose_all(self, reason: str) -> list[CheckpointReport]:
        """Every unsettled checkpoint is lost (the VPG stopped); returns them."""
        lost = [replace(r, state=CheckpointState.LOST, journal_seq=None, reason=reason)
                for _, r in sorted(self._open.items())]
        self._open.clear()
        self._by_seq.clear()
        self._carried.clear()
        for r in lost:
            self._settle(r)
        self.lost += len(lost)
        return lost

    def _settle(self, report: CheckpointReport) -> None:
        self._settled[report.checkpoint.id] = report
        while len(self._settled) > SETTLED_KEPT:
            self._settled.popitem(last=False)
