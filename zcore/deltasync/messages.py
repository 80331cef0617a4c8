"""Delta-sync payloads (docs/format.md 10c.3-10c.4): encoding and checked decoding.

Sits between the delta-sync state machines (zcore.deltasync.engine) and zcore.wire's
frames.  Decoders treat every payload as hostile: counts and lengths are bounded before
anything is allocated or sliced, and anything malformed raises `ProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from zcore import wire
from zcore.deltasync.hashing import ENTRY_SIZE, HASH_SIZE, KIND_HASH, KIND_ZERO, LEVELS
from zcore.errors import ProtocolError

DSYNC_PROTOCOL = 1
MAX_VOLUME_ID = 65535  # as in a journal (docs/format.md 3)
MAX_RUNS = 1024
MAX_ENTRIES = 16384
MAX_DATA = 8 << 20  # data bytes per DSYNC_DATA frame
# 8 MiB of data, plus a header and a block-CRC table per record (a record per 4 KiB at
# worst: 64 + 64 bytes each) and the frame's own 8-byte head
MAX_DSYNC_FRAME = MAX_DATA + (MAX_DATA // 4096) * 128 + 64 * 1024
BLOCKSET_HEAD = struct.Struct("<IIII")  # volume, level, batch, nruns
RUN = struct.Struct("<QII")  # offset, count, reserved
DATA_HEAD = struct.Struct("<II")  # volume, batch
_ZERO_HASH = bytes(HASH_SIZE)


@dataclass(frozen=True)
class BlockSet:
    """A HASHES, REFINE or VERDICT payload: runs of blocks of one level, and for HASHES
    and VERDICT one entry (kind byte + hash) per block, in run order."""

    volume: int
    level: int
    batch: int
    runs: tuple[tuple[int, int], ...]
    entries: tuple[bytes, ...] | None = None

    @property
    def nblocks(self) -> int:
        return sum(count for _, count in self.runs)


def encode_blockset(ftype: int, bs: BlockSet) -> bytes:
    """A HASHES, REFINE or VERDICT frame."""
    if not 0 < len(bs.runs) <= MAX_RUNS or bs.nblocks > MAX_ENTRIES:
        raise ProtocolError(f"block set of {len(bs.runs)} runs, {bs.nblocks} blocks")
    parts: list[bytes | memoryview] = [
        BLOCKSET_HEAD.pack(bs.volume, bs.level, bs.batch, len(bs.runs))]
    parts += [RUN.pack(offset, count, 0) for offset, count in bs.runs]
    if ftype != wire.DSYNC_REFINE:
        entries = bs.entries or ()
        if len(entries) != bs.nblocks:
            raise ProtocolError("block set entries disagree with its runs")
        parts.append(bytes(e[0] for e in entries))
        parts += [memoryview(e)[1:] for e in entries]
    return wire.frame(ftype, 0, b"".join(parts))


def parse_blockset(f: wire.Frame) -> BlockSet:
    """Decode a HASHES, REFINE or VERDICT frame, its layout checked (ranges are the
    state machines' to check against their volumes and batches)."""
    p = f.payload
    if len(p) < BLOCKSET_HEAD.size:
        raise ProtocolError(f"{f.name} shorter than its header")
    volume, level, batch, nruns = BLOCKSET_HEAD.unpack_from(p)
    if level >= LEVELS or not 0 < nruns <= MAX_RUNS:
        raise ProtocolError(f"{f.name} has level {level} or {nruns} runs")
    at = BLOCKSET_HEAD.size + nruns * RUN.size
    if at > len(p):
        raise ProtocolError(f"{f.name} run table passes its end")
    runs = []
    total = 0
    for i in range(nruns):
        offset, count, reserved = RUN.unpack_from(p, BLOCKSET_HEAD.size + i * RUN.size)
        if count == 0 or reserved:
            raise ProtocolError(f"{f.name} run {i} is empty or has reserved bits")
        total += count
        runs.append((offset, count))
    if total > MAX_ENTRIES:
        raise ProtocolError(f"{f.name} names {total} blocks (at most {MAX_ENTRIES})")
    if f.type == wire.DSYNC_REFINE:
        if at != len(p):
            raise ProtocolError(f"{f.name} has trailing bytes")
        return BlockSet(volume, level, batch, tuple(runs))
    if len(p) - at != total * ENTRY_SIZE:
        raise ProtocolError(f"{f.name} holds {len(p) - at} entry bytes for {total} blocks")
    kinds = bytes(p[at : at + total])
    hashes = p[at + total :]
    entries = []
    for i, kind in enumerate(kinds):
        h = bytes(hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE])
        if kind not in (KIND_HASH, KIND_ZERO) or (kind == KIND_ZERO and h != _ZERO_HASH):
            raise ProtocolError(f"{f.name} entry {i} has kind {kind} or a zero block's hash")
        entries.append(bytes((kind,)) + h)
    return BlockSet(volume, level, batch, tuple(runs), tuple(entries))


def data_frame(volume: int, batch: int, records: list[bytes]) -> bytes:
    return wire.frame(wire.DSYNC_DATA, 0, DATA_HEAD.pack(volume, batch) + b"".join(records))


def parse_data(f: wire.Frame) -> tuple[int, int, memoryview]:
    """(volume, batch, records) of a DSYNC_DATA frame (records unchecked here)."""
    if len(f.payload) < DATA_HEAD.size:
        raise ProtocolError("DSYNC_DATA shorter than its header")
    volume, batch = DATA_HEAD.unpack_from(f.payload)
    return volume, batch, f.payload[DATA_HEAD.size :]


def parse_volumes(msg: dict[str, Any], what: str, extra: str | None = None
                  ) -> list[tuple[int, int, int]]:
    """The `volumes` list of an OFFER, START or DONE: [(id, size or synced, extra)],
    every field a non-negative integer, ids distinct."""
    out = []
    seen = set()
    vols = msg["volumes"]
    if len(vols) > MAX_VOLUME_ID + 1:
        raise ProtocolError(f"{what} lists {len(vols)} volumes")
    key = "size" if what != "DSYNC_DONE" else "synced"
    for v in vols:
        if not isinstance(v, dict):
            raise ProtocolError(f"{what} volume entry is not an object")
        fields = [v.get("id"), v.get(key), v.get(extra) if extra else 0]
        ints = [x for x in fields if type(x) is int and 0 <= x < 1 << 64]
        if len(ints) != 3:
            raise ProtocolError(f"{what} volume entry {v!r} is malformed")
        if ints[0] in seen or ints[0] > MAX_VOLUME_ID:
            raise ProtocolError(f"{what} lists volume {ints[0]} twice or out of range")
        seen.add(ints[0])
        out.append((ints[0], ints[1], ints[2]))
    return out
