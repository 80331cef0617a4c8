"""The real SiteBackend: the REST API's operations on the running site (zcore.site.runtime),
with definitions, tasks, events and alerts in the database.

Sits between zcore.site.api (which calls it) and zcore.site.runtime (the live objects).
It extends the database-backed double (zcore.site.api.memory.DbSiteBackend), whose
inventory, task and activity methods are already the real ones, and replaces everything
that touches data: pairing, the VPG lifecycle, status, checkpoints and metric history.

Roles.  A VPG created here is `protected` (its VMs' volumes are backing files at this
site); its recovery site learns of it when it attaches and records it as `recovery`.
Checkpoints are listed and bucketed from the recovery site's journals (RecoveryVPG); a
tagged checkpoint is taken at the protected site (the VPG's stream marks it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

from zcore.backup.siteops import BackupOps
from zcore.errors import ConfigError, StateError, ZcoreError
from zcore.records import Checkpoint
from zcore.recovery.states import OperationStates
from zcore.security import Peer
from zcore.site.api.backend import (
    CheckpointBucket,
    CheckpointPage,
    CheckpointQuery,
    MetricHistory,
    PairingToken,
    VpgSpec,
    VpgStatus,
)
from zcore.site.api.memory import DbSiteBackend
from zcore.site.db import (
    PeerRecord,
    Severity,
    SiteDB,
    TaskRecord,
    VpgRecord,
    VpgRole,
    VpgState,
)
from zcore.site.errors import AlreadyExistsError
from zcore.site.failover_ops import FailoverOps
from zcore.site.metrics import Series
from zcore.site.operations import export_uri
from zcore.site.reverse_ops import ReverseOps
from zcore.site.runtime import SiteRuntime, vpg_settings
from zcore.site.tasks import Progress, TaskRunner
from zcore.vpg import VPGMode

log = logging.getLogger(__name__)

PAIRING_TTL_S = 3600.0
# How often a running task looks at its VPG (seconds).
TASK_POLL_S = 0.2
# Series names the API accepts (the metric history's, plus the memory double's aliases).
SERIES_ALIASES = {"throughput_bytes_per_s": Series.THROUGHPUT_OUT}
DEFAULT_HISTORY_WINDOW_S = 3600.0


class LiveSiteBackend(DbSiteBackend):
    """SiteBackend over a running site; create it on the service's event loop."""

    def __init__(self, db: SiteDB, runtime: SiteRuntime,
                 runner: TaskRunner | None = None) -> None:
        super().__init__(db, runner)
        self.rt = runtime
        self.operations: Any = None  # zcore.site.operations.RecoveryOperations
        runtime.attached = self._attached
        self.states = OperationStates()  # the one operation table of this site's VPGs
        self.failovers = FailoverOps(db, runtime, self.runner, self.states)
        self.reverse = ReverseOps(self, self.failovers)
        self.backups = BackupOps(  # issue 13
            runtime.recovery_vpg, self.runner, nbd=runtime.nbd,
            uri=lambda export: export_uri(runtime, export),
            recovery_site=lambda: runtime.recovery)

    # -- sites and pairing -----------------------------------------------------------------

    async def sync_peers(self) -> None:
        """Record in the database every pinned peer it lacks (a site that paired with us
        is pinned by the replication layer; its address is learnt when we pair back)."""
        known = {p.site_id for p in await self._db(self.db.list_peers)}
        for peer in await asyncio.to_thread(self.rt.pinned_peers):
            if peer.site_id not in known:
                try:
                    await self._db(self.db.add_peer, peer.site_id, peer.name, "",
                                   peer.fingerprint)
                except AlreadyExistsError:
                    pass

    async def peers(self) -> list[PeerRecord]:
        await self.sync_peers()
        return await self._db(self.db.list_peers)

    async def issue_pairing_token(self) -> PairingToken:
        token = await asyncio.to_thread(self.rt.issue_pairing_token, PAIRING_TTL_S)
        return PairingToken(token, time.time() + PAIRING_TTL_S)

    async def pair(self, address: str, token: str) -> PeerRecord:
        try:
            peer = await self.rt.pair(address, token)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the peer's replication listener at {address}: "
                              f"{exc}") from None
        await self.sync_peers()
        record = await self._db(self.db.set_peer_address, peer.site_id, address)
        await self._db(self.db.add_event, "site_paired",
                       f"paired with site {peer.name} ({peer.site_id}) at {address}")
        return record

    async def unpair(self, site_id: str) -> None:
        await self._db(self.db.get_peer, site_id)
        raise StateError(f"site {site_id} stays paired: the replication layer has no way to "
                         f"unpin a peer's certificate yet (zcore.security.PeerStore)")

    # -- VPGs ------------------------------------------------------------------------------

    async def peer_address(self, peer: str | None) -> str:
        if peer is None:
            raise ConfigError("a protected VPG needs a recovery site: give `peer`, the site "
                              "id of a paired site")
        record = await self._db(self.db.get_peer, peer)
        if not record.address:
            raise ConfigError(f"site {record.name} ({peer}) paired with this site but its "
                              f"replication address is not known here: pair with it from "
                              f"this site too (POST /api/v1/pairing)")
        return record.address

    async def create_vpg(self, spec: VpgSpec) -> TaskRecord:
        if spec.role != VpgRole.PROTECTED:
            raise ConfigError("only protected VPGs are created; a recovery site records a "
                              "VPG when its protected site attaches")
        if not spec.vms:
            raise ConfigError("a VPG needs at least one VM")
        vpg_settings(spec.settings)  # refuse bad settings before anything is recorded
        address = await self.peer_address(spec.peer)
        vms = [await self.get_vm(vm) for vm in spec.vms]
        record = await self._db(self.db.create_vpg, spec.name, spec.role, spec.vms, spec.peer,
                                spec.settings)
        state_dir = self.rt.site.vpg_state_dir(spec.name)
        fresh = not state_dir.exists()
        try:  # opens every backing file: a bad path is refused now, not in the task
            vpg = await asyncio.to_thread(self.rt.build_vpg, record, vms)
            await asyncio.to_thread(vpg.close)
        except BaseException:
            await self._db(self.db.delete_vpg, spec.name)
            if fresh:
                await asyncio.to_thread(shutil.rmtree, state_dir, True)
            raise

        delta = spec.initial_sync == "delta"
        sync = "delta sync against the preseeded replicas" if delta else "initial sync"

        async def run(progress: Progress) -> dict[str, Any]:
            try:
                await self.rt.start_protected(record, vms, address, delta_sync=delta)
            except Exception as exc:
                await self._db(self.db.update_vpg, spec.name, state=VpgState.ERROR)
                await self._db(self.db.add_event, "vpg_error",
                               f"VPG {spec.name} did not start: {exc}", vpg=spec.name,
                               severity=Severity.ERROR)
                raise
            await self._db(self.db.update_vpg, spec.name, state=VpgState.SYNCING)
            await self._db(self.db.add_event, "vpg_created",
                           f"VPG {spec.name} created: {sync} to {address}", vpg=spec.name)
            await self.wait_synced(spec.name, progress, sync)
            await self._db(self.db.update_vpg, spec.name, state=VpgState.PROTECTING)
            return {"vpg": spec.name}

        return await self.runner.submit("vpg_create", run, vpg=spec.name)

    async def wait_synced(self, name: str, progress: Progress, what: str) -> None:
        """Until the VPG streams with nothing unacknowledged from its sync: every seq
        up to the one it had when first seen streaming (a guest writing on keeps later
        seqs unacknowledged for good)."""
        last = -1.0
        synced_at: int | None = None  # the last seq when first seen streaming
        while True:
            entry = self.rt.entry(name)
            status = await asyncio.to_thread(entry.vpg.status)
            if status.mode != VPGMode.STREAMING:
                synced_at = None  # folded again: a new sync to wait for
            elif synced_at is None:
                synced_at = status.last_seq
            if synced_at is not None and status.acked_seq >= synced_at \
                    and entry.replication.connected:
                return
            total = status.sync_total_bytes
            fraction = status.sync_done_bytes / total if total else 0.0
            if fraction != last:
                last = fraction
                await progress(min(fraction, 0.99), f"{what} of {name}: {status.mode.label}, "
                               f"{status.sync_done_bytes} of {total} bytes")
            await asyncio.sleep(TASK_POLL_S)

    async def update_vpg(self, name: str, settings: dict[str, Any]) -> VpgRecord:
        if (await self.get_vpg(name)).role != VpgRole.PROTECTED:
            raise StateError(f"the settings of VPG {name!r} are changed at its protected site")
        new = vpg_settings(settings)
        record = await self._db(self.db.update_vpg, name, settings=settings)
        entry = self.rt.protected.get(name)
        if entry is not None:  # what a running VPG can change; journal settings are sent
            entry.vpg.settings.checkpoint_interval = new.checkpoint_interval  # at attach
            entry.vpg.settings.rpo_alert_seconds = new.rpo_alert_seconds
        return record

    async def pause_vpg(self, name: str) -> VpgRecord:
        record = await self.get_vpg(name)
        if record.role != VpgRole.PROTECTED:
            raise StateError(f"VPG {name!r} is paused at its protected site")
        self.rt.entry(name).replication.pause()
        await self._db(self.db.add_event, "vpg_paused", f"VPG {name} paused", vpg=name)
        return await self._db(self.db.update_vpg, name, state=VpgState.PAUSED)

    async def resume_vpg(self, name: str) -> VpgRecord:
        record = await self.get_vpg(name)
        if record.role != VpgRole.PROTECTED:
            raise StateError(f"VPG {name!r} is resumed at its protected site")
        if record.state == VpgState.MOVED and name not in self.rt.protected:
            # stopped by a move or a failover's shutdown policy (rolled back since): it
            # starts again from its saved bitmaps and exports its volumes
            vms = [await self.get_vm(vm) for vm in record.vms]
            await self.rt.start_protected(record, vms, await self.peer_address(record.peer))
            await self._db(self.db.add_event, "vpg_resumed", f"VPG {name} started again "
                           f"here after it was stopped for a failover", vpg=name)
            return await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)
        self.rt.entry(name).replication.resume()
        await self._db(self.db.add_event, "vpg_resumed", f"VPG {name} resumed", vpg=name)
        return await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)

    async def sync_vpg(self, name: str) -> TaskRecord:
        """Resend everything not yet acknowledged through a bitmap sync."""
        record = await self.get_vpg(name)
        if record.role != VpgRole.PROTECTED:
            raise StateError(f"VPG {name!r} is synced from its protected site")
        if record.state == VpgState.PAUSED:
            raise StateError(f"VPG {name!r} is paused: resume it before a sync")
        entry = self.rt.entry(name)

        async def run(progress: Progress) -> dict[str, Any]:
            await asyncio.to_thread(entry.vpg.link_down, "sync requested by a user")
            await asyncio.to_thread(entry.vpg.link_up)
            await self._db(self.db.update_vpg, name, state=VpgState.SYNCING)
            await self.wait_synced(name, progress, "sync")
            await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)
            return {"vpg": name}

        return await self.runner.submit("vpg_sync", run, vpg=name)

    async def delete_vpg(self, name: str) -> TaskRecord:
        record = await self.get_vpg(name)
        receiver = self.rt.receiver(name) if record.role == VpgRole.RECOVERY else None
        if receiver is not None and receiver.conn is not None and not receiver.conn.closed:
            raise StateError(f"VPG {name!r} is still replicating into this site: delete it "
                             f"at its protected site first")
        if self.operations is not None:
            op_state = self.operations.state(name)
            if op_state != "replicating":
                raise StateError(f"VPG {name!r} is {op_state}: stop its recovery operation "
                                 f"before deleting it")
        await self._db(self.db.update_vpg, name, state=VpgState.DELETING)

        async def run(progress: Progress) -> None:
            await self.finish_delete(record)

        return await self.runner.submit("vpg_delete", run, vpg=name)

    async def finish_delete(self, record: VpgRecord) -> None:
        """Stop and remove a VPG: a protected one's state directory (its volumes stay),
        a recovery one's journals.  Also what a restart does for a VPG left deleting."""
        name = record.name
        if record.role == VpgRole.PROTECTED:
            await self.rt.stop_protected(name, forget=True)
            path = self.rt.site.vpg_state_dir(name)
        else:
            path = await self.rt.drop_recovery(name)
        await asyncio.to_thread(shutil.rmtree, path, True)
        if self.rt.metrics is not None:
            self.rt.metrics.forget(name)
        await self._db(self.db.delete_vpg, name)
        await self._db(self.db.add_event, "vpg_deleted", f"VPG {name} deleted", vpg=name)

    async def vpg_status(self, name: str) -> VpgStatus:
        record = await self.get_vpg(name)
        if record.role == VpgRole.PROTECTED and name in self.rt.protected:
            # on the loop: the sender's throughput meter is the loop's (the VPG lock its
            # status takes is held for one stream round at most)
            return self._protected_status(record)
        if record.role == VpgRole.RECOVERY and name in self.rt.recovery_vpgs:
            return await asyncio.to_thread(self._recovery_status, record)
        return VpgStatus(name=name, role=record.role, state=record.state)

    def _protected_status(self, record: VpgRecord) -> VpgStatus:
        entry = self.rt.entry(record.name)
        s = entry.replication.status()
        total, done = s.sync_total_bytes, s.sync_done_bytes
        syncing = entry.vpg.mode.syncing
        eta = (total - done) / s.throughput_bytes if syncing and s.throughput_bytes else None
        return VpgStatus(
            name=record.name, role=record.role, state=record.state,
            rpo_seconds=s.rpo_seconds, throughput_bytes_per_s=s.throughput_bytes,
            history_seconds_configured=record.settings.get("history_seconds"),
            journal_limit_bytes=record.settings.get("journal_hard_limit_bytes"),
            sync_progress=(done / total if total else 0.0) if syncing else None,
            sync_eta_seconds=eta, compression=s.codec, compression_bytes_saved=s.bytes_saved,
            compression_use=s.compression, compression_held_seconds=s.zstd_held_seconds,
            compression_held_at=s.zstd_held_at or None,
            hypervisor_disks=None if entry.mirrors is None
            else entry.mirrors.disk_states(syncing))

    def _recovery_status(self, record: VpgRecord) -> VpgStatus:
        s = self.rt.recovery_vpg(record.name).status()
        rpo = s.rpo_seconds
        if rpo is None and s.newest_checkpoint is not None:  # an upper bound: the newest
            rpo = max(0.0, time.time() - s.newest_checkpoint.time)  # usable checkpoint's age
        return VpgStatus(
            name=record.name, role=record.role, state=record.state, rpo_seconds=rpo,
            history_seconds_held=s.history_held_seconds,
            history_seconds_configured=s.history_configured_seconds,
            journal_bytes=s.journal_bytes, journal_limit_bytes=s.journal_hard_limit_bytes,
            throughput_bytes_per_s=s.throughput_bytes,
            sync_progress=None if s.sync is None
            else s.sync.done_bytes / max(1, s.sync.total_bytes),
            sync_eta_seconds=None if s.sync is None else s.sync.eta_seconds,
            latest_checkpoint=s.newest_checkpoint, **self._operation_status(record.name))

    def _operation_status(self, name: str) -> dict[str, Any]:
        ops = self.operations
        if ops is None:
            return {}
        running = ops.tests.get(name)
        return {"operation_state": str(ops.state(name)),
                "scratch_used_bytes": None if running is None else running.test.used_bytes,
                "scratch_limit_bytes": None if running is None else running.test.limit_bytes}

    # -- checkpoints -----------------------------------------------------------------------

    async def list_checkpoints(self, vpg: str, query: CheckpointQuery) -> CheckpointPage:
        await self.get_vpg(vpg)
        rvpg = self.rt.recovery_vpg(vpg)
        want = query.limit + 1  # one more says whether another page follows
        found = await asyncio.to_thread(
            rvpg.checkpoints, start=query.start, end=query.end, tag=query.tag,
            kind=query.kind, consistent=query.consistent, after_id=query.after,
            limit=want, newest_first=query.newest_first)
        if query.tag is not None:  # RecoveryVPG matches a substring; the API an exact tag
            found = [c for c in found if c.tag == query.tag]
        page = found[: query.limit]
        more = len(found) > query.limit
        return CheckpointPage(page, page[-1].id if more and page else None)

    async def checkpoint_buckets(self, vpg: str, query: CheckpointQuery,
                                 bucket_seconds: float) -> list[CheckpointBucket]:
        await self.get_vpg(vpg)
        rvpg = self.rt.recovery_vpg(vpg)
        status = await asyncio.to_thread(rvpg.status)
        if status.oldest_checkpoint is None or status.newest_checkpoint is None:
            return []
        start = query.start if query.start is not None else status.oldest_checkpoint.time
        end = query.end if query.end is not None else \
            status.newest_checkpoint.time + bucket_seconds
        if end <= start:
            return []
        buckets = await asyncio.to_thread(rvpg.buckets, start, end, bucket_seconds)
        return [CheckpointBucket(b.start, b.count, b.tagged, b.first_id, b.last_id)
                for b in buckets if b.count]

    async def tag_checkpoint(self, vpg: str, tag: str) -> Checkpoint:
        record = await self.get_vpg(vpg)
        if record.role != VpgRole.PROTECTED:
            raise StateError(f"VPG {vpg!r} is tagged at its protected site, where its "
                             f"writes are captured")
        if record.state in (VpgState.PAUSED, VpgState.DELETING, VpgState.ERROR):
            raise StateError(f"VPG {vpg!r} is {record.state}: no checkpoint can be tagged")
        entry = self.rt.entry(vpg)
        cp = await asyncio.to_thread(entry.vpg.checkpoint, tag)
        await self._db(self.db.add_event, "checkpoint_tagged",
                       f"checkpoint {cp.id} tagged {tag!r}", vpg=vpg)
        return cp

    # -- recovery VPGs appear ----------------------------------------------------------------

    def _attached(self, name: str, peer: Peer) -> None:
        """A protected site attached VPG `name` (called on the loop by the runtime)."""
        task = asyncio.get_running_loop().create_task(self.record_recovery(name, peer.site_id))
        task.add_done_callback(_log_failure)

    async def record_recovery(self, name: str, owner: str) -> None:
        """Record (or mark protecting again) a recovery VPG whose journals are here."""
        await self.sync_peers()
        try:
            record = await self.get_vpg(name)
        except ZcoreError:
            record = None
        if record is None:
            rvpg = self.rt.recovery_vpg(name)
            # no settings: a recovery VPG's settings are its protected site's (the journals
            # hold what the recovery side applies)
            await self._db(self.db.create_vpg, name, VpgRole.RECOVERY, (), owner, {},
                           VpgState.PROTECTING)
            await self._db(self.db.add_event, "vpg_attached",
                           f"VPG {name} (VMs {', '.join(rvpg.vms)}) attached by site "
                           f"{owner}: receiving its writes", vpg=name)
        elif record.role != VpgRole.RECOVERY:
            log.error("VPG %s attached from site %s but is a %s VPG here", name, owner,
                      record.role)
        elif record.state != VpgState.PROTECTING:
            await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)

    # -- metric history --------------------------------------------------------------------

    async def metric_history(self, series: str, vpg: str | None, start: float | None,
                             end: float | None, resolution: float | None) -> MetricHistory:
        history = self.rt.metrics
        name = str(SERIES_ALIASES.get(series, series))
        if history is None or name not in history.series:
            known = ", ".join(history.series if history else ())
            raise ConfigError(f"unknown series {series!r}; known: {known}")
        if vpg is None:
            raise ConfigError("metric history is kept per VPG: give `vpg`")
        await self.get_vpg(vpg)
        hi = time.time() if end is None else end
        lo = hi - DEFAULT_HISTORY_WINDOW_S if start is None else start
        found = await asyncio.to_thread(history.query, vpg, name, lo, hi, resolution)
        return MetricHistory(series, vpg, found.resolution,
                             list(zip(found.times, found.avg, strict=True)))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("recording an attached VPG failed: %s", task.exception())

