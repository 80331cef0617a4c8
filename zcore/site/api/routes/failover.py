"""Routes for live failover (zcore.site.failover_ops): start, commit, rollback (tasks)
and the failover's status; and for what follows a failover (zcore.site.reverse_ops):
move, reverse protection, failback (tasks).  A state that does not allow the operation
answers 409 with the reason and what is allowed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from zcore.errors import StateError
from zcore.site.api.backend import SiteContext
from zcore.site.api.models import Task
from zcore.site.api.routes.common import ERRORS, PROTECTED, accepted

NamePath = Annotated[str, Path(max_length=128)]


class FailoverStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: int | str | None = Field(
        None, description="latest (default), latest_tagged, latest_consistent, an id, "
        "or before:<seconds since the epoch>")
    commit_policy: Literal["none", "commit", "rollback"] = "none"
    commit_after_minutes: float | None = Field(None, ge=0, description="0: at once")
    shutdown_policy: Literal["none", "graceful", "force"] = "none"
    reverse: bool = Field(False, description="start reverse protection once committed")


class MoveStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reverse: bool = Field(True, description="protect the VPG back to this site after it "
                          "moved (the default)")


def _ops(ctx: SiteContext, which: str = "failovers") -> Any:
    ops = getattr(ctx.backend, which, None)
    if ops is None:
        raise StateError("this site's backend runs no recovery operations (a live site "
                         "service does)")
    return ops


def failover_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(dependencies=PROTECTED, responses=ERRORS, tags=["failover"])

    @r.post("/vpgs/{name}/failover", status_code=202,
            summary="Fail a VPG over at a checkpoint (a task; volumes served at once)")
    async def failover_start(name: NamePath, body: FailoverStart, response: Response) -> Task:
        task = await _ops(ctx).start(name, body.checkpoint, body.commit_policy,
                                     body.commit_after_minutes, body.shutdown_policy,
                                     body.reverse)
        return accepted(response, task)

    @r.post("/vpgs/{name}/move", status_code=202,
            summary="A planned move to the recovery site (a task, run at the protected "
            "site): writes stopped, a checkpoint after the last one, failover with commit")
    async def move(name: NamePath, response: Response,
                   body: MoveStart | None = None) -> Task:
        reverse = True if body is None else body.reverse
        return accepted(response, await _ops(ctx, "reverse").move(name, reverse))

    @r.post("/vpgs/{name}/reverse", status_code=202,
            summary="Reverse protection of a committed failover (a task): the recovered "
            "volumes protected back to the original site with a delta sync")
    async def reverse(name: NamePath, response: Response) -> Task:
        return accepted(response, await _ops(ctx, "reverse").reverse(name))

    @r.post("/vpgs/{name}/failback", status_code=202,
            summary="Fail a reversed VPG back to its original site (a task): a move back "
            "with reverse protection")
    async def failback(name: NamePath, response: Response) -> Task:
        return accepted(response, await _ops(ctx, "reverse").failback(name))

    @r.post("/vpgs/{name}/failover/commit", status_code=202,
            summary="Commit a failover (a task): the recovered volumes become the replicas")
    async def failover_commit(name: NamePath, response: Response) -> Task:
        return accepted(response, await _ops(ctx).commit(name))

    @r.post("/vpgs/{name}/failover/rollback", status_code=202,
            summary="Roll a failover back (a task): overlays discarded, replicating again")
    async def failover_rollback(name: NamePath, response: Response) -> Task:
        return accepted(response, await _ops(ctx).rollback(name))

    @r.get("/vpgs/{name}/failover", summary="The VPG's failover: state, promotion, exports")
    async def failover_status(name: NamePath) -> dict[str, Any]:
        await ctx.backend.get_vpg(name)
        result: dict[str, Any] = _ops(ctx).status(name)
        return result

    return r
