"""The protected site's sender of one VPG: `Replication` connects to the paired recovery
site, attaches the VPG, resumes after the recovery site's durable seq, ships bundles
through the site-wide throttle (zcore.replication.throttle) and takes acks.  A lost
connection is retried with backoff; if the VPG's buffer overflows meanwhile it waits in
bitmap mode and its bitmap sync runs when the link is back.  A stalled link (data
outstanding, no ack progress, nothing arriving or the send buffer not draining for
`timing.STALL_TIMEOUT`) is declared down at once, well before the peer timeout.  A pause
tells the VPG, which folds into bitmap mode once and syncs once on resume.  The VPG's
blocking calls (link down and up, checkpoint) run in worker threads, never on the loop."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from zcore import records, wire
from zcore.errors import ProtocolError, StateError, ZcoreError
from zcore.records import Checkpoint, Codec, CodecChoice
from zcore.replication import timing
from zcore.replication.compression import CompressionController
from zcore.replication.deltasend import attach_fields, run_delta_source, run_resync_compare
from zcore.replication.status import ReplicationStatus, ThroughputMeter, replication_state
from zcore.security import SERVER_NAME, client_context, fingerprint
from zcore.vpg import VPG, DeltaSyncReport, ResyncReport, VPGMode
from zcore.vpg.core import CodecUse

if TYPE_CHECKING:
    from zcore.replication.protected_site import ProtectedSite

log = logging.getLogger(__name__)


class LinkStalledError(TimeoutError):
    """The link carries nothing while data is outstanding (see timing.STALL_TIMEOUT)."""


# What ends a session: the sender reconnects after any of these.
POLL_HELD = 0.2  # seconds between looks at a VPG whose compare waits for its sources
_LINK_ERRORS = (OSError, ssl.SSLError, ZcoreError, asyncio.IncompleteReadError, TimeoutError)


class _CompareRequested(Exception):
    """The VPG asked for a compare with the recovery site's journals mid-stream (a
    source's dirty bitmaps were lost): the session ends, the next one runs it."""


