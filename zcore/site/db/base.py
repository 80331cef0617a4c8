"""What the parts of the site database's repository share: the engine, the clock, and the
translation of integrity errors.  Sits under zcore.site.db.inventory / activity / repo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from zcore.site.db.engine import WRITE_OPTION
from zcore.site.errors import AlreadyExistsError, InUseError

LIST_MAX = 100_000  # the largest page any list call returns


def now() -> float:
    return time.time()


class Repository:
    """Holds the engine; every public method of a subclass blocks (runs SQL)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    @contextmanager
    def _write(self, what: str) -> Iterator[sa.Connection]:
        """One transaction; a unique or foreign-key violation raised by a concurrent writer
        becomes AlreadyExistsError / InUseError naming `what`."""
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    yield conn
        except sa.exc.IntegrityError as exc:
            text = str(exc.orig).lower()
            if "unique" in text or "duplicate" in text:
                raise AlreadyExistsError(f"{what} already exists") from exc
            if "foreign key" in text:
                raise InUseError(f"{what} is referenced by another object") from exc
            raise


def clamp_limit(limit: int | None) -> int:
    if limit is None:
        return LIST_MAX
    return max(0, min(int(limit), LIST_MAX))
