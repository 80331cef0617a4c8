"""Instant access: a backup's volumes read straight from the repository (issue 13), served
over NBD by zcore.nbd like any other export, so a VM from months ago boots before a
restore would have finished.

`BackupImage` is the volumes of one VM in one backup, read-only: a read finds the chunks
it covers in the manifest, reads each through a small cache of verified plain chunks
(every chunk decrypted and checked once, ChunkDamagedError or ChunkMissingError and no
bytes otherwise), and fills zero chunks with zeros without touching the repository.  It
is a zcore.recovery `Image`, so a scratch overlay can stand on it: `backup_export(...,
writable=True)` serves a volume the VM may write to, its writes kept in a scratch file
and discarded when the export closes (the repository is only ever read).
`BackupVolume` is one volume of an image as an NBD backend.  Both exports have
`blocking_reads`: a chunk fetched from the repository (a share, a bucket) is read and
decrypted in a worker thread, never on the NBD server's event loop, which in a site
service is also the loop of its API and replication."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from zcore.backup.store import Repository
from zcore.errors import ConfigError, OutOfRangeError
from zcore.fsutil import STATE_HOLE, STATE_ZERO
from zcore.nbd.exports import Export, ExportKind
from zcore.records import Checkpoint, CheckpointKind
from zcore.recovery import ScratchOverlay

# Verified chunks kept per served VM: 64 MiB at the default chunk size, enough for a
# guest's boot working set to be read once from the repository.
CACHE_CHUNKS = 64
HOLE = STATE_HOLE | STATE_ZERO  # a zero chunk: stored nowhere, reads as zeros


class BackupImage:
    """The volumes of VM `vm` in `backup`, read-only; reads from several threads are safe.
    Volumes are named by name or id, as a journal view's are."""

    def __init__(self, repo: Repository, backup: str, vm: str) -> None:
        m = repo.manifest(backup)
        found = [x for x in m["vms"] if x["name"] == vm]
        if not found:
            names = ", ".join(x["name"] for x in m["vms"])
            raise ConfigError(f"backup {backup} has no VM {vm!r}; it holds: {names}")
        self.repo = repo
        self.backup = backup
        self.vm = vm
        c = m["checkpoint"]
        self.checkpoint = Checkpoint(int(c["id"]), int(c["seq"]), int(c["time_ns"]),
                                     CheckpointKind(c["kind"]), c["tag"],
                                     bool(c["consistent"]))
        self._volumes: dict[str, dict[str, Any]] = {str(v["name"]): v
                                                    for v in found[0]["volumes"]}
        self._cs = int(m["chunk_size"])
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def volume(self, volume: int | str) -> dict[str, Any]:
        """The manifest entry of `volume` (a name or an id)."""
        for v in self._volumes.values():
            if volume in (v["name"], v["id"]):
                return v
        raise ConfigError(f"backup {self.backup} has no volume {volume!r} of VM {self.vm!r};"
                          f" it holds: {', '.join(self._volumes)}")

    def size(self, volume: int | str) -> int:
        return int(self.volume(volume)["size"])

    def _chunk(self, cid: str) -> bytes:
        with self._lock:
            data = self._cache.get(cid)
            if data is not None:
                self._cache.move_to_end(cid)
                return data
        data = self.repo.get_chunk(cid)
        with self._lock:
            self._cache[cid] = data
            while len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def read_into(self, volume: int | str, offset: int, buf: Any) -> None:
        v = self.volume(volume)
        out = memoryview(buf).cast("B")
        end = offset + len(out)
        if offset < 0 or end > v["size"]:
            raise OutOfRangeError(f"read [{offset}, {end}) is past the {v['size']}-byte "
                                  f"volume {v['name']} of backup {self.backup}")
        chunks: list[str | None] = v["chunks"]
        pos = offset
        while pos < end:
            idx = pos // self._cs
            start = idx * self._cs
            stop = min(end, start + self._cs)
            dst = out[pos - offset:stop - offset]
            cid = chunks[idx]
            if cid is None:
                dst[:] = bytes(len(dst))
            else:
                dst[:] = self._chunk(cid)[pos - start:stop - start]
            pos = stop

    def allocation(self, volume: int | str, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """(start, length, state) runs of the range: zero chunks are holes that read as
        zeros (no repository read), stored chunks data (NBD base:allocation)."""
        v = self.volume(volume)
        end = offset + length
        if offset < 0 or end > v["size"]:
            raise OutOfRangeError(f"range [{offset}, {end}) is past the {v['size']}-byte "
                                  f"volume {v['name']} of backup {self.backup}")
        chunks: list[str | None] = v["chunks"]
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end and len(out) <= max_extents:
            stop = min(end, (pos // self._cs + 1) * self._cs)
            state = HOLE if chunks[pos // self._cs] is None else 0
            if out and out[-1][2] == state:
                out[-1] = (out[-1][0], out[-1][1] + stop - pos, state)
            else:
                out.append((pos, stop - pos, state))
            pos = stop
        return out

    def close(self) -> None:
        with self._lock:
            self._cache.clear()


class BackupVolume:
    """One volume of a `BackupImage` as a read-only NBD backend."""

    readonly = True

    def __init__(self, repo: Repository, backup: str, vm: str, volume: str | int) -> None:
        self.image = BackupImage(repo, backup, vm)
        self.name = str(self.image.volume(volume)["name"])
        self.size = self.image.size(self.name)

    def read_into(self, offset: int, buf: Any) -> None:
        self.image.read_into(self.name, offset, buf)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def allocation(self, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        return self.image.allocation(self.name, offset, length, max_extents)

    def write(self, offset: int, data: Any) -> int:
        raise PermissionError("a backup is read-only")

    def write_zeroes(self, offset: int, length: int) -> int:
        raise PermissionError("a backup is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.image.close()


def backup_export(repo: Repository, backup: str, vm: str, volume: str | int,
                  name: str | None = None, *, writable: bool = False,
                  scratch_dir: str | os.PathLike[str] | None = None,
                  scratch_limit: int | None = None) -> Export:
    """An NBD export of one volume of a backup, read through the repository: read-only,
    or with `writable` under a scratch overlay (in `scratch_dir`, at most `scratch_limit`
    bytes) whose writes are discarded when the export closes."""
    if not writable:
        backend = BackupVolume(repo, backup, vm, volume)
        return Export(name if name is not None else f"{vm}-{backend.name}@{backup}", backend,
                      f"volume {backend.name} of VM {vm} in backup {backup}",
                      kind=ExportKind.VIEW, blocking_reads=True)
    image = BackupImage(repo, backup, vm)
    vol = str(image.volume(volume)["name"])
    overlay = ScratchOverlay(image, vol, owns_view=True, limit_bytes=scratch_limit,
                             directory=scratch_dir)
    try:
        return Export(name if name is not None else f"{vm}-{vol}@{backup}-scratch", overlay,
                      f"scratch overlay on volume {vol} of VM {vm} in backup {backup}",
                      kind=ExportKind.SCRATCH, blocking_reads=True)
    except BaseException:
        overlay.close()
        raise
