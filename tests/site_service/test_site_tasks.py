"""The task runner: a task's progress, result and error code are recorded; a cancelled task
says so; tasks a dead process left queued or running fail with "site service restarted"."""

from __future__ import annotations

import asyncio

import pytest

from zcore.errors import CheckpointNotFoundError, StateError
from zcore.site.db import SiteDB, TaskState
from zcore.site.tasks import RESTARTED_CODE, RESTARTED_MESSAGE, Progress, TaskRunner

pytestmark = pytest.mark.anyio


async def test_success_records_progress_and_result(db: SiteDB) -> None:
    runner = TaskRunner(db)
    seen: list[float] = []

    async def work(progress: Progress) -> dict[str, int]:
        await progress(0.5, "halfway")
        seen.append(db.get_task(progress.task_id).progress)
        return {"bytes": 42}

    task = await runner.submit("sync", work, vpg="g")
    assert task.state == TaskState.QUEUED
    done = await runner.wait(task.id)
    assert seen == [0.5]
    assert done.state == TaskState.SUCCEEDED and done.progress == 1.0
    assert done.result == {"bytes": 42} and done.message == "halfway"
    assert done.started_at is not None and done.ended_at is not None


@pytest.mark.parametrize(
    "exc, code",
    [
        (StateError("VPG is paused"), "invalid_state"),
        (CheckpointNotFoundError("no checkpoint 7"), "checkpoint_not_found"),
        (ZeroDivisionError("boom"), "internal_error"),
    ],
)
async def test_failure_records_the_stable_code(db: SiteDB, exc: Exception, code: str) -> None:
    runner = TaskRunner(db)

    async def work(progress: Progress) -> None:
        raise exc

    done = await runner.wait((await runner.submit("sync", work)).id)
    assert done.state == TaskState.FAILED
    assert done.error is not None and (done.error.code, done.error.message) == (code, str(exc))


async def test_cancel_records_cancelled(db: SiteDB) -> None:
    runner = TaskRunner(db)
    started = asyncio.Event()

    async def work(progress: Progress) -> None:
        started.set()
        await asyncio.sleep(60)

    task = await runner.submit("sync", work)
    await started.wait()
    done = await runner.cancel(task.id)
    assert done.state == TaskState.CANCELLED and runner.active == []


async def test_tasks_left_running_by_a_dead_process_fail_at_restart(db: SiteDB) -> None:
    running = db.create_task("vpg_sync", "g")
    db.update_task(running.id, state=TaskState.RUNNING, progress=0.3)
    queued = db.create_task("vpg_create", "h")
    finished = db.create_task("vpg_delete")
    db.update_task(finished.id, state=TaskState.SUCCEEDED)
    failed = await TaskRunner(db).recover()
    assert sorted(failed) == sorted([running.id, queued.id])
    for task_id in failed:
        task = db.get_task(task_id)
        assert task.state == TaskState.FAILED and task.message == RESTARTED_MESSAGE
        assert task.error is not None and task.error.code == RESTARTED_CODE
    assert db.get_task(finished.id).state == TaskState.SUCCEEDED


async def test_close_cancels_what_runs(db: SiteDB) -> None:
    runner = TaskRunner(db)

    async def work(progress: Progress) -> None:
        await asyncio.sleep(60)

    task = await runner.submit("sync", work)
    await asyncio.sleep(0)
    await runner.close()
    assert db.get_task(task.id).state == TaskState.CANCELLED


async def test_a_task_cancelled_before_it_starts_is_recorded_cancelled(db: SiteDB) -> None:
    runner = TaskRunner(db)

    async def work(progress: Progress) -> None:
        await asyncio.sleep(60)

    task = await runner.submit("sync", work)
    done = await runner.cancel(task.id)  # no await in between: its first step never ran
    assert done.state == TaskState.CANCELLED
    assert done.error is not None and done.error.code == "cancelled"
