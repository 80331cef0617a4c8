"""The REST API's request and response bodies (pydantic v2): the schema the OpenAPI
document is generated from.

Sits under zcore.site.api.routes.  Every model forbids unknown fields, so a misspelt or
hostile field is a 422, never silently ignored; names, sizes and settings carry their
bounds here, so a request the backend sees is already well-formed.  Times are float
seconds since the epoch (UTC).
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from zcore.records import CheckpointKind
from zcore.site.db.records import Severity, TaskState, VolumeRole, VpgRole, VpgState

T = TypeVar("T")

Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="letters, digits, '.', '_' and '-', starting with a letter or digit",
    ),
]
Tag = Annotated[str, Field(min_length=1, max_length=200)]
SECTOR = 512
MAX_VOLUME_BYTES = 1 << 50


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


class ErrorInfo(Model):
    code: str = Field(description="stable machine-readable code (zcore.site.errors)")
    message: str
    details: Any = None


class ErrorBody(Model):
    """The one shape of every error the API returns."""

    error: ErrorInfo


class Page(Model, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` (or `after`) for the next page; null at the end"
    )


class Health(Model):
    status: Literal["ok"]
    version: str
    api: Literal["v1"] = "v1"


# -- sites and pairing -------------------------------------------------------------------


class Site(Model):
    id: str
    name: str
    created_at: float


class Peer(Model):
    site_id: str
    name: str
    address: str
    fingerprint: str
    paired_at: float


class Sites(Model):
    site: Site
    peers: list[Peer]


class PairingToken(Model):
    token: str = Field(description="give this to the peer's `pair` call; shown once")
    expires_at: float


class PairRequest(Model):
    address: str = Field(min_length=1, max_length=500, description="host:port of the peer")
    token: str = Field(min_length=1, max_length=500, description="the peer's pairing token")


# -- VMs and volumes ---------------------------------------------------------------------


class VolumeSpec(Model):
    """A volume: an image or device at `path` of `size` bytes, or the block node `node` of
    a running QEMU reached at its QMP socket `qmp`, protected in place (its size is
    QEMU's; `nbd`: QEMU's own NBD server socket, if it runs one)."""

    name: Name
    size: int | None = Field(default=None, ge=SECTOR, le=MAX_VOLUME_BYTES, multiple_of=SECTOR,
                             description="bytes; required unless `qmp` is given")
    path: str | None = Field(default=None, max_length=4096)
    role: VolumeRole = VolumeRole.PROTECTED
    qmp: str | None = Field(default=None, min_length=2, max_length=107, pattern=r"^/",
                            description="a running QEMU's QMP socket (absolute path)")
    node: str | None = Field(default=None, min_length=1, max_length=128,
                             description="the QEMU block node (query-named-block-nodes)")
    nbd: str | None = Field(default=None, min_length=2, max_length=107, pattern=r"^/",
                            description="QEMU's NBD server socket, if it already runs one")

    @model_validator(mode="after")
    def _one_kind(self) -> VolumeSpec:
        if self.qmp is None:
            if self.node is not None or self.nbd is not None:
                raise ValueError("`node` and `nbd` go with `qmp` (a running QEMU's disk)")
            if self.size is None:
                raise ValueError("`size` is required (unless `qmp` names a running QEMU)")
        else:
            if self.node is None:
                raise ValueError("`qmp` needs `node`: the block node to protect")
            if self.path is not None:
                raise ValueError("give `path` or `qmp`, not both")
            if self.role != VolumeRole.PROTECTED:
                raise ValueError("a running QEMU's disk can only be a protected volume")
        return self


class Volume(Model):
    vm: str
    name: str
    size: int
    path: str | None
    role: VolumeRole
    created_at: float


class VmCreate(Model):
    name: Name
    volumes: list[VolumeSpec] = Field(default_factory=list, max_length=64)


class Vm(Model):
    name: str
    created_at: float
    volumes: list[Volume]


# -- VPGs --------------------------------------------------------------------------------


class VpgSettings(Model):
    """How a VPG protects its VMs (stored with the VPG; the service applies them)."""

    rpo_alert_seconds: float = Field(default=300.0, gt=0, le=86_400)
    history_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    checkpoint_interval_seconds: float = Field(default=5.0, ge=0.1, le=3600)
    journal_warn_bytes: int | None = Field(default=None, ge=1 << 20)
    journal_hard_limit_bytes: int | None = Field(default=None, ge=1 << 20)
    compression: bool = True
    bandwidth_limit_bytes_per_s: int | None = Field(default=None, ge=1)


class VpgSettingsPatch(Model):
    """Only the settings to change; the result is validated as a whole."""

    rpo_alert_seconds: float | None = Field(default=None, gt=0, le=86_400)
    history_seconds: int | None = Field(default=None, ge=60, le=30 * 86_400)
    checkpoint_interval_seconds: float | None = Field(default=None, ge=0.1, le=3600)
    journal_warn_bytes: int | None = Field(default=None, ge=1 << 20)
    journal_hard_limit_bytes: int | None = Field(default=None, ge=1 << 20)
    compression: bool | None = None
    bandwidth_limit_bytes_per_s: int | None = Field(default=None, ge=1)


class VpgCreate(Model):
    name: Name
    role: VpgRole = VpgRole.PROTECTED
    vms: list[Name] = Field(default_factory=list, max_length=1000)
    peer: str | None = Field(default=None, max_length=64, description="site id of a paired site")
    settings: VpgSettings = Field(default_factory=VpgSettings)
    initial_sync: Literal["full", "delta"] = Field(
        default="full", description="full: copy every volume whole (zero blocks skipped); "
        "delta: the recovery site holds preseeded replicas (a backup restored there as this "
        "VPG's, POST /backups/{backup}/preseed): compare block hashes, send what differs")


class VpgUpdate(Model):
    settings: VpgSettingsPatch


class Vpg(Model):
    name: str
    role: VpgRole
    peer: str | None
    settings: dict[str, Any]
    state: VpgState
    vms: list[str]
    created_at: float
    updated_at: float


class Checkpoint(Model):
    id: int
    seq: int
    time_ns: int
    kind: CheckpointKind
    tag: str | None
    consistent: bool


class CheckpointTag(Model):
    tag: Tag


class CheckpointBucket(Model):
    start: float
    count: int
    tagged: int
    first_id: int | None
    last_id: int | None


class CheckpointBuckets(Model):
    start: float
    end: float
    bucket_seconds: float
    buckets: list[CheckpointBucket]


class HypervisorDisk(Model):
    """A disk protected in its running QEMU, as the VPG's mirror keeper sees it."""

    vm: str
    volume: str
    node: str
    state: Literal["mirroring", "syncing", "tracking"] = Field(
        description="mirroring: every guest write reaches zcore; syncing: mirrored, and "
                    "what QEMU's bitmap marked is being resent; tracking: the mirror is "
                    "down and QEMU's dirty bitmap records the writes")
    error: str | None = Field(default=None, description="why the mirror is down")
    bitmap_generation: int = Field(description="zcore's newest bitmap generation on the node")


