"""Read-through: a volume as of a checkpoint, the replica overlaid with every journaled
write before it, newest wins (docs/format.md 8.4).  Views pin their checkpoint against
promotion; the LZ4 cache keeps decompressed payloads for random reads.

Locking: a read holds the journal's index lock, never its append lock, so reads are not
served behind appends' writes and fsyncs or promotion's replica writes.  The index lock
guards every call on the native index and every change to the descriptors it reads:
segment and replica descriptors are unregistered and closed only under it, so a read
never reaches a closed (or reused) descriptor.  Promotion rewrites replica bytes only
where the index still maps a journaled record for every allowed read (reads are at or
above the promotion target), and forgets those records only when the replica holds them.

A mixin of Journal."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from zcore import records
from zcore._native import record as _rec
from zcore.errors import (
    CheckpointNotFoundError,
    ClosedError,
    CorruptRecordError,
    OutOfRangeError,
    StateError,
)
from zcore.fsutil import STATE_HOLE, STATE_ZERO, data_ranges, pread_exact
from zcore.journal.damage import refuse_damaged
from zcore.journal.settings import LZ4_CACHE_BYTES, VolumeSpec
from zcore.journal.state import JournalState
from zcore.records import Checkpoint


class Lz4Cache:
    """Decompressed payloads (LZ4, zstd) by (segment, pos), least recently used dropped first.
    Not thread-safe: used under the journal's index lock."""

    def __init__(self, limit: int = LZ4_CACHE_BYTES) -> None:
        self.limit = limit
        self._data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[int, int]) -> bytes | None:
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
        return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        self._data[key] = data
        self.bytes += len(data)
        while self.bytes > self.limit:
            _, old = self._data.popitem(last=False)
            self.bytes -= len(old)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0


