"""Checkpoint choice: which checkpoint a recovery operation recovers to, as a person says
it ("the latest", "the latest tagged", "the one tagged before-upgrade", "id 4711", "the
last checkpoint before 14:05"), resolved against the recovery-site VPG
(zcore.site.recovery_vpg.RecoveryVPG) to one usable checkpoint.

The one parser of checkpoint choices: every recovery operation (failover test, failover,
move), their API and CLI, and the site's NBD view names (`VPG/VM/VOLUME@CKPT`) take the
same text form (`CheckpointChoice.parse`):

    latest                 the newest usable checkpoint
    latest-tagged          the newest tagged one (also latest_tagged, tagged)
    latest-consistent      the newest crash-consistent one (also latest_consistent,
                           consistent)
    id:N  (or just N)      checkpoint N (the API also takes N as a JSON number)
    tag:NAME               the newest checkpoint tagged exactly NAME
    before:TIME            the last checkpoint strictly before TIME: ISO 8601
                           (2026-12-01T14:05:00+01:00; without a zone it is UTC) or
                           seconds since the epoch (1796047500.5)

A choice nothing matches raises CheckpointNotFoundError saying what the VPG holds (its
range of ids and times, its newest tags), so the next attempt can be right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from zcore.errors import CheckpointNotFoundError, ConfigError
from zcore.records import Checkpoint, CheckpointKind

# How many of the newest tagged checkpoints a "not found" message names.
TAGS_SHOWN = 5


class ChoiceKind(StrEnum):
    LATEST = "latest"
    LATEST_TAGGED = "latest-tagged"
    LATEST_CONSISTENT = "latest-consistent"
    ID = "id"
    TAG = "tag"
    BEFORE = "before"


class CheckpointSource(Protocol):
    """What a choice is resolved against (RecoveryVPG has these)."""

    name: str

    def latest(self, *, kind: str | CheckpointKind | None = None, tagged: bool = False,
               consistent: bool | None = None) -> Checkpoint: ...

    def before(self, t: float, *, kind: str | CheckpointKind | None = None,
               consistent: bool | None = None) -> Checkpoint: ...

    def by_id(self, checkpoint_id: int) -> Checkpoint: ...

    def checkpoints(self, *, start: float | None = None, end: float | None = None,
                    tag: str | None = None, kind: str | CheckpointKind | None = None,
                    consistent: bool | None = None, after_id: int | None = None,
                    limit: int | None = None, newest_first: bool = False,
                    ) -> list[Checkpoint]: ...


def parse_time(text: str) -> float:
    """Seconds since the epoch from ISO 8601 (no zone: UTC) or a number of seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"time {text!r} is not a time since the epoch")
        return value
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"time {text!r} is neither ISO 8601 (2026-12-01T14:05:00Z) nor "
                          f"seconds since the epoch") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class CheckpointChoice:
    """One way of naming a checkpoint (see the module docstring)."""

    kind: ChoiceKind = ChoiceKind.LATEST
    checkpoint_id: int | None = None
    tag: str | None = None
    before: float | None = None

    def __post_init__(self) -> None:
        need = {ChoiceKind.ID: self.checkpoint_id, ChoiceKind.TAG: self.tag,
                ChoiceKind.BEFORE: self.before}
        if self.kind in need and need[self.kind] is None:
            raise ConfigError(f"checkpoint choice {self.kind} needs its value")

    @classmethod
    def parse(cls, text: str | int | None) -> CheckpointChoice:
        """The choice `text` spells (None or blank: latest; an int: that id)."""
        if isinstance(text, int) and not isinstance(text, bool):
            if text < 0:
                raise ConfigError(f"checkpoint choice {text}: an id is not negative")
            return cls(ChoiceKind.ID, checkpoint_id=text)
        if not isinstance(text, str | None):
            raise ConfigError(f"checkpoint choice {text!r} is not text or an id")
        if text is None or not text.strip():
            return cls()
        # a tag is kept to its last character (an NBD view name may end in a space)
        tag = text.lstrip().partition(":")[2]
        text = text.strip()
        head, sep, rest = text.partition(":")
        key = head.strip().lower().replace("_", "-")
        if not sep:
            if _is_id(text):
                return cls(ChoiceKind.ID, checkpoint_id=int(text))
            aliases = {"latest": ChoiceKind.LATEST, "latest-tagged": ChoiceKind.LATEST_TAGGED,
                       "tagged": ChoiceKind.LATEST_TAGGED,
                       "latest-consistent": ChoiceKind.LATEST_CONSISTENT,
                       "consistent": ChoiceKind.LATEST_CONSISTENT}
            if key in aliases:
                return cls(aliases[key])
        elif key == "id" and _is_id(rest.strip()):
            return cls(ChoiceKind.ID, checkpoint_id=int(rest.strip()))
        elif key == "tag" and tag.strip():
            return cls(ChoiceKind.TAG, tag=tag)
        elif key == "before":
            return cls(ChoiceKind.BEFORE, before=parse_time(rest))
        raise ConfigError(f"checkpoint choice {text!r} is not one of: latest, latest-tagged, "
                          f"latest-consistent, id:N, tag:NAME, before:TIME (ISO 8601 or "
                          f"epoch seconds)")

    def __str__(self) -> str:
        if self.kind == ChoiceKind.ID:
            return f"id:{self.checkpoint_id}"
        if self.kind == ChoiceKind.TAG:
            return f"tag:{self.tag}"
        if self.kind == ChoiceKind.BEFORE:
            assert self.before is not None
            return f"before:{self.before}"
        return str(self.kind)

    def resolve(self, source: CheckpointSource) -> Checkpoint:
        """The one usable checkpoint of `source` this choice names."""
        try:
            return self._resolve(source)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(f"{exc}; {holdings(source)}") from None

    def _resolve(self, source: CheckpointSource) -> Checkpoint:
        k = self.kind
        if k == ChoiceKind.LATEST:
            return source.latest()
        if k == ChoiceKind.LATEST_TAGGED:
            return source.latest(tagged=True)
        if k == ChoiceKind.LATEST_CONSISTENT:
            return source.latest(consistent=True)
        if k == ChoiceKind.ID:
            assert self.checkpoint_id is not None
            return source.by_id(self.checkpoint_id)
        if k == ChoiceKind.BEFORE:
            assert self.before is not None
            return source.before(self.before)
        # `tag=` may match substrings (RecoveryVPG does): keep the exact matches
        found = [c for c in source.checkpoints(tag=self.tag, newest_first=True)
                 if c.tag == self.tag]
        if not found:
            raise CheckpointNotFoundError(
                f"VPG {source.name} holds no usable checkpoint tagged {self.tag!r}")
        return found[0]


def holdings(source: CheckpointSource) -> str:
    """What `source` holds, for an error message: id and time range, newest tags."""
    oldest = source.checkpoints(limit=1)
    newest = source.checkpoints(limit=1, newest_first=True)
    if not oldest or not newest:
        return "it holds no usable checkpoint yet (the initial sync may still run)"
    a, b = oldest[0], newest[0]
    tags = source.checkpoints(kind=CheckpointKind.TAGGED, limit=TAGS_SHOWN, newest_first=True)
    shown = ", ".join(f"{c.tag!r} (id {c.id})" for c in tags) or "none"
    return (f"it holds checkpoints {a.id} ({_iso(a.time)}) to {b.id} ({_iso(b.time)}); "
            f"newest tags: {shown}")
