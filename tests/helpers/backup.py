"""Test helpers of the backup tests: a one-VM recovery VPG over a journal, a journal whose
volume holds an ext4 file system, a repository with cheap key derivation, an object store
that crashes after N operations, bit rot."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from zcore.backup import DirectoryStore, Repository, Secret
from zcore.journal import Journal, VolumeSpec
from zcore.site.recovery_vpg import RecoveryVPG

SECRET = Secret(passphrase="correct horse battery staple")
CHUNK = 1 << 16  # the smallest chunk size, so small volumes span many chunks
FAST_N = 1 << 10  # scrypt's smallest accepted cost: the tests open many repositories


def flip(path: Path) -> None:
    """Flip a bit of the file; its times are kept (a directory store's retain-until is
    the mtime: bit rot does not touch it)."""
    st = path.stat()
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def vpg_of(journal: Journal, name: str = "vpg1", vm: str = "vm1") -> RecoveryVPG:
    return RecoveryVPG(name, {vm: journal})


MOTD = "eleven months ago\n"


def ext4_journal(tmp_path: Path, size: int = 16 << 20, vm: str = "vm1"
                 ) -> tuple[Path, Path, int]:
    """A journal of VM `vm` (in tmp_path/VM) whose volume disk0 is an ext4 file system
    holding /etc/motd (MOTD) and /notes.txt (5,000 bytes): (journal dir, the image as
    made, checkpoint id).
    The image is the replica; one write lands past the file system's data, as a guest's
    would, before checkpoint "fs"."""
    from conftest import require_tool

    mkfs = require_tool("mkfs.ext4")
    require_tool("debugfs")
    src = tmp_path / f"ext4-src-{vm}"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text(MOTD)
    (src / "notes.txt").write_text("x" * 5000)
    image = tmp_path / f"{vm}-disk0.img"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([mkfs, "-F", "-q", "-d", str(src), str(image)], check=True)
    made = tmp_path / f"{vm}-disk0-as-made.img"
    made.write_bytes(image.read_bytes())
    j = Journal.create(tmp_path / vm, [VolumeSpec(0, "disk0", size)], vm=vm,
                       replica_files={0: image})
    j.append([(0, size - (1 << 20), b"\1" * 4096)])
    c = j.checkpoint("fs")
    j.commit()
    j.close()
    with open(made, "r+b") as f:  # the image as the checkpoint sees it
        f.seek(size - (1 << 20))
        f.write(b"\1" * 4096)
    return tmp_path / vm, made, c.id


def new_repo(path: Path, secret: Secret = SECRET) -> Repository:
    return Repository.init(path, secret, chunk_size=CHUNK, scrypt_n=FAST_N)


class Crash(Exception):
    """The simulated death of the process at one store operation."""


class CrashingStore(DirectoryStore):
    """A directory store whose `after`-th put, delete or lock (counting from 1) completes
    and then raises Crash, as a process killed right after that operation; None: never.
    What the killed process left is what the file system holds: every rename, delete and
    lock done so far, and each put since the last `sync` only as its `*.tmp-*` file (a
    DirectoryStore renames puts over their names only at `sync`), which the store then
    forgets as a dead process would."""

    def __init__(self, root: Path, after: int | None = None) -> None:
        super().__init__(root)
        self.after = after
        self.ops = 0

    def _tick(self) -> None:
        self.ops += 1
        if self.after is not None and self.ops == self.after:
            with self._mu:
                self._pending.clear()
                self._locked.clear()
                self._dirty.clear()
            raise Crash(f"crash after operation {self.ops}")

    def put(self, name: str, data: bytes | bytearray) -> None:
        super().put(name, data)
        self._tick()

    def delete(self, name: str) -> None:
        super().delete(name)
        self._tick()

    def lock(self, name: str, until: float) -> None:
        super().lock(name, until)
        self._tick()

    def writer(self) -> AbstractContextManager[None]:
        return super().writer()

    def names(self) -> Iterator[str]:
        return self.list("")
