"""Live failover in the site service: tasks, NBD exports, events, the ATTACH refusal and
the commit policy's timer, over zcore.recovery.failover.

Sits under zcore.site.live (the REST API's backend calls it) and beside zcore.site.runtime
(whose NBD server serves the recovered volumes and whose recovery site refuses the VPG's
ATTACH while a failover lasts).  Runs on the service's event loop; the blocking steps
(opening overlays, commit, rollback) go to worker threads.

Exports: `failover/<vpg>/<vm>/<volume>` (the durable overlays, read-write, FLUSH/FUA
honoured) while failed over; `recovered/<vpg>/<vm>/<volume>` (the replicas, plain file
exports) once committed.  State: DIR/failover/<vpg>/ (zcore.recovery.failover's state
file and overlays); a restart resumes every failover found there before the scheduler
starts (so no retention round runs on a journal a failover pins).

VMs (zcore.site.failover_vms): a start boots the recovered VMs on the failover exports
through the VPG's adapter and boot plan; rollback and commit stop them first; a commit
boots them again on the `recovered/...` exports.  A failover committed at once (a commit
policy of 0 minutes: a move) boots them only after its commit.  A commit or rollback that
comes while the start's boot runs cancels the boot and waits for the step in flight, then
stops what it started.  A boot that fails fails its task and leaves the failover as it is
(its status' `vms` holds the error).

Shutdown policy: recorded; the recovery site closes the VPG's replication connection and
refuses its ATTACH whatever the policy.  Stopping the protected site's VMs and refusing
writes on its exports needs a message to the protected site (the hypervisor-adapter work).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from zcore.adapters import StopMode
from zcore.errors import ConfigError, StateError
from zcore.nbd import file_export, overlay_export
from zcore.recovery.choice import CheckpointChoice
from zcore.recovery.failover import (
    CommitPolicy,
    Failover,
    FailoverPlan,
    FailoverState,
    ShutdownPolicy,
)
from zcore.recovery.states import Operation, OperationState, OperationStates, Transition
from zcore.site.db import SiteDB, TaskRecord, VpgRole
from zcore.site.failover_vms import FailoverVMs
from zcore.site.runtime import SiteRuntime
from zcore.site.tasks import Progress, TaskRunner

log = logging.getLogger(__name__)

POLL_S = 0.2
FAILOVER_PREFIX = "failover"
RECOVERED_PREFIX = "recovered"
# Called on the loop with the VPG's name once a failover planned with `reverse` is
# committed (also after a restart that finds it so): reverse protection starts there.
ReverseHook = Callable[[str], Awaitable[None]]


def refusal(name: str, state: FailoverState) -> str:
    return (f"VPG {name} is failed over at its recovery site ({state.value}): replication "
            f"into its journals stops until a rollback")


class FailoverOps:
    """The failovers of one site's recovery VPGs."""

    def __init__(self, db: SiteDB, runtime: SiteRuntime, runner: TaskRunner,
                 states: OperationStates) -> None:
        self.db = db
        self.rt = runtime
        self.runner = runner
        self.states = states  # the site's one operation table (with the failover test's)
        self.active: dict[str, Failover] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.after_commit: ReverseHook | None = None
        self.vms = FailoverVMs(db, runtime)

    def directory(self, name: str) -> Path:
        return self.rt.site.root / "failover" / name

    async def _event(self, kind: str, message: str, vpg: str) -> None:
        await asyncio.to_thread(self.db.add_event, kind, message, vpg=vpg)

    # ---- start ---------------------------------------------------------------------------

    async def start(self, name: str, checkpoint: str | int | None,
                    commit_policy: str = "none", commit_after_minutes: float | None = None,
                    shutdown_policy: str = "none", reverse: bool = False) -> TaskRecord:
        record = await asyncio.to_thread(self.db.get_vpg, name)
        if record.role != VpgRole.RECOVERY:
            raise StateError(f"VPG {name!r} is protected at this site: fail it over at its "
                             f"recovery site")
        self.states.check(name, Operation.FAILOVER)
        rvpg = self.rt.recovery_vpg(name)
        try:
            plan = FailoverPlan(0, CommitPolicy(commit_policy), commit_after_minutes,
                                ShutdownPolicy(shutdown_policy), reverse)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        plan.check()
        ckpt = await asyncio.to_thread(CheckpointChoice.parse(checkpoint).resolve, rvpg)
        plan = FailoverPlan(ckpt.id, plan.commit_policy, plan.commit_after_minutes,
                            plan.shutdown_policy, reverse)
        t = self.states.begin(name, Operation.FAILOVER)  # a second start is refused now
        self._refuse_attach(name, FailoverState.PROMOTING, plan)
        requested = time.monotonic()

        # committed at once (a move): the VMs boot once, on the replicas, after the commit
        at_once = plan.commit_policy == CommitPolicy.COMMIT and plan.commit_after_minutes == 0

        async def run(progress: Progress) -> dict[str, Any]:
            fo = await asyncio.to_thread(Failover.start, name, rvpg.journals,
                                         self.directory(name), plan)
            vms = None if at_once else self.vms.reserve(name, "failover")
            self.states.finish(t, True)  # failed over, whatever its VMs do next
            try:
                self._activate(fo)
                await self._event("failover_started",
                                  f"VPG {name} failed over to checkpoint {ckpt.id}: recovered "
                                  f"volumes served after {time.monotonic() - requested:.3f} "
                                  f"s, promoting", name)
                if vms is not None:
                    await progress(0.0, "starting the recovered VMs")
                    await self.vms.boot(fo, FAILOVER_PREFIX, "failover", vms)
            finally:
                if vms is not None:
                    vms.finished.set()  # a stop waiting for this boot goes on
            while not fo.wait_promoted(0) and fo.state == FailoverState.PROMOTING:
                p = fo.promotion
                await progress(p.done_bytes / p.total_bytes if p.total_bytes else 0.0,
                               f"promoting {p.done_bytes} of {p.total_bytes} bytes")
                await asyncio.sleep(POLL_S)
            return fo.status()

        def settle(ok: bool) -> None:
            if not self.states.finish(t, ok) == OperationState.FAILED_OVER:
                self._allow_attach(name)  # nothing failed over: replication may attach

        return await self.runner.submit("failover_start", run, vpg=name, settle=settle)

    def _refuse_attach(self, name: str, state: FailoverState,
                       plan: FailoverPlan | None = None) -> None:
        """Refuse the VPG's ATTACH from now on and close its connection; a failover
        starting (`plan`) tells the protected site first, with its shutdown policy."""
        assert self.rt.recovery is not None
        self.rt.recovery.failed_over[name] = refusal(name, state)
        receiver = self.rt.receiver(name)
        conn = receiver.conn if receiver is not None else None
        if conn is not None and not conn.closed:
            if plan is not None:
                conn.tell_failed_over(name, plan.checkpoint_id, plan.shutdown_policy.value)
            conn.close(refusal(name, state))

    def _allow_attach(self, name: str) -> None:
        if self.rt.recovery is not None:
            self.rt.recovery.failed_over.pop(name, None)

    def _activate(self, fo: Failover) -> None:
        """Serve a failover's volumes, refuse the VPG's ATTACH, arm its commit policy."""
        self.active[fo.name] = fo
        self._refuse_attach(fo.name, fo.state)
        self._export(fo)
        deadline = fo.deadline
        if deadline is not None and fo.state in (FailoverState.PROMOTING,
                                                 FailoverState.FAILED_OVER):
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - time.time())
            self._timers[fo.name] = loop.call_later(delay, self._policy_due, fo.name)

    def _policy_due(self, name: str) -> None:
        self._timers.pop(name, None)
        fo = self.active.get(name)
        if fo is None:
            return
        act = self.commit if fo.plan.commit_policy == CommitPolicy.COMMIT else self.rollback
        task = asyncio.get_running_loop().create_task(act(name))
        task.add_done_callback(_log_failure)

    def _export(self, fo: Failover) -> None:
        self._unexport(fo.name)
        if fo.state == FailoverState.COMMITTED:
            for (vm, vol), path in fo.replica_paths().items():
                self.rt.nbd.add_export(file_export(
                    path, f"{RECOVERED_PREFIX}/{fo.name}/{vm}/{vol}"))
            return
        for (vm, vol), ov in fo.overlays.items():
            self.rt.nbd.add_export(overlay_export(
                ov, f"{FAILOVER_PREFIX}/{fo.name}/{vm}/{vol}", owned=False))

    def _unexport(self, name: str) -> None:
        for prefix in (FAILOVER_PREFIX, RECOVERED_PREFIX):
            for export in list(self.rt.nbd.exports()):
                if export.name.startswith(f"{prefix}/{name}/"):
                    self.rt.nbd.remove_export(export.name)

    # ---- commit and rollback -------------------------------------------------------------

    def _begin(self, name: str, op: Operation) -> tuple[Failover, Transition]:
        t = self.states.begin(name, op)
        fo = self.active.get(name)
        assert fo is not None  # the states that allow commit and rollback hold a failover
        return fo, t

    def _settle(self, t: Transition, fo: Failover) -> Callable[[bool], None]:
        """A commit's or rollback's end: on failure the VPG is where the failover's
        state file says (a stop of its VMs that failed changed nothing)."""
        def settle(ok: bool) -> None:
            self.states.finish(t, ok)
            if not ok:
                self.states.set(t.vpg, fo.operation_state)
        return settle

    async def commit(self, name: str) -> TaskRecord:
        fo, t = self._begin(name, Operation.COMMIT)
        self._cancel_timer(name)

        async def run(progress: Progress) -> dict[str, Any]:
            await progress(0.0, f"committing VPG {name}: stopping the recovered VMs")
            await self.vms.stop(fo, StopMode.GRACEFUL)
            await progress(0.1, f"committing VPG {name}: finishing promotion")
            self._unexport(name)
            await asyncio.to_thread(fo.commit)
            self.states.finish(t, True)  # committed: reverse protection may begin
            self.rt.reload_recovery_vpg(name)  # its cached checkpoints are gone
            self._export(fo)
            await self._event("failover_committed",
                              f"VPG {name} committed at checkpoint {fo.plan.checkpoint_id}: "
                              f"the recovered volumes are the replicas", name)
            if fo.plan.reverse and self.after_commit is not None:
                # reverse protection boots the VMs on the volumes it protects
                status = self.status(name)
                await self.after_commit(name)
                return status
            await progress(0.9, "starting the recovered VMs on the replicas")
            await self.vms.boot(fo, RECOVERED_PREFIX, "recovered")
            return self.status(name)

        return await self.runner.submit("failover_commit", run, vpg=name,
                                        settle=self._settle(t, fo))

    async def rollback(self, name: str) -> TaskRecord:
        fo, t = self._begin(name, Operation.ROLLBACK)
        self._cancel_timer(name)

        async def run(progress: Progress) -> dict[str, Any]:
            await self.vms.stop(fo, StopMode.FORCE)
            self._unexport(name)
            await asyncio.to_thread(fo.rollback)
            self.active.pop(name, None)
            self._allow_attach(name)
            await self._event("failover_rolled_back",
                              f"VPG {name} rolled back from checkpoint "
                              f"{fo.plan.checkpoint_id}: replicating again", name)
            return {"vpg": name, "state": None, "checkpoint_id": fo.plan.checkpoint_id}

        return await self.runner.submit("failover_rollback", run, vpg=name,
                                        settle=self._settle(t, fo))

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def status(self, name: str) -> dict[str, Any]:
        fo = self.active.get(name)
        if fo is None:
            return {"vpg": name, "state": None}
        out = fo.status()
        prefix = RECOVERED_PREFIX if fo.state == FailoverState.COMMITTED else FAILOVER_PREFIX
        out["exports"] = sorted(e.name for e in self.rt.nbd.exports()
                                if e.name.startswith(f"{prefix}/{name}/"))
        out["vms"] = self.vms.status(name)
        return out

    # ---- restart and stop ----------------------------------------------------------------

    async def restore(self) -> None:
        """Resume every failover a previous process left (before the scheduler starts)."""
        root = self.rt.site.root / "failover"
        if not root.is_dir():
            return
        for path in sorted(p for p in root.iterdir() if p.is_dir()):
            rvpg = self.rt.recovery_vpgs.get(path.name)
            if rvpg is None:
                log.error("failover state %s names no recovery VPG here", path)
                continue
            fo = await asyncio.to_thread(Failover.resume, path.name, rvpg.journals, path)
            if fo is not None:
                self.states.set(fo.name, fo.operation_state)
                self._activate(fo)
                log.info("failover of %s resumed (%s)", fo.name, fo.state)
                if (fo.state == FailoverState.COMMITTED and fo.plan.reverse
                        and self.after_commit is not None):
                    await self.after_commit(fo.name)

    async def release(self, name: str, refusal: str) -> None:
        """Forget a committed failover whose volumes leave the journals (reverse
        protection, which holds the VPG's `reversing` state): its VMs stop, its exports
        and state go; ATTACHes of the VPG stay refused with `refusal`."""
        fo = self.active[name]
        await self.vms.stop(fo, StopMode.GRACEFUL)  # they run on `recovered/` exports
        self._unexport(name)
        await asyncio.to_thread(fo.close)
        self.active.pop(name, None)
        assert self.rt.recovery is not None
        self.rt.recovery.failed_over[name] = refusal
        await asyncio.to_thread(shutil.rmtree, self.directory(name), True)

    async def close(self) -> None:
        for name in list(self._timers):
            self._cancel_timer(name)
        for name, fo in list(self.active.items()):
            self._unexport(name)
            await asyncio.to_thread(fo.close)
        self.active.clear()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a failover commit policy failed: %s", task.exception())
