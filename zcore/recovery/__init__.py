"""Recovery: the overlays recovered volumes run on and the operations over them.

This package is the facade (`from zcore.recovery import ScratchOverlay` keeps working):
    scratch    ScratchOverlay, the throw-away overlay of a failover test
    overlay    DurableOverlay, the crash-safe overlay a live failover runs production on
    failover   the live failover operation: start, commit, rollback
"""

from zcore.recovery.overlay import DurableOverlay, remove_overlay
from zcore.recovery.scratch import DEFAULT_SCRATCH_LIMIT, SECTOR, ScratchOverlay

__all__ = ["DEFAULT_SCRATCH_LIMIT", "SECTOR", "DurableOverlay", "ScratchOverlay",
           "remove_overlay"]
