"""Planned move, reverse protection and failback as site-service tasks.

Sits beside zcore.site.failover_ops (the failover and commit these build on) under
zcore.site.live; over zcore.site.runtime (protected VPGs, the recovery site's journals)
and the replication link (MOVE, docs/format.md 10.3; the delta sync as a reversed VPG's
first sync).

Move (run at the protected site A, where the VMs run): A refuses every write to the
VPG's volumes (its NBD exports dropped, their connections ended), tags a checkpoint after
the last write, waits until the recovery site B holds it durably, asks B over the
replication link to fail over to it (MOVE), then stops the VPG (state `moved`).  B fails
the VPG over to that checkpoint with an immediate commit and, by default, reverse
protection.  Nothing acknowledged is lost: every write before the checkpoint is in it.

Reverse protection (run at B once a failover is committed): the recovered volumes (the
journals' replicas) move out of the journals into volume files, B's journals of the VPG
are dropped, and the VPG becomes protected at B, replicating to A with a delta sync as
its first sync.  A learns of it from B's ATTACH (`before_attach`): its VPG (stopped first
if it still runs: a failover while A was away) becomes a recovery VPG whose journals
adopt A's disks as replicas, so the delta sync sends only the blocks that differ.  A's
VM records keep the disks' paths: a failback returns the volumes there.

Failback (run at B on a reversed VPG): a move back to A with reverse protection, after
which the VPG is protected from A again, on its original disk paths.

State: DIR/reverse/<vpg>.json (a checked state file) holds a reversal's plan before its
first file moves, and a restart finishes it; a reversed VPG's protected state directory
holds `reversed.json` naming the site it was reversed from (what failback checks).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zcore import wire
from zcore.adapters import BootPlanError, StopMode
from zcore.errors import (
    AdapterError,
    CheckpointNotFoundError,
    ConfigError,
    HypervisorError,
    ProtocolError,
    StateError,
    ZcoreError,
)
from zcore.fsutil import fsync_dir, move_file, read_state, write_state
from zcore.hypervisor import QemuAddress
from zcore.journal import JournalSettings, VolumeSpec
from zcore.recovery.states import Operation
from zcore.security import Peer
from zcore.site.db import (
    Severity,
    SiteDB,
    TaskRecord,
    VmRecord,
    VpgRecord,
    VpgRole,
    VpgState,
)
from zcore.site.errors import NotFoundError
from zcore.site.failover_ops import FailoverOps
from zcore.site.runtime import SiteRuntime, export_name
from zcore.site.tasks import Progress, TaskRunner
from zcore.vpg import CheckpointState

if TYPE_CHECKING:
    from zcore.site.live import LiveSiteBackend

log = logging.getLogger(__name__)

PLAN_FORMAT = "zcore-reverse-plan"
PLAN_VERSION = 1
MARKER_FORMAT = "zcore-reversed"
MARKER_VERSION = 1
MARKER_NAME = "reversed.json"
POLL_S = 0.2
DURABLE_TIMEOUT_S = 300.0  # a move's checkpoint must reach the recovery site in this
REVERSE_WAIT_S = 600.0  # a move waits this long for the reverse ATTACH, then reports it
CATALOGUE_WAIT_S = 5.0  # a just-acknowledged checkpoint enters the catalogue within this


@dataclass(frozen=True)
class VolumeMove:
    """One volume file's way out of a journal (reverse) or into one (adopt)."""

    vm: str
    volume: str
    size: int
    source: str
    destination: str


def protected_refusal(name: str) -> str:
    return (f"VPG {name} is protected at this site (reverse protection): its recovery "
            f"site attaches it only reversed")


