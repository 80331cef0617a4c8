"""The site service's recovery operations: the failover test today (start, stop with a
verdict, status, its recovery settings and the test reminder), run as tasks.

Sits between the REST API (zcore.site.api.routes.operations, which calls it) and the
recovery package (zcore.recovery: states, checkpoint choice, the failover test's
overlays) and the hypervisor adapters (zcore.adapters: the VPG's adapter and boot plan,
from its settings), over the live site (zcore.site.runtime: the recovery VPGs'
journals and the NBD server) and the database (tasks, events, alerts, and the VPG's
record).  Every method runs on the service's event loop; blocking work (opening views
and overlays, adapter commands, database calls) goes to worker threads.

State.  The operation state of each VPG (zcore.recovery.states) is held in memory: a
running test lives in this process (its scratch files are unlinked temporaries), so a
restart ends it.  `recover()` at start closes the record of a test a previous process
left running as `aborted`, with an event.

What is kept with the recovery VPG's database record (its `settings` document, which a
recovery VPG otherwise leaves empty: its replication settings are its protected site's):
- `recovery`: the recovery-side settings: the adapter keys (zcore.adapters.settings:
  `adapter` none | command | qemu, `start_command`, `stop_command`, `status_command`,
  `command_timeout_seconds`, `boot_order`, `pre_scripts`, `post_scripts`, `qemu`),
  `test_scratch_limit_bytes` (the VPG's scratch limit, summed over its overlays),
  `test_period_days` (the reminder; none: no reminder);
- `tests`: the last TEST_HISTORY test records (zcore.recovery.test_op.TestRecord), the
  verdict a DR user audits, tied to the tested checkpoint's id;
- `test_running`: the record of the test in progress.

VMs.  A test's start boots the VPG's VMs on the test exports through its boot plan (pre
scripts, boot order with delays, post scripts; `command_timeout_seconds` or the site-wide
`default_timeout` for steps naming none); the qemu adapter's VM directories are
DIR/vms/test/<vpg>/<vm>/ (console.log there).  A start whose script or adapter fails
rolls itself back: the VMs it started are stopped, its overlays discarded, the VPG is
replicating again and the task's error (and a `test_start_failed` event) names the step,
so the user fixes it and starts again.  Stop ends the VMs by force (their writes are
discarded anyway), in reverse boot order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from zcore.adapters import (
    ADAPTER_KEYS,
    DEFAULT_TIMEOUT,
    BootPlan,
    BootPlanError,
    BootReport,
    StopMode,
    boot_plan,
    check_adapter_settings,
    make_adapter,
)
from zcore.errors import ConfigError, StateError, ZcoreError
from zcore.recovery import (
    DEFAULT_TEST_SCRATCH_BYTES,
    CheckpointChoice,
    FailoverTest,
    Operation,
    OperationState,
    OperationStates,
    TestRecord,
    TestResult,
    Transition,
)
from zcore.recovery.test_op import utc_stamp
from zcore.site.db import Severity, SiteDB, TaskRecord, VpgRecord, VpgRole
from zcore.site.runtime import SiteRuntime
from zcore.site.tasks import Progress, TaskRunner

log = logging.getLogger(__name__)

TEST_HISTORY = 50  # test records kept per VPG
TEST_OVERDUE_ALERT = "test_overdue"
DAY = 86_400.0
# the keys of a VPG's recovery settings: the adapter keys are checked by
# zcore.adapters.settings (their types here say what a value is), the others here
RECOVERY_KEYS = {"adapter": str, "start_command": str, "stop_command": str,
                 "status_command": str, "command_timeout_seconds": float,
                 "boot_order": list, "pre_scripts": list, "post_scripts": list, "qemu": dict,
                 "test_scratch_limit_bytes": int, "test_period_days": float}


@dataclass
class RunningTest:
    test: FailoverTest
    plan: BootPlan
    exports: list[str]
    report: BootReport
    task_id: str = ""


def check_recovery_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The recovery settings, checked (unknown keys, types, bounds, the adapter)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        kind = RECOVERY_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"unknown recovery setting {key!r}; known: "
                              f"{', '.join(sorted(RECOVERY_KEYS))}")
        if value is None:
            continue
        if key in ADAPTER_KEYS:
            out[key] = value
            continue
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"recovery setting {key} must be a {kind.__name__}")
        if isinstance(value, int | float) and value <= 0:
            raise ConfigError(f"recovery setting {key} must be positive")
        out[key] = value
    out.update(check_adapter_settings(out))
    return out


class RecoveryOperations:
    """The recovery operations of one running site (see the module docstring)."""

    def __init__(self, db: SiteDB, runtime: SiteRuntime, runner: TaskRunner,
                 states: OperationStates | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.db = db
        self.default_timeout = default_timeout  # the site-wide default of scripts (s)
        self.rt = runtime
        self.runner = runner
        # the site's one operation table, shared with failover (zcore.site.live's)
        self.states = OperationStates() if states is None else states
        self.tests: dict[str, RunningTest] = {}
        self._record_lock = asyncio.Lock()  # read-modify-write of a VPG's settings

    # -- records -------------------------------------------------------------------------

    async def _recovery_record(self, name: str, what: str) -> VpgRecord:
        record = await asyncio.to_thread(self.db.get_vpg, name)
        if record.role != VpgRole.RECOVERY:
            raise StateError(f"VPG {name!r} is protected by this site: {what} runs at its "
                             f"recovery site ({record.peer or 'none named'})")
        return record

    async def _update_doc(self, name: str, **changes: Any) -> dict[str, Any]:
        """Replace keys of the VPG record's settings document (None removes a key)."""
        async with self._record_lock:
            record = await asyncio.to_thread(self.db.get_vpg, name)
            doc = dict(record.settings)
            for key, value in changes.items():
                if value is None:
                    doc.pop(key, None)
                else:
                    doc[key] = value
            await asyncio.to_thread(self.db.update_vpg, name, settings=doc)
            return doc

    async def _event(self, code: str, text: str, vpg: str,
                     severity: Severity = Severity.INFO) -> None:
        await asyncio.to_thread(self.db.add_event, code, text, vpg=vpg, severity=severity)

    async def recovery_settings(self, name: str) -> dict[str, Any]:
        record = await self._recovery_record(name, "a recovery setting")
        return dict(record.settings.get("recovery", {}))

    async def update_recovery_settings(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        current = await self.recovery_settings(name)
        merged = {**current, **patch}
        checked = check_recovery_settings({k: v for k, v in merged.items() if v is not None})
        await self._update_doc(name, recovery=checked)
        return checked

    def history(self, record: VpgRecord) -> list[TestRecord]:
        return [TestRecord.from_dict(d) for d in record.settings.get("tests", [])]

    # -- start -----------------------------------------------------------------------------

    async def test_start(self, name: str, choice: CheckpointChoice) -> TaskRecord:
        """Start a failover test at the checkpoint `choice` names (a task).  The choice and
        the state are checked now: a refusal is an error of this call, not of the task."""
        record = await self._recovery_record(name, "a failover test")
        settings = check_recovery_settings(dict(record.settings.get("recovery", {})))
        rvpg = self.rt.recovery_vpg(name)
        checkpoint = await asyncio.to_thread(choice.resolve, rvpg)
        transition = self.states.begin(name, Operation.TEST_START)
        limit = int(settings.get("test_scratch_limit_bytes", DEFAULT_TEST_SCRATCH_BYTES))
        test = FailoverTest(name, rvpg.journals, checkpoint, limit_bytes=limit)

        async def run(progress: Progress) -> dict[str, Any]:
            ok = False
            try:
                result = await self._start(test, settings, progress)
                ok = True
                return result
            finally:
                detail = f"checkpoint {checkpoint.id}, since {utc_stamp(test.started_at)}" \
                    if ok else ""
                self.states.finish(transition, ok, detail)

        try:
            task = await self.runner.submit("test_start", run, vpg=name,
                                            message=f"failover test of {name} at checkpoint "
                                                    f"{checkpoint.id}")
        except BaseException:
            self.states.finish(transition, False)
            raise
        return task

    async def _start(self, test: FailoverTest, settings: dict[str, Any],
                     progress: Progress) -> dict[str, Any]:
        name, ckpt = test.vpg, test.checkpoint
        await progress(0.1, f"opening scratch overlays at checkpoint {ckpt.id}")
        await asyncio.to_thread(test.open)
        exports: list[str] = []
        running: RunningTest | None = None
        try:
            for export in test.exports():
                self.rt.nbd.add_export(export)
                exports.append(export.name)
            running = RunningTest(test, self._plan(test, settings), exports, BootReport())
            self.tests[name] = running
            await self._update_doc(name, test_running=test.record().to_dict())
            await progress(0.3, f"starting {len(running.plan.steps)} VM(s) "
                                f"({running.plan.adapter.name} adapter)")
            try:
                running.report = await asyncio.to_thread(running.plan.run)
            except BootPlanError as exc:
                running.report = exc.report  # what it left running: the teardown stops it
                raise
        except BaseException as exc:
            await self._teardown(name, test, exports, running)
            await self._update_doc(name, test_running=None)
            await self._event("test_start_failed", f"failover test of VPG {name} at "
                              f"checkpoint {ckpt.id} did not start (rolled back): {exc}",
                              name, Severity.ERROR)
            raise
        adapter = running.plan.adapter.name
        tag = f" {ckpt.tag!r}" if ckpt.tag else ""
        await self._event("test_started", f"failover test of VPG {name} started at "
                          f"checkpoint {ckpt.id}{tag}: {len(exports)} volume(s) served "
                          f"as test/{name}/..., VMs by the {adapter} adapter", name)
        return {"vpg": name, "checkpoint": _ckpt(ckpt), "started_at": test.started_at,
                "exports": [self._uri(e) for e in exports], "adapter": adapter,
                "vms": running.report.started}

    def _uri(self, export: str) -> str:
        return export_uri(self.rt, export)

    def _plan(self, test: FailoverTest, settings: dict[str, Any]) -> BootPlan:
        """The boot plan of a test's VMs on its exports (volumes in name order)."""
        volumes: dict[str, dict[str, str]] = {}
        for v in test.volumes:
            volumes.setdefault(v.vm, {})[v.volume] = self._uri(v.export)
        adapter = make_adapter(settings, run_dir=self.rt.site.root / "vms" / "test" / test.vpg,
                               vpg=test.vpg, purpose="test", volumes=volumes)
        uris = {vm: [vols[v] for v in sorted(vols)] for vm, vols in volumes.items()}
        return boot_plan(adapter, settings, uris, checkpoint=test.checkpoint, vpg=test.vpg,
                         operation="test", default_timeout=self.default_timeout)

    async def _teardown(self, name: str, test: FailoverTest, exports: list[str],
                        running: RunningTest | None) -> list[str]:
        """Stop the VMs, drop the exports, discard the overlays; the adapter's errors."""
        problems: list[str] = []
        if running is not None:
            failed = await asyncio.to_thread(running.plan.stop_started, running.report,
                                             StopMode.FORCE)
            problems += [str(exc) for exc in failed.values()]
        for export in exports:
            if self.rt.nbd.lookup(export) is not None:
                self.rt.nbd.remove_export(export)
        await asyncio.to_thread(test.close)
        self.tests.pop(name, None)
        return problems

    # -- stop ------------------------------------------------------------------------------

    async def test_stop(self, name: str, result: TestResult, note: str = "") -> TaskRecord:
        """Stop the VPG's failover test with the user's verdict (a task)."""
        await self._recovery_record(name, "a failover test")
        if result == TestResult.ABORTED:
            raise ConfigError("a test's result is passed or failed")
        transition = self.states.begin(name, Operation.TEST_STOP)

        async def run(progress: Progress) -> dict[str, Any]:
            try:
                return await self._stop(name, result, note, progress)
            finally:
                self.states.finish(transition, True)

        try:
            return await self.runner.submit("test_stop", run, vpg=name,
                                            message=f"stopping the failover test of {name}")
        except BaseException:
            self._restore(transition)
            raise

    def _restore(self, t: Transition) -> None:
        self.states.set(t.vpg, t.before)

    async def _stop(self, name: str, result: TestResult, note: str,
                    progress: Progress) -> dict[str, Any]:
        running = self.tests.get(name)
        if running is None:  # cannot happen while the state machine holds
            raise StateError(f"VPG {name} has no failover test in this process")
        test = running.test
        used = test.used_bytes
        await progress(0.2, "stopping the test VMs and discarding the overlays")
        problems = await self._teardown(name, test, running.exports, running)
        ended = test.record().ended(result, note)
        await self._keep(name, ended)
        tag = f" {ended.checkpoint_tag!r}" if ended.checkpoint_tag else ""
        text = (f"{ended.label}: checkpoint {ended.checkpoint_id}{tag} of VPG {name} "
                f"{result}" + (f": {note}" if note else ""))
        severity = Severity.INFO if result == TestResult.PASSED else Severity.WARNING
        await self._event("test_result", text, name, severity)
        if problems:
            await self._event("test_stop_problem", f"failover test of VPG {name}: "
                              f"{'; '.join(problems)}", name, Severity.WARNING)
        if result == TestResult.PASSED:
            await self.remind_once(only=name)
        return {"vpg": name, "record": ended.to_dict(), "scratch_used_bytes": used,
                "problems": problems}

    async def _keep(self, name: str, ended: TestRecord) -> None:
        record = await asyncio.to_thread(self.db.get_vpg, name)
        tests = [*record.settings.get("tests", []), ended.to_dict()][-TEST_HISTORY:]
        await self._update_doc(name, tests=tests, test_running=None)

    # -- status ----------------------------------------------------------------------------

    async def test_status(self, name: str) -> dict[str, Any]:
        record = await self._recovery_record(name, "a failover test")
        running = self.tests.get(name)
        out: dict[str, Any] = {
            "vpg": name, "state": str(self.states.get(name)), "running": None,
            "history": [r.to_dict() for r in reversed(self.history(record))],
            "settings": dict(record.settings.get("recovery", {}))}
        if running is not None:
            test = running.test
            out["running"] = {
                **test.record().to_dict(), "checkpoint": _ckpt(test.checkpoint),
                "adapter": running.plan.adapter.name, "vms": running.report.started,
                "exports": [self._uri(e) for e in running.exports],
                "scratch_used_bytes": test.used_bytes,
                "scratch_limit_bytes": test.limit_bytes,
                "volumes": await asyncio.to_thread(test.usage)}
        return out

    def state(self, name: str) -> OperationState:
        return self.states.get(name)

    # -- reminder, recovery, close ---------------------------------------------------------

    async def remind_once(self, now: float | None = None, only: str | None = None) -> None:
        """Raise `test_overdue` for each recovery VPG whose last passed test (or, never
        tested, its creation) is older than its `test_period_days`; clear it otherwise.
        Two queries a round (VPGs, active alerts) plus one write per change."""
        now = time.time() if now is None else now
        try:
            await asyncio.to_thread(self._remind_all, now, only)
        except ZcoreError as exc:  # a VPG deleted meanwhile, the database away
            log.warning("test reminder failed: %s", exc)

    def _remind_all(self, now: float, only: str | None) -> None:
        records = self.db.list_vpgs(VpgRole.RECOVERY)
        active: dict[str, list[int]] = {}
        for alert in self.db.list_alerts(active=True, limit=None):
            if alert.code == TEST_OVERDUE_ALERT and alert.vpg is not None:
                active.setdefault(alert.vpg, []).append(alert.id)
        for record in records:
            if only is None or record.name == only:
                self._remind(record, now, active.get(record.name, []))

    def _remind(self, record: VpgRecord, now: float, active: list[int]) -> None:
        period = record.settings.get("recovery", {}).get("test_period_days")
        if period is None and not active:
            return
        passed = [r.started_at for r in self.history(record) if r.result == TestResult.PASSED]
        since = max(passed) if passed else record.created_at
        overdue = period is not None and now - since > float(period) * DAY
        if overdue and not active:
            what = "passed its last failover test" if passed else \
                "has had no passed failover test since it was created"
            text = (f"VPG {record.name} {what} {(now - since) / DAY:.2f} days ago; its test "
                    f"period is {float(period):g} days: run a failover test")
            self.db.raise_alert(TEST_OVERDUE_ALERT, text, vpg=record.name)
            self.db.add_event(TEST_OVERDUE_ALERT, text, vpg=record.name,
                              severity=Severity.WARNING)
        elif not overdue:
            for alert_id in active:
                self.db.clear_alert(alert_id)

    async def recover(self) -> None:
        """Close the record of every test a previous process left running (aborted)."""
        for record in await asyncio.to_thread(self.db.list_vpgs, VpgRole.RECOVERY):
            doc = record.settings.get("test_running")
            if not doc:
                continue
            ended = TestRecord.from_dict(doc).ended(
                TestResult.ABORTED, "the site service restarted during the test: its "
                "scratch overlays were discarded")
            await self._keep(record.name, ended)
            await self._event("test_aborted", f"failover test of VPG {record.name} at "
                              f"checkpoint {ended.checkpoint_id} ended by a restart of "
                              f"the site service (overlays discarded)", record.name,
                              Severity.WARNING)

    async def close(self) -> None:
        """Stop every running test's VMs and discard its overlays (service stop).  The
        record stays `test_running`, so the next start records it as aborted."""
        for name, running in list(self.tests.items()):
            try:
                await self._teardown(name, running.test, running.exports, running)
            except Exception:
                log.exception("VPG %s: the failover test did not stop cleanly", name)

    def forget(self, name: str) -> None:
        self.states.forget(name)


def export_uri(rt: SiteRuntime, export: str) -> str:
    """The NBD URI of `export` on the site's NBD listener (the bare name without one)."""
    if rt.nbd_address is None:
        return export
    host, port = rt.nbd_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"nbd://{host}:{port}/{export}"


def _ckpt(c: Any) -> dict[str, Any]:
    return {"id": c.id, "seq": c.seq, "time_ns": c.time_ns, "kind": str(c.kind),
            "tag": c.tag, "consistent": c.consistent}
