"""The recovered VMs of a live failover: booted through the VPG's adapter and boot plan on
its exports, stopped before a rollback or a commit, booted again on the replicas after a
commit.

Sits beside zcore.site.failover_ops (which calls it from its start, commit and rollback
tasks) over zcore.adapters (the VPG's adapter and boot plan, from the adapter keys of its
recovery settings, as zcore.site.operations keeps them).  Runs on the service's event
loop; the adapter's blocking calls go to worker threads.

What a failure leaves.  A boot whose script or adapter fails fails its task (the error
names the step) and logs `failover_vms_failed`; the failover itself stays where it is
(started or committed, its exports served, promotion going on), and `status()` (in the
failover's status, `vms`) holds the error and the VMs that did start: the user starts the
rest by hand and commits, or rolls back, which stops whatever runs.  A stop that fails
(a VM that does not go down even by force) fails the rollback or commit task before it
changes anything, so it can be retried.

Stops cover every VM of the VPG, not only the ones this process started: after a restart
of the site service the qemu adapter finds its VMs by their pid files (DIR/vms/failover/
<vpg>/<vm>/), and stopping a VM that does not run is not an error.  A commit stops them
gracefully (ACPI power-down, so guests flush; by force when that times out): their
flushed writes are in the overlay that the commit folds into the replicas.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from zcore.adapters import (
    DEFAULT_TIMEOUT,
    Adapter,
    BootPlan,
    BootPlanError,
    BootReport,
    StopMode,
    boot_plan,
    make_adapter,
)
from zcore.errors import AdapterError
from zcore.recovery.failover import Failover
from zcore.site.db import Severity, SiteDB
from zcore.site.operations import check_recovery_settings, export_uri
from zcore.site.runtime import SiteRuntime


@dataclass
class VMRun:
    """The VMs of one VPG's failover in this process: the last plan run and its outcome."""

    phase: str  # "failover" (on the overlays) or "recovered" (on the replicas)
    adapter: str
    plan: BootPlan | None = None
    report: BootReport = field(default_factory=BootReport)
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # the boot has ended

    def status(self) -> dict[str, Any]:
        return {"phase": self.phase, "adapter": self.adapter, "started": self.report.started,
                "error": self.error}


class FailoverVMs:
    """Boots and stops the recovered VMs of a site's failovers (see the module docstring)."""

    def __init__(self, db: SiteDB, runtime: SiteRuntime,
                 default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.db = db
        self.rt = runtime
        self.default_timeout = default_timeout  # the site-wide default of scripts (s)
        self.runs: dict[str, VMRun] = {}

    async def _plan(self, name: str, volumes: dict[str, dict[str, str]], phase: str,
                    checkpoint: str, cancel: threading.Event | None = None) -> BootPlan:
        """The VPG's boot plan over `volumes` (VM -> volume -> export name)."""
        record = await asyncio.to_thread(self.db.get_vpg, name)
        settings = check_recovery_settings(dict(record.settings.get("recovery", {})))
        uris = {vm: {vol: export_uri(self.rt, export) for vol, export in vols.items()}
                for vm, vols in volumes.items()}
        adapter: Adapter = make_adapter(
            settings, run_dir=self.rt.site.root / "vms" / "failover" / name, vpg=name,
            purpose=phase, volumes=uris)
        ordered = {vm: [vols[v] for v in sorted(vols)] for vm, vols in uris.items()}
        return boot_plan(adapter, settings, ordered, checkpoint=checkpoint, vpg=name,
                         operation=phase, default_timeout=self.default_timeout,
                         cancel=cancel)

    @staticmethod
    def exports(fo: Failover, prefix: str) -> dict[str, dict[str, str]]:
        """VM -> volume -> export name of a failover's volumes under `prefix`."""
        return {vm: {spec.name: f"{prefix}/{fo.name}/{vm}/{spec.name}"
                     for spec in journal.volumes.values()}
                for vm, journal in fo.journals.items()}

    def reserve(self, name: str, phase: str) -> VMRun:
        """The run of a boot about to begin, registered now: a commit or rollback that
        comes before the boot has started its VMs cancels it and waits for it to end
        (call it with no await before the operation that allows them)."""
        run = VMRun(phase, "?")
        self.runs[name] = run
        return run

    async def boot(self, fo: Failover, prefix: str, phase: str,
                   run: VMRun | None = None) -> dict[str, Any]:
        """Run the VPG's boot plan on the exports under `prefix` (blocking work in a thread);
        `BootPlanError` (after an event) when a step fails."""
        return await self.boot_exports(fo.name, self.exports(fo, prefix), phase,
                                       str(fo.plan.checkpoint_id), run)

    async def boot_exports(self, name: str, volumes: dict[str, dict[str, str]], phase: str,
                           checkpoint: str = "", run: VMRun | None = None) -> dict[str, Any]:
        """`boot` on any exports (VM -> volume -> export name): reverse protection boots
        the VMs on the volumes it protects.  A boot a stop cancels ends without error."""
        run = self.reserve(name, phase) if run is None else run
        try:
            run.plan = plan = await self._plan(name, volumes, phase, checkpoint, run.cancel)
            run.adapter = plan.adapter.name
            try:
                run.report = await asyncio.to_thread(plan.run)
            except BootPlanError as exc:
                run.report, run.error = exc.report, str(exc)
                if run.cancel.is_set():  # a commit or rollback stops these VMs anyway
                    return run.status()
                await asyncio.to_thread(
                    self.db.add_event, "failover_vms_failed",
                    f"VPG {name}: the recovered VMs did not all start ({phase}): {exc}; the "
                    f"operation stays as it is: start the rest yourself, or roll back",
                    vpg=name, severity=Severity.ERROR)
                raise
            return run.status()
        finally:
            run.finished.set()

    async def stop(self, fo: Failover, mode: StopMode) -> None:
        """Stop every VM of the VPG (reverse boot order; a graceful stop that fails is
        retried by force); `AdapterError` naming the VMs still running."""
        await self.stop_exports(fo.name, self.exports(fo, "failover"), mode,
                                str(fo.plan.checkpoint_id))

    async def stop_exports(self, name: str, volumes: dict[str, dict[str, str]],
                           mode: StopMode, checkpoint: str = "") -> None:
        """`stop` of VMs on any exports (VM -> volume -> export name): a planned move
        stops the VMs at the protected site before it refuses their writes."""
        run = self.runs.get(name)
        if run is not None:
            run.cancel.set()  # a boot still running stops at its next step:
            await run.finished.wait()  # the VM it is starting is then stopped too
        plan = run.plan if run is not None and run.plan is not None else \
            await self._plan(name, volumes, "failover", checkpoint)
        everyone = BootReport(started=[s.vm for s in plan.steps])
        failed = await asyncio.to_thread(plan.stop_started, everyone, mode)
        if failed and mode is StopMode.GRACEFUL:
            await asyncio.to_thread(
                self.db.add_event, "failover_vms_forced",
                f"VPG {name}: {', '.join(failed)} did not power off gracefully and "
                f"were stopped by force", vpg=name, severity=Severity.WARNING)
            failed = await asyncio.to_thread(plan.stop_started, everyone, StopMode.FORCE)
        if failed:
            why = "; ".join(f"{vm}: {exc}" for vm, exc in failed.items())
            raise AdapterError(f"VPG {name}: the recovered VMs did not stop, nothing "
                               f"changed (retry once they are down): {why}")
        self.runs.pop(name, None)

    def status(self, name: str) -> dict[str, Any] | None:
        run = self.runs.get(name)
        return None if run is None else run.status()
