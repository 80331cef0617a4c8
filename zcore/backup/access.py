"""Instant access: a backup's volume read straight from the repository (issue 13), served
over NBD by zcore.nbd like any other export, so a VM from months ago boots before a
restore would have finished.

`BackupVolume` has the read-only half of zcore.nbd's `Backend`: a read finds the chunks it
covers in the manifest, reads each through a small cache of verified plain chunks (every
chunk decrypted and checked once, ChunkDamagedError or ChunkMissingError and no bytes
otherwise), and fills zero chunks with zeros without touching the repository."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from zcore.backup.store import Repository
from zcore.errors import ConfigError, OutOfRangeError
from zcore.nbd.exports import Export, ExportKind

# Verified chunks kept per served volume: 64 MiB at the default chunk size, enough for a
# guest's boot working set to be read once from the repository.
CACHE_CHUNKS = 64


class BackupVolume:
    """One volume of one backup, read-only; reads from several threads are safe."""

    readonly = True

    def __init__(self, repo: Repository, backup: str, vm: str, volume: str | int) -> None:
        m = repo.manifest(backup)
        found = [v for x in m["vms"] if x["name"] == vm for v in x["volumes"]
                 if v["name"] == volume or v["id"] == volume]
        if not found:
            raise ConfigError(f"backup {backup} has no volume {volume!r} of VM {vm!r}")
        self.repo = repo
        self.backup = backup
        self.name = str(found[0]["name"])
        self.size = int(found[0]["size"])
        self._chunks: list[str | None] = list(found[0]["chunks"])
        self._cs = int(m["chunk_size"])
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

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

    def read_into(self, offset: int, buf: Any) -> None:
        out = memoryview(buf).cast("B")
        end = offset + len(out)
        if offset < 0 or end > self.size:
            raise OutOfRangeError(f"read [{offset}, {end}) is past the {self.size}-byte "
                                  f"volume {self.name} of backup {self.backup}")
        pos = offset
        while pos < end:
            idx = pos // self._cs
            start = idx * self._cs
            stop = min(end, start + self._cs)
            dst = out[pos - offset:stop - offset]
            cid = self._chunks[idx]
            if cid is None:
                dst[:] = bytes(len(dst))
            else:
                data = self._chunk(cid)
                dst[:] = data[pos - start:stop - start]
            pos = stop

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Any) -> int:
        raise PermissionError("a backup is read-only")

    def write_zeroes(self, offset: int, length: int) -> int:
        raise PermissionError("a backup is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            self._cache.clear()


def backup_export(repo: Repository, backup: str, vm: str, volume: str | int,
                  name: str | None = None) -> Export:
    """An NBD export of one volume of a backup, read-only, read through the repository."""
    backend = BackupVolume(repo, backup, vm, volume)
    return Export(name if name is not None else f"{vm}-{backend.name}@{backup}", backend,
                  f"volume {backend.name} of VM {vm} in backup {backup}",
                  kind=ExportKind.VIEW)
