"""A SiteBackend over a SiteDB with in-memory checkpoints, metrics and pairing: the double
the API tests run against, and a reference for the real backend's behaviour.

Sits beside zcore.site.api.backend (the protocol it implements).  Inventory, VPG
definitions, tasks, events and alerts go to the database through worker threads; long
operations (create, sync, delete a VPG) run in the TaskRunner.  Checkpoints and metric
points are held in memory (`add_checkpoint`, `add_metric_point` feed them) because their
source of truth is the journals the real backend reads.  Pairing records the peer without
contacting it (no network in the double).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from zcore.errors import ConfigError, StateError
from zcore.records import Checkpoint, CheckpointKind
from zcore.site.api.backend import (
    CheckpointBucket,
    CheckpointPage,
    CheckpointQuery,
    EventQuery,
    MetricHistory,
    PairingToken,
    VolumeSpec,
    VpgSpec,
    VpgStatus,
)
from zcore.site.db import (
    AlertRecord,
    EventRecord,
    PeerRecord,
    SiteDB,
    SiteRecord,
    TaskRecord,
    TaskState,
    VmRecord,
    VolumeRecord,
    VolumeRole,
    VpgRecord,
    VpgState,
)
from zcore.site.tasks import Progress, TaskRunner

R = TypeVar("R")
PAIRING_TOKEN_TTL_S = 600.0
METRIC_SERIES = ("rpo_seconds", "throughput_bytes_per_s", "journal_bytes")
MAX_BUCKETS = 10_000


class DbSiteBackend:
    """SiteBackend over `db`; create it on the event loop that serves the API."""

    def __init__(self, db: SiteDB, runner: TaskRunner | None = None) -> None:
        self.db = db
        self.runner = runner or TaskRunner(db)
        self._checkpoints: dict[str, list[Checkpoint]] = {}
        self._metrics: dict[tuple[str, str | None], list[tuple[float, float]]] = {}
        self._pairing_tokens: dict[str, float] = {}
        self._next_seq = 1
        self.step_delay_s = 0.0  # how long each step of a long operation sleeps (tests)

    async def _db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- test feeds ------------------------------------------------------------------------

    def add_checkpoint(
        self, vpg: str, time_ns: int, tag: str | None = None, consistent: bool = True
    ) -> Checkpoint:
        """Record a checkpoint of `vpg` (times must not go backwards)."""
        kind = CheckpointKind.TAGGED if tag is not None else CheckpointKind.AUTO
        seq = self._next_seq
        self._next_seq += 1
        cp = Checkpoint(seq, seq, time_ns, kind, tag, consistent)
        self._checkpoints.setdefault(vpg, []).append(cp)
        return cp

    def add_metric_point(self, series: str, vpg: str | None, t: float, value: float) -> None:
        self._metrics.setdefault((series, vpg), []).append((t, value))

    # -- sites and pairing -----------------------------------------------------------------

    async def site(self) -> SiteRecord:
        return await self._db(self.db.get_site)

    async def peers(self) -> list[PeerRecord]:
        return await self._db(self.db.list_peers)

    async def issue_pairing_token(self) -> PairingToken:
        token = "zp_" + secrets.token_urlsafe(24)
        expires = time.time() + PAIRING_TOKEN_TTL_S
        self._pairing_tokens[token] = expires
        return PairingToken(token, expires)

    async def pair(self, address: str, token: str) -> PeerRecord:
        site_id = hashlib.sha256(address.encode()).hexdigest()[:16]
        fingerprint = hashlib.sha256(token.encode()).hexdigest()
        peer = await self._db(self.db.add_peer, site_id, address, address, fingerprint)
        await self._db(self.db.add_event, "site_paired", f"paired with {address}")
        return peer

    async def unpair(self, site_id: str) -> None:
        await self._db(self.db.remove_peer, site_id)

    # -- VMs and volumes -------------------------------------------------------------------

    async def list_vms(self, limit: int, after: str | None) -> list[VmRecord]:
        return await self._db(self.db.list_vms, limit, after)

    async def get_vm(self, name: str) -> VmRecord:
        return await self._db(self.db.get_vm, name)

    async def create_vm(self, name: str, volumes: list[VolumeSpec]) -> VmRecord:
        specs = [vars(v) for v in volumes]
        return await self._db(self.db.create_vm, name, specs)

    async def delete_vm(self, name: str) -> None:
        await self._db(self.db.delete_vm, name)

    async def list_volumes(self, vm: str | None) -> list[VolumeRecord]:
        return await self._db(self.db.list_volumes, vm)

    async def get_volume(self, vm: str, name: str) -> VolumeRecord:
        return await self._db(self.db.get_volume, vm, name)

    async def create_volume(self, vm: str, spec: VolumeSpec) -> VolumeRecord:
        role = VolumeRole(spec.role)
        return await self._db(self.db.create_volume, vm, spec.name, spec.size, spec.path, role)

    async def delete_volume(self, vm: str, name: str) -> None:
        await self._db(self.db.delete_volume, vm, name)

    # -- VPGs ------------------------------------------------------------------------------

    async def list_vpgs(self) -> list[VpgRecord]:
        return await self._db(self.db.list_vpgs)

    async def get_vpg(self, name: str) -> VpgRecord:
        return await self._db(self.db.get_vpg, name)

    async def _steps(self, progress: Progress, name: str, what: str) -> None:
        for step in range(1, 5):
            await asyncio.sleep(self.step_delay_s)
            await progress(step / 4, f"{what} {name}: step {step} of 4")

    async def create_vpg(self, spec: VpgSpec) -> TaskRecord:
        await self._db(self.db.create_vpg, spec.name, spec.role, spec.vms, spec.peer, spec.settings)

        async def run(progress: Progress) -> dict[str, Any]:
            await self._steps(progress, spec.name, "initial sync of")
            await self._db(self.db.update_vpg, spec.name, state=VpgState.PROTECTING)
            await self._db(
                self.db.add_event, "vpg_created", f"VPG {spec.name} created", vpg=spec.name
            )
            return {"vpg": spec.name}

        return await self.runner.submit("vpg_create", run, vpg=spec.name)

    async def update_vpg(self, name: str, settings: dict[str, Any]) -> VpgRecord:
        return await self._db(self.db.update_vpg, name, settings=settings)

    async def pause_vpg(self, name: str) -> VpgRecord:
        vpg = await self.get_vpg(name)
        if vpg.state not in (VpgState.PROTECTING, VpgState.SYNCING, VpgState.PAUSED):
            raise StateError(f"VPG {name!r} is {vpg.state}: only a protecting VPG pauses")
        return await self._db(self.db.update_vpg, name, state=VpgState.PAUSED)

    async def resume_vpg(self, name: str) -> VpgRecord:
        vpg = await self.get_vpg(name)
        if vpg.state not in (VpgState.PAUSED, VpgState.PROTECTING):
            raise StateError(f"VPG {name!r} is {vpg.state}: only a paused VPG resumes")
        return await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)

    async def sync_vpg(self, name: str) -> TaskRecord:
        vpg = await self.get_vpg(name)
        if vpg.state == VpgState.PAUSED:
            raise StateError(f"VPG {name!r} is paused: resume it before a sync")
        await self._db(self.db.update_vpg, name, state=VpgState.SYNCING)

        async def run(progress: Progress) -> dict[str, Any]:
            await self._steps(progress, name, "sync of")
            await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)
            return {"vpg": name, "bytes": 0}

        return await self.runner.submit("vpg_sync", run, vpg=name)

    async def delete_vpg(self, name: str) -> TaskRecord:
        await self._db(self.db.update_vpg, name, state=VpgState.DELETING)

        async def run(progress: Progress) -> None:
            await self._steps(progress, name, "removal of")
            await self._db(self.db.delete_vpg, name)
            self._checkpoints.pop(name, None)

        return await self.runner.submit("vpg_delete", run, vpg=name)

    async def vpg_status(self, name: str) -> VpgStatus:
        vpg = await self.get_vpg(name)
        cps = self._checkpoints.get(name, [])
        held = (cps[-1].time_ns - cps[0].time_ns) / 1e9 if cps else 0.0
        return VpgStatus(
            name=vpg.name,
            role=vpg.role,
            state=vpg.state,
            history_seconds_held=held,
            history_seconds_configured=vpg.settings.get("history_seconds"),
            journal_limit_bytes=vpg.settings.get("journal_hard_limit_bytes"),
            sync_progress=None if vpg.state != VpgState.SYNCING else 0.0,
            latest_checkpoint=cps[-1] if cps else None,
        )

    # -- checkpoints -----------------------------------------------------------------------

    async def _filtered(self, vpg: str, q: CheckpointQuery) -> list[Checkpoint]:
        await self.get_vpg(vpg)
        cps = self._checkpoints.get(vpg, [])
        times = [c.time_ns for c in cps]
        lo = 0 if q.start is None else bisect.bisect_left(times, int(q.start * 1e9))
        hi = len(cps) if q.end is None else bisect.bisect_left(times, int(q.end * 1e9))
        return [
            c
            for c in cps[lo:hi]
            if (q.tag is None or c.tag == q.tag)
            and (q.kind is None or c.kind == q.kind)
            and (q.consistent is None or c.consistent == q.consistent)
        ]

    async def list_checkpoints(self, vpg: str, query: CheckpointQuery) -> CheckpointPage:
        found = await self._filtered(vpg, query)
        if query.newest_first:
            found.reverse()
        if query.after is not None:
            after = query.after
            found = [c for c in found if (c.id < after if query.newest_first else c.id > after)]
        page = found[: query.limit]
        more = len(found) > query.limit
        return CheckpointPage(page, page[-1].id if more and page else None)

    async def checkpoint_buckets(
        self, vpg: str, query: CheckpointQuery, bucket_seconds: float
    ) -> list[CheckpointBucket]:
        found = await self._filtered(vpg, replace(query, after=None))
        if not found:
            return []
        start = query.start if query.start is not None else found[0].time_ns / 1e9
        end = query.end if query.end is not None else found[-1].time_ns / 1e9 + bucket_seconds
        if (end - start) / bucket_seconds > MAX_BUCKETS:
            raise ConfigError(f"more than {MAX_BUCKETS} buckets: choose a larger bucket_seconds")
        counts: dict[int, list[Checkpoint]] = {}
        for c in found:
            counts.setdefault(int((c.time_ns / 1e9 - start) // bucket_seconds), []).append(c)
        return [
            CheckpointBucket(
                start + i * bucket_seconds,
                len(cs),
                sum(1 for c in cs if c.kind == CheckpointKind.TAGGED),
                cs[0].id,
                cs[-1].id,
            )
            for i, cs in sorted(counts.items())
        ]

    async def tag_checkpoint(self, vpg: str, tag: str) -> Checkpoint:
        record = await self.get_vpg(vpg)
        if record.state in (VpgState.PAUSED, VpgState.DELETING, VpgState.ERROR):
            raise StateError(f"VPG {vpg!r} is {record.state}: no checkpoint can be tagged")
        cp = self.add_checkpoint(vpg, time.time_ns(), tag=tag)
        await self._db(self.db.add_event, "checkpoint_tagged", f"tagged {tag!r}", vpg=vpg)
        return cp

    # -- activity --------------------------------------------------------------------------

    async def list_events(self, query: EventQuery) -> list[EventRecord]:
        return await self._db(
            self.db.list_events,
            vpg=query.vpg,
            severity=query.severity,
            start=query.start,
            end=query.end,
            before_id=query.before_id,
            limit=query.limit,
        )

    async def list_alerts(
        self, vpg: str | None, active: bool | None, limit: int
    ) -> list[AlertRecord]:
        return await self._db(self.db.list_alerts, vpg=vpg, active=active, limit=limit)

    async def acknowledge_alert(self, alert_id: int) -> AlertRecord:
        return await self._db(self.db.acknowledge_alert, alert_id)

    async def list_tasks(
        self, state: TaskState | None, vpg: str | None, kind: str | None, limit: int
    ) -> list[TaskRecord]:
        return await self._db(self.db.list_tasks, state=state, vpg=vpg, kind=kind, limit=limit)

    async def get_task(self, task_id: str) -> TaskRecord:
        return await self._db(self.db.get_task, task_id)

    async def cancel_task(self, task_id: str) -> TaskRecord:
        await self.get_task(task_id)
        return await self.runner.cancel(task_id)

    async def metric_history(
        self,
        series: str,
        vpg: str | None,
        start: float | None,
        end: float | None,
        resolution: float | None,
    ) -> MetricHistory:
        if series not in METRIC_SERIES:
            raise ConfigError(f"unknown series {series!r}; known: {', '.join(METRIC_SERIES)}")
        if vpg is not None:
            await self.get_vpg(vpg)
        points = [
            p
            for p in self._metrics.get((series, vpg), [])
            if (start is None or p[0] >= start) and (end is None or p[0] < end)
        ]
        step = resolution or 5.0
        if resolution:
            merged: dict[int, list[float]] = {}
            for t, v in points:
                merged.setdefault(int(t // step), []).append(v)
            points = [(k * step, sum(vs) / len(vs)) for k, vs in sorted(merged.items())]
        return MetricHistory(series, vpg, step, points)