class VpgStatus(Model):
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
    operation_state: str | None = Field(
        default=None, description="recovery site: replicating, testing, failed_over, ...")
    scratch_used_bytes: int | None = Field(
        default=None, description="a running failover test's scratch use over its volumes")
    scratch_limit_bytes: int | None = None
    compression: str | None = Field(
        default=None, description="protected site: the link's encoding now (lz4, zstd-3, "
                                  "none), chosen by the adaptive compression")
    compression_bytes_saved: int | None = Field(
        default=None, description="data bytes less the bytes sealed for the link, since start")
    compression_use: dict[str, dict[str, int]] | None = Field(
        default=None, description="per encoding: bundles, data_bytes, encoded_bytes")
    compression_held_seconds: float | None = Field(
        default=None, description="seconds before zstd (or its next level) is tried again "
                                  "after a step up that did not deliver more data")
    compression_held_at: str | None = Field(
        default=None, description="the encoding the link is held at meanwhile (lz4, zstd-3)")
    hypervisor_disks: list[HypervisorDisk] | None = Field(
        default=None, description="protected site: the disks protected in running QEMUs")



# -- activity ----------------------------------------------------------------------------


class TaskErrorOut(Model):
    code: str
    message: str


class Task(Model):
    id: str
    kind: str
    vpg: str | None
    state: TaskState
    progress: float
    message: str
    result: Any
    error: TaskErrorOut | None
    created_at: float
    started_at: float | None
    ended_at: float | None


class Event(Model):
    id: int
    time: float
    vpg: str | None
    severity: Severity
    code: str
    text: str


class Alert(Model):
    id: int
    time: float
    vpg: str | None
    code: str
    severity: Severity
    text: str
    acknowledged: bool
    cleared: bool
    cleared_at: float | None


class MetricHistory(Model):
    series: str
    vpg: str | None
    resolution_seconds: float
    points: list[tuple[float, float]] = Field(description="[time, value] pairs, oldest first")


# -- tokens ------------------------------------------------------------------------------


class Token(Model):
    id: str
    name: str
    created_at: float
    revoked_at: float | None
    last_used_at: float | None


class TokenCreate(Model):
    name: Name


class TokenCreated(Model):
    token: Token
    secret: str = Field(description="the bearer token; shown once, stored only as a SHA-256")
