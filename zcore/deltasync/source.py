"""The source of a delta sync: the side whose volumes are copied (docs/format.md 10c).

Sits under the transport (zcore.deltasync.transport) as a state machine that consumes the
target's frames and produces its own; it reads its volumes (blocking), so the transport
runs it in a worker thread.

What the source trusts (10c.1): the target's hashes describe the target's own disk, so a
target that lies can only leave its own copy wrong; the source trusts nothing else.  Every
frame of the target is checked against the plan both sides derive from DSYNC_START (batch
numbers, volumes, levels, runs exactly as requested), and the key must be 32 bytes.  The
source sends every 4 KiB block whose entry differs from the target's, and a verdict (its
own level-0 entries) per batch, which the target checks its disk against.

A live volume (reverse protection: the guest writes while the sync runs) may change
between the level-0 hashes and the data: each level-1 block refined to 4 KiB blocks is
read once, its 4 KiB hashes, the data sent and its entry in the verdict all come from
that one read, so the verdict always describes what the target ends up holding (the
writes themselves are the caller's to resend: the VPG marks them dirty).

Compare mode (`compare=True`, the resync after an unclean protected-site restart, 10c.7):
the source picks the session key (a target that lies can then only make it mark more
blocks, never fewer: only this side must not be fooled) and sends it in its OFFER; it
refines differing blocks to 4 KiB as above, but instead of DATA and a VERDICT it hands
the differing runs to `on_differ(volume, offset, length)` and sends DSYNC_COMPARED.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zcore import records, wire
from zcore.deltasync.hashing import KEY_SIZE, LEVEL_SIZES, BlockHasher, Volume
from zcore.deltasync.messages import (
    DSYNC_PROTOCOL,
    MAX_DATA,
    BlockSet,
    data_frame,
    encode_blockset,
    parse_blockset,
    parse_volumes,
)
from zcore.deltasync.target import BATCH_BLOCKS, MAX_WINDOW, plan_batches
from zcore.errors import ConfigError, ProtocolError

MAX_RECORD = 1 << 20  # data bytes per record: big enough that headers cost 0.01 %


@dataclass
class SourceBatch:
    number: int
    volume: int
    start: int
    end: int
    entries0: list[bytes] = field(default_factory=list)
    children: list[list[bytes]] = field(default_factory=list)
    requested: tuple[tuple[int, int], ...] = ()  # runs of the last REFINE
    level: int = 0  # level of the HASHES expected next


class DeltaSource:
    """Sends a delta sync of `volumes` (id -> Volume); `compress` tries LZ4 on data."""

    def __init__(self, volumes: dict[int, Volume], *, compress: bool = True,
                 compare: bool = False,
                 on_differ: Callable[[int, int, int], None] | None = None) -> None:
        if not volumes:
            raise ConfigError("a delta sync needs a volume")
        if compare and on_differ is None:
            raise ConfigError("a compare needs somewhere to put the blocks that differ")
        self.volumes = volumes
        self.compress = compress
        self.compare = compare
        self.on_differ = on_differ
        self.key = os.urandom(KEY_SIZE) if compare else b""  # compare: this side picks it
        self.differing_bytes = 0  # bytes of the 4 KiB blocks found different
        self.hashers: dict[int, BlockHasher] = {}
        self._plan: list[tuple[int, int, int]] = []
        self._batches: dict[int, SourceBatch] = {}
        self._next = 0  # next batch whose level-0 hashes are expected
        self._verdicts = 0
        self._seq = 0
        self.started = False
        self.done = False
        self.data_bytes = 0  # bytes of volume data sent in records
        self.differing_blocks = 0  # 4 KiB blocks found different
        self.total_bytes = sum(v.size for v in volumes.values())
        self.done_bytes = 0  # bytes resumed or compared (their batch's verdict sent)

    def offer(self) -> bytes:
        vols = [{"id": vid, "size": v.size} for vid, v in sorted(self.volumes.items())]
        if self.compare:
            return wire.control(wire.DSYNC_OFFER, 0, protocol=DSYNC_PROTOCOL, volumes=vols,
                                mode="compare", key=self.key.hex())
        return wire.control(wire.DSYNC_OFFER, 0, protocol=DSYNC_PROTOCOL, volumes=vols)

    def on_frame(self, f: wire.Frame) -> list[bytes]:
        """Handle a frame of the target; returns the frames to send."""
        if f.type == wire.DSYNC_START:
            return self._start(f)
        if not self.started:
            raise ProtocolError(f"{f.name} before DSYNC_START")
        if f.type == wire.DSYNC_HASHES:
            return self._hashes(parse_blockset(f))
        if f.type == wire.DSYNC_DONE:
            if self._verdicts != len(self._plan):
                raise ProtocolError("DSYNC_DONE from the target before the sync ended")
            parse_volumes(wire.parse_control(f), "DSYNC_DONE")
            self.done = True
            return []
        raise ProtocolError(f"unexpected {f.name} from a delta-sync target")

    def _start(self, f: wire.Frame) -> list[bytes]:
        if self.started:
            raise ProtocolError("a second DSYNC_START")
        msg = wire.parse_control(f)
        key = self._start_key(msg["key"])
        vols = parse_volumes(msg, "DSYNC_START", "resume")
        if self.compare and any(resume for _, _, resume in vols):
            raise ProtocolError("a compare's DSYNC_START resumes a volume: a compare "
                                "keeps no progress")
        mine = {vid: v.size for vid, v in self.volumes.items()}
        if {vid: size for vid, size, _ in vols} != mine:
            raise ProtocolError("DSYNC_START volumes are not the offered ones")
        for vid, size, resume in vols:
            if resume > size or (resume % LEVEL_SIZES[0] and resume != size):
                raise ProtocolError(f"DSYNC_START resume {resume} of volume {vid} is invalid")
        if not 1 <= msg["batch"] <= BATCH_BLOCKS:
            raise ProtocolError(f"DSYNC_START batch of {msg['batch']} blocks is invalid")
        self.hashers = {vid: BlockHasher(key, vid, v) for vid, v in self.volumes.items()}
        self._plan = plan_batches(sorted(vols), msg["batch"])
        self.done_bytes = sum(resume for _, _, resume in vols)
        self.started = True
        return self._maybe_done()

    def _start_key(self, text: str) -> bytes:
        """The session key: the target's (sync), or this side's own (compare: the
        target's START must then carry none, "")."""
        if self.compare:
            if text:
                raise ProtocolError("a compare's DSYNC_START carries a key: the source "
                                    "picks it")
            return self.key
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ProtocolError("DSYNC_START key is not hex") from None
        if len(key) != KEY_SIZE:
            raise ProtocolError(f"DSYNC_START key is {len(key)} bytes, not {KEY_SIZE}")
        return key

    def _hashes(self, bs: BlockSet) -> list[bytes]:
        if bs.level == 0:
            return self._level0(bs)
        batch = self._batches.get(bs.batch)
        if batch is None or batch.volume != bs.volume or batch.level != bs.level:
            raise ProtocolError(f"unexpected level-{bs.level} hashes of batch {bs.batch}")
        assert bs.entries is not None
        size = LEVEL_SIZES[bs.level]
        expected = [p + i * size for p, n in _children_runs(batch, bs.level, batch.requested)
                    for i in range(n)]
        if _offsets(bs.runs, size) != expected:
            raise ProtocolError(f"level-{bs.level} hashes of batch {bs.batch} are not the "
                                "blocks asked for")
        snaps: dict[int, bytes] = {}
        mine = (self._own_children(batch, 1) if bs.level == 1
                else self._snapshot_children(batch, snaps))
        differ = [off for off, theirs, ours in zip(expected, bs.entries, mine, strict=True)
                  if theirs != ours]
        if bs.level == 1 and differ:
            return [self._refine(batch, 2, differ)]
        return self._send(batch, differ if bs.level == 2 else [], snaps)

    def _level0(self, bs: BlockSet) -> list[bytes]:
        if len(self._batches) >= MAX_WINDOW:
            raise ProtocolError(f"the target has more than {MAX_WINDOW} batches in flight")
        if bs.batch != self._next or self._next >= len(self._plan):
            raise ProtocolError(f"level-0 hashes of batch {bs.batch}, expected {self._next}")
        vid, start, end = self._plan[self._next]
        nblocks = -(-(end - start) // LEVEL_SIZES[0])
        if bs.volume != vid or bs.runs != ((start, nblocks),) or bs.entries is None:
            raise ProtocolError(f"level-0 hashes of batch {bs.batch} do not cover it")
        batch = SourceBatch(bs.batch, vid, start, end)
        batch.entries0, batch.children = self.hashers[vid].level0(start, nblocks)
        self._next += 1
        self._batches[batch.number] = batch
        differ = [start + i * LEVEL_SIZES[0] for i, (theirs, ours) in enumerate(
            zip(bs.entries, batch.entries0, strict=True)) if theirs != ours]
        if not differ:
            return self._send(batch, [])
        return [self._refine(batch, 1, differ)]

    def _refine(self, batch: SourceBatch, level: int, parents: list[int]) -> bytes:
        size = LEVEL_SIZES[level - 1]
        runs: list[tuple[int, int]] = []
        for p in parents:
            if runs and runs[-1][0] + runs[-1][1] * size == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        batch.requested = tuple(runs)
        batch.level = level
        return encode_blockset(wire.DSYNC_REFINE,
                               BlockSet(batch.volume, level, batch.number, batch.requested))

    def _own_children(self, batch: SourceBatch, level: int) -> list[bytes]:
        size = LEVEL_SIZES[level - 1]
        out: list[bytes] = []
        for parent in _offsets(batch.requested, size):
            if level == 1:
                out += batch.children[(parent - batch.start) // size]
            else:
                out += self.hashers[batch.volume].children(2, parent)
        return out

    def _snapshot_children(self, batch: SourceBatch, snaps: dict[int, bytes]) -> list[bytes]:
        """The 4 KiB entries of the requested level-1 blocks, each read once into `snaps`
        (offset -> bytes); their level-1 entries (so the batch's verdict) follow the
        same bytes."""
        l0, l1, l2 = LEVEL_SIZES
        hasher = self.hashers[batch.volume]
        volume = self.volumes[batch.volume]
        out: list[bytes] = []
        for parent in _offsets(batch.requested, l1):
            n = min(l1, batch.end - parent)
            data = bytearray(n)
            volume.read_into(parent, data)
            snaps[parent] = bytes(data)
            view = memoryview(snaps[parent])
            out += [hasher.entry_of(2, b, view[b - parent : b - parent + l2])
                    for b in range(parent, parent + n, l2)]
            i = (parent - batch.start) // l0
            batch.children[i][(parent - batch.start - i * l0) // l1] = \
                hasher.entry_of(1, parent, view)
        for i in {(p - batch.start) // l0 for p in snaps}:
            batch.entries0[i] = hasher.combine(batch.start + i * l0, batch.children[i])
        return out

    def _send(self, batch: SourceBatch, blocks: list[int],
              snaps: dict[int, bytes] | None = None) -> list[bytes]:
        """DATA frames of the differing 4 KiB `blocks` (from `snaps`, the level-1 blocks
        they were hashed from), then the batch's VERDICT."""
        self.differing_blocks += len(blocks)
        if self.compare:
            return self._compared(batch, blocks)
        out = []
        recs: list[bytes] = []
        pending = 0
        l1 = LEVEL_SIZES[1]
        for offset, length in _coalesce(blocks, LEVEL_SIZES[2], batch.end, MAX_RECORD):
            assert snaps is not None  # blocks are sent only after a level-2 refinement
            data = b"".join(snaps[p][max(offset, p) - p : min(offset + length, p + l1) - p]
                            for p in range(offset - offset % l1, offset + length, l1))
            self._seq += 1
            recs.append(records.encode_write(batch.volume, self._seq, offset, data,
                                             time.time_ns(), compress=self.compress))
            self.data_bytes += length
            self.differing_bytes += length
            pending += length
            if pending + MAX_RECORD > MAX_DATA:
                out.append(data_frame(batch.volume, batch.number, recs))
                recs, pending = [], 0
        if recs:
            out.append(data_frame(batch.volume, batch.number, recs))
        nblocks = len(batch.entries0)
        out.append(encode_blockset(wire.DSYNC_VERDICT, BlockSet(
            batch.volume, 0, batch.number, ((batch.start, nblocks),), tuple(batch.entries0))))
        del self._batches[batch.number]
        self._verdicts += 1
        self.done_bytes += batch.end - batch.start
        return out + self._maybe_done()

    def _compared(self, batch: SourceBatch, blocks: list[int]) -> list[bytes]:
        """Compare mode: the differing 4 KiB `blocks` go to `on_differ`, in runs; the
        batch is retired with DSYNC_COMPARED."""
        assert self.on_differ is not None
        for offset, length in _coalesce(blocks, LEVEL_SIZES[2], batch.end, 1 << 62):
            self.on_differ(batch.volume, offset, length)
            self.differing_bytes += length
        del self._batches[batch.number]
        self._verdicts += 1
        self.done_bytes += batch.end - batch.start
        return [wire.control(wire.DSYNC_COMPARED, 0, batch=batch.number),
                *self._maybe_done()]

    def _maybe_done(self) -> list[bytes]:
        if self._verdicts != len(self._plan):
            return []
        vols = [{"id": vid, "synced": v.size} for vid, v in sorted(self.volumes.items())]
        return [wire.control(wire.DSYNC_DONE, 0, volumes=vols)]


def _offsets(runs: tuple[tuple[int, int], ...], size: int) -> list[int]:
    return [offset + i * size for offset, count in runs for i in range(count)]


def _children_runs(batch: SourceBatch, level: int, parents: tuple[tuple[int, int], ...]
                   ) -> list[tuple[int, int]]:
    """(parent, number of level-`level` children) of each requested parent."""
    psize, size = LEVEL_SIZES[level - 1], LEVEL_SIZES[level]
    return [(p, -(-(min(p + psize, batch.end) - p) // size))
            for p in _offsets(parents, psize)]


def _coalesce(blocks: list[int], size: int, end: int, limit: int) -> list[tuple[int, int]]:
    """(offset, length) runs of adjacent blocks, each at most `limit` bytes, clipped at
    `end`."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        n = min(size, end - b)
        if runs and runs[-1][0] + runs[-1][1] == b and runs[-1][1] + n <= limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((b, n))
    return runs
