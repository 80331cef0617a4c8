"""Routes for health (public), events, alerts, tasks, metric history and API tokens."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query

from zcore.site.api import models as m
from zcore.site.api.backend import EventQuery, SiteContext
from zcore.site.api.routes.common import ERRORS, LIMIT_MAX, PROTECTED, out, outs
from zcore.site.db import Severity, TaskState

Limit = Annotated[int, Query(ge=1, le=LIMIT_MAX)]
VpgQ = Annotated[str | None, Query(max_length=128)]
IdPath = Annotated[str, Path(max_length=64)]


def health_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(tags=["health"])

    @r.get("/health", summary="Liveness (no token needed)")
    async def health() -> m.Health:
        return m.Health(status="ok", version=ctx.version)

    return r


# long by design: the routes are nested functions closing over ctx, one per endpoint
def activity_router(ctx: SiteContext) -> APIRouter:
    r = APIRouter(dependencies=PROTECTED, responses=ERRORS)
    b = ctx.backend
    db = ctx.db

    @r.get("/events", tags=["events"], summary="Events, newest first, paged")
    async def list_events(
        vpg: VpgQ = None,
        severity: Severity | None = None,
        start: float | None = None,
        end: float | None = None,
        cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
        limit: Limit = 100,
    ) -> m.Page[m.Event]:
        before = None if cursor is None else int(cursor)
        found = await b.list_events(EventQuery(vpg, severity, start, end, before, limit + 1))
        more = len(found) > limit
        found = found[:limit]
        nxt = str(found[-1].id) if more else None
        return m.Page[m.Event](items=outs(m.Event, found), next_cursor=nxt)

    @r.get("/alerts", tags=["alerts"], summary="Alerts, newest first")
    async def list_alerts(
        vpg: VpgQ = None, active: bool | None = None, limit: Limit = 100
    ) -> list[m.Alert]:
        return outs(m.Alert, await b.list_alerts(vpg, active, limit))

    @r.post("/alerts/{alert_id}/acknowledge", tags=["alerts"], summary="Acknowledge an alert")
    async def acknowledge_alert(alert_id: Annotated[int, Path(ge=0, le=2**62)]) -> m.Alert:
        return out(m.Alert, await b.acknowledge_alert(alert_id))

    @r.get("/tasks", tags=["tasks"], summary="Tasks, newest first")
    async def list_tasks(
        state: TaskState | None = None,
        vpg: VpgQ = None,
        kind: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = 100,
    ) -> list[m.Task]:
        return outs(m.Task, await b.list_tasks(state, vpg, kind, limit))

    @r.get("/tasks/{task_id}", tags=["tasks"], summary="One task: state, progress, result")
    async def get_task(task_id: IdPath) -> m.Task:
        return out(m.Task, await b.get_task(task_id))

    @r.post("/tasks/{task_id}/cancel", tags=["tasks"], summary="Cancel a running task")
    async def cancel_task(task_id: IdPath) -> m.Task:
        return out(m.Task, await b.cancel_task(task_id))

    @r.get("/metrics/history", tags=["metrics"], summary="History of one figure")
    async def metric_history(
        series: Annotated[str, Query(min_length=1, max_length=64)],
        vpg: VpgQ = None,
        start: float | None = None,
        end: float | None = None,
        resolution: Annotated[float | None, Query(gt=0, le=86_400)] = None,
    ) -> m.MetricHistory:
        return out(m.MetricHistory, await b.metric_history(series, vpg, start, end, resolution))

    @r.get("/tokens", tags=["tokens"], summary="API tokens (never their secrets)")
    async def list_tokens() -> list[m.Token]:
        return outs(m.Token, await asyncio.to_thread(db.list_tokens))

    @r.post("/tokens", tags=["tokens"], status_code=201, summary="Create an API token")
    async def create_token(body: m.TokenCreate) -> m.TokenCreated:
        new = await asyncio.to_thread(db.create_token, body.name)
        return m.TokenCreated(token=out(m.Token, new.record), secret=new.secret)

    @r.delete("/tokens/{token_id}", tags=["tokens"], summary="Revoke an API token")
    async def revoke_token(token_id: IdPath) -> m.Token:
        return out(m.Token, await asyncio.to_thread(db.revoke_token, token_id))

    return r
