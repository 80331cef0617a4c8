"""The site database: schema (schema.py), migrations (migrations/), connections
(engine.py) and the typed repository `SiteDB` (repo.py) whose every method blocks.

Public facade: import from `zcore.site.db`.
"""

from zcore.site.db.engine import (
    create_site_engine,
    current_revision,
    downgrade,
    head_revision,
    migrate,
)
from zcore.site.db.records import (
    AlertRecord,
    EventRecord,
    NewToken,
    PeerRecord,
    Severity,
    SiteRecord,
    TaskError,
    TaskRecord,
    TaskState,
    TokenRecord,
    VmRecord,
    VolumeRecord,
    VolumeRole,
    VpgRecord,
    VpgRole,
    VpgState,
)
from zcore.site.db.repo import SiteDB, hash_token

__all__ = [
    "AlertRecord",
    "EventRecord",
    "NewToken",
    "PeerRecord",
    "Severity",
    "SiteDB",
    "SiteRecord",
    "TaskError",
    "TaskRecord",
    "TaskState",
    "TokenRecord",
    "VmRecord",
    "VolumeRecord",
    "VolumeRole",
    "VpgRecord",
    "VpgRole",
    "VpgState",
    "create_site_engine",
    "current_revision",
    "downgrade",
    "hash_token",
    "head_revision",
    "migrate",
]
