"""Adopting existing files as a new journal's replicas (reverse protection: the original
site's disks become the replicas of the reversed VPG's journals, docs/format.md 7.8).

Sits under `Journal.create`.  `plan` checks every named file before anything moves (a
regular file of exactly its volume's size, else ConfigError); `place` moves each into
the journal directory as `replica-NNNN.img` (zcore.fsutil.move_file) and builds its
block sums from its bytes (zcore.journal.replica), so reads and the scrub check it.

Crash safety: a journal is valid only once journal.meta exists (written last).  A crash
during create leaves a directory without journal.meta holding the replicas moved so far
(and perhaps sums, a manifest): no adopted file is lost, it sits at its replica's name.
Calling `Journal.create` again with the same arguments resumes: a source already moved
(missing, its replica present) is taken from the journal directory, a source and replica
that are one file (the move's unlink was lost) lose the source name, and the leftovers
of the interrupted create are rebuilt.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from zcore.errors import ConfigError
from zcore.fsutil import fsync_dir, move_file
from zcore.journal.settings import VolumeSpec

ReplicaFiles = Mapping[int, "str | os.PathLike[str]"]
# what an interrupted create may leave in the directory (no journal.meta yet)
_LEFTOVER = re.compile(r"replica-\d{4}\.(img|sum|sum\.tmp|img\.tmp-move)|journal\.manifest.*")


def replica_name(volume: int) -> str:
    return f"replica-{volume:04d}.img"


def plan(path: Path, specs: list[VolumeSpec], files: ReplicaFiles | None
         ) -> dict[int, Path]:
    """The adopted files by volume id, each checked (ConfigError before anything moves:
    an unknown volume, a file that is not a regular file of its volume's size)."""
    if not files:
        return {}
    sizes = {v.id: v.size for v in specs}
    out: dict[int, Path] = {}
    for vid, name in files.items():
        if vid not in sizes:
            raise ConfigError(f"replica file {name} names volume {vid}, which the journal "
                              "does not have")
        src = Path(name)
        dst = path / replica_name(vid)
        if not src.exists() and dst.is_file() and not (path / "journal.meta").exists():
            src = dst  # moved by an interrupted create: resumed from the journal directory
        try:
            st = os.stat(src)
        except FileNotFoundError:
            raise ConfigError(f"replica file {src} of volume {vid} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"replica file {src} of volume {vid} is not a regular file")
        if st.st_size != sizes[vid]:
            raise ConfigError(f"replica file {src} holds {st.st_size} bytes, volume {vid} "
                              f"is {sizes[vid]}: refused, nothing moved")
        out[vid] = src
    return out


def check_empty(path: Path, resuming: bool) -> None:
    """Refuse a directory that holds anything but what an interrupted create of an
    adopting journal leaves (`resuming`: some adopted file is already inside)."""
    for p in path.iterdir():
        if resuming and _LEFTOVER.fullmatch(p.name) and not (path / "journal.meta").exists():
            continue
        raise ConfigError(f"{path} is not empty: open an existing journal with Journal.open")


def place(path: Path, vid: int, src: Path) -> Path:
    """Move `src` into the journal directory as volume `vid`'s replica; returns it."""
    dst = path / replica_name(vid)
    if src == dst:
        return dst
    if dst.exists():
        if os.path.samefile(src, dst):  # the move linked it and lost the unlink
            os.unlink(src)
            fsync_dir(src.parent)
            return dst
        # a copy of src by a cross-file-system move whose unlink was lost: src is whole
        dst.unlink()
        fsync_dir(path)
    move_file(src, dst)
    return dst
