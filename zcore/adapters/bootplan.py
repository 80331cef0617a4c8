"""A VPG's boot plan: pre-operation scripts, its VMs started in boot order with delays, then
post-operation scripts.

What an operation (failover test, failover, move) runs once the VPG's volumes are served:
`BootPlan.run` blocks through every step in order and returns a `BootReport`.  When a step
fails it raises `BootPlanError` naming the step, with the report of what ran: the VMs that
already started are left running, so the user can fix the cause and continue
(`BootPlan.run(resume=report)` skips what is done) or roll the operation back (which stops
`report.started`).  Scripts get `default_timeout` (the site-wide default) unless they name
their own; they run with ZCORE_OPERATION, ZCORE_VPG, ZCORE_PHASE ("pre" or "post"), the
checkpoint's variables and ZCORE_VMS (the plan's VMs in boot order) in their environment.

Delays are waited on `cancel` (a threading.Event), so an operation being aborted does not
sit out a long delay.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from zcore.adapters.base import DEFAULT_TIMEOUT, Adapter, StopMode, checkpoint_env
from zcore.adapters.scripts import Command, describe, run_script
from zcore.errors import AdapterError
from zcore.records import Checkpoint


@dataclass(frozen=True)
class BootStep:
    """One VM of the boot order: wait `delay` seconds (after the previous step), then start
    it on `nbd_uris` (boot disk first) with `timeout` (None: the plan's default)."""

    vm: str
    nbd_uris: tuple[str, ...]
    delay: float = 0.0
    timeout: float | None = None


@dataclass(frozen=True)
class Script:
    """A pre- or post-operation script with its own timeout (None: the plan's default)."""

    command: Command
    timeout: float | None = None


class StepKind(StrEnum):
    PRE = "pre"
    START = "start"
    POST = "post"


@dataclass
class StepResult:
    """One step that ran (or failed): what it was, how long it took, what it printed."""

    kind: StepKind
    index: int  # its position among the plan's steps of its kind (0 = first pre script...)
    name: str  # the VM's name, or the script's command line
    seconds: float
    output: str = ""
    error: str | None = None


@dataclass
class BootReport:
    """What a boot plan did: each step in order and the VMs it left running."""

    steps: list[StepResult] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @property
    def failed(self) -> StepResult | None:
        return next((s for s in self.steps if s.error is not None), None)

    def done(self, kind: StepKind, index: int) -> bool:
        """Whether the `index`-th step of `kind` succeeded."""
        return any(s.kind is kind and s.index == index and s.error is None
                   for s in self.steps)


class BootPlanError(AdapterError):
    """A step of a boot plan failed.  `step` is that step's result (its `error` says why),
    `report` what the plan did before; `report.started` is still running."""

    def __init__(self, message: str, step: StepResult, report: BootReport) -> None:
        super().__init__(message)
        self.step = step
        self.report = report


class BootPlan:
    """The boot order of one VPG for one operation.  `steps` start through `adapter` in
    order, after the `pre` scripts and before the `post` scripts."""

    def __init__(self, adapter: Adapter, steps: Sequence[BootStep], *,
                 checkpoint: Checkpoint | str | None, vpg: str = "", operation: str = "",
                 pre: Sequence[Script] = (), post: Sequence[Script] = (),
                 default_timeout: float = DEFAULT_TIMEOUT,
                 cancel: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [s.vm for s in steps]
        if len(set(names)) != len(names):
            raise AdapterError(f"a boot plan names a VM twice: {names}")
        self.adapter = adapter
        self.steps = list(steps)
        self.checkpoint = checkpoint
        self.vpg = vpg
        self.operation = operation
        self.pre = list(pre)
        self.post = list(post)
        self.default_timeout = default_timeout
        self.cancel = cancel or threading.Event()
        self._clock = clock

    def _script_env(self, phase: StepKind) -> dict[str, str]:
        return {"ZCORE_OPERATION": self.operation, "ZCORE_VPG": self.vpg,
                "ZCORE_PHASE": str(phase), "ZCORE_VMS": " ".join(s.vm for s in self.steps),
                **checkpoint_env(self.checkpoint)}

    def _record(self, report: BootReport, kind: StepKind, index: int, name: str,
                action: Callable[[], str]) -> None:
        t0 = self._clock()
        try:
            output = action()
        except Exception as exc:
            step = StepResult(kind, index, name, self._clock() - t0, error=str(exc))
            report.steps.append(step)
            what = "VM" if kind is StepKind.START else f"{kind}-operation script"
            raise BootPlanError(f"boot plan of VPG {self.vpg or '?'} failed at {what} "
                                f"{name!r}: {exc}; left running: "
                                f"{', '.join(report.started) or 'nothing'}",
                                step, report) from exc
        report.steps.append(StepResult(kind, index, name, self._clock() - t0, output))

    def _run_scripts(self, scripts: Sequence[Script], phase: StepKind,
                     report: BootReport) -> None:
        env = self._script_env(phase)
        for index, script in enumerate(scripts):
            if report.done(phase, index):
                continue
            timeout = self.default_timeout if script.timeout is None else script.timeout
            self._record(report, phase, index, describe(script.command), functools.partial(
                self._run_one, script.command, env, timeout, phase))

    @staticmethod
    def _run_one(command: Command, env: dict[str, str], timeout: float,
                 phase: StepKind) -> str:
        return run_script(command, env, timeout, what=f"{phase}-operation script").output

    def _start(self, step: BootStep, report: BootReport) -> str:
        if step.delay > 0 and self.cancel.wait(step.delay):
            raise AdapterError("the operation was cancelled during the boot delay")
        if self.cancel.is_set():
            raise AdapterError("the operation was cancelled")
        timeout = self.default_timeout if step.timeout is None else step.timeout
        self.adapter.start(step.vm, step.nbd_uris, self.checkpoint, timeout)
        report.started.append(step.vm)
        return ""

    def run(self, resume: BootReport | None = None) -> BootReport:
        """Run the plan (blocking): pre scripts, each VM with its delay, post scripts.
        With `resume` (the report of a failed run), steps that already succeeded are
        skipped and the failed one is retried.  Raises `BootPlanError` at the first step
        that fails."""
        report = BootReport(
            steps=[s for s in resume.steps if s.error is None] if resume else [],
            started=list(resume.started) if resume else [],
        )
        self._run_scripts(self.pre, StepKind.PRE, report)
        for index, step in enumerate(self.steps):
            if step.vm in report.started:
                continue
            self._record(report, StepKind.START, index, step.vm,
                         functools.partial(self._start, step, report))
        self._run_scripts(self.post, StepKind.POST, report)
        return report

    def stop_started(self, report: BootReport, mode: StopMode = StopMode.GRACEFUL,
                     timeout: float | None = None) -> dict[str, AdapterError]:
        """Stop the VMs `report` left running, in reverse boot order (blocking); a rollback
        does this.  Returns the VMs that did not stop, with why; they stay in
        `report.started`."""
        failures: dict[str, AdapterError] = {}
        t = self.default_timeout if timeout is None else timeout
        for vm in reversed(list(report.started)):
            try:
                self.adapter.stop(vm, mode, t)
            except AdapterError as exc:
                failures[vm] = exc
            else:
                report.started.remove(vm)
        return failures
