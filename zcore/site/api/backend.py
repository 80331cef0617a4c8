"""What the REST API needs from the running site: the `SiteBackend` protocol, the query and
result types it speaks, and `SiteContext`, the one object `create_app` receives.

Sits between zcore.site.api.routes (the callers) and the site service (the lead's real
backend over the running site objects) or zcore.site.api.memory (a database-backed double
with in-memory checkpoints and metrics, used by the tests).  Every method is a coroutine
run on the service's event loop: an implementation sends blocking work (database calls,
journal scans, fsyncs) to worker threads.  Errors are zcore.errors / zcore.site.errors
classes; the API turns them into its JSON error shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from zcore import __version__
from zcore.records import Checkpoint, CheckpointKind
from zcore.site.db import (
    AlertRecord,
    EventRecord,
    PeerRecord,
    Severity,
    SiteDB,
    SiteRecord,
    TaskRecord,
    TaskState,
    VmRecord,
    VolumeRecord,
    VpgRecord,
    VpgRole,
    VpgState,
)

DEFAULT_BODY_LIMIT = 1 << 20  # 1 MiB: the largest request body the API reads


@dataclass(frozen=True)
class CheckpointQuery:
    """Which checkpoints of a VPG: time range [start, end) in seconds, tag (exact), kind,
    consistent; `after` is a cursor (a checkpoint id: only those past it in `order`)."""

    start: float | None = None
    end: float | None = None
    tag: str | None = None
    kind: CheckpointKind | None = None
    consistent: bool | None = None
    after: int | None = None
    limit: int = 1000
    newest_first: bool = True


@dataclass(frozen=True)
class CheckpointPage:
    items: list[Checkpoint]
    next_cursor: int | None


@dataclass(frozen=True)
class CheckpointBucket:
    start: float
    count: int
    tagged: int
    first_id: int | None
    last_id: int | None


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    path: str | None = None
    role: str = "protected"


@dataclass(frozen=True)
class VpgSpec:
    name: str
    role: VpgRole
    vms: list[str]
    peer: str | None
    settings: dict[str, Any]
    initial_sync: str = "full"  # or "delta": against replicas preseeded at the recovery site


@dataclass(frozen=True)
class VpgStatus:
    name: str
    role: VpgRole
    state: VpgState
    rpo_seconds: float | None = None
    history_seconds_held: float | None = None
    history_seconds_configured: float | None = None
    journal_bytes: int | None = None
    journal_limit_bytes: int | None = None
    throughput_bytes_per_s: float | None = None
    sync_progress: float | None = None
    sync_eta_seconds: float | None = None
    latest_checkpoint: Checkpoint | None = None
    # recovery site: the recovery operation state (zcore.recovery.states) and the scratch
    # space of a running failover test (summed over its overlays)
    operation_state: str | None = None
    scratch_used_bytes: int | None = None
    scratch_limit_bytes: int | None = None
    # protected site: the link's adaptive compression (zcore.replication.compression): the
    # encoding bundles are sealed with now, the bytes it saved since start, and per
    # encoding {bundles, data_bytes, encoded_bytes}, and how long a step up that did not
    # pay is held
    compression: str | None = None
    compression_bytes_saved: int | None = None
    compression_use: dict[str, dict[str, int]] | None = None
    compression_held_seconds: float | None = None
    compression_held_at: str | None = None
    # protected site: the disks that live in running QEMUs (zcore.site.mirrors), each
    # {vm, volume, node, state: mirroring|syncing|tracking, error, bitmap_generation}
    hypervisor_disks: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class MetricHistory:
    series: str
    vpg: str | None
    resolution_seconds: float
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PairingToken:
    token: str
    expires_at: float


@dataclass(frozen=True)
class EventQuery:
    vpg: str | None = None
    severity: Severity | None = None
    start: float | None = None
    end: float | None = None
    before_id: int | None = None
    limit: int = 100


@runtime_checkable
class SiteBackend(Protocol):
    """The operations of a running site that the REST API exposes."""

    # sites and pairing
    async def site(self) -> SiteRecord: ...
    async def peers(self) -> list[PeerRecord]: ...
    async def issue_pairing_token(self) -> PairingToken: ...
    async def pair(self, address: str, token: str) -> PeerRecord: ...
    async def unpair(self, site_id: str) -> None: ...

    # VMs and volumes
    async def list_vms(self, limit: int, after: str | None) -> list[VmRecord]: ...
    async def get_vm(self, name: str) -> VmRecord: ...
    async def create_vm(self, name: str, volumes: list[VolumeSpec]) -> VmRecord: ...
    async def delete_vm(self, name: str) -> None: ...
    async def list_volumes(self, vm: str | None) -> list[VolumeRecord]: ...
    async def get_volume(self, vm: str, name: str) -> VolumeRecord: ...
    async def create_volume(self, vm: str, spec: VolumeSpec) -> VolumeRecord: ...
    async def delete_volume(self, vm: str, name: str) -> None: ...

    # VPGs: create, sync and delete are long (a task); the others answer at once
    async def list_vpgs(self) -> list[VpgRecord]: ...
    async def get_vpg(self, name: str) -> VpgRecord: ...
    async def create_vpg(self, spec: VpgSpec) -> TaskRecord: ...
    async def update_vpg(self, name: str, settings: dict[str, Any]) -> VpgRecord: ...
    async def pause_vpg(self, name: str) -> VpgRecord: ...
    async def resume_vpg(self, name: str) -> VpgRecord: ...
    async def sync_vpg(self, name: str) -> TaskRecord: ...
    async def delete_vpg(self, name: str) -> TaskRecord: ...
    async def vpg_status(self, name: str) -> VpgStatus: ...

    # checkpoints of a VPG (usable ones: durable in every journal of the VPG)
    async def list_checkpoints(self, vpg: str, query: CheckpointQuery) -> CheckpointPage: ...
    async def checkpoint_buckets(
        self, vpg: str, query: CheckpointQuery, bucket_seconds: float
    ) -> list[CheckpointBucket]: ...
    async def tag_checkpoint(self, vpg: str, tag: str) -> Checkpoint: ...

    # activity
    async def list_events(self, query: EventQuery) -> list[EventRecord]: ...
    async def list_alerts(
        self, vpg: str | None, active: bool | None, limit: int
    ) -> list[AlertRecord]: ...
    async def acknowledge_alert(self, alert_id: int) -> AlertRecord: ...
    async def list_tasks(
        self, state: TaskState | None, vpg: str | None, kind: str | None, limit: int
    ) -> list[TaskRecord]: ...
    async def get_task(self, task_id: str) -> TaskRecord: ...
    async def cancel_task(self, task_id: str) -> TaskRecord: ...
    async def metric_history(
        self,
        series: str,
        vpg: str | None,
        start: float | None,
        end: float | None,
        resolution: float | None,
    ) -> MetricHistory: ...


@dataclass
class SiteContext:
    """What the service hands `create_app`: the database (tokens are checked and managed
    by the API itself), the backend (everything else) and the recovery operations."""

    db: SiteDB
    backend: SiteBackend
    operations: Any = None  # zcore.site.operations.RecoveryOperations (the service's)
    max_body_bytes: int = DEFAULT_BODY_LIMIT
    version: str = __version__
