"""The typed rows the site database returns: frozen dataclasses and the StrEnums of their
states.  Sits between zcore.site.db.repo (which builds them from rows) and every caller
(the REST API, the task runner, the service).  Times are float seconds since the epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class VolumeRole(StrEnum):
    """What a volume is at this site."""

    PROTECTED = "protected"  # a disk of a VM protected from this site
    REPLICA = "replica"  # the recovery-site image of a protected volume
    SCRATCH = "scratch"  # the writable overlay of a test
    RECOVERED = "recovered"  # a volume produced by a recovery operation


class VpgRole(StrEnum):
    """The side of a VPG this site holds (reverse protection swaps the two sites')."""

    PROTECTED = "protected"
    RECOVERY = "recovery"


class VpgState(StrEnum):
    """Where a VPG is in its life."""

    CREATING = "creating"
    SYNCING = "syncing"
    PROTECTING = "protecting"
    PAUSED = "paused"
    ERROR = "error"
    DELETING = "deleting"
    MOVED = "moved"  # its VMs moved to the recovery site (a planned move); not running here


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


@dataclass(frozen=True)
class SiteRecord:
    id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class PeerRecord:
    site_id: str
    name: str
    address: str
    fingerprint: str
    paired_at: float


@dataclass(frozen=True)
class VolumeRecord:
    id: int
    vm: str
    name: str
    size: int
    path: str | None
    role: VolumeRole
    created_at: float


@dataclass(frozen=True)
class VmRecord:
    id: int
    name: str
    created_at: float
    volumes: tuple[VolumeRecord, ...] = ()


@dataclass(frozen=True)
class VpgRecord:
    id: int
    name: str
    role: VpgRole
    peer: str | None
    settings: dict[str, Any]
    state: VpgState
    created_at: float
    updated_at: float
    vms: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskError:
    code: str
    message: str


@dataclass(frozen=True)
class TaskRecord:
    id: str
    kind: str
    vpg: str | None
    state: TaskState
    progress: float
    message: str
    result: Any
    error: TaskError | None
    created_at: float
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True)
class EventRecord:
    id: int
    time: float
    vpg: str | None
    severity: Severity
    code: str
    text: str


@dataclass(frozen=True)
class AlertRecord:
    id: int
    time: float
    vpg: str | None
    code: str
    severity: Severity
    text: str
    acknowledged: bool
    cleared: bool
    cleared_at: float | None


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    created_at: float
    revoked_at: float | None
    last_used_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class NewToken:
    """A token just created: `secret` is shown once and never stored (only its SHA-256)."""

    record: TokenRecord
    secret: str = field(repr=False)
