"""Recovery: scratch overlays and the recovery operations built on them (issue 11).

The public facade: import from `zcore.recovery`.  Modules, bottom up:
- `scratch`: ScratchOverlay (a writable overlay on a view, discarded on close) and
  ScratchBudget (one scratch limit shared by several overlays);
- `states`: the VPG's operation states at the recovery site and THE table of which
  operation each state allows (every operation adds its rows there);
- `choice`: CheckpointChoice, the checkpoint an operation recovers to (latest, latest
  tagged, latest consistent, by id, by tag, the last before a time);
- `test_op`: the failover test (overlays at a checkpoint, exports, the verdict record);
- `overlay`: DurableOverlay, the crash-safe overlay a live failover runs production on;
- `failover`: the live failover operation: start, commit, rollback (its own state table
  for now, beside `states`).

The site service runs these as tasks (zcore.site.operations, zcore.site.failover_ops),
starting and stopping VMs through the hypervisor adapters (zcore.adapters);
move, reverse protection and failback add their modules beside these.
"""

from __future__ import annotations

from zcore.recovery.choice import CheckpointChoice, ChoiceKind, parse_time
from zcore.recovery.overlay import DurableOverlay, remove_overlay
from zcore.recovery.scratch import DEFAULT_SCRATCH_LIMIT, SECTOR, ScratchBudget, ScratchOverlay
from zcore.recovery.states import (
    Operation,
    OperationState,
    OperationStates,
    Transition,
    allowed,
    refusal,
)
from zcore.recovery.test_op import (
    DEFAULT_TEST_SCRATCH_BYTES,
    FailoverTest,
    TestRecord,
    TestResult,
    failover_test_export,
    tested_label,
)

__all__ = [
    "DEFAULT_SCRATCH_LIMIT",
    "DEFAULT_TEST_SCRATCH_BYTES",
    "SECTOR",
    "CheckpointChoice",
    "ChoiceKind",
    "DurableOverlay",
    "FailoverTest",
    "Operation",
    "OperationState",
    "OperationStates",
    "ScratchBudget",
    "ScratchOverlay",
    "TestRecord",
    "TestResult",
    "Transition",
    "allowed",
    "failover_test_export",
    "parse_time",
    "refusal",
    "remove_overlay",
    "tested_label",
]
