"""Virtual protection groups: the VPG write-order stream on the protected site.

Sits between the protected volumes and the link to the recovery site.  A VPG owns the
capture ring shared by all its volumes (one seq order for the whole group), a stream
thread that seals the ring into bundles (by size or age) and adds automatic checkpoints,
and the dirty bitmaps it falls back to when the buffer overflows or the link is declared
down.  A bitmap sync resends the dirty blocks as sync records; checkpoints taken while
it runs are flagged not crash-consistent, and a consistent one closes it.  A tagged
checkpoint a fold dropped is carried through the sync and journaled after it (flagged
not crash-consistent); `VPG.checkpoint_state` says which tagged checkpoints are durable
in the recovery journals and which are lost.

The public facade of the package:
- `settings`: `VPGSettings`, `VPGMode` and the tuning constants;
- `state`: the state directory (`vpg.json`, bitmap files; docs/format.md 10a);
- `core`: the shared state and the records handed out (`Bundle`, `VPGStatus`, `VM`);
- `promises`: `CheckpointState`, `CheckpointReport`: tagged checkpoints durable or lost;
- `syncs`: bitmap mode, the fold, bitmap and initial syncs;
- `stream`: the stream thread, sealing, checkpoint cadence;
- `group`: `VPG` itself (definition, lifetime, checkpoints, links, status);
- `locallink`: `LocalLink`, a VPG fed into journals in this process (tests, the demo).
"""

from zcore.records import Checkpoint, CheckpointKind
from zcore.vpg.core import VM, Bundle, DeltaSyncReport, ResyncReport, VPGStatus
from zcore.vpg.group import VPG
from zcore.vpg.locallink import LocalLink
from zcore.vpg.promises import CheckpointReport, CheckpointState
from zcore.vpg.settings import (
    CHECKPOINT_WAIT,
    PRIORITIES,
    SEQ_RESERVE,
    SYNC_HEADROOM,
    VPGMode,
    VPGSettings,
)
from zcore.vpg.state import (
    STATE_FORMAT,
    STATE_NAME,
    STATE_VERSION,
    STATE_VERSIONS,
    read_vpg_state,
)

__all__ = [
    "CHECKPOINT_WAIT",
    "PRIORITIES",
    "SEQ_RESERVE",
    "STATE_FORMAT",
    "STATE_NAME",
    "STATE_VERSION",
    "STATE_VERSIONS",
    "SYNC_HEADROOM",
    "VM",
    "VPG",
    "Bundle",
    "Checkpoint",
    "CheckpointKind",
    "CheckpointReport",
    "CheckpointState",
    "DeltaSyncReport",
    "LocalLink",
    "ResyncReport",
    "VPGMode",
    "VPGSettings",
    "VPGStatus",
    "read_vpg_state",
]
