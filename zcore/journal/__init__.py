"""The recovery site's per-VM journal: segments, checkpoints, views, promotion.

Sits at the end of the data path.  This package is its public face; the parts:
    settings      value types and tunables (VolumeSpec, JournalSettings, JournalStatus...)
    meta          journal.meta, a checked state file
    manifest      journal.manifest: the segment set and the damage found, checked at reopen
    damage        quarantined records: the scan that steps over them, the read refusal
    segments      segment files, their headers and durable-length marks
    indexfile     segment index files (.zci) v2; indexfile_v1 the legacy v1 reader
    loader        reopening and the background index loader
    committer     group commit and its thread
    catalogue     the checkpoint catalogue and its filters
    readthrough   views, reads as of a seq, the LZ4 cache
    changes       changed extents between two checkpoints (incremental backups)
    retention     retention and promotion
    history       history retention of a group of journals: rounds, targets, events
    replica       replica block sums (replica-NNNN.sum), written by promotion, read checks
    scrub         Journal.scrub: every record, index file and replica block checked
    state, core   the shared state and locks; the Journal class composing the parts

On-disk layout of a journal directory (docs/format.md 7):
    journal.meta               settings, volumes, promotion watermark (checked JSON)
    journal.manifest           segment set, sealed lengths and last seqs, damage (checked JSON)
    seg-NNNNNNNN.zcj           segment: 64-byte header, then records
    seg-NNNNNNNN.zci           index of a sealed segment (extents + checkpoints)
    replica-NNNN.img           one sparse image per volume
    replica-NNNN.sum           its block sums: one CRC32C per 4 KiB block (format 2)
"""

from zcore.journal.core import Journal
from zcore.journal.indexfile import INDEX_MAGIC, INDEX_V1, INDEX_VERSION
from zcore.journal.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from zcore.journal.meta import META_FORMAT, META_NAME, META_VERSION
from zcore.journal.readthrough import HeadView, HeadVolume, View
from zcore.journal.replica import SUM_BLOCK, SUM_MAGIC, SUM_VERSION
from zcore.journal.scrub import Damage, DamageKind, ScrubReport
from zcore.journal.segments import SEGMENT_MAGIC, SEGMENT_VERSION
from zcore.journal.settings import (
    DAY,
    DEFAULT_GROUP_COMMIT_BYTES,
    DEFAULT_SEGMENT_BYTES,
    HOUR,
    LZ4_CACHE_BYTES,
    MAX_BUNDLE,
    MAX_HISTORY,
    MIN_HISTORY,
    HistoryState,
    JournalSettings,
    JournalStatus,
    ReopenReport,
    SegmentInfo,
    VolumeSpec,
)
from zcore.records import Checkpoint

__all__ = [
    "DAY", "DEFAULT_GROUP_COMMIT_BYTES", "DEFAULT_SEGMENT_BYTES", "HOUR", "INDEX_MAGIC",
    "INDEX_V1", "INDEX_VERSION", "LZ4_CACHE_BYTES", "MANIFEST_FORMAT", "MANIFEST_NAME",
    "MANIFEST_VERSION", "MAX_BUNDLE", "MAX_HISTORY",
    "META_FORMAT", "META_NAME", "META_VERSION", "MIN_HISTORY", "SEGMENT_MAGIC",
    "SEGMENT_VERSION", "SUM_BLOCK", "SUM_MAGIC", "SUM_VERSION", "Checkpoint", "Damage",
    "DamageKind", "HeadView", "HeadVolume", "HistoryState", "Journal", "JournalSettings",
    "JournalStatus", "ReopenReport", "ScrubReport", "SegmentInfo", "View", "VolumeSpec",
]
