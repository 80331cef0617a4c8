"""The task runner of the site service: long operations (syncs, VPG creation and deletion,
later failover tests and backups) run as asyncio tasks recorded in the site database.

Sits between the REST API (which submits work and returns the task at once, 202) and the
site database (zcore.site.db, the record of every task).  A task goes queued -> running ->
succeeded | failed | cancelled; its callable receives a `Progress` to report a fraction
and a message; a failure stores the stable code of zcore.site.errors.error_code and the
message, never a traceback.  At start, `recover()` marks the tasks a previous process left
queued or running as failed ("site service restarted"): nothing resumes them.

The runner lives on the service's event loop; it reaches the database (blocking) only
through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from zcore.site.db import SiteDB, TaskError, TaskRecord, TaskState
from zcore.site.errors import error_code

log = logging.getLogger(__name__)

RESTARTED_MESSAGE = "site service restarted"
RESTARTED_CODE = "service_restarted"
CANCELLED_CODE = "cancelled"
PROGRESS_INTERVAL_S = 0.5  # progress is written at most this often (plus the final value)

TaskFn = Callable[["Progress"], Awaitable[Any]]
CANCELLED = TaskError(CANCELLED_CODE, "cancelled")
R = TypeVar("R")


async def _settled(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`fn` in a worker thread; if the caller is cancelled meanwhile, wait for the thread
    to finish before the cancellation goes on, so a later write cannot be overtaken by
    this one."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


class Progress:
    """What a running task reports: `await progress(fraction, message)`.  Writes are
    throttled to one every PROGRESS_INTERVAL_S, except when the message changes."""

    def __init__(self, db: SiteDB, task_id: str) -> None:
        self._db = db
        self.task_id = task_id
        self._last_write = 0.0
        self._message: str | None = None
        self.fraction = 0.0

    async def __call__(self, fraction: float, message: str | None = None) -> None:
        self.fraction = min(1.0, max(0.0, float(fraction)))
        stamp = time.monotonic()
        changed = message is not None and message != self._message
        if not changed and stamp - self._last_write < PROGRESS_INTERVAL_S:
            return
        self._last_write = stamp
        if message is not None:
            self._message = message
        await _settled(self._db.update_task, self.task_id, progress=self.fraction, message=message)


class _Once:
    """A task's `settle` callback, called at most once."""

    def __init__(self, fn: Callable[[bool], object] | None) -> None:
        self._fn = fn

    def __call__(self, ok: bool) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn(ok)


class TaskRunner:
    """Runs and records the site's tasks.  Create it on the event loop that runs them."""

    def __init__(self, db: SiteDB) -> None:
        self._db = db
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ended: set[str] = set()  # ids whose end was recorded, until cancel() looks

    async def recover(self) -> list[str]:
        """Fail every task a previous process left queued or running; their ids."""
        ids = await asyncio.to_thread(
            self._db.fail_unfinished_tasks, RESTARTED_MESSAGE, RESTARTED_CODE
        )
        if ids:
            log.warning("%d task(s) failed: %s", len(ids), RESTARTED_MESSAGE)
        return ids

    async def submit(
        self, kind: str, fn: TaskFn, *, vpg: str | None = None, message: str = "",
        settle: Callable[[bool], object] | None = None,
    ) -> TaskRecord:
        """Record a task (queued) and start `fn(progress)` on the loop; returns at once.
        `fn`'s return value (JSON-able) becomes the task's result.  `settle`, if given, is
        called exactly once: True when `fn` returned, False when it raised, when the task
        was cancelled (even before `fn` began) or when recording it failed (how an
        operation's state transition always ends, zcore.recovery.states)."""
        once = _Once(settle)
        try:
            record = await asyncio.to_thread(self._db.create_task, kind, vpg, message)
        except BaseException:
            once(False)
            raise
        task = asyncio.create_task(self._run(record.id, fn, once),
                                   name=f"zcore-task-{record.id}")
        self._running[record.id] = task
        task.add_done_callback(self._forget(record.id))
        task.add_done_callback(lambda _: once(False))  # a no-op once settled
        return record

    def _forget(self, task_id: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(task: asyncio.Task[None]) -> None:
            self._running.pop(task_id, None)
            if not task.cancelled():
                self._ended.discard(task_id)

        return forget

    async def _run(self, task_id: str, fn: TaskFn, settle: _Once) -> None:
        db = self._db
        try:
            await _settled(db.update_task, task_id, state=TaskState.RUNNING)
            result = await fn(Progress(db, task_id))
        except asyncio.CancelledError:
            settle(False)
            await self._finish(task_id, TaskState.CANCELLED, error=CANCELLED)
            raise
        except Exception as exc:  # every failure is recorded, none escapes the loop
            settle(False)
            log.warning("task %s failed: %s", task_id, exc, exc_info=exc)
            error = TaskError(error_code(exc), str(exc) or type(exc).__name__)
            await self._finish(task_id, TaskState.FAILED, error=error)
        else:
            settle(True)
            await self._finish(task_id, TaskState.SUCCEEDED, result=result)

    async def _finish(
        self, task_id: str, state: TaskState, *, result: Any = None, error: TaskError | None = None
    ) -> None:
        kwargs: dict[str, Any] = {"state": state, "error": error}
        if state == TaskState.SUCCEEDED:
            kwargs.update(progress=1.0, result=result)
        self._ended.add(task_id)
        try:
            await _settled(self._db.update_task, task_id, **kwargs)
        except Exception:
            log.exception("task %s: could not record its end", task_id)

    async def _cancel(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks.values())
        for task_id in tasks:
            if task_id not in self._ended:  # cancelled before its first step ran
                await self._finish(task_id, TaskState.CANCELLED, error=CANCELLED)
            self._ended.discard(task_id)

    async def wait(self, task_id: str) -> TaskRecord:
        """The task's record once it has finished (at once if it already has)."""
        task = self._running.get(task_id)
        if task is not None:
            await asyncio.wait([task])
        return await asyncio.to_thread(self._db.get_task, task_id)

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a running task (recorded cancelled); a finished one is returned as is."""
        task = self._running.get(task_id)
        if task is not None:
            await self._cancel({task_id: task})
        return await asyncio.to_thread(self._db.get_task, task_id)

    @property
    def active(self) -> list[str]:
        """Ids of the tasks running in this process."""
        return list(self._running)

    async def close(self) -> None:
        """Cancel every running task and wait for each to record its end."""
        await self._cancel(dict(self._running))
