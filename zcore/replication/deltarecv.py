"""The recovery site's side of a reversed VPG's delta sync (docs/format.md 10.2, 10c):
after an ATTACH that says `"initial": "delta"`, the DSYNC frames of the connection drive
a `DeltaTarget` over the VPG's journals' replicas until DONE, before any BUNDLE.

Sits between the connection (zcore.replication.receiver), which routes the frames here,
and the journals, whose replicas are written through `ReplicaVolume` (sums kept right).
Only journals that hold no record may be targets (ProtocolError otherwise).  Progress is
kept in `vpgs/<vpg>/delta-sync.progress` (a checked state file): a session interrupted
by a crash of either side resumes after the last verified block, unless the protected
site asks for a fresh start (`"delta_resume": false`, after its own crash).  A session
that resumed rebuilds the replicas' sums from their verified bytes before its DONE.

After an ATTACH that says `"initial": "resync"` (the protected VPG restarted after a
crash) the DSYNC frames drive a compare-only target instead (`make_compare_target`,
docs/format.md 10c.7): it hashes each journal's head view (replica and every durable
record) under the key the protected site sent, and writes nothing; any journal may be
compared, history and all.  The protected site then sends what differs as bundles."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zcore import wire
from zcore.deltasync import DeltaTarget, SyncStats, TargetVolume, target_session
from zcore.deltasync.target import PROGRESS_BYTES
from zcore.errors import CorruptRecordError, ProtocolError, ZcoreError
from zcore.journal.replicavolume import ReplicaVolume
from zcore.replication.journals import VPGReceiver

log = logging.getLogger(__name__)

PROGRESS_NAME = "delta-sync.progress"
# the target's progress is made durable after this many verified bytes (see
# zcore.deltasync.target.PROGRESS_BYTES; tests lower it)
PROGRESS_BYTES = PROGRESS_BYTES
# DSYNC frame bytes queued before reading pauses (a source sends at most its window of
# batches' data ahead of the target: 4 x 64 MiB at worst)
QUEUE_BYTES = 64 << 20


def delta_requested(msg: dict[str, Any]) -> tuple[bool, bool]:
    """(delta sync asked for, resume its progress) from an ATTACH message's optional
    `initial` and `delta_resume` fields (checked: ProtocolError); `"resync"` is a
    compare (`resync_requested`), not a delta sync."""
    initial = msg.get("initial")
    if initial is None or initial == "resync":
        return False, False
    if initial != "delta":
        raise ProtocolError(f"ATTACH initial {initial!r} is not supported")
    resume = msg.get("delta_resume", True)
    if not isinstance(resume, bool):
        raise ProtocolError("ATTACH delta_resume must be a boolean")
    return True, resume


def make_target(receiver: VPGReceiver, resume: bool) -> DeltaTarget:
    """The target over every replica of the VPG's journals (blocking: a worker thread)."""
    full = [vm for vm, j in receiver.journals.items() if not j.empty]
    if full:
        raise ProtocolError(f"VPG {receiver.name}: a delta sync was asked for, but the "
                            f"journal of VM {full[0]} holds records (its replicas are not "
                            "the volumes): refused")
    volumes: dict[int, TargetVolume] = {}
    for j in receiver.journals.values():
        for vid in j.volumes:
            volumes[vid] = ReplicaVolume(j, vid)
    first = next(iter(receiver.journals.values()))
    progress = Path(first.path).parent / PROGRESS_NAME
    if not resume:
        progress.unlink(missing_ok=True)
    target: DeltaTarget

    def resum() -> None:
        if target.resumed:  # a crash may have left bytes and sums apart: verified now
            for j in receiver.journals.values():
                for vid in j.volumes:
                    j.replica_resum(vid)

    target = DeltaTarget(volumes, progress, on_done=resum, progress_bytes=PROGRESS_BYTES)
    return target


def resync_requested(msg: dict[str, Any]) -> bool:
    """True when an ATTACH asks for an unclean restart's compare (`"initial":
    "resync"`; other values are delta_requested's to check)."""
    return msg.get("initial") == "resync"


def make_compare_target(receiver: VPGReceiver) -> DeltaTarget:
    """The compare-only target over the head views of every journal of the VPG
    (blocking: a worker thread).  The bundles of an earlier connection are applied
    first and every journal committed, so the head views hold every record the
    journals will keep and nothing is appended under the compare."""
    receiver.quiesce()
    volumes: dict[int, TargetVolume] = {}
    for j in receiver.journals.values():
        try:
            j.commit()
            head = j.head_view()
        except (ZcoreError, OSError) as exc:  # the session then fails with the reason
            log.warning("VPG %s: journal %s cannot be compared: %s", receiver.name,
                        j.path, exc)
            for vid, spec in j.volumes.items():
                volumes[vid] = Unreadable(spec.size, f"journal {j.path}: {exc}")
            continue
        for vid in j.volumes:
            volumes[vid] = head.volume(vid)
    return DeltaTarget(volumes, compare=True)


class Unreadable:
    """A volume of a journal that cannot be read: every read fails with the reason, so
    the compare fails after its START (the protected site then resends every volume)
    instead of the ATTACH (which it would retry forever)."""

    def __init__(self, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        raise CorruptRecordError(f"cannot read for the compare: {self.reason}")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise CorruptRecordError(self.reason)

    def flush(self) -> None:
        """Nothing to make durable."""


class DeltaChannel:
    """The DSYNC frames of one connection as a FrameChannel for `target_session`."""

    def __init__(self, send: Callable[[bytes], None], pause: Callable[[bool], None]) -> None:
        self._send = send
        self._pause = pause
        self._frames: deque[wire.Frame] = deque()
        self._bytes = 0
        self._paused = False
        self._ready = asyncio.Event()
        self._closed: str | None = None
        self.stats = SyncStats()

    def put(self, f: wire.Frame) -> None:
        """A DSYNC (or ERROR) frame of the peer (event loop)."""
        self._frames.append(f)
        self._bytes += len(f.payload)
        self._ready.set()
        if self._bytes > QUEUE_BYTES and not self._paused:
            self._paused = True
            self._pause(True)

    def close(self, reason: str) -> None:
        self._closed = reason
        self._ready.set()

    async def read(self) -> wire.Frame:
        while not self._frames:
            if self._closed is not None:
                raise ProtocolError(f"the peer connection closed mid-sync: {self._closed}")
            self._ready.clear()
            await self._ready.wait()
        f = self._frames.popleft()
        self._bytes -= len(f.payload)
        if self._paused and self._bytes <= QUEUE_BYTES // 2:
            self._paused = False
            self._pause(False)
        self.stats.bytes_received += wire.HEADER.size + len(f.payload)
        if f.type == wire.ERROR:
            raise ProtocolError(f"the peer failed the sync: {wire.parse_control(f)['reason']}")
        return f

    async def send(self, frames: Sequence[bytes]) -> None:
        for fr in frames:
            self._send(fr)
            self.stats.bytes_sent += len(fr)

    async def fail(self, exc: BaseException) -> None:
        self._send(wire.control(wire.ERROR, 0, reason=str(exc)[:1000] or type(exc).__name__))


async def run_delta(channel: DeltaChannel, target: DeltaTarget, name: str) -> SyncStats:
    """The target's session to its end (ProtocolError: the sync failed)."""
    stats = await target_session(channel, target)
    log.info("VPG %s: delta sync received: %d bytes written, %d bytes in", name,
             target.bytes_written, stats.bytes_received)
    return stats