class ReadThroughMixin(JournalState):
    def view(self, checkpoint: Checkpoint | int) -> View:
        """A read-only image of every volume as of `checkpoint`; pins it against promotion
        until closed."""
        self.wait_loaded()
        with self._lock:
            self._check_open()
            cid = (checkpoint.id if isinstance(checkpoint, Checkpoint)
                   else records.check_int("checkpoint id", checkpoint))
            ckpt = self.checkpoint_by_id(cid)
            if ckpt.seq < self._promotion_floor():
                raise CheckpointNotFoundError(f"checkpoint {cid} is being promoted away")
            self._pins[ckpt.seq] = self._pins.get(ckpt.seq, 0) + 1
            return View(self, ckpt)

    def head_view(self) -> HeadView:
        """A read-only image of every volume at the journal's durable head: the replica
        overlaid with every record up to `durable_seq` (records appended but not yet
        committed are left out: they could still be lost).  Nothing is pinned: promotion
        never passes a durable record's seq, so the image cannot move under the reads,
        and appends after the call do not change it.  What an unclean protected-site
        restart's resync compares the protected volumes with (zcore.replication)."""
        self.wait_loaded()
        with self._lock:
            self._check_open()
            return HeadView(self, self.durable_seq + 1)

    def read_at(self, seq: int, volume: int | str, offset: int, length: int) -> bytes:
        """`length` bytes of `volume` at `offset` as a checkpoint at `seq` would see them:
        every journaled write with a seq below `seq`, over the replica.  `seq` must be
        between the promotion watermark (or target) and `last_seq + 1`: older states are
        in no file any more (CheckpointNotFoundError), newer ones not yet (OutOfRangeError).
        Unlike a view, nothing is pinned: a promotion may start after the call returns."""
        self.wait_loaded()
        seq = records.check_int("seq", seq)
        spec = self._volume(volume)
        records.check_range(offset, length, spec.size)
        with self._index_lock:
            self._check_open()
            if seq < self._promotion_floor():
                raise CheckpointNotFoundError(
                    f"seq {seq} of journal {self.path} is promoted into the replicas")
            if seq > self.last_seq + 1:
                raise OutOfRangeError(f"seq {seq} is past journal {self.path}'s last seq "
                                      f"{self.last_seq}")
            if self._damage:
                refuse_damaged(self._damage, seq, spec.id, offset, length, self.path)
            return self._index.read(spec.id, offset, length, seq, self._load_lz4)

    def _promotion_floor(self) -> int:
        return max(self.promoted_seq, int(self._meta.get("promote_target", 0)))

    def _unpin(self, seq: int) -> None:
        with self._lock:
            left = self._pins.get(seq, 0) - 1
            if left > 0:
                self._pins[seq] = left
            else:
                self._pins.pop(seq, None)

    def _volume(self, volume: int | str) -> VolumeSpec:
        if isinstance(volume, str):
            spec = self._by_name.get(volume)
        else:
            spec = self.volumes.get(records.check_int("volume id", volume))
        if spec is None:
            raise OutOfRangeError(f"journal {self.path} has no volume {volume!r}")
        return spec

    def _read(self, at: int, volume: int | str, offset: int, length: int,
              out: Any = None) -> Any:
        spec = self._volume(volume)
        records.check_range(offset, length, spec.size)
        with self._index_lock:  # never the append lock: see the module docstring
            self._check_open()
            if self._damage:
                refuse_damaged(self._damage, at, spec.id, offset, length, self.path)
            if out is None:
                return self._index.read(spec.id, offset, length, at, self._load_lz4)
            self._index.read_into(spec.id, offset, out, at, self._load_lz4)
            return out

    def _allocation(self, at: int, volume: int | str, offset: int, length: int,
                    max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """What [offset, offset + length) of `volume` is as of seq `at`: (start, length,
        state) runs by offset, state a mask of `zcore.fsutil.STATE_HOLE` and `STATE_ZERO`:
        a ZERO record is a hole that reads as zeros, a data record data, and where no
        record covers, the replica's holes (SEEK_HOLE) holes and its data data.  Looked
        at in windows of `ALLOCATION_WINDOW` bytes; it stops after the window in which
        more than `max_extents` runs are found, so the runs may end before offset +
        length, but the first `max_extents` of them are whole."""
        spec = self._volume(volume)
        records.check_range(offset, length, spec.size)
        out: list[tuple[int, int, int]] = []
        end = offset + length
        pos = offset
        with self._index_lock:
            self._check_open()
            fd = self._replica_fds.get(spec.id, -1)
            # one run past the cap: the runs before it are then known to be whole
            while pos < end and len(out) <= max_extents:
                n = min(ALLOCATION_WINDOW, end - pos)
                for start, run, kind in self._index.kinds(spec.id, pos, n, at):
                    if kind == records.REC_ZERO:
                        _add_run(out, start, run, STATE_HOLE | STATE_ZERO)
                    elif kind:
                        _add_run(out, start, run, 0)
                    else:
                        cur = start
                        ranges = data_ranges(fd, start, run) if fd >= 0 else []
                        for d0, dn in ranges:
                            if d0 > cur:
                                _add_run(out, cur, d0 - cur, STATE_HOLE | STATE_ZERO)
                            _add_run(out, d0, dn, 0)
                            cur = d0 + dn
                        if cur < start + run:
                            _add_run(out, cur, start + run - cur, STATE_HOLE | STATE_ZERO)
                pos += n
        return out

    def _load_lz4(self, segment: int, pos: int, stored: int, length: int) -> bytes:
        """The native reader's loader for compressed (LZ4, zstd) records (called under the
        index lock)."""
        key = (segment, pos)
        cached = self._lz4_cache.get(key)
        if cached is not None:
            return cached
        seg = self._segments.get(segment)
        if seg is None or seg.fd < 0:
            raise CorruptRecordError(f"record at segment {segment} pos {pos}: segment is gone")
        raw = pread_exact(seg.fd, 64 + stored, pos,
                          what=f"segment {seg.path} (inside the record at {pos})")
        _rec.verify_payload(raw[:64], memoryview(raw)[64:])
        flags = int.from_bytes(raw[2:4], "little")  # the header passed its CRC just now
        data = records.decode_payload(flags, memoryview(raw)[64:], length,
                                      f"{seg.path}:{pos}")
        self._lz4_cache.put(key, data)
        return data


# Bytes of a volume one step of `_allocation` plans at once: the index's planning is
# quadratic in the records a range holds, so a 1 GiB block-status request over a busy
# journal is planned in pieces, and stops early once a reply is full.
ALLOCATION_WINDOW = 64 << 20


def _add_run(out: list[tuple[int, int, int]], start: int, length: int, state: int) -> None:
    """Append a run to `out`, merged into the last one when it continues it."""
    if length <= 0:
        return
    if out:
        s0, n0, k0 = out[-1]
        if k0 == state and s0 + n0 == start:
            out[-1] = (s0, n0 + length, state)
            return
    out.append((start, length, state))


class View:
    """A volume image as of a checkpoint: replica overlaid with the journal, read-only.
    Reads from several threads at once are safe."""

    def __init__(self, journal: ReadThroughMixin, checkpoint: Checkpoint) -> None:
        self.journal = journal
        self.checkpoint = checkpoint
        self._closed = False

    def read(self, volume: int | str, offset: int, length: int) -> bytes:
        """`length` bytes of `volume` at `offset` as they were at the checkpoint."""
        self._check()
        data: bytes = self.journal._read(self.checkpoint.seq, volume, offset, length)
        return data

    def read_into(self, volume: int | str, offset: int, buf: Any) -> None:
        """Fill the writable buffer `buf` from `volume` at `offset`."""
        self._check()
        self.journal._read(self.checkpoint.seq, volume, offset, len(memoryview(buf)), buf)

    def size(self, volume: int | str) -> int:
        return self.journal._volume(volume).size

    def allocation(self, volume: int | str, offset: int, length: int,
                   max_extents: int = 1 << 62) -> list[tuple[int, int, int]]:
        """(start, length, state) runs of [offset, offset + length) of `volume` at the
        checkpoint: holes (ZERO records, replica holes) and data (docs/format.md 8.4); see
        `Journal._allocation` for `max_extents`."""
        self._check()
        return self.journal._allocation(self.checkpoint.seq, volume, offset, length,
                                        max_extents)

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("view is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.journal._unpin(self.checkpoint.seq)

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeadView:
    """A volume image at a fixed seq of a journal (`Journal.head_view`): every record
    below `seq` over the replica, read-only.  Reads from several threads are safe; a
    damaged range refuses to be read (CorruptRecordError), never returns other bytes."""

    def __init__(self, journal: ReadThroughMixin, seq: int) -> None:
        self.journal = journal
        self.seq = seq

    def read(self, volume: int | str, offset: int, length: int) -> bytes:
        data: bytes = self.journal._read(self.seq, volume, offset, length)
        return data

    def read_into(self, volume: int | str, offset: int, buf: Any) -> None:
        self.journal._read(self.seq, volume, offset, len(memoryview(buf)), buf)

    def size(self, volume: int | str) -> int:
        return self.journal._volume(volume).size

    def volume(self, volume: int) -> HeadVolume:
        """Volume `volume` of this image as a delta-sync Volume (zcore.deltasync)."""
        return HeadVolume(self, volume)


class HeadVolume:
    """One volume of a `HeadView` with `size` and `read_into(offset, buf)`: what a
    delta-sync hasher reads (zcore.deltasync.Volume)."""

    def __init__(self, head: HeadView, volume: int) -> None:
        self.head = head
        self.volume = volume
        self._size = head.size(volume)

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        self.head.read_into(self.volume, offset, buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Refused: a head view is read-only (a compare writes nothing)."""
        raise StateError(f"the head view of volume {self.volume} is read-only")

    def flush(self) -> None:
        """Nothing to make durable."""
