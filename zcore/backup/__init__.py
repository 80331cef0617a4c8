"""Extended recovery: offsite backups of recovery-site VPGs (issue 13, docs/format.md 10d).

The public face of the package; the parts, in data-path order:
    format    the bytes: sealed objects (LZ4 + AES-256-GCM), names, manifest and index bodies
    crypto    the keys: scrypt or key file -> wrapped master -> sealing and chunk-id keys
    repo      object stores (ObjectStore; DirectoryStore for a local directory or a share)
    store     the repository: config, chunks, manifests, index, the writers' lock
    engine    backups from journal views (full, incremental, full-dedup) and restores
    prune     GFS retention, crash-safe garbage collection, check
    repair    check --repair: heal chunks from the journals, set the rest aside, re-index
    access    instant access: a backup's volume as an NBD export
    files     file-level restore through debugfs (zcore.backup.files)
    s3, schedule, siteops   S3 store; schedules; the site service's tasks
    errors    WrongKeyError, ChunkDamagedError, ChunkMissingError, RetentionLockError
"""

from zcore.backup.crypto import Secret, new_keyfile
from zcore.backup.engine import (
    BackupMode,
    BackupResult,
    BackupStats,
    restore,
    restore_volume,
    run_backup,
)
from zcore.backup.errors import (
    ChunkDamagedError,
    ChunkMissingError,
    RetentionLockError,
    WrongKeyError,
)
from zcore.backup.format import DEFAULT_CHUNK, REPO_VERSION
from zcore.backup.prune import CheckReport, PruneResult, Retention, check, forget, prune
from zcore.backup.repo import DirectoryStore, ObjectStore
from zcore.backup.store import BackupInfo, Repository

__all__ = [
    "DEFAULT_CHUNK", "REPO_VERSION", "BackupInfo", "BackupMode", "BackupResult",
    "BackupStats", "CheckReport", "ChunkDamagedError", "ChunkMissingError", "DirectoryStore",
    "ObjectStore", "PruneResult", "Repository", "Retention", "RetentionLockError", "Secret",
    "WrongKeyError", "check", "forget", "new_keyfile", "prune", "restore", "restore_volume",
    "run_backup",
]
