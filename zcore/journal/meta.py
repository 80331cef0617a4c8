"""`journal.meta`: the journal's settings, volumes and promotion watermark, as a checked
state file (zcore.fsutil.write_state/read_state, docs/format.md 7.2).

The bytes are those the journal always wrote: `{"meta": {...}, "crc32c": N}` with the
format name and version inside meta and the CRC32C over its canonical JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zcore.fsutil import read_state, write_state

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