class FrameStream:
    """Frames from an asyncio StreamReader (the protected side receives only small ones)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.parser = wire.FrameReader()
        self.ready: deque[wire.Frame] = deque()

    async def next(self) -> wire.Frame:
        while not self.ready:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("connection closed by the recovery site")
            self.ready.extend(self.parser.feed(data))
        return self.ready.popleft()

    async def expect(self, ftype: int) -> dict[str, Any]:
        """The next frame's control message, which must be of type `ftype` (heartbeats,
        which the recovery site sends while an attach opens its journals, are skipped)."""
        f = await self.next()
        while f.type == wire.HEARTBEAT and ftype != wire.HEARTBEAT:
            f = await self.next()
        if f.type == wire.ERROR:
            raise ProtocolError(f"recovery site refused: {wire.parse_control(f)['reason']}")
        if f.type != ftype:
            raise ProtocolError(f"expected {wire.TYPE_NAMES[ftype]}, got {f.name}")
        return wire.parse_control(f)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream, waiting a little for the TLS close to go out."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, ssl.SSLError, TimeoutError):
        pass


class Replication:
    """The sender of one VPG: connect, attach, resume, ship bundles, take acks."""

    CHANNEL = 1

    def __init__(self, site: ProtectedSite, vpg: VPG, host: str, port: int) -> None:
        self.site = site
        self.vpg = vpg
        self.host = host
        self.port = port
        self.connected = False
        self.paused = False
        self.sent_seq = 0
        self.last_error = ""
        self.protocol = 0  # the wire protocol version of the session (0: none yet)
        # adaptive compression: how the stream seals the next bundles (compression.py)
        self.compression = CompressionController(vpg)
        self._sent_use: dict[str, CodecUse] = {}  # what went to the link, per encoding
        self._rate = ThroughputMeter()
        self._inflight: deque[tuple[int, int]] = deque()  # (last seq, data bytes)
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._declared_down = False
        self._resume = asyncio.Event()
        self._stopping = False
        self._resume.set()
        self.sessions = 0
        self.stalls = 0  # sessions ended because the link stalled
        now = time.monotonic()
        self._last_frame = now  # any frame from the recovery site
        self._progress_at = now  # the last ack that advanced (or the first unacked send)
        self._vpg_op: asyncio.Task[None] | None = None  # link_down/up, in call order
        self._writer: asyncio.StreamWriter | None = None  # the session's, while streaming
        self._move_reply: asyncio.Future[dict[str, Any]] | None = None
        self.delta_report: DeltaSyncReport | None = None  # the delta sync, once done
        self.resync_report: ResyncReport | None = None  # an unclean restart's compare
        # told when the recovery site says the VPG failed over there (FAILED_OVER: its
        # checkpoint id and shutdown policy); the site service applies the policy
        self.on_failed_over: Callable[[dict[str, Any]], None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._task = loop.create_task(self._run())
        self._watch = loop.create_task(self._watch_outage())

    async def stop(self) -> None:
        # Python 3.11's wait_for can swallow a cancellation that races its own result, so
        # the loops also check this flag: a lost cancel costs one backoff, never a hang.
        self._stopping = True
        for task in (self._watch, self._task):
            while task is not None and not task.done():
                task.cancel()
                try:
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
                except (asyncio.CancelledError, TimeoutError):
                    pass
        self._task = self._watch = None
        try:  # the VPG's last link call finishes before the VPG may be stopped
            await asyncio.wait_for(self.settled(), 10.0)
        except TimeoutError:
            log.warning("VPG %s: a link call did not finish in 10 s", self.vpg.name)

    async def _watch_outage(self) -> None:
        """While the recovery site is unreachable, a VPG that overflowed waits in bitmap
        mode: a bitmap sync now would fill a buffer nobody drains, overflow again and
        start over, rereading the disks each time.  It starts on reconnect (link_up)."""
        while not self._stopping:
            await asyncio.sleep(timing.OUTAGE_POLL)
            if (not self.connected and not self._declared_down
                    and self.vpg.mode in ("bitmap", "bitmap_syncing")):
                self._declared_down = True
                self._vpg_call(self.vpg.link_down, "the recovery site is unreachable")

    def pause(self) -> None:
        """Stop sending.  The VPG is told (link down, "replication paused"): it folds into
        bitmap mode once, marks writes dirty while paused and syncs once on resume,
        instead of overflowing into a bitmap sync that overflows again."""
        if self.paused:
            return
        self.paused = True
        self._resume.clear()
        self._declared_down = True
        self._vpg_call(self.vpg.link_down, "replication paused")

    def resume(self) -> None:
        """Send again; with the link up the VPG's bitmap sync starts now (otherwise at
        the next connection)."""
        if not self.paused:
            return
        self.paused = False
        self._resume.set()
        if self.connected:
            self._declared_down = False
            self._vpg_call(self.vpg.link_up)

    async def settled(self) -> None:
        """Wait until the VPG has taken every pause, resume and link-down call so far."""
        while self._vpg_op is not None and not self._vpg_op.done():
            await asyncio.shield(self._vpg_op)

    async def checkpoint(self, tag: str | None = None) -> Checkpoint:
        """`VPG.checkpoint` in a worker thread (it blocks while the ring is full, and
        the loop may be the one that must drain it)."""
        return await self.vpg.checkpoint_async(tag)

    async def request_move(self, checkpoint_id: int, reverse: bool,
                           timeout: float = timing.HANDSHAKE_TIMEOUT) -> None:
        """Ask the recovery site to fail the VPG over to `checkpoint_id` (a planned move:
        the caller stopped every write and saw the checkpoint durable).  Returns when the
        recovery site accepted; StateError with its reason when it refused or the link is
        down."""
        writer = self._writer
        if writer is None or not self.connected:
            raise StateError(f"VPG {self.vpg.name}: the recovery site is not connected "
                             f"({self.last_error or 'no session'})")
        if self._move_reply is not None and not self._move_reply.done():
            raise StateError(f"VPG {self.vpg.name}: a move request is already waiting")
        reply = self._move_reply = asyncio.get_running_loop().create_future()
        writer.write(wire.control(wire.MOVE, self.CHANNEL, checkpoint_id=checkpoint_id,
                                  reverse=reverse))
        try:
            msg = await asyncio.wait_for(asyncio.shield(reply), timeout)
        except TimeoutError:
            raise StateError(f"VPG {self.vpg.name}: the recovery site did not answer the "
                             f"move request in {timeout:.0f} s") from None
        finally:
            self._move_reply = None
        if not msg["accepted"]:
            raise StateError(f"the recovery site refused the move of VPG {self.vpg.name}: "
                             f"{msg['reason']}")

    def _vpg_call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a blocking VPG call in a worker thread, after the ones before it (a
        pause's link_down before its resume's link_up); without a loop, run it now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _quiet_call(fn, *args)
            return
        prev = self._vpg_op

        async def op() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            await asyncio.to_thread(_quiet_call, fn, *args)
        self._vpg_op = loop.create_task(op())

    async def _run(self) -> None:
        delay = timing.RECONNECT_BACKOFF[0]
        while not self._stopping:
            sessions = self.sessions
            if self.vpg.sync_held and (self.vpg.resync_pending or self.vpg.delta_pending):
                await asyncio.sleep(POLL_HELD)  # its sources' mirrors are not running yet
                continue
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _LINK_ERRORS as exc:  # before the session had a stream to close
                self._link_lost(exc)
            finally:
                self.connected = False
            if self.sessions > sessions:  # the link worked: the backoff starts over
                delay = timing.RECONNECT_BACKOFF[0]
            await asyncio.sleep(delay)
            delay = min(timing.RECONNECT_BACKOFF[1], delay * 2)

    async def _session(self) -> None:
        """One connection: handshake and attach, then stream until the link fails."""
        peer = self.site.recovery_peer()
        ctx = client_context(self.site.identity, peer.cert_pem)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=ctx, server_hostname=SERVER_NAME),
            timing.HANDSHAKE_TIMEOUT)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if fingerprint(der) != peer.fingerprint:
                raise ProtocolError("recovery site presented a certificate that is not pinned")
            frames = FrameStream(reader)
            durable = await self._handshake(frames, writer)
            self._resume_after(durable)
            if self.vpg.delta_pending:  # reverse protection: before any bundle
                self.delta_report = await run_delta_source(self.vpg, frames, writer,
                                                           self.site.throttle)
            elif self.vpg.resync_pending:  # after an unclean restart: before any bundle
                self.resync_report = await run_resync_compare(self.vpg, frames, writer,
                                                              self.site.throttle)
            await self._stream(frames, writer)
        except _CompareRequested:
            log.info("VPG %s: a compare with the recovery site's journals was asked for: "
                     "a new session runs it", self.vpg.name)
        except _LINK_ERRORS as exc:
            # reported now: closing a dead link's stream waits up to a second more, and a
            # link declared down (the peer timeout, a stall) is not "connected" meanwhile
            self._link_lost(exc)
        finally:
            self.connected = False
            await close_writer(writer)

    def _link_lost(self, exc: BaseException) -> None:
        """A session ended (or never began) with `exc`: disconnected, and why; a stall
        is declared to the VPG once per outage, so it folds once."""
        self.connected = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, LinkStalledError):
            log.info("VPG %s: link lost: %s", self.vpg.name, self.last_error)
            return
        self.stalls += 1
        log.warning("VPG %s: %s", self.vpg.name, exc)
        if not self._declared_down:
            self._declared_down = True
            self._vpg_call(self.vpg.link_down, str(exc))

    async def _handshake(self, frames: FrameStream, writer: asyncio.StreamWriter) -> int:
        """HELLO and ATTACH; returns the recovery site's durable seq for the VPG."""
        writer.write(self.site.hello())
        hello = await asyncio.wait_for(frames.expect(wire.HELLO), timing.HANDSHAKE_TIMEOUT)
        self.protocol = wire.accepted_version(hello)
        self.compression.reset(zstd_allowed=self.protocol >= 2)  # a v1 peer has no zstd
        writer.write(wire.control(wire.ATTACH, self.CHANNEL, **self.attach_message()))
        attached = await asyncio.wait_for(frames.expect(wire.ATTACHED),
                                          timing.HANDSHAKE_TIMEOUT)
        durable: int = attached["durable_seq"]
        last = self.vpg.status().last_seq
        if durable > last:  # acking it would drop this VPG's writes up to it, unsent
            raise ProtocolError(
                f"recovery site holds VPG {self.vpg.name} up to seq {durable}, beyond "
                f"this VPG's last seq {last}: it holds another history (start the VPG "
                f"with min_seq={durable} to continue after it)")
        return durable

    def _resume_after(self, durable: int) -> None:
        """The link is up: everything up to `durable` is acknowledged, sending resumes
        after it."""
        self.vpg.ack(durable)
        self.sent_seq = max(self.vpg.acked_seq, durable)
        self._inflight.clear()
        self.connected = True
        self.sessions += 1
        self._last_frame = self._progress_at = time.monotonic()
        if not self.paused:  # a paused VPG stays down until resume()
            self._declared_down = False
            self._vpg_call(self.vpg.link_up)
        self.last_error = ""

    async def _stream(self, frames: FrameStream, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        tasks = [asyncio.create_task(self._send_loop(writer)),
                 asyncio.create_task(self._recv_loop(frames)),
                 asyncio.create_task(self._beat(writer)),
                 asyncio.create_task(self._stall_watch(writer))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            self._writer = None
            reply = self._move_reply
            if reply is not None and not reply.done():
                reply.set_exception(StateError(f"VPG {self.vpg.name}: the link to the "
                                               f"recovery site ended before it answered "
                                               f"the move request"))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def attach_message(self) -> dict[str, Any]:
        """The fields of this VPG's ATTACH message (docs/format.md 10.2)."""
        vms = [{"name": vm.name, "volumes": [{"id": v.id, "name": v.name, "size": v.size}
                                              for v in vm.volumes]}
               for vm in self.vpg.vms.values()]
        return {"vpg": self.vpg.name, "vms": vms, "journal": asdict(self.vpg.settings.journal),
                **attach_fields(self.vpg)}

    async def _send_loop(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        vm_index = {name: i for i, name in enumerate(self.vpg.vms)}
        priority = self.vpg.settings.priority
        clock, compression = time.monotonic, self.compression
        while True:
            await self._resume.wait()
            compression.tick()
            bundles = await loop.run_in_executor(None, self.vpg.wait_bundles,
                                                 self.sent_seq, 0.1)
            if self.vpg.resync_pending:  # its hypervisor's bitmaps were lost: compare
                raise _CompareRequested
            for b in bundles:
                if b.last_seq <= self.sent_seq:
                    continue
                await self._resume.wait()
                parts = [(vm_index[vm], data) for vm, data in b.parts.items() if data]
                size, sent = b.encoded_bytes, b.codec
                now = self.vpg.link_codec
                if b.codec.codec == Codec.ZSTD and self.protocol < 2:
                    # sealed with zstd before the link went to a v1 peer: raw for it
                    parts, size = await loop.run_in_executor(None, self._recode, parts, None)
                    sent = CodecChoice(Codec.NONE)
                elif (now.codec == Codec.ZSTD and self.vpg.settings.compression and
                      (b.codec.codec != Codec.ZSTD or b.codec.level < now.level)):
                    # sealed ahead of the link before zstd or its present level was
                    # chosen (the buffer lets the stream run up to half of it ahead, and
                    # a burst seals at a lower level than the link then affords): zstd
                    # at the present level now, off the loop
                    parts, size = await loop.run_in_executor(
                        None, self._recode, parts, now, b.codec.codec != Codec.ZSTD)
                    sent = now
                self._count_sent(sent, b.data_bytes, size)
                t = clock()
                await self.site.throttle.acquire(size, priority)
                writer.writelines(wire.bundle_frames(self.CHANNEL, b.first_seq, b.last_seq,
                                                     parts))
                if not self._inflight:  # the ack clock starts at the first unacked send
                    self._progress_at = time.monotonic()
                self._inflight.append((b.last_seq, b.data_bytes))
                self.sent_seq = b.last_seq
                await writer.drain()
                compression.waited(clock() - t)  # the link's share of the time
                compression.sent(b.data_bytes)  # what it delivered (a step up's verdict)
                compression.tick()

    def _recode(self, parts: list[tuple[int, bytes | bytearray]], to: CodecChoice | None,
                raw: bool = True) -> tuple[list[tuple[int, bytes | bytearray]], int]:
        """The parts re-encoded for the link: zstd at `to`'s level (raw records too, with
        `raw`), or without zstd (None).  Runs in an executor thread, serially before each
        send: when it cannot keep up with the link, the sender waits less for the link and
        the controller leaves zstd, so its CPU is bounded by the link's pace."""
        sizes = np.zeros(max(self.vpg.volumes, default=-1) + 1, dtype=np.uint64)
        for vid, vol in self.vpg.volumes.items():
            sizes[vid] = vol.size
        saving = self.vpg.settings.lz4_min_saving
        out: list[tuple[int, bytes | bytearray]] = [
            (i, records.unzstd_part(data, sizes) if to is None else
             records.zstd_part(data, to.level, sizes, saving, raw=raw)) for i, data in parts]
        return out, sum(len(d) for _, d in out)

    def _count_sent(self, codec: CodecChoice, data_bytes: int, encoded_bytes: int) -> None:
        key = str(codec)
        use = self._sent_use.get(key, CodecUse())
        self._sent_use[key] = CodecUse(use.bundles + 1, use.data_bytes + data_bytes,
                                       use.encoded_bytes + encoded_bytes)

    async def _recv_loop(self, frames: FrameStream) -> None:
        while True:
            f = await asyncio.wait_for(frames.next(), timing.PEER_TIMEOUT)
            self._last_frame = time.monotonic()
            if f.type == wire.ACK:
                if f.channel != self.CHANNEL:
                    raise ProtocolError(f"ACK for unknown channel {f.channel}")
                seq = wire.parse_ack(f)
                if seq > self.sent_seq:  # acking it would drop writes never sent
                    raise ProtocolError(f"ACK of seq {seq}, beyond the last seq sent "
                                        f"({self.sent_seq})")
                if self._inflight and self._inflight[0][0] <= seq:
                    self._progress_at = self._last_frame
                    if self._declared_down and not self.paused:  # it drains again
                        self._declared_down = False
                        self._vpg_call(self.vpg.link_up)
                self.vpg.ack(seq)
                while self._inflight and self._inflight[0][0] <= seq:
                    self._rate.add(self._inflight.popleft()[1])
            elif f.type == wire.HEARTBEAT:
                continue
            elif f.type == wire.FAILED_OVER:
                msg = wire.parse_control(f)
                if self.on_failed_over is not None:
                    self.on_failed_over(msg)
            elif f.type == wire.MOVING:
                msg = wire.parse_control(f)
                if self._move_reply is None or self._move_reply.done():
                    raise ProtocolError("MOVING without a move request")
                self._move_reply.set_result(msg)
            elif f.type in (wire.ERROR, wire.CLOSE):
                raise ProtocolError(f"recovery site: {wire.parse_control(f)['reason']}")
            else:
                raise ProtocolError(f"unexpected {f.name} from the recovery site")

    async def _beat(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(timing.HEARTBEAT_INTERVAL)
            writer.write(wire.heartbeat(time.time_ns()))

    async def _stall_watch(self, writer: asyncio.StreamWriter) -> None:
        """End the session when the link stalls: data outstanding with no ack progress
        for STALL_TIMEOUT, and either nothing at all received for as long (no heartbeat:
        both ways held, or the way back) or the send buffer not draining (the way out
        held).  A recovery site that is alive but slow to commit still sends heartbeats
        and reads what it is sent, so it is not taken for a stall."""
        transport = writer.transport
        last_size = 0
        drained_at = time.monotonic()
        while True:
            await asyncio.sleep(timing.OUTAGE_POLL)
            now = time.monotonic()
            size = transport.get_write_buffer_size()
            if size == 0 or size < last_size:
                drained_at = now
            last_size = size
            limit = timing.STALL_TIMEOUT
            waited = now - self._progress_at if self._inflight else 0.0
            if (waited >= max(timing.OUTAGE_POLL, limit / 10) and not self._declared_down
                    and self.vpg.mode in (VPGMode.BITMAP, VPGMode.BITMAP_SYNCING)):
                # the buffer overflowed while the link delivers nothing: a bitmap sync
                # now would fill it again and overflow again, rereading the disks each
                # time.  Down until an ack comes (or the next session).
                self._declared_down = True
                self._vpg_call(self.vpg.link_down, "the buffer overflowed while the link "
                               f"acknowledged nothing for {waited:.1f} s")
            if waited < limit:
                continue
            if now - self._last_frame >= limit:
                raise LinkStalledError(f"the link stalled: no ack and nothing received "
                                       f"for {now - self._last_frame:.1f} s with data "
                                       f"outstanding")
            if size > 0 and now - drained_at >= limit:
                raise LinkStalledError(f"the link stalled: no ack and {size} bytes not "
                                       f"draining for {now - drained_at:.1f} s")

    def status(self) -> ReplicationStatus:
        s = self.vpg.status()
        return ReplicationStatus(
            vpg=self.vpg.name, state=replication_state(s, self.connected, self.paused),
            rpo_seconds=s.rpo_seconds, throughput_bytes=self._rate.value(),
            buffer_used=s.buffer_used, buffer_bytes=s.buffer_bytes, sent_seq=self.sent_seq,
            acked_seq=s.acked_seq, connected=self.connected,
            sync_total_bytes=s.sync_total_bytes, sync_done_bytes=s.sync_done_bytes,
            last_error=self.last_error, codec=s.link_codec,
            bytes_saved=sum(u.data_bytes - u.encoded_bytes for u in self._sent_use.values()),
            compression={k: asdict(v) for k, v in self._sent_use.items()},
            link_wait=round(self.compression.load.link_wait, 3),
            sealer_busy=round(self.compression.load.sealer_busy, 3),
            zstd_held_seconds=round(self.compression.held_seconds(), 1),
            zstd_held_at=str(self.compression.ceiling or "") if self.compression.held_seconds()
            else "",
            protocol=self.protocol)


def _quiet_call(fn: Callable[..., None], *args: Any) -> None:
    """Call a VPG link hook; a stopped VPG (StateError) has nothing to be told."""
    try:
        fn(*args)
    except StateError:
        pass
