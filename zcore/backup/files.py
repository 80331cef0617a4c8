"""File-level restore (issue 13): list and extract files of an ext4 volume from a backup
or a journal checkpoint, through `debugfs` (e2fsprogs) reading a volume image, so no loop
device, mount or FUSE is needed.

The image is materialized in a scratch directory first: a backup's volume restored
(sparse: its zero chunks stay holes, every chunk verified), or a checkpoint's view copied
out; it is removed afterwards.  debugfs only reads it (`-c`, catastrophic mode: read-only,
no journal replay), and an error it reports on stderr becomes a ConfigError."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zcore.backup.engine import restore_volume
from zcore.backup.store import Repository
from zcore.errors import ConfigError, CorruptRecordError
from zcore.journal import View

COPY_STEP = 4 << 20  # bytes per read of a view copied out to an image


@dataclass(frozen=True)
class FileEntry:
    """One directory entry: name, inode, mode (octal st_mode), uid, gid, size (files)."""

    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int | None

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == 0o040000


def _debugfs(image: Path, request: str) -> str:
    tool = shutil.which("debugfs")
    if tool is None:
        raise ConfigError("file-level restore needs debugfs (apt-get install e2fsprogs)")
    done = subprocess.run([tool, "-c", "-R", request, str(image)], capture_output=True,
                          text=True, timeout=600)
    problems = [line for line in done.stderr.splitlines()
                if line.strip() and not line.startswith("debugfs ")
                and "catastrophic mode" not in line]
    if done.returncode or problems:
        raise ConfigError(f"debugfs {request!r}: {'; '.join(problems) or done.returncode}")
    return done.stdout


def _safe(path: str) -> str:
    if not path.startswith("/") or "\n" in path or '"' in path:
        raise ConfigError(f"{path!r} is not an absolute path of the volume's file system")
    return path


def list_files(image: str | os.PathLike[str], path: str = "/") -> list[FileEntry]:
    """The entries of directory `path` of the ext4 image (without . and ..)."""
    out = []
    for line in _debugfs(Path(image), f'ls -p "{_safe(path)}"').splitlines():
        parts = line.split("/")
        if len(parts) < 8 or parts[0] != "":
            continue
        name = "/".join(parts[5:-2])
        if name in (".", ".."):
            continue
        try:
            out.append(FileEntry(name, int(parts[1]), int(parts[2], 8), int(parts[3]),
                                 int(parts[4]), int(parts[-2]) if parts[-2] else None))
        except ValueError:
            raise CorruptRecordError(f"debugfs listed an entry it cannot parse: {line!r}") \
                from None
    return out


def extract(image: str | os.PathLike[str], path: str, dest: str | os.PathLike[str]) -> Path:
    """Copy file or directory `path` of the ext4 image into directory `dest` (which must
    exist); returns what was written."""
    dest = Path(dest)
    if not dest.is_dir():
        raise ConfigError(f"{dest} is not a directory")
    path = _safe(path).rstrip("/") or "/"
    name = path.rsplit("/", 1)[-1] or "root"
    target = dest / name
    if target.exists():
        raise ConfigError(f"{target} already exists")
    parent = path.rsplit("/", 1)[0] or "/"
    entry = next((e for e in list_files(image, parent) if e.name == name), None) \
        if path != "/" else None
    if entry is not None and not entry.is_dir:
        _debugfs(Path(image), f'dump -p "{path}" "{target}"')
    else:
        _debugfs(Path(image), f'rdump "{path}" "{dest}"')
    if not target.exists():
        raise ConfigError(f"{path} is not in the volume's file system")
    return target


@contextmanager
def backup_image(repo: Repository, backup: str, vm: str, volume: str,
                 scratch: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A backup's volume as a temporary image file (removed when the block ends)."""
    with tempfile.TemporaryDirectory(prefix="zcore-files-", dir=scratch) as tmp:
        path = Path(tmp) / "volume.img"
        restore_volume(repo, backup, vm, volume, path)
        yield path


@contextmanager
def view_image(view: View, volume: int | str,
               scratch: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A journal checkpoint's volume as a temporary image file (zero runs left as holes)."""
    with tempfile.TemporaryDirectory(prefix="zcore-files-", dir=scratch) as tmp:
        path = Path(tmp) / "volume.img"
        size = view.size(volume)
        buf = bytearray(COPY_STEP)
        zeros = bytes(COPY_STEP)
        with open(path, "wb") as f:
            f.truncate(size)
            for off in range(0, size, COPY_STEP):
                n = min(COPY_STEP, size - off)
                chunk = memoryview(buf)[:n]
                view.read_into(volume, off, chunk)
                if chunk != zeros[:n]:
                    f.seek(off)
                    f.write(chunk)
        yield path
