"""Delta sync: make a target volume byte-identical to a source volume by comparing keyed
block hashes and sending only the blocks that differ (docs/format.md 10c).

Used by reverse protection's initial sync and by the resync after an unclean protected-site
restart; it depends on no site service.  The package is layered bottom-up:

- `hashing`: keyed BLAKE3 entries of 1 MiB / 64 KiB / 4 KiB blocks, zero and hole
  detection, `FileVolume`;
- `messages`: the checked encoding of the delta-sync frames;
- `target`, `source`: the two sides as state machines consuming and producing frames
  (each module's docstring says what its side trusts);
- `transport`: both sides run end to end on an asyncio stream of zcore.wire frames.
"""

from zcore.deltasync.hashing import (
    KEY_SIZE,
    LEVEL_SIZES,
    BlockHasher,
    FileVolume,
    TargetVolume,
    Volume,
)
from zcore.deltasync.messages import MAX_DSYNC_FRAME, BlockSet
from zcore.deltasync.source import DeltaSource
from zcore.deltasync.target import PROGRESS_FORMAT, PROGRESS_VERSION, DeltaTarget
from zcore.deltasync.transport import (
    FrameChannel,
    FrameStream,
    SyncStats,
    run_source,
    run_target,
    source_session,
    target_session,
)

__all__ = [
    "KEY_SIZE",
    "LEVEL_SIZES",
    "MAX_DSYNC_FRAME",
    "PROGRESS_FORMAT",
    "PROGRESS_VERSION",
    "BlockHasher",
    "BlockSet",
    "DeltaSource",
    "DeltaTarget",
    "FileVolume",
    "FrameChannel",
    "FrameStream",
    "SyncStats",
    "TargetVolume",
    "Volume",
    "run_source",
    "run_target",
    "source_session",
    "target_session",
]
