"""Dirty bitmaps: which blocks of a protected volume the recovery site may be missing.

Sits beside the capture ring on the protected site.  When the ring overflows or the link
is down, the VPG folds queued writes into one `DirtyBitmap` per volume and keeps marking
new writes there; a bitmap sync later resends the marked blocks.  Bitmaps are pyroaring
bitmaps of 4 KiB blocks.  Marks arrive in bulk (numpy arrays of ranges) and become
roaring run containers built with numpy and loaded through `BitMap.deserialize`: far
cheaper than one `add_range` call per write.  Memory is bounded by coarsening the block
size (a dirty bit then covers more bytes: a sync resends more, never less).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pyroaring import BitMap

from zcore._native.record import crc32c
from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError, OutOfRangeError
from zcore.fsutil import atomic_write

BLOCK = 4096
# 64 MiB of roaring containers per volume before coarsening: a 1 TiB volume with 1 % of its
# blocks dirty in 64 KiB clusters needs about 1 MiB (bench: bitmap.persist).
DEFAULT_MAX_BYTES = 64 << 20
MAGIC = b"ZCBMAP\r\n"
VERSION = 1
HEADER = struct.Struct("<8sII Q I I Q I 16x I")  # 64 bytes, header crc last
assert HEADER.size == 64

_ROARING_COOKIE = 12347  # portable format, with run containers
_NO_OFFSET_THRESHOLD = 4


def id_runs(ids: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64],
                                                    npt.NDArray[np.uint64]]:
    """The maximal runs of consecutive members of `ids` (ascending, distinct integers):
    (starts, ends), each run the half-open range [starts[i], ends[i]).  The one run
    extraction of zcore, for dirty bitmaps and scratch overlays alike."""
    ids = np.asarray(ids, dtype=np.uint64)
    if ids.size == 0:
        empty = np.empty(0, dtype=np.uint64)
        return empty, empty.copy()
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.concatenate(([0], breaks))]
    ends = ids[np.concatenate((breaks - 1, [ids.size - 1]))] + np.uint64(1)
    return starts, ends


def runs_to_bitmap(starts: np.ndarray, ends: np.ndarray) -> BitMap:
    """A BitMap of the union of half-open integer ranges [starts[i], ends[i]) (< 2**32)."""
    # One function of ~60 lines on purpose: it is one numpy pipeline (merge the ranges,
    # split them at container boundaries, lay out the portable serialization) whose
    # stages pass seven arrays to each other; cut up, each piece means nothing alone.
    starts = np.asarray(starts, dtype=np.uint64)
    ends = np.asarray(ends, dtype=np.uint64)
    keep = ends > starts
    if not keep.all():
        starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return BitMap()
    if int(ends.max()) > 1 << 32:
        raise OutOfRangeError("bitmap ranges must stay below 2**32")
    # Union of ranges from separately sorted starts and ends: after the k-th smallest end,
    # coverage drops to zero exactly when the (k+1)-th smallest start lies beyond it.
    dtype = np.uint32 if int(ends.max()) < 1 << 32 else np.uint64
    s = np.sort(starts.astype(dtype))
    e = np.sort(ends.astype(dtype))
    gap = np.flatnonzero(s[1:] > e[:-1])
    lo = np.concatenate((s[:1], s[gap + 1])).astype(np.uint64)
    hi = np.concatenate((e[gap], e[-1:])).astype(np.uint64)
    # split runs at container (2**16) boundaries
    first_key = lo >> 16
    pieces = ((hi - 1) >> 16) - first_key + 1
    if np.any(pieces > 1):
        rep = np.repeat(np.arange(lo.size), pieces.astype(np.int64))
        counts = pieces.astype(np.int64)
        within = np.arange(rep.size) - np.repeat(np.cumsum(counts) - counts, counts)
        key = first_key[rep] + within.astype(np.uint64)
        lo = np.maximum(lo[rep], key << 16)
        hi = np.minimum(hi[rep], (key + 1) << 16)
    keys = lo >> 16
    ukeys, first = np.unique(keys, return_index=True)
    ncont = ukeys.size
    nruns = np.diff(np.append(first, keys.size))
    card = np.add.reduceat((hi - lo).astype(np.int64), first)
    # portable serialization: cookie, run flags, (key, card-1) pairs, offsets, containers
    run_flags = np.full((ncont + 7) // 8, 0xFF, dtype=np.uint8)
    if ncont % 8:
        run_flags[-1] = (1 << (ncont % 8)) - 1
    desc = np.empty(2 * ncont, dtype="<u2")
    desc[0::2] = ukeys
    desc[1::2] = card - 1
    header_size = 4 + run_flags.size + 4 * ncont
    if ncont >= _NO_OFFSET_THRESHOLD:
        header_size += 4 * ncont
    # each container: u16 run count then (start, length-1) pairs of u16
    base = np.arange(ncont) + 2 * first  # u16 index of each container's count
    body = np.empty(ncont + 2 * keys.size, dtype="<u2")
    body[base] = nruns
    run_container = np.repeat(np.arange(ncont), nruns)
    local = np.arange(keys.size) - first[run_container]
    slot = base[run_container] + 1 + 2 * local
    body[slot] = lo & 0xFFFF
    body[slot + 1] = hi - lo - 1
    parts = [
        np.array([_ROARING_COOKIE | ((ncont - 1) << 16)], dtype="<u4").tobytes(),
        run_flags.tobytes(),
        desc.tobytes(),
    ]
    if ncont >= _NO_OFFSET_THRESHOLD:
        parts.append((header_size + 2 * base).astype("<u4").tobytes())
    parts.append(body.tobytes())
    return BitMap.deserialize(b"".join(parts))


class DirtyBitmap:
    """Dirty blocks of one volume.  `block` starts at 4 KiB and doubles on coarsening."""

    def __init__(self, volume_size: int, *, block: int = BLOCK,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if volume_size <= 0:
            raise ConfigError("volume size must be positive")
        if block < BLOCK or block & (block - 1):
            raise ConfigError(f"bitmap block must be a power of two >= {BLOCK}")
        self.volume_size = volume_size
        self.block = block
        self.max_bytes = max_bytes
        self._bm = BitMap()
        while self._nblocks() > 1 << 32:
            self.block *= 2

    def _nblocks(self) -> int:
        return -(-self.volume_size // self.block)

    # ---- marking ------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Mark the blocks covering [offset, offset+length)."""
        if length <= 0:
            return
        if offset < 0 or offset + length > self.volume_size:
            raise OutOfRangeError(f"range {offset}+{length} passes the volume's end")
        self._bm.add_range(offset // self.block, -(-(offset + length) // self.block))
        self._bound()

    def mark_many(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Mark many byte ranges at once (numpy arrays of equal length)."""
        offsets = np.asarray(offsets, dtype=np.uint64)
        lengths = np.asarray(lengths, dtype=np.uint64)
        if offsets.shape != lengths.shape:
            raise ConfigError("offsets and lengths differ in shape")
        if offsets.size == 0:
            return
        ends = offsets + lengths
        # an end below its offset wrapped around 2**64 (a negative or huge offset)
        if int(ends.max()) > self.volume_size or bool((ends < offsets).any()):
            raise OutOfRangeError("a marked range passes the volume's end")
        shift = self.block.bit_length() - 1
        first = offsets >> np.uint64(shift)
        last = (ends + np.uint64(self.block - 1)) >> np.uint64(shift)
        self._bm |= runs_to_bitmap(first, last)
        self._bound()

    def mark_all(self) -> None:
        """Everything is dirty (a full sync): an unreadable bitmap falls back to this."""
        self._bm.add_range(0, self._nblocks())

    def update(self, other: DirtyBitmap) -> None:
        """Add another bitmap's dirty ranges (any granularity)."""
        for offset, length in other.extents():
            self.mark(offset, length)

    def clear(self, offset: int, length: int) -> None:
        """Forget the blocks wholly inside [offset, offset+length) (they were resent)."""
        lo = -(-offset // self.block)
        hi = min(offset + length, self.volume_size)
        hi_block = hi // self.block if hi < self.volume_size else self._nblocks()
        if hi_block > lo:
            self._bm.remove_range(lo, hi_block)

    def _bound(self) -> None:
        while self.memory_bytes > self.max_bytes and self._bm:
            self.coarsen()

    def coarsen(self) -> None:
        """Double the block size: each new bit covers two old ones."""
        ids = self.block_ids()
        self.block *= 2
        coarse = np.unique(ids >> 1)
        self._bm = runs_to_bitmap(coarse.astype(np.uint64), coarse.astype(np.uint64) + 1)

    # ---- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._bm)

    def __bool__(self) -> bool:
        return bool(self._bm)

    def block_ids(self) -> npt.NDArray[np.uint32]:
        """The dirty blocks' numbers (block i covers bytes [i*block, (i+1)*block)),
        ascending: a copy, safe to keep."""
        return np.frombuffer(self._bm.to_array(), dtype=np.uint32)

    @property
    def dirty_bytes(self) -> int:
        n = len(self._bm)
        if n and self._bm.max() == self._nblocks() - 1:
            return n * self.block - (self._nblocks() * self.block - self.volume_size)
        return n * self.block

    @property
    def memory_bytes(self) -> int:
        return self._bm.get_statistics()["n_bytes_array_containers"] + \
            self._bm.get_statistics()["n_bytes_bitset_containers"] + \
            self._bm.get_statistics()["n_bytes_run_containers"]

    def extents(self, max_length: int | None = None) -> Iterator[tuple[int, int]]:
        """Dirty byte ranges (offset, length), ascending, merged, clipped to the volume,
        each at most `max_length` bytes."""
        if not self._bm:
            return
        starts, ends = id_runs(self.block_ids().astype(np.uint64))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            lo, hi = s * self.block, min(e * self.block, self.volume_size)
            step = max_length or hi - lo
            for at in range(lo, hi, step):
                yield at, min(step, hi - at)

    # ---- persistence --------------------------------------------------------------------

    def serialize(self, volume_id: int = 0) -> bytes:
        payload = self._bm.serialize()
        head = HEADER.pack(MAGIC, VERSION, HEADER.size, self.volume_size, self.block,
                           volume_id, len(payload), crc32c(payload), 0)
        return head[:60] + struct.pack("<I", crc32c(head[:60])) + payload

    @classmethod
    def deserialize(cls, data: bytes, *, volume_size: int, volume_id: int = 0,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> DirtyBitmap:
        """Rebuild a persisted bitmap; raises CorruptRecordError on any mismatch."""
        if len(data) < HEADER.size:
            raise CorruptRecordError("bitmap file is shorter than its header")
        magic, version, hsize, size, block, vid, plen, pcrc, hcrc = HEADER.unpack_from(data)
        if magic != MAGIC or crc32c(data[:60]) != hcrc:
            raise CorruptRecordError("bitmap file header is damaged")
        if version != VERSION:
            raise FormatVersionError(f"bitmap format version {version} is not supported")
        if hsize != HEADER.size or size != volume_size or vid != volume_id:
            raise CorruptRecordError("bitmap file belongs to another volume or size")
        if block < BLOCK or block & (block - 1) or len(data) != HEADER.size + plen:
            raise CorruptRecordError("bitmap file has an invalid block size or length")
        payload = data[HEADER.size :]
        if crc32c(payload) != pcrc:
            raise CorruptRecordError("bitmap payload fails its checksum")
        out = cls(volume_size, block=block, max_bytes=max_bytes)
        try:
            out._bm = BitMap.deserialize(payload)
        except Exception as exc:  # pyroaring raises ValueError or MemoryError variants
            raise CorruptRecordError(f"bitmap payload does not decode: {exc}") from None
        if out._bm and out._bm.max() >= out._nblocks():
            raise CorruptRecordError("bitmap marks blocks past the volume's end")
        return out

    def persist(self, path: str | os.PathLike[str], volume_id: int = 0) -> int:
        """Write atomically (temp file, fsync, rename, directory fsync); returns bytes."""
        data = self.serialize(volume_id)
        atomic_write(path, data)
        return len(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, volume_size: int, volume_id: int = 0,
             max_bytes: int = DEFAULT_MAX_BYTES) -> DirtyBitmap:
        return cls.deserialize(Path(path).read_bytes(), volume_size=volume_size,
                               volume_id=volume_id, max_bytes=max_bytes)
