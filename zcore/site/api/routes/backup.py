"""Routes for extended-recovery backups (zcore.backup.siteops): run a backup of a recovery
VPG, restore one, check and prune a repository (tasks); list and show backups; a VPG's
backup schedule (daily, in a window, GFS retention); instant access (a backup's volumes
served on the site's NBD server); file-level restore from a backup or a checkpoint.  The
repository is a path at this site; its secret is a key file path, a passphrase in the body
(used for this request only), or the site's $ZCORE_BACKUP_PASSPHRASE."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from zcore.errors import StateError
from zcore.site.api.backend import SiteContext
from zcore.site.api.models import Task
from zcore.site.api.routes.common import ERRORS, PROTECTED, accepted
from zcore.site.errors import NotFoundError

NamePath = Annotated[str, Path(max_length=128)]
BackupPath = Annotated[str, Path(max_length=64)]
CheckpointPath = Annotated[int, Path(ge=0, le=(1 << 63) - 1)]


class RepoRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository: str = Field(max_length=4096, description="the repository's path at this site")
    keyfile: str | None = Field(None, max_length=4096, description="a key file's path here")
    passphrase: str | None = Field(None, max_length=1024,
                                   description="used for this request only, never stored")


class BackupRun(RepoRef):
    checkpoint: int | None = Field(None, description="checkpoint id (default: the newest)")
    full: bool = Field(False, description="read everything (no incremental)")
    retain_days: float = Field(0.0, ge=0, le=36600, description="retention lock, days")


class BackupRestore(RepoRef):
    dest: str = Field(max_length=4096, description="directory at this site for the images")
    vms: list[str] | None = None


class BackupPreseed(RepoRef):
    vpg: str = Field(max_length=128, description="the new VPG's name")
    peer: str = Field(max_length=64, description="site id of the protected site that will "
                      "create it (with initial_sync=delta)")


class BackupCheck(RepoRef):
    repair: bool = Field(False, description="heal chunks from this site's journals where "
                         "they still hold them, quarantine the rest, rebuild the index")


class BackupServe(RepoRef):
    vms: list[str] | None = Field(None, max_length=1000, description="default: every VM")
    writable: bool = Field(False, description="under scratch overlays: writes are kept "
                           "until the backup is unserved, then discarded")
    scratch_limit_bytes: int | None = Field(None, ge=0, le=1 << 50,
                                            description="per volume (default its size)")


class FileRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str = Field(max_length=128)
    volume: str = Field(max_length=128)
    path: str = Field("/", max_length=4096, description="absolute, in the volume's ext4")


class BackupFiles(RepoRef, FileRef):
    pass


class BackupExtract(BackupFiles):
    dest: str = Field(max_length=4096, description="a directory at this site")


class CheckpointExtract(FileRef):
    dest: str = Field(max_length=4096, description="a directory at this site")


class BackupPrune(RepoRef):
    daily: int = Field(7, ge=0, le=100000)
    weekly: int = Field(4, ge=0, le=100000)
    monthly: int = Field(12, ge=0, le=100000)
    yearly: int = Field(0, ge=0, le=100000)
    last: int = Field(1, ge=0, le=100000)
    vpg: str | None = Field(None, max_length=128)
    dry_run: bool = False


class BackupSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository: str = Field(max_length=4096, description="the repository's path at this site")
    keyfile: str | None = Field(None, max_length=4096, description="else the site's "
                                "$ZCORE_BACKUP_PASSPHRASE")
    window_start: int = Field(0, ge=0, le=23, description="hour (UTC) the window opens")
    window_hours: int = Field(24, ge=1, le=24)
    daily: int = Field(7, ge=0, le=100000)
    weekly: int = Field(4, ge=0, le=100000)
    monthly: int = Field(12, ge=0, le=100000)
    yearly: int = Field(0, ge=0, le=100000)
    last: int = Field(1, ge=0, le=100000)
    retain_days: float = Field(0.0, ge=0, le=36600)


def _ops(ctx: SiteContext) -> Any:
    ops = getattr(ctx.backend, "backups", None)
    if ops is None:
        raise StateError("this site's backend runs no backups (a live site service does)")
    return ops


def backup_router(ctx: SiteContext) -> APIRouter:
    # long only by its nested handlers (one per route), as every routes module builds them
    from zcore.backup.prune import Retention
    from zcore.backup.schedule import Schedule
    from zcore.backup.siteops import secret_of

    r = APIRouter(dependencies=PROTECTED, responses=ERRORS, tags=["backups"])

    @r.post("/vpgs/{name}/backups", status_code=202,
            summary="Back up a recovery VPG at a checkpoint into a repository (a task)")
    async def backup_run(name: NamePath, body: BackupRun, response: Response) -> Task:
        task = await _ops(ctx).run(name, body.repository,
                                   secret_of(body.keyfile, body.passphrase),
                                   checkpoint=body.checkpoint, full=body.full,
                                   retain_days=body.retain_days)
        return accepted(response, task)

    @r.post("/backups/list", summary="The backups of a repository, oldest first")
    async def backup_list(body: RepoRef,
                          vpg: Annotated[str | None, Query(max_length=128)] = None
                          ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await _ops(ctx).list(
            body.repository, secret_of(body.keyfile, body.passphrase), vpg)
        return found

    @r.post("/backups/{backup}/show", summary="One backup: checkpoint, VMs, volumes")
    async def backup_show(backup: BackupPath, body: RepoRef) -> dict[str, Any]:
        shown: dict[str, Any] = await _ops(ctx).show(
            body.repository, secret_of(body.keyfile, body.passphrase), backup)
        return shown

    @r.post("/backups/{backup}/restore", status_code=202,
            summary="Restore a backup to volume images at this site (a task)")
    async def backup_restore(backup: BackupPath, body: BackupRestore,
                             response: Response) -> Task:
        task = await _ops(ctx).restore(body.repository,
                                       secret_of(body.keyfile, body.passphrase), backup,
                                       body.dest, body.vms)
        return accepted(response, task)

    @r.post("/backups/{backup}/preseed", status_code=202,
            summary="Restore a backup as the replicas of a new VPG, so that its protection "
                    "starts with a delta sync (a task)")
    async def backup_preseed(backup: BackupPath, body: BackupPreseed,
                             response: Response) -> Task:
        task = await _ops(ctx).preseed(body.repository, secret_of(body.keyfile,
                                                                   body.passphrase),
                                       backup, body.vpg, body.peer)
        return accepted(response, task)

    @r.post("/backups/check", status_code=202,
            summary="Decrypt and verify every manifest and chunk of a repository; or repair "
                    "it (a task)")
    async def backup_check(body: BackupCheck, response: Response) -> Task:
        task = await _ops(ctx).check(body.repository, secret_of(body.keyfile, body.passphrase),
                                     repair=body.repair)
        return accepted(response, task)

    @r.post("/backups/prune", status_code=202,
            summary="GFS retention and garbage collection of a repository (a task)")
    async def backup_prune(body: BackupPrune, response: Response) -> Task:
        policy = Retention(body.daily, body.weekly, body.monthly, body.yearly, body.last)
        task = await _ops(ctx).prune(body.repository, secret_of(body.keyfile, body.passphrase),
                                     policy, body.vpg, body.dry_run)
        return accepted(response, task)

    @r.post("/backups/{backup}/serve", status_code=201,
            summary="Instant access: serve a backup's volumes on this site's NBD server")
    async def backup_serve(backup: BackupPath, body: BackupServe) -> list[dict[str, Any]]:
        served: list[dict[str, Any]] = await _ops(ctx).serve(
            body.repository, secret_of(body.keyfile, body.passphrase), backup,
            vms=body.vms, writable=body.writable, scratch_limit=body.scratch_limit_bytes)
        return served

    @r.get("/backups/served", summary="The backups served for instant access, by backup")
    async def backup_served() -> dict[str, Any]:
        served: dict[str, Any] = _ops(ctx).served()
        return served

    @r.delete("/backups/{backup}/serve", status_code=204,
              summary="Stop serving a backup (its scratch writes are discarded)")
    async def backup_unserve(backup: BackupPath) -> Response:
        _ops(ctx).unserve(backup)
        return Response(status_code=204)

    @r.post("/backups/{backup}/files",
            summary="File-level restore: list a directory of a backup's ext4 volume")
    async def backup_files(backup: BackupPath, body: BackupFiles) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await _ops(ctx).files(
            body.repository, secret_of(body.keyfile, body.passphrase), backup, body.vm,
            body.volume, body.path)
        return found

    @r.post("/backups/{backup}/files/extract", status_code=202,
            summary="File-level restore: copy a file or directory of a backup out (a task)")
    async def backup_extract(backup: BackupPath, body: BackupExtract,
                             response: Response) -> Task:
        task = await _ops(ctx).extract(
            body.repository, secret_of(body.keyfile, body.passphrase), backup, body.vm,
            body.volume, body.path, body.dest)
        return accepted(response, task)

    @r.get("/vpgs/{name}/checkpoints/{checkpoint}/files",
           summary="File-level restore: list a directory of an ext4 volume at a checkpoint")
    async def checkpoint_files(name: NamePath, checkpoint: CheckpointPath,
                               vm: Annotated[str, Query(max_length=128)],
                               volume: Annotated[str, Query(max_length=128)],
                               path: Annotated[str, Query(max_length=4096)] = "/"
                               ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await _ops(ctx).checkpoint_files(
            name, checkpoint, vm, volume, path)
        return found

    @r.post("/vpgs/{name}/checkpoints/{checkpoint}/files/extract", status_code=202,
            summary="File-level restore: copy a file or directory out of a checkpoint "
                    "(a task)")
    async def checkpoint_extract(name: NamePath, checkpoint: CheckpointPath,
                                 body: CheckpointExtract, response: Response) -> Task:
        task = await _ops(ctx).checkpoint_extract(name, checkpoint, body.vm, body.volume,
                                                  body.path, body.dest)
        return accepted(response, task)

    @r.get("/vpgs/{name}/backup-schedule", summary="The VPG's backup schedule")
    async def schedule_get(name: NamePath) -> dict[str, Any]:
        found = _ops(ctx).schedules().get(name)
        if found is None:
            raise NotFoundError(f"VPG {name!r} has no backup schedule")
        return asdict(found)

    @r.put("/vpgs/{name}/backup-schedule",
           summary="Set the VPG's daily backup: repository, run window, GFS retention")
    async def schedule_put(name: NamePath, body: BackupSchedule) -> dict[str, Any]:
        sched = Schedule(vpg=name, **body.model_dump())
        await asyncio.to_thread(_ops(ctx).schedules().put, sched)
        return asdict(sched)

    @r.delete("/vpgs/{name}/backup-schedule", status_code=204,
              summary="Stop the VPG's scheduled backups (its backups stay)")
    async def schedule_delete(name: NamePath) -> Response:
        if not await asyncio.to_thread(_ops(ctx).schedules().remove, name):
            raise NotFoundError(f"VPG {name!r} has no backup schedule")
        return Response(status_code=204)

    return r
