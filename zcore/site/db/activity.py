"""What happens at a site, in its database: tasks (operations with progress and a result),
events (an append-only log) and alerts (raised, acknowledged, cleared).

Sits under zcore.site.db.repo.SiteDB (a mixin of it); zcore.site.tasks drives the task
rows.  Every method blocks.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from zcore.site.db import schema as t
from zcore.site.db.base import Repository, clamp_limit, now
from zcore.site.db.records import (
    AlertRecord,
    EventRecord,
    Severity,
    TaskError,
    TaskRecord,
    TaskState,
)
from zcore.site.errors import AlertNotFoundError, TaskNotFoundError

_UNSET: Any = object()


def _task(row: sa.Row[Any]) -> TaskRecord:
    error = None
    if row.error_code is not None:
        error = TaskError(row.error_code, row.error_message or "")
    return TaskRecord(
        row.id,
        row.kind,
        row.vpg,
        TaskState(row.state),
        row.progress,
        row.message,
        row.result,
        error,
        row.created_at,
        row.started_at,
        row.ended_at,
    )


def _alert(row: sa.Row[Any]) -> AlertRecord:
    return AlertRecord(
        row.id,
        row.time,
        row.vpg,
        row.code,
        Severity(row.severity),
        row.text,
        bool(row.acknowledged),
        bool(row.cleared),
        row.cleared_at,
    )


class ActivityRepository(Repository):
    # -- tasks -----------------------------------------------------------------------------

    def create_task(self, kind: str, vpg: str | None = None, message: str = "") -> TaskRecord:
        """Record a new task in state queued.  Blocks."""
        task_id = uuid.uuid4().hex
        with self._write(f"task {task_id}") as conn:
            conn.execute(
                sa.insert(t.tasks).values(
                    id=task_id,
                    kind=kind,
                    vpg=vpg,
                    state=str(TaskState.QUEUED),
                    progress=0.0,
                    message=message,
                    created_at=now(),
                )
            )
        return self.get_task(task_id)

    def update_task(
        self,
        task_id: str,
        *,
        state: TaskState | None = None,
        progress: float | None = None,
        message: str | None = None,
        result: Any = _UNSET,
        error: TaskError | None = None,
    ) -> TaskRecord:
        """Change a task; entering running stamps started_at, a finished state ended_at.
        Progress is clamped to 0..1.  Blocks."""
        values: dict[str, Any] = {}
        stamp = now()
        if state is not None:
            values["state"] = str(TaskState(state))
            if state == TaskState.RUNNING:
                values["started_at"] = stamp
            elif TaskState(state).finished:
                values["ended_at"] = stamp
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, float(progress)))
        if message is not None:
            values["message"] = message
        if result is not _UNSET:
            values["result"] = result
        if error is not None:
            values["error_code"] = error.code
            values["error_message"] = error.message
        with self._write(f"task {task_id}") as conn:
            done = conn.execute(sa.update(t.tasks).where(t.tasks.c.id == task_id).values(**values))
            if done.rowcount == 0:
                raise TaskNotFoundError(f"no task {task_id!r}")
        return self.get_task(task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        """One task by id.  Blocks."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.tasks).where(t.tasks.c.id == task_id)).first()
        if row is None:
            raise TaskNotFoundError(f"no task {task_id!r}")
        return _task(row)

    def list_tasks(
        self,
        *,
        state: TaskState | None = None,
        vpg: str | None = None,
        kind: str | None = None,
        limit: int | None = 100,
    ) -> list[TaskRecord]:
        """Tasks, newest first, filtered.  Blocks."""
        query = sa.select(t.tasks).order_by(t.tasks.c.created_at.desc(), t.tasks.c.id)
        if state is not None:
            query = query.where(t.tasks.c.state == str(state))
        if vpg is not None:
            query = query.where(t.tasks.c.vpg == vpg)
        if kind is not None:
            query = query.where(t.tasks.c.kind == kind)
        with self._engine.connect() as conn:
            return [_task(r) for r in conn.execute(query.limit(clamp_limit(limit)))]

    def fail_unfinished_tasks(self, message: str, code: str) -> list[str]:
        """Mark every queued or running task failed (the process that ran them is gone);
        returns their ids.  Blocks."""
        unfinished = [str(TaskState.QUEUED), str(TaskState.RUNNING)]
        with self._write("tasks") as conn:
            ids = list(conn.scalars(sa.select(t.tasks.c.id).where(t.tasks.c.state.in_(unfinished))))
            if ids:
                conn.execute(
                    sa.update(t.tasks)
                    .where(t.tasks.c.id.in_(ids))
                    .values(
                        state=str(TaskState.FAILED),
                        error_code=code,
                        error_message=message,
                        message=message,
                        ended_at=now(),
                    )
                )
        return ids

    # -- events ----------------------------------------------------------------------------

    def add_event(
        self,
        code: str,
        text: str,
        *,
        vpg: str | None = None,
        severity: Severity = Severity.INFO,
        time: float | None = None,
    ) -> EventRecord:
        """Append an event.  Blocks."""
        stamp = now() if time is None else time
        with self._write("event") as conn:
            event_id = conn.execute(
                sa.insert(t.events)
                .values(time=stamp, vpg=vpg, severity=str(Severity(severity)), code=code, text=text)
                .returning(t.events.c.id)
            ).scalar_one()
        return EventRecord(event_id, stamp, vpg, Severity(severity), code, text)

    def list_events(
        self,
        *,
        vpg: str | None = None,
        severity: Severity | None = None,
        start: float | None = None,
        end: float | None = None,
        before_id: int | None = None,
        limit: int | None = 100,
    ) -> list[EventRecord]:
        """Events newest first (ids below `before_id` for the next page), filtered.
        Blocks."""
        query = sa.select(t.events).order_by(t.events.c.id.desc())
        if vpg is not None:
            query = query.where(t.events.c.vpg == vpg)
        if severity is not None:
            query = query.where(t.events.c.severity == str(severity))
        if start is not None:
            query = query.where(t.events.c.time >= start)
        if end is not None:
            query = query.where(t.events.c.time < end)
        if before_id is not None:
            query = query.where(t.events.c.id < before_id)
        with self._engine.connect() as conn:
            rows = conn.execute(query.limit(clamp_limit(limit)))
            return [
                EventRecord(r.id, r.time, r.vpg, Severity(r.severity), r.code, r.text) for r in rows
            ]

    # -- alerts ----------------------------------------------------------------------------

    def raise_alert(
        self,
        code: str,
        text: str,
        *,
        vpg: str | None = None,
        severity: Severity = Severity.WARNING,
    ) -> AlertRecord:
        """Raise an alert, or return the active one with the same code and VPG (an alert
        that stays true is not raised again).  Blocks."""
        with self._write("alert") as conn:
            active = conn.execute(
                sa.select(t.alerts).where(
                    t.alerts.c.code == code,
                    t.alerts.c.vpg.is_(None) if vpg is None else t.alerts.c.vpg == vpg,
                    t.alerts.c.cleared.is_(False),
                )
            ).first()
            if active is not None:
                return _alert(active)
            alert_id = conn.execute(
                sa.insert(t.alerts)
                .values(
                    time=now(),
                    vpg=vpg,
                    code=code,
                    severity=str(Severity(severity)),
                    text=text,
                    acknowledged=False,
                    cleared=False,
                )
                .returning(t.alerts.c.id)
            ).scalar_one()
        return self.get_alert(alert_id)

    def get_alert(self, alert_id: int) -> AlertRecord:
        """One alert by id.  Blocks."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.alerts).where(t.alerts.c.id == alert_id)).first()
        if row is None:
            raise AlertNotFoundError(f"no alert {alert_id}")
        return _alert(row)

    def list_alerts(
        self, *, vpg: str | None = None, active: bool | None = None, limit: int | None = 100
    ) -> list[AlertRecord]:
        """Alerts newest first; `active=True` only those not cleared.  Blocks."""
        query = sa.select(t.alerts).order_by(t.alerts.c.id.desc())
        if vpg is not None:
            query = query.where(t.alerts.c.vpg == vpg)
        if active is not None:
            query = query.where(t.alerts.c.cleared.is_(not active))
        with self._engine.connect() as conn:
            return [_alert(r) for r in conn.execute(query.limit(clamp_limit(limit)))]

    def acknowledge_alert(self, alert_id: int) -> AlertRecord:
        """Mark an alert seen by a person (it stays active until cleared).  Blocks."""
        with self._write(f"alert {alert_id}") as conn:
            done = conn.execute(
                sa.update(t.alerts).where(t.alerts.c.id == alert_id).values(acknowledged=True)
            )
            if done.rowcount == 0:
                raise AlertNotFoundError(f"no alert {alert_id}")
        return self.get_alert(alert_id)

    def clear_alert(self, alert_id: int) -> AlertRecord:
        """Mark an alert's condition over.  Blocks."""
        with self._write(f"alert {alert_id}") as conn:
            done = conn.execute(
                sa.update(t.alerts)
                .where(t.alerts.c.id == alert_id, t.alerts.c.cleared.is_(False))
                .values(cleared=True, cleared_at=now())
            )
            if done.rowcount == 0:
                self.get_alert(alert_id)  # raises for an unknown id; else already cleared
        return self.get_alert(alert_id)
