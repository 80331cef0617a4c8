"""A VPG's state directory: `vpg.json` and one dirty bitmap file per volume
(docs/format.md 10a).

Sits under the VPG's stream: it only reads and writes files, through zcore.fsutil.
`vpg.json` is a checked state file (version 2, fsutil.write_state); the plain JSON of
version 1 is still read.  Bitmap files are written atomically by `DirtyBitmap.persist`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zcore.bitmap import DirtyBitmap
from zcore.capture import ProtectedVolume
from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError
from zcore.fsutil import read_state, write_state

STATE_NAME = "vpg.json"
STATE_FORMAT = "zcore-vpg"
STATE_VERSION = 2
STATE_VERSIONS = (1, 2)


def read_vpg_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state recorded in a `vpg.json` of either version (v1: the plain JSON document;
    v2: the `meta` of the checked state file).  Damage raises `CorruptRecordError`, an
    unknown version `FormatVersionError`, a missing file `FileNotFoundError`."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptRecordError(f"{path} is unreadable: {exc}") from None
    if isinstance(doc, dict) and "meta" in doc:
        return read_state(path, STATE_FORMAT, STATE_VERSION)
    return _read_v1(path, doc)


def _read_v1(path: Path, doc: object) -> dict[str, Any]:
    """Version 1 (docs/format.md 10a.1, until the checked state file): plain JSON with
    `format` and `version` beside the fields, no checksum."""
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CorruptRecordError(f"{path} is not a zcore VPG state file")
    if doc.get("version") != 1:
        raise FormatVersionError(f"{path} has version {doc.get('version')} "
                                 f"(this build reads {', '.join(map(str, STATE_VERSIONS))})")
    return doc


class StateFiles:
    """The files of one VPG state directory (created if missing)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_NAME

    def bitmap_path(self, vid: int) -> Path:
        return self.dir / f"bitmap-{vid:04d}.zcb"

    def load(self, definition: list[dict[str, Any]], vpg: str) -> dict[str, Any] | None:
        """The saved state, None when there is none; refused when it describes other
        volumes than `definition`."""
        path = self.state_path
        if not path.exists():
            return None
        doc = read_vpg_state(path)
        if doc.get("volumes") != definition:
            raise ConfigError(f"{path} describes other volumes than VPG {vpg} has now")
        return doc

    def save(self, meta: dict[str, Any]) -> None:
        write_state(self.state_path, STATE_FORMAT, STATE_VERSION, meta)

    def load_bitmaps(self, volumes: Mapping[int, ProtectedVolume],
                     bitmaps: dict[int, DirtyBitmap], max_bytes: int,
                     event: Callable[[str], None]) -> None:
        """Replace `bitmaps` by the persisted ones; a missing or unreadable file marks its
        whole volume dirty (and says so through `event`): blocks are never skipped."""
        for vid, vol in volumes.items():
            path = self.bitmap_path(vid)
            if not path.exists():  # a clean stop persists every bitmap: this one was lost
                bitmaps[vid].mark_all()
                event(f"bitmap of volume {vol.name} is missing ({path}): "
                      "the whole volume will be resent")
                continue
            try:
                bitmaps[vid] = DirtyBitmap.load(path, volume_size=vol.size, volume_id=vid,
                                                max_bytes=max_bytes)
            except CorruptRecordError as exc:
                bitmaps[vid].mark_all()
                event(f"bitmap of volume {vol.name} is unreadable ({exc}): "
                      "the whole volume will be resent")

    def persist_bitmaps(self, bitmaps: Mapping[int, DirtyBitmap]) -> None:
        for vid, bm in bitmaps.items():
            bm.persist(self.bitmap_path(vid), vid)

    def remove_bitmaps(self, vids: list[int]) -> None:
        for vid in vids:
            self.bitmap_path(vid).unlink(missing_ok=True)
