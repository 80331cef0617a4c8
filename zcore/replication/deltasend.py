"""The protected site's side of a reversed VPG's delta sync (docs/format.md 10.2, 10c):
a VPG started with `delta_sync=True` says so in its ATTACH, and after ATTACHED its sender
runs a `DeltaSource` over the VPG's backing files on the same TLS connection, before any
BUNDLE; when it is DONE the VPG is told (`VPG.delta_done`, durable) and replication goes
on with the bitmap sync of the writes made meanwhile.

After an unclean restart (`VPG.resync_pending`) the ATTACH says `"initial": "resync"`
and the same connection carries a compare instead (`run_resync_compare`, 10c.7): this
side picks the key, the recovery site hashes its journals' head views, the blocks that
differ are marked dirty in the VPG (`VPG.resync_differs`), and the VPG's bitmap sync
sends them as ordinary writes once the compare is done.  A compare the recovery site
fails, or that breaks this side's checks, resends every volume (`VPG.resync_failed`); a
link lost mid-compare compares again in the next session.

Sits between the sender (zcore.replication.sender), which owns the connection, and
zcore.deltasync.  The recovery site's heartbeats are skipped, this side sends its own
while the session runs, and DATA frames pass the site's throttle like bundles."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from zcore import wire
from zcore.deltasync import DeltaSource, FileVolume, SyncStats, Volume, source_session
from zcore.errors import ProtocolError
from zcore.replication import timing
from zcore.vpg import VPG, DeltaSyncReport, ResyncReport

if TYPE_CHECKING:
    from zcore.replication.sender import FrameStream
    from zcore.replication.throttle import Throttle


def attach_fields(vpg: VPG) -> dict[str, Any]:
    """The ATTACH fields of a VPG whose delta sync or resync compare is pending (none
    otherwise)."""
    if vpg.delta_pending:
        return {"initial": "delta", "delta_resume": not vpg.delta_fresh}
    if vpg.resync_pending:
        return {"initial": "resync"}
    return {}


class SenderChannel:
    """The sender's connection as a FrameChannel for `source_session`."""

    def __init__(self, frames: FrameStream, writer: asyncio.StreamWriter,
                 throttle: Throttle, priority: str, vpg: VPG, source: DeltaSource,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.vpg = vpg
        self.progress = progress or vpg.delta_progress
        self.source = source
        self.frames = frames
        self.writer = writer
        self.throttle = throttle
        self.priority = priority
        self.stats = SyncStats()

    async def read(self) -> wire.Frame:
        while True:
            f = await asyncio.wait_for(self.frames.next(), timing.PEER_TIMEOUT)
            self.stats.bytes_received += wire.HEADER.size + len(f.payload)
            if f.type == wire.HEARTBEAT:
                continue
            if f.type in (wire.ERROR, wire.CLOSE):
                raise ProtocolError("the peer failed the sync: "
                                    f"{wire.parse_control(f)['reason']}")
            return f

    async def send(self, frames: Sequence[bytes]) -> None:
        for fr in frames:
            await self.throttle.acquire(len(fr), self.priority)
            self.writer.write(fr)
            self.stats.bytes_sent += len(fr)
            await self.writer.drain()
        self.progress(self.source.done_bytes, self.source.total_bytes)

    async def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(wire.control(wire.ERROR, 0, reason=str(exc)[:1000]
                                           or type(exc).__name__))
            await self.writer.drain()


async def _beat(writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(timing.HEARTBEAT_INTERVAL)
        writer.write(wire.heartbeat(time.time_ns()))


def _source_volumes(vpg: VPG) -> tuple[list[FileVolume], dict[int, Volume]]:
    """What a delta sync or compare reads of each volume: its backing file (opened here:
    the caller closes them), or a capture-only volume's source through the volume."""
    files: list[FileVolume] = []
    volumes: dict[int, Volume] = {}
    try:
        for vid, v in vpg.volumes.items():
            if v.path is None:
                volumes[vid] = v
            else:
                files.append(FileVolume(v.path, v.size))
                volumes[vid] = files[-1]
    except BaseException:
        for f in files:
            f.close()
        raise
    return files, volumes


async def run_delta_source(vpg: VPG, frames: FrameStream, writer: asyncio.StreamWriter,
                           throttle: Throttle) -> DeltaSyncReport:
    """The whole delta sync of `vpg` on an attached connection; the VPG is told when
    it is done.  ProtocolError (or OSError) ends the session: the next resumes."""
    await asyncio.to_thread(vpg.delta_started)
    files, volumes = _source_volumes(vpg)
    try:
        source = DeltaSource(volumes, compress=vpg.settings.compression)
        channel = SenderChannel(frames, writer, throttle, vpg.settings.priority, vpg,
                                source)
        beat = asyncio.create_task(_beat(writer))
        try:
            stats = await source_session(channel, source)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
    finally:
        for f in files:
            f.close()
    report = DeltaSyncReport(volumes=len(volumes), differing_blocks=source.differing_blocks,
                             differing_bytes=source.data_bytes, bytes_sent=stats.bytes_sent,
                             bytes_received=stats.bytes_received, seconds=stats.seconds)
    await asyncio.to_thread(vpg.delta_done, report)
    return report


async def run_resync_compare(vpg: VPG, frames: FrameStream, writer: asyncio.StreamWriter,
                             throttle: Throttle) -> ResyncReport:
    """The compare of `vpg`'s volumes with the recovery site's journals after an unclean
    restart, on an attached connection; the VPG is told what differs and when it is
    done.  A ProtocolError (the recovery site failed it, or broke a check here) makes
    the VPG resend every volume, then ends the session; OSError or a timeout only ends
    it (the next session compares again)."""
    files, volumes = _source_volumes(vpg)
    try:
        source = DeltaSource(volumes, compress=False, compare=True,
                             on_differ=vpg.resync_differs)
        channel = SenderChannel(frames, writer, throttle, vpg.settings.priority, vpg,
                                source, progress=vpg.resync_progress)
        beat = asyncio.create_task(_beat(writer))
        try:
            stats = await source_session(channel, source)
        except ProtocolError as exc:
            await asyncio.to_thread(vpg.resync_failed, str(exc))
            raise
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
    finally:
        for f in files:
            f.close()
    report = ResyncReport(volumes=len(volumes), compared_bytes=source.total_bytes,
                          differing_bytes=source.differing_bytes,
                          bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received,
                          seconds=stats.seconds)
    await asyncio.to_thread(vpg.resync_done, report)
    return report
