"""What every route module shares: the error responses each operation documents, the
security dependency, and turning repository records into response models (or, for the
long listings, straight into their JSON: `RecordsJson`, `page_response`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import Response, Security
from pydantic import BaseModel, TypeAdapter

from zcore.site.api.auth import PREFIX, bearer
from zcore.site.api.models import ErrorBody, Task
from zcore.site.db import TaskRecord

M = TypeVar("M", bound=BaseModel)
Adapter = TypeAdapter[list[Any]]

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


class RecordsJson:
    """The JSON of a list of `model` built from `record` dataclasses (the backend's own
    types) in one pass of pydantic-core's serializer: no model per row and no second
    validation of the response, which at thousands of rows cost several times the query.

    Only the model's fields are written, in the record's field order, which must be the
    model's (checked here, nested models included); records of another type (a backend
    free to return look-alikes) go the validated way, through the model."""

    def __init__(
        self,
        record: type[Any],
        model: type[BaseModel],
        nested: Mapping[str, tuple[type[Any], type[BaseModel]]] | None = None,
    ) -> None:
        nested = dict(nested or {})
        self.record = record
        self.model = model
        self._nested = [(name, sub) for name, (sub, _) in nested.items()]
        self._records: Adapter = TypeAdapter(list[record])  # type: ignore[valid-type]
        self._models: Adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
        self._include = {"__all__": self._fields(record, model, nested)}

    @staticmethod
    def _fields(
        record: type[Any],
        model: type[BaseModel],
        nested: Mapping[str, tuple[type[Any], type[BaseModel]]],
    ) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(record) if f.name in model.model_fields]
        if names != list(model.model_fields):
            raise TypeError(f"{record.__name__} does not hold the fields of {model.__name__}")
        include: dict[str, Any] = {name: True for name in names}
        for name, (sub_record, sub_model) in nested.items():
            include[name] = {"__all__": RecordsJson._fields(sub_record, sub_model, {})}
        return include

    def _own(self, records: Sequence[Any]) -> bool:
        if not all(type(r) is self.record for r in records):
            return False
        return all(
            type(x) is sub for name, sub in self._nested for r in records for x in getattr(r, name)
        )

    def dump(self, records: Sequence[Any]) -> bytes:
        """The JSON array of `records` as `list[model]` would write it."""
        if self._own(records):
            return self._records.dump_json(list(records), include=self._include)
        return self._models.dump_json(outs(self.model, records))


def page_response(items: RecordsJson, records: Sequence[Any], next_cursor: str | None) -> Response:
    """A `Page` of `records` as its JSON response, serialized once."""
    cursor = json.dumps(next_cursor, ensure_ascii=False).encode()
    body = b'{"items":' + items.dump(records) + b',"next_cursor":' + cursor + b"}"
    return Response(body, media_type="application/json")
