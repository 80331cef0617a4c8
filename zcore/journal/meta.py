"""`journal.meta`: the journal's settings, volumes and promotion watermark, as a checked
state file (zcore.fsutil.write_state/read_state, docs/format.md 7.2).

The bytes are those the journal always wrote: `{"meta": {...}, "crc32c": N}` with the
format name and version inside meta and the CRC32C over its canonical JSON.

A CRC only proves the file is what some writer wrote: `check_meta` validates every field
(types, ranges, the settings through JournalSettings.check, the volumes through
check_volumes) before the journal uses any, so a crafted file is refused as damage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zcore.errors import ConfigError, CorruptRecordError
from zcore.fsutil import read_state, write_state
from zcore.journal.settings import JournalSettings, VolumeSpec, check_volumes

META_NAME = "journal.meta"
META_FORMAT = "zcore-journal"
META_VERSION = 2  # v2: the journal keeps journal.manifest and v2 segments
META_VERSIONS = (1, 2)  # v1 journals open and are upgraded in place (loader)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Atomically replace the journal directory `path`'s metadata with `meta`, at the
    version `meta` states (a v1 journal stays v1 until its upgrade)."""
    write_state(path / META_NAME, META_FORMAT, int(meta.get("version", META_VERSION)), meta)


def read_meta(path: Path) -> dict[str, Any]:
    """The checked metadata of the journal directory `path` (CorruptRecordError on damage
    or another format, FormatVersionError on another version)."""
    return read_state(path / META_NAME, META_FORMAT, META_VERSIONS)


U64 = 1 << 64
_JOURNAL_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class CheckedMeta:
    """The fields of a journal.meta that passed `check_meta`."""

    journal_id: bytes
    vm: str
    created_ns: int
    settings: JournalSettings
    volumes: list[VolumeSpec]
    promoted_seq: int
    promote_target: int


def _u64(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if type(value) is not int or not 0 <= value < U64:
        raise ConfigError(f"{key} must be an integer in 0..2**64-1, not {value!r}")
    return value


def _volume(v: object) -> VolumeSpec:
    if not isinstance(v, dict) or set(v) != {"id", "name", "size"}:
        raise ConfigError(f"a volume must be an object of id, name and size, not {v!r}")
    spec = VolumeSpec(v["id"], v["name"], v["size"])
    spec.check()
    return spec


def check_meta(path: Path, meta: dict[str, Any]) -> CheckedMeta:
    """Every field of the metadata `meta` of the journal directory `path` checked; any
    field of the wrong type or out of range raises CorruptRecordError (the journal
    cannot be opened from it: restore the file or resync the journal)."""
    try:
        jid = meta.get("journal_id")
        if not isinstance(jid, str) or not _JOURNAL_ID.fullmatch(jid):
            raise ConfigError(f"journal_id must be 32 hex digits, not {jid!r}")
        vm = meta.get("vm")
        if not isinstance(vm, str):
            raise ConfigError(f"vm must be a string, not {vm!r}")
        vols = meta.get("volumes")
        if not isinstance(vols, list):
            raise ConfigError(f"volumes must be a list, not {type(vols).__name__}")
        return CheckedMeta(bytes.fromhex(jid), vm, _u64(meta, "created_ns"),
                           JournalSettings.from_dict(meta.get("settings")),
                           check_volumes(_volume(v) for v in vols),
                           _u64(meta, "promoted_seq"), _u64(meta, "promote_target", 0))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CorruptRecordError(f"{path / META_NAME} holds an invalid journal: {exc}") from None
