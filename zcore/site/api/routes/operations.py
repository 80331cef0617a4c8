"""Routes for recovery operations on a VPG at its recovery site: the failover test
(start with a checkpoint choice, stop with a verdict, status) and the VPG's recovery
settings (adapter, boot order, scripts, scratch limit, test period).

Long work answers 202 with a task; a refusal by the VPG's operation state is a 409 whose
message says what the VPG is doing and what is allowed now (zcore.recovery.states).
The routes reach `SiteContext.operations` (zcore.site.operations.RecoveryOperations);
a context without it (the API tests' double) answers 409 saying so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response
from pydantic import Field

from zcore.errors import StateError
from zcore.recovery import CheckpointChoice, TestResult
from zcore.site.api import models as m
from zcore.site.api.backend import SiteContext
from zcore.site.api.routes.common import ERRORS, PROTECTED, accepted

NamePath = Annotated[str, Path(max_length=128)]


class TestStart(m.Model):
    checkpoint: str = Field(
        default="latest", max_length=300,
        description="latest | latest-tagged | latest-consistent | id:N | tag:NAME | "
                    "before:TIME (ISO 8601, UTC without a zone, or epoch seconds)")


class TestStop(m.Model):
    result: Literal["passed", "failed"]
    note: str = Field(default="", max_length=2000)


class RecoverySettings(m.Model):
    """The VPG's recovery settings; the adapter keys are described in
    zcore.adapters.settings (and checked there: a wrong value is a 422 saying why)."""

    adapter: str | None = Field(default=None, max_length=64,
                                description="none (serve the exports only) | command | qemu")
    start_command: str | None = Field(default=None, max_length=4096)
    stop_command: str | None = Field(default=None, max_length=4096)
    status_command: str | None = Field(default=None, max_length=4096)
    command_timeout_seconds: float | None = Field(default=None, gt=0, le=86_400)
    boot_order: list[str | dict[str, Any]] | None = Field(
        default=None, max_length=1000,
        description="VM names or {vm, delay_seconds, timeout_seconds}, first to start first")
    pre_scripts: list[str | dict[str, Any]] | None = Field(
        default=None, max_length=100, description="commands or {command, timeout_seconds}")
    post_scripts: list[str | dict[str, Any]] | None = Field(
        default=None, max_length=100, description="commands or {command, timeout_seconds}")
    qemu: dict[str, Any] | None = Field(
        default=None, description="the qemu adapter: memory_mib, cpus, accel, kernel, "
                                  "initrd, append, extra_args, vms: {vm: {...}}")
    test_scratch_limit_bytes: int | None = Field(default=None, ge=1 << 20, le=1 << 50)
    test_period_days: float | None = Field(default=None, gt=0, le=3650)


def operations_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(dependencies=PROTECTED, responses=ERRORS, tags=["operations"])

    def ops() -> Any:
        if ctx.operations is None:
            raise StateError("this site runs no recovery operations (no site service)")
        return ctx.operations

    @r.post("/vpgs/{name}/test", status_code=202,
            summary="Start a failover test at a checkpoint (a task)")
    async def test_start(name: NamePath, body: TestStart, response: Response) -> m.Task:
        choice = CheckpointChoice.parse(body.checkpoint)
        return accepted(response, await ops().test_start(name, choice))

    @r.post("/vpgs/{name}/test/stop", status_code=202,
            summary="Stop the failover test with its result (a task)")
    async def test_stop(name: NamePath, body: TestStop, response: Response) -> m.Task:
        return accepted(response, await ops().test_stop(name, TestResult(body.result),
                                                        body.note))

    @r.get("/vpgs/{name}/test", summary="The failover test: running, history, settings")
    async def test_status(name: NamePath) -> dict[str, Any]:
        status: dict[str, Any] = await ops().test_status(name)
        return status

    @r.get("/vpgs/{name}/recovery-settings", summary="The VPG's recovery settings")
    async def recovery_settings(name: NamePath) -> dict[str, Any]:
        found: dict[str, Any] = await ops().recovery_settings(name)
        return found

    @r.patch("/vpgs/{name}/recovery-settings", summary="Change the VPG's recovery settings")
    async def update_recovery_settings(name: NamePath,
                                       body: RecoverySettings) -> dict[str, Any]:
        patch = body.model_dump(exclude_unset=True)
        found: dict[str, Any] = await ops().update_recovery_settings(name, patch)
        return found

    return r
