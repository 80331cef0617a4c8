"""The target of a delta sync: the side whose volumes are overwritten (docs/format.md 10c).

Sits under the transport (zcore.deltasync.transport) as a state machine that consumes
frames and produces frames; it does blocking volume I/O, so the transport runs it in a
worker thread.

What the target trusts (10c.1): nothing the source says about *which* blocks differ.  It
picks the session key, sends its own hashes, writes the records the source sends only
inside the batch they name, and counts a 1 MiB block as synced only when, after the
writes, its own hash of the block equals the source's verdict under this session's key.
A source that skips a differing block, sends wrong bytes, claims equality where the data
differ, or hashes with another key fails the sync with `ProtocolError`; it never makes
the target record a block it did not verify.  Progress (the highest verified offset per
volume) reaches the checked state file only after the volumes are fdatasync'ed.

Compare mode (`compare=True`, the resync after an unclean protected-site restart, 10c.7):
the target only hashes what it holds (its volumes are read-only, e.g. journal head views)
under the key the *source* picked and sent in its OFFER; the source marks what differs
on its side and later sends it as ordinary writes.  DATA and VERDICT are refused; a
DSYNC_COMPARED retires a batch.  Nothing is kept across sessions (no progress file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zcore import records, wire
from zcore._native import record as _rec
from zcore.deltasync.hashing import (
    KEY_SIZE,
    LEVEL_SIZES,
    BlockHasher,
    Punchable,
    TargetVolume,
)
from zcore.deltasync.messages import (
    DSYNC_PROTOCOL,
    MAX_VOLUME_ID,
    BlockSet,
    encode_blockset,
    parse_blockset,
    parse_data,
    parse_volumes,
)
from zcore.errors import ConfigError, CorruptRecordError, ProtocolError, status_error
from zcore.fsutil import read_state, write_state

PROGRESS_FORMAT = "zcore-delta-sync"
PROGRESS_VERSION = 1
BATCH_BLOCKS = 64  # level-0 blocks per batch: 64 MiB, one large read per side
WINDOW = 4  # batches hashed ahead of the source's verdicts (4 x 64 MiB)
MAX_WINDOW = 64  # the protocol's bound: a source refuses more batches in flight
# progress is made durable (fdatasync + state file) at most this often: an fdatasync
# per 64 MiB batch would cost more than re-verifying 256 MiB after a crash
PROGRESS_BYTES = 256 << 20


@dataclass
class Batch:
    number: int
    volume: int
    start: int
    end: int
    entries0: list[bytes] = field(default_factory=list)  # before any write
    children: list[list[bytes]] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)  # offsets of level-1 blocks written
    verified: bool = False


def plan_batches(volumes: list[tuple[int, int, int]], batch_blocks: int
                 ) -> list[tuple[int, int, int]]:
    """(volume, start, end) of every batch, numbered in list order: [resume, size) of each
    volume in (id, size, resume) order, cut into `batch_blocks` level-0 blocks."""
    out = []
    span = batch_blocks * LEVEL_SIZES[0]
    for vid, size, resume in volumes:
        for start in range(resume, size, span):
            out.append((vid, start, min(start + span, size)))
    return out


class DeltaTarget:
    """Receives a delta sync into `volumes` (id -> TargetVolume), keeping its progress in
    the checked state file `progress` (None: no resume)."""

    def __init__(self, volumes: dict[int, TargetVolume], progress: str | os.PathLike[str]
                 | None = None, *, key: bytes | None = None, batch_blocks: int = BATCH_BLOCKS,
                 window: int = WINDOW, progress_bytes: int = PROGRESS_BYTES,
                 on_done: Callable[[], None] | None = None, compare: bool = False) -> None:
        if not 1 <= batch_blocks <= BATCH_BLOCKS or not 1 <= window <= MAX_WINDOW:
            raise ConfigError(f"batches hold 1..{BATCH_BLOCKS} blocks, window 1..{MAX_WINDOW}")
        self.batch_blocks = batch_blocks
        self.window = window
        self.progress_bytes = progress_bytes
        self.volumes = volumes
        self.progress_path = Path(progress) if progress is not None else None
        self.on_done = on_done  # called (worker thread) before DSYNC_DONE is answered
        self.compare = compare
        if compare and (key is not None or progress is not None):
            raise ConfigError("a compare takes the source's key and keeps no progress")
        self.key = key if key is not None else os.urandom(KEY_SIZE)
        if len(self.key) != KEY_SIZE:
            raise ConfigError(f"a delta-sync key is {KEY_SIZE} bytes")
        if any(not 0 <= vid <= MAX_VOLUME_ID for vid in volumes) or not volumes:
            raise ConfigError(f"delta-sync volume ids are 0..{MAX_VOLUME_ID}")
        self.hashers = {vid: BlockHasher(self.key, vid, v) for vid, v in volumes.items()}
        self.compared_bytes = 0  # compare mode: bytes of the batches the source compared
        self.synced = self._load_progress()
        self.resumed = any(self.synced.values())  # a progress file carried verified blocks
        self._durable = dict(self.synced)
        self._plan: list[tuple[int, int, int]] = []
        self._next = 0  # next batch to hash
        self._inflight: dict[int, Batch] = {}
        self._verified_upto = 0  # batches below it are verified
        self._last_seq = 0
        self.started = False
        self.done = False
        self.bytes_written = 0

    # ---- progress ----
    def _load_progress(self) -> dict[int, int]:
        fresh = dict.fromkeys(self.volumes, 0)
        if self.progress_path is None or not self.progress_path.exists():
            return fresh
        meta = read_state(self.progress_path, PROGRESS_FORMAT, PROGRESS_VERSION)
        vols = meta.get("volumes")
        if not isinstance(vols, dict):
            raise CorruptRecordError(f"{self.progress_path} lacks its volumes")
        out = {}
        for vid, v in self.volumes.items():
            entry = vols.get(str(vid))
            synced = entry.get("synced") if isinstance(entry, dict) else None
            ok = (isinstance(entry, dict) and entry.get("size") == v.size
                  and type(synced) is int and 0 <= synced <= v.size
                  and (synced % LEVEL_SIZES[0] == 0 or synced == v.size))
            if not ok or not isinstance(synced, int):
                return fresh  # another sync's file, or other sizes: start over
            out[vid] = synced
        return out

    def _save_progress(self, force: bool = False) -> None:
        gained = sum(self.synced[v] - self._durable[v] for v in self.synced)
        if self.progress_path is None or not gained or (gained < self.progress_bytes
                                                        and not force):
            return
        for v in self.volumes.values():
            v.flush()
        meta = {"volumes": {str(vid): {"size": v.size, "synced": self.synced[vid]}
                            for vid, v in self.volumes.items()}}
        write_state(self.progress_path, PROGRESS_FORMAT, PROGRESS_VERSION, meta)
        self._durable = dict(self.synced)

    # ---- the conversation ----
    def on_offer(self, f: wire.Frame) -> bytes:
        """DSYNC_OFFER -> DSYNC_START."""
        if f.type != wire.DSYNC_OFFER or self.started:
            raise ProtocolError(f"expected one DSYNC_OFFER, got {f.name}")
        msg = wire.parse_control(f)
        if msg["protocol"] != DSYNC_PROTOCOL:
            raise ProtocolError(f"delta-sync protocol {msg['protocol']} is not supported")
        self._offer_mode(msg)
        offered = {vid: size for vid, size, _ in parse_volumes(msg, "DSYNC_OFFER")}
        mine = {vid: v.size for vid, v in self.volumes.items()}
        if offered != mine:
            raise ProtocolError(f"DSYNC_OFFER volumes {offered} are not the target's {mine}")
        order = sorted(self.volumes)
        self._plan = plan_batches([(v, mine[v], self.synced[v]) for v in order],
                                  self.batch_blocks)
        self.started = True
        vols = [{"id": v, "size": mine[v], "resume": self.synced[v]} for v in order]
        key = "" if self.compare else self.key.hex()  # a compare uses the source's key
        return wire.control(wire.DSYNC_START, 0, key=key, batch=self.batch_blocks,
                            volumes=vols)

    def _offer_mode(self, msg: dict[str, object]) -> None:
        """The OFFER's `mode` must be this target's; a compare's OFFER carries its key."""
        mode = msg.get("mode", "sync")
        if mode != ("compare" if self.compare else "sync"):
            raise ProtocolError(f"DSYNC_OFFER mode {mode!r} is not what this target was "
                                f"attached for ({'compare' if self.compare else 'sync'})")
        if not self.compare:
            return
        key = msg.get("key")
        try:
            raw = bytes.fromhex(key) if isinstance(key, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != KEY_SIZE:
            raise ProtocolError(f"a compare's DSYNC_OFFER must carry a {KEY_SIZE}-byte key "
                                "in hex")
        self.key = raw
        self.hashers = {vid: BlockHasher(raw, vid, v) for vid, v in self.volumes.items()}

    def wants_hashing(self) -> bool:
        """True while another batch's level-0 hashes may be sent (window not full)."""
        return (self.started and self._next < len(self._plan)
                and len(self._inflight) < self.window)

    def next_hashes(self) -> bytes:
        """Hash the next batch; its level-0 DSYNC_HASHES frame."""
        vid, start, end = self._plan[self._next]
        batch = Batch(self._next, vid, start, end)
        nblocks = -(-(end - start) // LEVEL_SIZES[0])
        batch.entries0, batch.children = self.hashers[vid].level0(start, nblocks)
        self._inflight[batch.number] = batch
        self._next += 1
        bs = BlockSet(vid, 0, batch.number, ((start, nblocks),), tuple(batch.entries0))
        return encode_blockset(wire.DSYNC_HASHES, bs)

    def on_frame(self, f: wire.Frame) -> list[bytes]:
        """Handle a frame of the source after the offer; returns the frames to send."""
        if f.type == wire.DSYNC_REFINE:
            return [self._refine(parse_blockset(f))]
        if self.compare:
            if f.type == wire.DSYNC_COMPARED:
                self._compared(wire.parse_control(f))
                return []
            if f.type == wire.DSYNC_DONE:
                return [self._finish(f)]
            raise ProtocolError(f"{f.name} in a compare (it writes nothing)")
        if f.type == wire.DSYNC_DATA:
            self._data(f)
            return []
        if f.type == wire.DSYNC_VERDICT:
            self._verdict(parse_blockset(f))
            return []
        if f.type == wire.DSYNC_DONE:
            return [self._finish(f)]
        raise ProtocolError(f"unexpected {f.name} from a delta-sync source")

    def _batch(self, number: int, volume: int) -> Batch:
        batch = self._inflight.get(number)
        if batch is None or batch.volume != volume:
            raise ProtocolError(f"batch {number} of volume {volume} is not in flight")
        return batch

    def _refine(self, bs: BlockSet) -> bytes:
        """Children hashes of the blocks a REFINE names (level 1 from the batch's cache,
        level 2 read again)."""
        batch = self._batch(bs.batch, bs.volume)
        if bs.level not in (1, 2):
            raise ProtocolError(f"DSYNC_REFINE of level {bs.level}")
        parent_size = LEVEL_SIZES[bs.level - 1]
        runs: list[tuple[int, int]] = []
        entries: list[bytes] = []
        for offset, count in _check_runs(bs, batch, parent_size):
            for parent in range(offset, offset + count * parent_size, parent_size):
                if bs.level == 1:
                    kids = batch.children[(parent - batch.start) // parent_size]
                else:
                    kids = self.hashers[bs.volume].children(2, parent)
                runs.append((parent, len(kids)))
                entries += kids
        out = BlockSet(bs.volume, bs.level, bs.batch, _merge_runs(runs, LEVEL_SIZES[bs.level]),
                       tuple(entries))
        return encode_blockset(wire.DSYNC_HASHES, out)

    def _data(self, f: wire.Frame) -> None:
        """Validate every record of a DSYNC_DATA frame, then write them."""
        vid, number, recs = parse_data(f)
        batch = self._batch(number, vid)
        sizes = np.zeros(vid + 1, dtype=np.uint64)
        sizes[vid] = batch.end  # records must end inside the batch...
        scanned = _rec.scan(recs, 0, 0, self._last_seq, sizes, records.FLAGS_V2)  # no zstd (10c.3)
        if scanned.status:
            raise ProtocolError(f"DSYNC_DATA records are invalid: "
                                f"{status_error(scanned.status, 'checking records')}")
        arr = scanned.array()
        kinds, offsets = arr["type"].tolist(), arr["offset"].tolist()
        if set(arr["volume"].tolist()) - {vid}:  # scan refuses them too: never rely on it
            raise ProtocolError("DSYNC_DATA holds a record of another volume")
        if any(k not in (records.REC_WRITE, records.REC_ZERO) for k in kinds):
            raise ProtocolError("DSYNC_DATA holds a record that is not a WRITE or ZERO")
        if offsets and min(offsets) < batch.start:  # ...and start inside it
            raise ProtocolError(f"DSYNC_DATA writes before batch {number}")
        for kind, flags, offset, length, pos, stored in zip(
                kinds, arr["flags"].tolist(), offsets, arr["length"].tolist(),
                arr["pos"].tolist(), arr["stored"].tolist(), strict=True):
            self._write(vid, kind, flags, offset, length, recs[pos + 64 : pos + 64 + stored])
            l1 = LEVEL_SIZES[1]
            batch.touched.update(range(offset - offset % l1, offset + length, l1))
        self._last_seq = scanned.last_seq

    def _write(self, vid: int, kind: int, flags: int, offset: int, length: int,
               payload: memoryview) -> None:
        volume = self.volumes[vid]
        data: bytes | memoryview
        if kind == records.REC_ZERO and isinstance(volume, Punchable):
            volume.zero(offset, length)
            self.bytes_written += length
            return
        if kind == records.REC_ZERO:
            data = bytes(length)
        elif flags & records.FLAGS_COMPRESSED:
            try:
                data = records.decode_payload(flags, payload, length,
                                              f"DSYNC_DATA offset {offset}")
            except CorruptRecordError as exc:
                raise ProtocolError(str(exc)) from exc
        else:
            data = payload[_rec.blockcrc_table_size(length) :]
        volume.pwrite(offset, data)
        self.bytes_written += length

    def _verdict(self, bs: BlockSet) -> None:
        """Check the batch against the source's level-0 entries (10c.1)."""
        batch = self._batch(bs.batch, bs.volume)
        nblocks = len(batch.entries0)
        if bs.level != 0 or bs.runs != ((batch.start, nblocks),) or bs.entries is None:
            raise ProtocolError(f"DSYNC_VERDICT of batch {bs.batch} does not cover it")
        hasher = self.hashers[batch.volume]
        l1 = LEVEL_SIZES[1]
        for i, theirs in enumerate(bs.entries):
            b0 = batch.start + i * LEVEL_SIZES[0]
            kids = batch.children[i]
            written = [k for k in range(len(kids)) if b0 + k * l1 in batch.touched]
            mine = batch.entries0[i]
            if written:  # re-hash the level-1 blocks written; the others did not change
                kids = list(kids)
                for k in written:
                    kids[k] = hasher.entry(1, b0 + k * l1)
                mine = hasher.combine(b0, kids)
            if mine != theirs:
                raise ProtocolError(
                    f"volume {batch.volume}: block at {batch.start + i * LEVEL_SIZES[0]} "
                    "differs from the source's verdict after the sync")
        batch.verified = True
        self._advance()

    def _compared(self, msg: dict[str, object]) -> None:
        """A compare's batch is done on the source's side: retire it."""
        number = msg["batch"]
        batch = self._inflight.get(number) if type(number) is int else None
        if batch is None or batch.verified:
            raise ProtocolError(f"DSYNC_COMPARED of batch {number}, which is not in flight")
        batch.verified = True
        self.compared_bytes += batch.end - batch.start
        self._advance()

    def _advance(self) -> None:
        while (b := self._inflight.get(self._verified_upto)) is not None and b.verified:
            del self._inflight[b.number]
            self.synced[b.volume] = b.end
            self._verified_upto += 1
        self._save_progress()

    def _finish(self, f: wire.Frame) -> bytes:
        msg = wire.parse_control(f)
        parse_volumes(msg, "DSYNC_DONE")
        if self._verified_upto != len(self._plan):
            raise ProtocolError(f"DSYNC_DONE after {self._verified_upto} of "
                                f"{len(self._plan)} batches were verified")
        if not self.compare:
            for v in self.volumes.values():
                v.flush()
        self._save_progress(force=True)
        if self.on_done is not None:
            self.on_done()
        self.done = True
        vols = [{"id": vid, "synced": self.synced[vid]} for vid in sorted(self.volumes)]
        return wire.control(wire.DSYNC_DONE, 0, volumes=vols)


def _check_runs(bs: BlockSet, batch: Batch, size: int) -> tuple[tuple[int, int], ...]:
    """The runs of `bs`, each of blocks of `size` inside the batch, increasing."""
    at = batch.start
    for offset, count in bs.runs:
        if offset < at or offset % size or offset + (count - 1) * size >= batch.end:
            raise ProtocolError(f"{json.dumps(bs.runs[:4])}... lie outside batch {bs.batch}")
        at = offset + count * size
    return bs.runs


def _merge_runs(runs: list[tuple[int, int]], size: int) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for offset, count in runs:
        if out and out[-1][0] + out[-1][1] * size == offset:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((offset, count))
    return tuple(out)

