"""What every route module shares: the error responses each operation documents, the
security dependency, and turning repository records into response models."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Response, Security
from pydantic import BaseModel

from zcore.site.api.auth import PREFIX, bearer
from zcore.site.api.models import ErrorBody, Task
from zcore.site.db import TaskRecord

M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "no valid API token"),
        (404, "not found"),
        (409, "conflicts with the current state"),
        (413, "request body too large"),
        (422, "invalid request"),
    )
}
PROTECTED = [Security(bearer)]
LIMIT_MAX = 10_000


def out(model: type[M], record: Any) -> M:
    return model.model_validate(record, from_attributes=True)


def outs(model: type[M], records: Any) -> list[M]:
    return [model.model_validate(r, from_attributes=True) for r in records]


def accepted(response: Response, task: TaskRecord) -> Task:
    """A long operation's answer: 202 with the task and its Location."""
    response.status_code = 202
    response.headers["Location"] = f"{PREFIX}/tasks/{task.id}"
    return out(Task, task)