class ReverseOps:
    """Move, reverse protection and failback of one site's VPGs."""

    def __init__(self, backend: LiveSiteBackend, failovers: FailoverOps) -> None:
        self.backend = backend
        self.db: SiteDB = backend.db
        self.rt: SiteRuntime = backend.rt
        self.runner: TaskRunner = backend.runner
        self.failovers = failovers
        self._moving: set[str] = set()
        self._adopting: dict[str, asyncio.Lock] = {}
        failovers.after_commit = self._reverse_after_commit

    def install(self) -> None:
        """Take the recovery site's MOVE requests and reversed ATTACHes (before it
        listens); a reversal left half done refuses its VPG's ATTACH until it is
        finished (`restore`)."""
        assert self.rt.recovery is not None
        self.rt.recovery.on_move = self.on_move
        self.rt.recovery.before_attach = self.before_attach
        self.rt.on_failed_over = self.failed_over_there
        if self.plans_dir.is_dir():
            for path in self.plans_dir.glob("*.json"):
                self.rt.recovery.failed_over[path.stem] = protected_refusal(path.stem)

    @property
    def plans_dir(self) -> Path:
        return self.rt.site.root / "reverse"

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _event(self, code: str, text: str, vpg: str) -> None:
        await self._db(self.db.add_event, code, text, vpg=vpg)

    # ---- move (at the protected site) ----------------------------------------------------

    async def move(self, name: str, reverse: bool = True, kind: str = "move") -> TaskRecord:
        """A planned move of VPG `name` to its recovery site (see the module docstring)."""
        record: VpgRecord = await self._db(self.db.get_vpg, name)
        if record.role != VpgRole.PROTECTED:
            raise StateError(f"VPG {name!r} is a recovery VPG at this site: a {kind} is "
                             f"started at its protected site, where its VMs run")
        if record.state != VpgState.PROTECTING:
            raise StateError(f"VPG {name!r} is {record.state.value}: a {kind} needs it "
                             f"protecting (synced and replicating)")
        if name in self._moving:
            raise StateError(f"VPG {name!r} is already moving")
        entry = self.rt.entry(name)
        mode = entry.vpg.mode
        if mode.syncing or mode.marking:  # refused before its VMs are shut down
            raise StateError(f"VPG {name!r} is in {mode.label} mode: a {kind} needs it "
                             f"protecting (synced and replicating); wait for the sync to end")
        if not entry.replication.connected:
            raise StateError(f"VPG {name!r}: its recovery site is not connected "
                             f"({entry.replication.last_error or 'no session'}); a {kind} "
                             f"needs the link (fail over at the recovery site instead)")
        self._moving.add(name)

        async def run(progress: Progress) -> dict[str, Any]:
            try:
                return await self._move(name, record, reverse, kind, progress)
            finally:
                self._moving.discard(name)

        try:
            return await self.runner.submit(kind, run, vpg=name)
        except BaseException:
            self._moving.discard(name)
            raise

    def _exports(self, name: str) -> dict[str, dict[str, str]]:
        """VM -> volume -> export name of a running protected VPG."""
        out: dict[str, dict[str, str]] = {}
        for v in self.rt.entry(name).vpg.volumes.values():
            out.setdefault(v.vm, {})[v.name] = export_name(name, v.vm, v.name)
        return out

    async def _move(self, name: str, record: VpgRecord, reverse: bool, kind: str,
                    progress: Progress) -> dict[str, Any]:
        entry = self.rt.entry(name)
        await progress(0.02, f"{kind} of {name}: shutting its VMs down")
        await self.failovers.vms.stop_exports(name, self._exports(name), StopMode.GRACEFUL)
        await progress(0.05, f"{kind} of {name}: refusing writes to its volumes")
        await self.rt.refuse_writes(name)
        try:
            cp = await entry.replication.checkpoint(
                f"{kind.capitalize()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            await progress(0.2, f"checkpoint {cp.id} taken after the last write; waiting "
                           f"until the recovery site holds it")
            await self._wait_durable(name, cp.id)
            await progress(0.4, f"checkpoint {cp.id} is durable; asking the recovery site "
                           f"to fail over to it")
            await entry.replication.request_move(cp.id, reverse)
        except BaseException:
            if name in self.rt.protected:
                self.rt.allow_writes(name)  # nothing moved: the VMs may write again
                if entry.mirrors is not None:
                    await asyncio.to_thread(entry.mirrors.resume_guests)
            raise
        await self.rt.stop_protected(name)
        await self._db(self.db.update_vpg, name, state=VpgState.MOVED)
        await self._event("vpg_moved", f"VPG {name} moved to its recovery site at "
                          f"checkpoint {cp.id}" + (": reverse protection follows"
                                                   if reverse else ""), name)
        result = {"vpg": name, "checkpoint_id": cp.id, "reverse": reverse,
                  "reversed": False}
        if reverse:
            await progress(0.6, f"waiting for site {record.peer} to protect {name} back "
                           f"to this site")
            result["reversed"] = await self._wait_role(name, VpgRole.RECOVERY)
        return result

    async def _wait_durable(self, name: str, checkpoint_id: int) -> None:
        entry = self.rt.entry(name)
        deadline = time.monotonic() + DURABLE_TIMEOUT_S
        while True:
            report = entry.vpg.checkpoint_state(checkpoint_id)
            if report is not None and report.state == CheckpointState.DURABLE:
                return
            if report is not None and report.state == CheckpointState.LOST:
                raise StateError(f"VPG {name}: the move's checkpoint {checkpoint_id} was "
                                 f"lost ({report.reason})")
            if time.monotonic() > deadline:
                raise StateError(f"VPG {name}: the move's checkpoint {checkpoint_id} did "
                                 f"not reach the recovery site in {DURABLE_TIMEOUT_S:.0f} s")
            await asyncio.sleep(POLL_S)

    async def _wait_role(self, name: str, role: VpgRole) -> bool:
        deadline = time.monotonic() + REVERSE_WAIT_S
        while time.monotonic() < deadline:
            if (await self._db(self.db.get_vpg, name)).role == role:
                return True
            await asyncio.sleep(POLL_S)
        return False

    # ---- the recovery site's side of a move ----------------------------------------------

    async def on_move(self, name: str, peer: Peer, checkpoint_id: int, reverse: bool) -> None:
        """MOVE from the protected site (zcore.replication.receiver): check it, then fail
        the VPG over to the checkpoint with an immediate commit, after MOVING is sent."""
        try:
            record: VpgRecord = await self._db(self.db.get_vpg, name)
        except NotFoundError:
            raise StateError(f"VPG {name} is not recorded at this site yet") from None
        if record.role != VpgRole.RECOVERY or record.peer != peer.site_id:
            raise StateError(f"VPG {name} is not a recovery VPG of site {peer.name} here")
        self.failovers.states.check(name, Operation.FAILOVER)
        rvpg = self.rt.recovery_vpg(name)
        deadline = time.monotonic() + CATALOGUE_WAIT_S
        while True:
            try:
                await asyncio.to_thread(rvpg.by_id, checkpoint_id)
                break
            except CheckpointNotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL_S)
        await self._event("move_accepted", f"site {peer.name} moves VPG {name} here at "
                          f"checkpoint {checkpoint_id}", name)
        # MOVING is sent as this hook returns, with no await between; the failover (which
        # closes the connection) starts on the loop's next round, after it
        task = asyncio.get_running_loop().create_task(self.failovers.start(
            name, checkpoint_id, "commit", 0.0, "none", reverse))
        task.add_done_callback(_log_failure)

    # ---- the protected site's side of a failover: the shutdown policy -------------------

    def failed_over_there(self, name: str, msg: dict[str, Any]) -> None:
        """The recovery site failed VPG `name` over (FAILED_OVER, on the loop): apply the
        failover's shutdown policy to its VMs and volumes here, in a task."""
        task = asyncio.get_running_loop().create_task(
            self._shut_down(name, int(msg["checkpoint_id"]), str(msg["shutdown"])))
        task.add_done_callback(_log_failure)

    async def _shut_down(self, name: str, checkpoint_id: int, policy: str) -> None:
        if name not in self.rt.protected:
            return
        if policy not in ("graceful", "force"):
            policy = "none"
        else:
            exports = self._exports(name)
            if policy == "graceful":  # the guests flush and power off, then writes stop
                await self.failovers.vms.stop_exports(name, exports, StopMode.GRACEFUL)
            try:
                await self.rt.refuse_writes(name)
            except HypervisorError as exc:  # the VPG stops here all the same
                await self._db(self.db.add_event, "vpg_vms_not_paused",
                               f"VPG {name}: its VMs could not be paused in QEMU ({exc})",
                               vpg=name, severity=Severity.WARNING)
                await self.rt.refuse_writes(name, pause=False)
            if policy == "force":
                await self.failovers.vms.stop_exports(name, exports, StopMode.FORCE)
            await self.rt.stop_protected(name)
            await self._db(self.db.update_vpg, name, state=VpgState.MOVED)
        await self._db(self.db.add_event, "vpg_failed_over_there",
                       f"VPG {name} failed over at its recovery site to checkpoint "
                       f"{checkpoint_id}; shutdown policy {policy}"
                       + (": its writes here are no longer replicated" if policy == "none"
                          else ": its VMs and volumes here are stopped"),
                       vpg=name, severity=Severity.WARNING)

    # ---- reverse protection (at the site the VPG failed over to) -------------------------

    async def _reverse_after_commit(self, name: str) -> None:
        try:
            await self.reverse(name)
        except ZcoreError as exc:
            log.error("reverse protection of %s did not start: %s", name, exc)
            await self._event("reverse_failed", f"reverse protection of VPG {name} did "
                              f"not start: {exc}", name)

    async def reverse(self, name: str) -> TaskRecord:
        """Protect a committed VPG back to the site it failed over from."""
        record: VpgRecord = await self._db(self.db.get_vpg, name)
        if record.role != VpgRole.RECOVERY:
            raise StateError(f"VPG {name!r} is protected at this site already: reverse "
                             f"protection follows a committed failover at its recovery site")
        states = self.failovers.states
        states.check(name, Operation.REVERSE)
        owner = record.peer
        if owner is None:
            raise StateError(f"VPG {name!r} names no protected site")
        address = await self.backend.peer_address(owner)
        t = states.begin(name, Operation.REVERSE)
        try:
            plan = await asyncio.to_thread(self._plan_reverse, name, owner, address)
        except BaseException:
            states.finish(t, False)
            raise

        async def run(progress: Progress) -> dict[str, Any]:
            return await self._reverse(name, plan, progress)

        def settle(ok: bool) -> None:
            states.finish(t, ok)
            if ok:  # protected here now: no recovery operation holds it
                states.forget(name)

        return await self.runner.submit("reverse", run, vpg=name, settle=settle)

    def _plan_reverse(self, name: str, owner: str, address: str) -> dict[str, Any]:
        """Where each recovered volume goes (its VM record's path here, or a new file in
        DIR/volumes), written down before anything moves (blocking)."""
        rvpg = self.rt.recovery_vpg(name)
        moves = []
        for vm, journal in sorted(rvpg.journals.items()):
            known = self._known_paths(vm)
            for spec in sorted(journal.volumes.values(), key=lambda v: v.name):
                dest = known.get(spec.name) or str(
                    self.rt.site.root / "volumes" / name / vm / f"{spec.name}.img")
                if Path(dest).exists():
                    raise ConfigError(f"volume {vm}/{spec.name} of VPG {name} would move to "
                                      f"{dest}, which exists: move that file away first")
                moves.append(VolumeMove(vm, spec.name, spec.size,
                                        journal.replica_path(spec.id), dest).__dict__)
        plan = {"vpg": name, "owner": owner, "address": address, "moves": moves,
                "settings": _journal_settings(rvpg)}
        self.plans_dir.mkdir(exist_ok=True)
        write_state(self.plans_dir / f"{name}.json", PLAN_FORMAT, PLAN_VERSION, plan)
        return plan

    def _known_paths(self, vm: str) -> dict[str, str]:
        try:
            record = self.db.get_vm(vm)
        except NotFoundError:
            return {}
        return {v.name: v.path for v in record.volumes if v.path}

    async def _reverse(self, name: str, plan: dict[str, Any],
                       progress: Progress) -> dict[str, Any]:
        """Carry out a reversal's plan; every step is idempotent (a restart redoes it)."""
        owner, moves = plan["owner"], [VolumeMove(**m) for m in plan["moves"]]
        await progress(0.05, f"reverse protection of {name}: the recovered volumes leave "
                       f"the journals")
        if name in self.failovers.active:
            await self.failovers.release(name, protected_refusal(name))
        elif self.rt.recovery is not None:
            self.rt.recovery.failed_over[name] = protected_refusal(name)
        if name in self.rt.recovery_vpgs or self.rt.receiver(name) is not None:
            await self.rt.drop_recovery(name)
        await asyncio.to_thread(_carry_out, moves)
        journals = self.rt.recovery.vpgs_dir / name if self.rt.recovery else None
        if journals is not None:
            await asyncio.to_thread(shutil.rmtree, journals, True)
        vms = await self._protected_records(name, owner, moves, plan["settings"])
        if self.rt.recovery is not None:  # protected here now: `before_attach` refuses
            self.rt.recovery.failed_over.pop(name, None)  # all but a reversed ATTACH
        state_dir = self.rt.site.vpg_state_dir(name)
        await asyncio.to_thread(shutil.rmtree, state_dir, True)
        state_dir.mkdir(parents=True)
        await asyncio.to_thread(write_state, state_dir / MARKER_NAME, MARKER_FORMAT,
                                MARKER_VERSION, {"origin": owner, "time": time.time()})
        record: VpgRecord = await self._db(self.db.get_vpg, name)
        await progress(0.2, f"protecting {name} back to site {owner}: delta sync")
        await self.rt.start_protected(record, vms, plan["address"], delta_sync=True)
        (self.plans_dir / f"{name}.json").unlink(missing_ok=True)
        await asyncio.to_thread(fsync_dir, self.plans_dir)
        await self._event("vpg_reversed", f"VPG {name} is protected from this site to site "
                          f"{owner} (reverse protection: a delta sync against its disks)",
                          name)
        try:  # the VMs run on the protected volumes at once, while the delta sync runs
            await self.failovers.vms.boot_exports(name, self._exports(name), "protected")
        except (BootPlanError, AdapterError) as exc:  # its event is logged; protection runs
            log.error("VPG %s: VMs not started after reverse protection: %s", name, exc)
        await self.backend.wait_synced(name, progress, "delta sync")
        await self._db(self.db.update_vpg, name, state=VpgState.PROTECTING)
        return {"vpg": name, "peer": owner,
                "volumes": {f"{m.vm}/{m.volume}": m.destination for m in moves}}

    async def _protected_records(self, name: str, owner: str, moves: list[VolumeMove],
                                 settings: dict[str, Any]) -> list[VmRecord]:
        """The VM records (made where missing) and the VPG record, now protected here."""
        by_vm: dict[str, list[VolumeMove]] = {}
        for m in moves:
            by_vm.setdefault(m.vm, []).append(m)
        vms = []
        for vm, vols in sorted(by_vm.items()):
            try:
                record: VmRecord = await self._db(self.db.get_vm, vm)
            except NotFoundError:
                record = await self._db(self.db.create_vm, vm, [
                    {"name": m.volume, "size": m.size, "path": m.destination}
                    for m in vols])
            have = {(v.name, v.size, v.path) for v in record.volumes}
            if have != {(m.volume, m.size, m.destination) for m in vols}:
                raise ConfigError(f"VM {vm} is recorded at this site with other volumes: "
                                  f"reverse protection of VPG {name} needs {vm}'s volumes "
                                  f"to be those of the VPG")
            vms.append(record)
        current: VpgRecord = await self._db(self.db.get_vpg, name)
        if current.role != VpgRole.PROTECTED:
            if "recovery" in current.settings:  # how its VMs start here, kept for failback
                settings = {**settings, "recovery": current.settings["recovery"]}
            await self._db(self.db.delete_vpg, name)
            await self._db(self.db.create_vpg, name, VpgRole.PROTECTED,
                           [v.name for v in vms], owner, settings, VpgState.SYNCING)
        return vms

    async def restore(self) -> None:
        """Finish every reversal a previous process left half done (at start)."""
        if not self.plans_dir.is_dir():
            return
        for path in sorted(self.plans_dir.glob("*.json")):
            plan = await asyncio.to_thread(read_state, path, PLAN_FORMAT, (PLAN_VERSION,))
            name = plan["vpg"]
            log.info("finishing the reverse protection of %s", name)

            async def run(progress: Progress, plan: dict[str, Any] = plan) -> dict[str, Any]:
                return await self._reverse(plan["vpg"], plan, progress)

            await self.runner.submit("reverse", run, vpg=name)

    # ---- failback ------------------------------------------------------------------------

    async def failback(self, name: str) -> TaskRecord:
        """Move a reversed VPG back to the site it was reversed from, reversed again."""
        record: VpgRecord = await self._db(self.db.get_vpg, name)
        marker = self.rt.site.vpg_state_dir(name) / MARKER_NAME
        try:
            origin = (await asyncio.to_thread(read_state, marker, MARKER_FORMAT,
                                              (MARKER_VERSION,)))["origin"]
        except FileNotFoundError:
            origin = None
        if record.role != VpgRole.PROTECTED or origin is None or origin != record.peer:
            raise StateError(f"VPG {name!r} is not protected here by reverse protection: "
                             f"failback moves a reversed VPG back to its original site "
                             f"(use move for any other planned move)")
        return await self.move(name, reverse=True, kind="failback")

    # ---- the original site's side: adopting the disks as replicas ------------------------

    async def before_attach(self, peer: Peer, msg: dict[str, Any]) -> None:
        """Every ATTACH, before its journals open: a VPG this site protects may be
        attached only reversed, by its own recovery site; then it becomes a recovery
        VPG over its disks (ProtocolError refuses anything else)."""
        name = str(msg.get("vpg"))
        lock = self._adopting.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                record: VpgRecord = await self._db(self.db.get_vpg, name)
            except NotFoundError:
                return
            if record.role == VpgRole.RECOVERY:
                return
            if record.peer != peer.site_id:
                raise ProtocolError(f"VPG {name} is protected at this site, to another site")
            if msg.get("initial") != "delta":
                raise ProtocolError(protected_refusal(name))
            try:
                await self._adopt(record, peer, msg)
            except (ZcoreError, OSError) as exc:
                if isinstance(exc, ProtocolError):
                    raise
                raise ProtocolError(f"VPG {name} cannot become a recovery VPG here: "
                                    f"{exc}") from None

    async def _adopt(self, record: VpgRecord, peer: Peer, msg: dict[str, Any]) -> None:
        name = record.name
        attach = wire.parse_attach_vms(msg)
        settings = JournalSettings(**msg["journal"])
        settings.check()
        local: dict[tuple[str, str], tuple[int, str]] = {}
        for vm in record.vms:
            for v in (await self._db(self.db.get_vm, vm)).volumes:
                local[(vm, v.name)] = (v.size, v.path or "")
        wanted = {(vm, vol): size for vm, vols in attach for _, vol, size in vols}
        if {k: s for k, (s, _) in local.items()} != wanted:
            raise ProtocolError(f"VPG {name} is attached with other VMs or volumes than it "
                                f"protects here")
        in_qemu = sorted(f"{vm}/{vol}" for (vm, vol), (_, path) in local.items()
                         if QemuAddress.parse(path) is not None)
        if in_qemu:
            # the disk is a running QEMU's, which may still have it open: never written
            raise ConfigError(
                f"VPG {name}: volume(s) {', '.join(in_qemu)} here are running QEMUs' disks; "
                "reverse protection into them is not supported: shut the VM down, then "
                "replace each such volume with its image file (DELETE and POST "
                "/vms/VM/volumes with its path) so it becomes the replica")
        if name in self.rt.protected:  # failed over while this site was away: it stops
            await self.failovers.vms.stop_exports(name, self._exports(name), StopMode.FORCE)
            await self.rt.stop_protected(name)
            await self._event("vpg_stopped", f"VPG {name} stopped here: site {peer.name} "
                              f"protects it back to this site", name)
        vms = [(vm, [VolumeSpec(vid, vol, size) for vid, vol, size in vols])
               for vm, vols in attach]
        files = {key: path for key, (_, path) in local.items()}
        assert self.rt.recovery is not None
        await asyncio.to_thread(self.rt.recovery.adopt, name, peer.site_id, vms, settings,
                                files)
        await asyncio.to_thread(shutil.rmtree, self.rt.site.vpg_state_dir(name), True)
        await self._db(self.db.update_vpg, name, role=VpgRole.RECOVERY,
                       state=VpgState.PROTECTING)
        await self._event("vpg_reversed", f"VPG {name} is protected from site {peer.name} "
                          f"to this site: its disks here are the replicas (delta sync)", name)


def _journal_settings(rvpg: Any) -> dict[str, Any]:
    """The protected VPG's settings from what its journals apply (history, limit)."""
    journal = next(iter(rvpg.journals.values()))
    s = journal.settings
    out: dict[str, Any] = {"history_seconds": s.history_seconds}
    if s.hard_limit_bytes:
        out["journal_hard_limit_bytes"] = s.hard_limit_bytes
    return out


def _carry_out(moves: list[VolumeMove]) -> None:
    """Move each file to its destination; a move already made is skipped (blocking)."""
    for m in moves:
        src, dst = Path(m.source), Path(m.destination)
        if dst.exists():  # moved already (a copy across filesystems is renamed into
            if src.exists():  # place whole, so only the source's unlink was pending)
                src.unlink()
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        move_file(src, dst)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a move's failover did not start: %s", task.exception())
