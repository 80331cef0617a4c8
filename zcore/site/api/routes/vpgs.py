"""Routes for VPGs (create, settings, pause, resume, sync, delete, status; the status of
all at once, for the browser UI's dashboard) and their
checkpoints (list, filter, page, bucket, tag)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import ValidationError

from zcore.errors import ConfigError
from zcore.records import Checkpoint, CheckpointKind
from zcore.site.api import models as m
from zcore.site.api.backend import CheckpointQuery, SiteContext, VpgSpec
from zcore.site.api.routes.common import (
    ERRORS,
    LIMIT_MAX,
    PROTECTED,
    RecordsJson,
    accepted,
    out,
    outs,
    page_response,
)
from zcore.site.errors import NotFoundError

NamePath = Annotated[str, Path(max_length=128)]
Start = Annotated[float | None, Query(description="from this time (seconds, inclusive)")]
End = Annotated[float | None, Query(description="until this time (seconds, exclusive)")]
TagQ = Annotated[str | None, Query(max_length=200, description="exact tag")]
KindQ = Annotated[CheckpointKind | None, Query()]
ConsistentQ = Annotated[bool | None, Query()]
CHECKPOINTS_JSON = RecordsJson(Checkpoint, m.Checkpoint)


def _merge_settings(current: dict[str, object], patch: m.VpgSettingsPatch) -> dict[str, object]:
    merged = {**current, **patch.model_dump(exclude_unset=True)}
    try:
        return m.VpgSettings.model_validate(merged).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"settings.{where}: {first['msg']}") from None


# long by design: the routes are nested functions closing over ctx, one per endpoint
def vpg_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(dependencies=PROTECTED, responses=ERRORS, tags=["vpgs"])
    b = ctx.backend

    @r.get("/vpgs", summary="Every VPG")
    async def list_vpgs() -> list[m.Vpg]:
        return outs(m.Vpg, await b.list_vpgs())

    @r.get("/status/vpgs", summary="The status of every VPG, by name (one call for a dashboard)")
    async def list_vpg_statuses() -> list[m.VpgStatus]:
        async def one(name: str) -> m.VpgStatus | None:
            try:
                return out(m.VpgStatus, await b.vpg_status(name))
            except NotFoundError:  # deleted since it was listed
                return None

        found = await asyncio.gather(*(one(v.name) for v in await b.list_vpgs()))
        return sorted((s for s in found if s is not None), key=lambda s: s.name)

    @r.post("/vpgs", status_code=202, summary="Create a VPG (a task: its initial sync)")
    async def create_vpg(body: m.VpgCreate, response: Response) -> m.Task:
        spec = VpgSpec(body.name, body.role, list(body.vms), body.peer, body.settings.model_dump(),
                       body.initial_sync)
        return accepted(response, await b.create_vpg(spec))

    @r.get("/vpgs/{name}", summary="One VPG")
    async def get_vpg(name: NamePath) -> m.Vpg:
        return out(m.Vpg, await b.get_vpg(name))

    @r.patch("/vpgs/{name}", summary="Change some settings of a VPG")
    async def update_vpg(name: NamePath, body: m.VpgUpdate) -> m.Vpg:
        current = await b.get_vpg(name)
        return out(
            m.Vpg, await b.update_vpg(name, _merge_settings(current.settings, body.settings))
        )

    @r.post("/vpgs/{name}/pause", summary="Pause replication of a VPG")
    async def pause_vpg(name: NamePath) -> m.Vpg:
        return out(m.Vpg, await b.pause_vpg(name))

    @r.post("/vpgs/{name}/resume", summary="Resume replication of a VPG")
    async def resume_vpg(name: NamePath) -> m.Vpg:
        return out(m.Vpg, await b.resume_vpg(name))

    @r.post("/vpgs/{name}/sync", status_code=202, summary="Force a sync (a task)")
    async def sync_vpg(name: NamePath, response: Response) -> m.Task:
        return accepted(response, await b.sync_vpg(name))

    @r.delete("/vpgs/{name}", status_code=202, summary="Delete a VPG (a task)")
    async def delete_vpg(name: NamePath, response: Response) -> m.Task:
        return accepted(response, await b.delete_vpg(name))

    @r.get("/vpgs/{name}/status", summary="State, RPO, history, journal use, sync progress")
    async def vpg_status(name: NamePath) -> m.VpgStatus:
        return out(m.VpgStatus, await b.vpg_status(name))

    @r.get(
        "/vpgs/{name}/checkpoints",
        tags=["checkpoints"],
        summary="Checkpoints, paged",
        response_model=m.Page[m.Checkpoint],
    )
    async def list_checkpoints(
        name: NamePath,
        start: Start = None,
        end: End = None,
        tag: TagQ = None,
        kind: KindQ = None,
        consistent: ConsistentQ = None,
        order: Literal["newest", "oldest"] = "newest",
        cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 1000,
    ) -> Response:
        query = CheckpointQuery(
            start,
            end,
            tag,
            kind,
            consistent,
            after=None if cursor is None else int(cursor),
            limit=limit,
            newest_first=order == "newest",
        )
        page = await b.list_checkpoints(name, query)
        cursor_out = None if page.next_cursor is None else str(page.next_cursor)
        return page_response(CHECKPOINTS_JSON, page.items, cursor_out)

    @r.get(
        "/vpgs/{name}/checkpoints/buckets",
        tags=["checkpoints"],
        summary="Checkpoint counts per time bucket",
    )
    async def checkpoint_buckets(
        name: NamePath,
        bucket_seconds: Annotated[float, Query(gt=0, le=366 * 86_400)] = 3600.0,
        start: Start = None,
        end: End = None,
        tag: TagQ = None,
        kind: KindQ = None,
        consistent: ConsistentQ = None,
    ) -> m.CheckpointBuckets:
        query = CheckpointQuery(start, end, tag, kind, consistent)
        buckets = await b.checkpoint_buckets(name, query, bucket_seconds)
        lo = start if start is not None else (buckets[0].start if buckets else 0.0)
        hi = end if end is not None else (buckets[-1].start + bucket_seconds if buckets else lo)
        return m.CheckpointBuckets(
            start=lo,
            end=hi,
            bucket_seconds=bucket_seconds,
            buckets=outs(m.CheckpointBucket, buckets),
        )

    @r.post(
        "/vpgs/{name}/checkpoints",
        tags=["checkpoints"],
        status_code=201,
        summary="Tag a checkpoint now",
    )
    async def tag_checkpoint(name: NamePath, body: m.CheckpointTag) -> m.Checkpoint:
        return out(m.Checkpoint, await b.tag_checkpoint(name, body.tag))

    return r
