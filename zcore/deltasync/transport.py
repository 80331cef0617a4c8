"""Delta sync over a stream: runs a DeltaSource or DeltaTarget end to end on an asyncio
(reader, writer) pair carrying zcore.wire frames (docs/format.md 10c.5).

Sits on top of the state machines (zcore.deltasync.source / .target) and under whoever
opened the connection (TLS between sites, plain TCP in benches, a socketpair in tests):
authentication is the caller's.  The state machines' volume reads, hashing and writes run
in worker threads, never on the event loop.  A frame that fails any check ends the
session: the side that found it sends ERROR with the reason, and raises `ProtocolError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from zcore import wire
from zcore.deltasync.messages import MAX_DSYNC_FRAME
from zcore.deltasync.source import DeltaSource
from zcore.deltasync.target import DeltaTarget
from zcore.errors import ProtocolError


@dataclass
class SyncStats:
    """What one session moved: frame bytes each way (headers included) and its time."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class FrameStream:
    """zcore.wire frames on an asyncio stream pair, with byte counts; a frame's header is
    checked (magic, CRC, type, length bound) before its payload is read or allocated."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_payload: int = MAX_DSYNC_FRAME) -> None:
        self.reader = reader
        self.writer = writer
        self.max_payload = max_payload
        self.stats = SyncStats()

    async def read(self) -> wire.Frame:
        fr = wire.FrameReader(self.max_payload)
        try:
            frames = fr.feed(await self.reader.readexactly(wire.HEADER.size))
            if not frames:
                frames = fr.feed(await self.reader.readexactly(fr.payload_allocated))
        except asyncio.IncompleteReadError:
            raise ProtocolError("the peer closed the connection mid-sync") from None
        self.stats.bytes_received += wire.HEADER.size + len(frames[0].payload)
        f = frames[0]
        if f.type == wire.ERROR:
            raise ProtocolError(f"the peer failed the sync: {wire.parse_control(f)['reason']}")
        return f

    async def send(self, frames: Sequence[bytes]) -> None:
        if frames:
            self.writer.writelines(frames)
            self.stats.bytes_sent += sum(len(f) for f in frames)
            await self.writer.drain()

    async def fail(self, exc: BaseException) -> None:
        """Tell the peer why this side stops (best effort)."""
        try:
            reason = str(exc)[:1000] or type(exc).__name__
            await self.send([wire.control(wire.ERROR, 0, reason=reason)])
        except (OSError, RuntimeError):
            pass


class FrameChannel(Protocol):
    """What the sessions run on: frames in (`read`, ERROR raising ProtocolError), frames
    out (`send`), a best-effort `fail`, and byte counts (`stats`).  `FrameStream` on an
    asyncio stream pair; the replication connection's own adapters between sites
    (zcore.replication.sender, zcore.replication.receiver)."""

    stats: SyncStats

    async def read(self) -> wire.Frame: ...

    async def send(self, frames: Sequence[bytes]) -> None: ...

    async def fail(self, exc: BaseException) -> None: ...


async def _guarded(stream: FrameChannel, body: Callable[[], Awaitable[None]]) -> SyncStats:
    t0 = time.perf_counter()
    try:
        await body()
    except ProtocolError as exc:
        if "the peer" not in str(exc):
            await stream.fail(exc)
        raise
    stream.stats.seconds = time.perf_counter() - t0
    return stream.stats


async def run_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     source: DeltaSource) -> SyncStats:
    """Run `source` to the end of its sync; returns the session's byte counts."""
    return await source_session(FrameStream(reader, writer), source)


async def source_session(stream: FrameChannel, source: DeltaSource) -> SyncStats:
    """Run `source` to the end of its sync on `stream`."""

    async def body() -> None:
        await stream.send([source.offer()])
        while not source.done:
            f = await stream.read()
            await stream.send(await asyncio.to_thread(source.on_frame, f))

    return await _guarded(stream, body)


async def run_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: DeltaTarget) -> SyncStats:
    """Run `target` to the end of its sync; returns the session's byte counts.  Progress
    verified before a failure is kept (in the target's progress file)."""
    return await target_session(FrameStream(reader, writer), target)


async def target_session(stream: FrameChannel, target: DeltaTarget) -> SyncStats:
    """Run `target` to the end of its sync on `stream`."""

    async def body() -> None:
        f = await stream.read()
        await stream.send([target.on_offer(f)])
        while not target.done:
            while target.wants_hashing():
                await stream.send([await asyncio.to_thread(target.next_hashes)])
            f = await stream.read()
            await stream.send(await asyncio.to_thread(target.on_frame, f))

    return await _guarded(stream, body)
