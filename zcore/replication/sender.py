"""The protected site's sender of one VPG: `Replication` connects to the paired recovery
site, attaches the VPG, resumes after the recovery site's durable seq, ships bundles
through the site-wide throttle (zcore.replication.throttle) and takes acks.  A lost
connection is retried with backoff; if the VPG's buffer overflows meanwhile it waits in
bitmap mode and its bitmap sync runs when the link is back."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from zcore import wire
from zcore.errors import ProtocolError, StateError, ZcoreError
from zcore.replication import timing
from zcore.replication.status import ReplicationStatus, ThroughputMeter, replication_state
from zcore.security import SERVER_NAME, client_context, fingerprint
from zcore.vpg import VPG

if TYPE_CHECKING:
    from zcore.replication.protected_site import ProtectedSite

log = logging.getLogger(__name__)


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
        """The next frame's control message, which must be of type `ftype`."""
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
        self._rate = ThroughputMeter()
        self._inflight: deque[tuple[int, int]] = deque()  # (last seq, data bytes)
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._declared_down = False
        self._resume = asyncio.Event()
        self._stopping = False
        self._resume.set()
        self.sessions = 0

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

    async def _watch_outage(self) -> None:
        """While the recovery site is unreachable, a VPG that overflowed waits in bitmap
        mode: a bitmap sync now would fill a buffer nobody drains, overflow again and
        start over, rereading the disks each time.  It starts on reconnect (link_up)."""
        while not self._stopping:
            await asyncio.sleep(timing.OUTAGE_POLL)
            if (not self.connected and not self._declared_down
                    and self.vpg.mode in ("bitmap", "bitmap_syncing")):
                try:
                    self.vpg.link_down("the recovery site is unreachable")
                except StateError:  # the VPG stopped
                    continue
                self._declared_down = True

    def pause(self) -> None:
        self.paused = True
        self._resume.clear()

    def resume(self) -> None:
        self.paused = False
        self._resume.set()

    async def _run(self) -> None:
        delay = timing.RECONNECT_BACKOFF[0]
        while not self._stopping:
            sessions = self.sessions
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, ssl.SSLError, ZcoreError,
                    asyncio.IncompleteReadError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("VPG %s: link lost: %s", self.vpg.name, self.last_error)
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
            await self._stream(frames, writer)
        finally:
            await close_writer(writer)

    async def _handshake(self, frames: FrameStream, writer: asyncio.StreamWriter) -> int:
        """HELLO and ATTACH; returns the recovery site's durable seq for the VPG."""
        writer.write(self.site.hello())
        hello = await asyncio.wait_for(frames.expect(wire.HELLO), timing.HANDSHAKE_TIMEOUT)
        if hello["protocol"] != wire.PROTOCOL_VERSION:
            raise ProtocolError(f"recovery site speaks protocol {hello['protocol']}")
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
        self._declared_down = False
        self.vpg.link_up()
        self.last_error = ""

    async def _stream(self, frames: FrameStream, writer: asyncio.StreamWriter) -> None:
        tasks = [asyncio.create_task(self._send_loop(writer)),
                 asyncio.create_task(self._recv_loop(frames)),
                 asyncio.create_task(self._beat(writer))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def attach_message(self) -> dict[str, Any]:
        """The fields of this VPG's ATTACH message (docs/format.md 10.2)."""
        vms = [{"name": vm.name, "volumes": [{"id": v.id, "name": v.name, "size": v.size}
                                              for v in vm.volumes]}
               for vm in self.vpg.vms.values()]
        return {"vpg": self.vpg.name, "vms": vms, "journal": asdict(self.vpg.settings.journal)}

    async def _send_loop(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        vm_index = {name: i for i, name in enumerate(self.vpg.vms)}
        priority = self.vpg.settings.priority
        while True:
            await self._resume.wait()
            bundles = await loop.run_in_executor(None, self.vpg.wait_bundles,
                                                 self.sent_seq, 0.1)
            for b in bundles:
                if b.last_seq <= self.sent_seq:
                    continue
                await self._resume.wait()
                await self.site.throttle.acquire(b.encoded_bytes, priority)
                parts = [(vm_index[vm], data) for vm, data in b.parts.items() if data]
                writer.writelines(wire.bundle_frames(self.CHANNEL, b.first_seq, b.last_seq,
                                                     parts))
                self._inflight.append((b.last_seq, b.data_bytes))
                self.sent_seq = b.last_seq
                await writer.drain()

    async def _recv_loop(self, frames: FrameStream) -> None:
        while True:
            f = await asyncio.wait_for(frames.next(), timing.PEER_TIMEOUT)
            if f.type == wire.ACK:
                if f.channel != self.CHANNEL:
                    raise ProtocolError(f"ACK for unknown channel {f.channel}")
                seq = wire.parse_ack(f)
                if seq > self.sent_seq:  # acking it would drop writes never sent
                    raise ProtocolError(f"ACK of seq {seq}, beyond the last seq sent "
                                        f"({self.sent_seq})")
                self.vpg.ack(seq)
                while self._inflight and self._inflight[0][0] <= seq:
                    self._rate.add(self._inflight.popleft()[1])
            elif f.type == wire.HEARTBEAT:
                continue
            elif f.type in (wire.ERROR, wire.CLOSE):
                raise ProtocolError(f"recovery site: {wire.parse_control(f)['reason']}")
            else:
                raise ProtocolError(f"unexpected {f.name} from the recovery site")

    async def _beat(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(timing.HEARTBEAT_INTERVAL)
            writer.write(wire.heartbeat(time.time_ns()))

    def status(self) -> ReplicationStatus:
        s = self.vpg.status()
        return ReplicationStatus(
            vpg=self.vpg.name, state=replication_state(s, self.connected, self.paused),
            rpo_seconds=s.rpo_seconds, throughput_bytes=self._rate.value(),
            buffer_used=s.buffer_used, buffer_bytes=s.buffer_bytes, sent_seq=self.sent_seq,
            acked_seq=s.acked_seq, connected=self.connected,
            sync_total_bytes=s.sync_total_bytes, sync_done_bytes=s.sync_done_bytes,
            last_error=self.last_error)
