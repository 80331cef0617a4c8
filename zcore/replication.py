"""Site-to-site replication: the recovery-site server and the protected-site sender.

Sits between a VPG's bundle stream (zcore.vpg) and the recovery site's journals
(zcore.journal), over TLS on TCP (zcore.security, zcore.wire).

Recovery site: `RecoverySite.start()` listens; each connection is a BufferedProtocol that
parses frames as they arrive.  A peer must complete TLS (pinned certificate, or pairing
mode with a one-time token) and HELLO before anything else is read.  Bundles go to one
worker thread per VPG, which appends every VM part to its journal (skipping records a
journal already holds, so a resend is never applied twice), commits all journals once
per batch (group commit) and only then acknowledges the batch's last seq.

Protected site: `ProtectedSite.protect(vpg, host, port)` runs a sender that connects,
attaches the VPG, resumes after the recovery site's durable seq, and ships bundles
through a site-wide throttle shared by priority.  A lost connection is retried with
backoff; if the buffer overflows meanwhile the VPG is in bitmap mode and a bitmap sync
runs when the link is back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import ssl
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zcore import wire
from zcore.errors import (
    ConfigError,
    JournalFullError,
    ProtocolError,
    StateError,
    ZcoreError,
)
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.security import (
    SERVER_NAME,
    PairingTokens,
    Peer,
    PeerStore,
    SiteIdentity,
    client_context,
    fingerprint,
    pairing_proof,
    pem_to_der,
    proofs_equal,
    server_context,
    token_id,
    token_key,
    trust,
)
from zcore.vpg import VPG

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
PEER_TIMEOUT = 10.0  # no frame for this long: the connection is dead
HANDSHAKE_TIMEOUT = 10.0
# Stop reading from a peer while this much received data waits for its journals.
RECEIVE_QUEUE_BYTES = 64 << 20
RECONNECT_BACKOFF = (0.05, 2.0)  # first and largest delay between connection attempts
# How often a disconnected sender checks whether its VPG overflowed into bitmap mode.
OUTAGE_POLL = 0.05
PRIORITY_WEIGHTS = {"high": 4, "medium": 2, "low": 1}
# Before HELLO, and on pairing connections, no bundle can be valid: binary frames are
# bounded to a heartbeat's size there, so an unauthenticated peer cannot make the server
# allocate (and wait for) a bundle-sized payload.
UNAUTHENTICATED_PAYLOAD = wire.HEARTBEAT_BODY.size


# ============================================================ recovery site ==============

@dataclass
class ReceiverStats:
    bundles: int = 0
    bytes: int = 0
    acked_seq: int = 0
    connected: bool = False
    peer: str = ""


class _VPGReceiver:
    """One VPG on the recovery site: its journals and the worker thread appending to them."""

    def __init__(self, name: str, owner: str, vms: list[str], journals: dict[str, Journal]):
        self.name = name
        self.owner = owner
        self.vms = vms
        self.journals = journals
        self.stats = ReceiverStats()
        self._queue: deque[tuple[_Connection, int, wire.BundleFrame, int]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.conn: _Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"journal-{name}", daemon=True)
        self._thread.start()

    def durable_seq(self) -> int:
        """Every journal holds every one of its records up to this seq, durably."""
        return max(self.stats.acked_seq, min(j.durable_seq for j in self.journals.values()))

    def max_seq(self) -> int:
        return max(j.last_seq for j in self.journals.values())

    def submit(self, conn: _Connection, channel: int, bundle: wire.BundleFrame, size: int):
        with self._cond:
            self._queue.append((conn, channel, bundle, size))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            self._apply(batch)

    def _apply(self, batch) -> None:
        touched: set[str] = set()
        done: list[tuple[_Connection, int, int, int]] = []
        for conn, channel, bundle, size in batch:
            if conn.closed:
                continue
            try:
                for vm_index, part in bundle.parts:
                    journal = self.journals[self.vms[vm_index]]
                    fresh = _skip_existing(part, journal.last_seq)
                    if len(fresh):
                        journal.append_encoded(fresh)
                        touched.add(self.vms[vm_index])
            except JournalFullError as exc:
                conn.fail_threadsafe(f"VPG {self.name}: {exc}", channel)
                continue
            except ZcoreError as exc:
                conn.fail_threadsafe(f"VPG {self.name}: bundle refused: {exc}")
                continue
            done.append((conn, channel, bundle.last_seq, size))
        try:
            for vm in touched:
                self.journals[vm].commit()
        except ZcoreError as exc:  # fsync failed: stop acknowledging, surface it
            log.error("VPG %s: commit failed: %s", self.name, exc)
            for conn, *_ in done:
                conn.fail_threadsafe(f"VPG {self.name}: journal commit failed: {exc}")
            return
        for conn, channel, seq, size in done:
            self.stats.bundles += 1
            self.stats.bytes += size
            self.stats.acked_seq = max(self.stats.acked_seq, seq)
            conn.ack_threadsafe(channel, seq, size)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        for j in self.journals.values():
            j.close()


def _skip_existing(part: memoryview, last_seq: int) -> memoryview:
    """The records of `part` with seq > last_seq (a resend after a reconnect)."""
    if len(part) < 64:
        return part
    for seq, pos in wire.iter_records(part):
        if seq > last_seq:
            return part[pos:]
    return part[len(part):]


class RecoverySite:
    """The recovery-site server: receives many VPGs into their journals."""

    def __init__(self, root: str | os.PathLike, name: str = "recovery") -> None:
        self.root = Path(root)
        self.identity = SiteIdentity.load_or_create(self.root / "site", name)
        self.peers = PeerStore(self.root / "site")
        self.tokens = PairingTokens(self.root / "site")
        self.vpgs_dir = self.root / "vpgs"
        self.vpgs_dir.mkdir(parents=True, exist_ok=True)
        self.receivers: dict[str, _VPGReceiver] = {}
        self.connections: set[_Connection] = set()
        self.refused: deque[str] = deque(maxlen=200)  # reasons of refused connections
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def issue_pairing_token(self, ttl: float = 3600.0) -> str:
        return self.tokens.issue(ttl)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        self._ssl = ctx = server_context(self.identity, self.peers)
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, ssl=ctx,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.close("recovery site stopping")
            await self._server.wait_closed()
            self._server = None
        for r in self.receivers.values():
            await asyncio.to_thread(r.close)
        self.receivers.clear()

    def journals(self, vpg: str) -> dict[str, Journal]:
        return self.receivers[vpg].journals

    def refuse(self, reason: str) -> None:
        log.warning("recovery site: %s", reason)
        self.refused.append(reason)

    def attach(self, peer: Peer, msg: dict) -> _VPGReceiver:
        """Open (or create) the journals of an attaching VPG; checks ownership."""
        name = msg["vpg"]
        if not wire.safe_name(name):
            raise ProtocolError(f"VPG name {name!r} is not allowed")
        vms = wire.parse_attach_vms(msg)
        try:
            settings = JournalSettings(**msg["journal"])
            settings.check()
        except (TypeError, ConfigError) as exc:
            raise ProtocolError(f"ATTACH journal settings refused: {exc}") from None
        receiver = self.receivers.get(name)
        if receiver is not None:
            if receiver.owner != peer.site_id:
                raise ProtocolError(f"VPG {name} belongs to another site")
            if receiver.vms != [vm for vm, _ in vms]:
                raise ProtocolError(f"VPG {name} was attached with other VMs")
            return receiver
        vpg_dir = self.vpgs_dir / name
        owner_file = vpg_dir / "owner.json"
        if owner_file.exists():
            owner = json.loads(owner_file.read_text())["site_id"]
            if owner != peer.site_id:
                raise ProtocolError(f"VPG {name} belongs to another site")
        else:
            vpg_dir.mkdir(parents=True, exist_ok=True)
            owner_file.write_text(json.dumps({"site_id": peer.site_id, "name": peer.name}))
        journals = {}
        try:
            for vm, vols in vms:
                specs = [VolumeSpec(*v) for v in vols]
                path = vpg_dir / vm
                if (path / "journal.meta").exists():
                    j = Journal.open(path)
                    if sorted(j.volumes.values(), key=lambda v: v.id) != specs:
                        j.close()
                        raise ProtocolError(f"VM {vm} of VPG {name} has other volumes now")
                else:
                    j = Journal.create(path, specs, vm=vm, settings=settings)
                journals[vm] = j
        except BaseException:
            for j in journals.values():
                j.close()
            raise
        receiver = _VPGReceiver(name, peer.site_id, [vm for vm, _ in vms], journals)
        self.receivers[name] = receiver
        return receiver


class _Connection(asyncio.BufferedProtocol):
    """One peer connection on the recovery site."""

    def __init__(self, site: RecoverySite) -> None:
        self.site = site
        self.reader = wire.FrameReader(max_payload=UNAUTHENTICATED_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.pairing = False
        self.greeted = False
        self.closed = False
        self.channels: dict[int, _VPGReceiver] = {}
        self.queued = 0
        self.paused = False
        self.last_frame = time.monotonic()
        self.remote = ""
        self._heartbeat: asyncio.Task | None = None

    # -- transport callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.remote = str(transport.get_extra_info("peername"))
        self.site.connections.add(self)
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der is None:
            self.pairing = True  # pairing mode: the PAIR proof is the only way in
        else:
            self.peer = self.site.peers.get(fingerprint(der))
            if self.peer is None:
                self.close("certificate not pinned")
                return
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            for f in self.reader.received(nbytes):
                self.last_frame = time.monotonic()
                self._handle(f)
                if self.closed:
                    return
        except (ProtocolError, ZcoreError) as exc:
            reason = str(exc)
            if not self.greeted or self.pairing:
                reason += " (before HELLO or on a pairing connection)"
            self.close(reason, error=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.site.connections.discard(self)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for r in self.channels.values():
            if r.conn is self:
                r.conn = None
                r.stats.connected = False

    def eof_received(self) -> bool:
        return False

    # -- frames --
    def _handle(self, f: wire.Frame) -> None:
        if not self.greeted:
            if f.type != wire.HELLO:
                raise ProtocolError(f"{f.name} before HELLO")
            msg = wire.parse_control(f)
            if msg["protocol"] != wire.PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {msg['protocol']} is not supported")
            if msg["role"] != "protected":
                raise ProtocolError("only protected sites connect to a recovery site")
            self.greeted = True
            if not self.pairing:
                self.reader.max_payload = wire.MAX_PAYLOAD
            self._send(wire.control(wire.HELLO, protocol=wire.PROTOCOL_VERSION,
                                    site_id=self.site.identity.site_id,
                                    site_name=self.site.identity.name, role="recovery"))
            return
        if self.pairing:
            if f.type != wire.PAIR:
                raise ProtocolError(f"{f.name} on a pairing connection")
            self._pair(wire.parse_control(f))
            return
        if f.type == wire.ATTACH:
            if f.channel == 0 or f.channel in self.channels:
                raise ProtocolError(f"ATTACH on channel {f.channel} is not allowed")
            receiver = self.site.attach(self.peer, wire.parse_control(f))
            if receiver.conn is not None and receiver.conn is not self:
                receiver.conn.close(f"VPG {receiver.name} re-attached by a new connection")
            receiver.conn = self
            receiver.stats.connected = True
            receiver.stats.peer = self.peer.name
            self.channels[f.channel] = receiver
            self._send(wire.control(wire.ATTACHED, f.channel,
                                    durable_seq=receiver.durable_seq(),
                                    max_seq=receiver.max_seq()))
        elif f.type == wire.BUNDLE:
            receiver = self.channels.get(f.channel)
            if receiver is None:
                raise ProtocolError(f"BUNDLE for channel {f.channel}, which this peer "
                                    "did not attach")
            bundle = wire.parse_bundle(f.payload, len(receiver.vms))
            size = len(f.payload)
            self.queued += size
            if self.queued > RECEIVE_QUEUE_BYTES and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            receiver.submit(self, f.channel, bundle, size)
        elif f.type == wire.HEARTBEAT:
            pass
        elif f.type == wire.CLOSE:
            self.close("peer closed", error=False, tell=False)
        else:
            raise ProtocolError(f"unexpected {f.name}")

    def _pair(self, msg: dict) -> None:
        site = self.site
        client_der = pem_to_der(msg["cert"])
        server_fp = site.identity.fingerprint
        client_fp = fingerprint(client_der)
        key = site.tokens.key_for(msg["token_id"])
        if key is None:
            raise ProtocolError("pairing token is wrong, expired or already used")
        expected = pairing_proof(key, "protected", server_fp, client_fp)
        if not proofs_equal(expected, msg["proof"]):
            raise ProtocolError("pairing proof does not match its certificates")
        if not site.tokens.consume(msg["token_id"]):  # a concurrent pairing took it
            raise ProtocolError("pairing token is wrong, expired or already used")
        peer_name = str(msg.get("site_name", "protected"))[:128]
        peer_id = str(msg.get("site_id", ""))[:64] or client_fp[:32]
        # VPG ownership follows the site id: one id, one pinned certificate
        if any(p.site_id == peer_id and p.fingerprint != client_fp for p in site.peers.all()):
            raise ProtocolError(f"site id {peer_id} is already paired with another "
                                "certificate")
        site.peers.add(peer_id, peer_name, msg["cert"])
        trust(site._ssl, msg["cert"])
        self._send(wire.control(
            wire.PAIRED, cert=site.identity.cert_pem,
            proof=pairing_proof(key, "recovery", server_fp, client_fp),
            site_id=site.identity.site_id, site_name=site.identity.name))
        log.info("paired with site %s (%s)", peer_name, client_fp[:16])
        self.close("pairing complete", error=False, tell=False)

    # -- output --
    def _send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def ack_threadsafe(self, channel: int, seq: int, size: int) -> None:
        self.site.loop.call_soon_threadsafe(self._acked, channel, seq, size)

    def _acked(self, channel: int, seq: int, size: int) -> None:
        self.queued -= size
        if self.paused and self.queued <= RECEIVE_QUEUE_BYTES // 2 and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        self._send(wire.ack(channel, seq))

    def fail_threadsafe(self, reason: str, channel: int = 0) -> None:
        self.site.loop.call_soon_threadsafe(self.close, reason, True)

    def close(self, reason: str, error: bool = True, tell: bool = True) -> None:
        if self.closed:
            return
        if error:
            self.site.refuse(f"{self.remote}: {reason}")
        if tell and self.transport is not None and self.greeted:
            self.transport.write(wire.control(wire.ERROR if error else wire.CLOSE,
                                              reason=reason))
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _beat(self) -> None:
        while not self.closed:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if time.monotonic() - self.last_frame > PEER_TIMEOUT:
                self.close("peer silent for too long")
                return
            if self.greeted:
                self._send(wire.heartbeat(time.time_ns()))


# ============================================================ protected site =============

class Throttle:
    """Site-wide bandwidth cap shared by VPG priority (weights high 4, medium 2, low 1):
    weighted fair queuing over a token bucket.  `rate` None means unlimited."""

    def __init__(self, rate_bytes: float | None = None) -> None:
        self.rate = rate_bytes
        self._tokens = 0.0
        self._last = time.monotonic()
        self._heap: list = []
        self._vtime = 0.0
        self._finish = dict.fromkeys(PRIORITY_WEIGHTS, 0.0)
        self._count = itertools.count()
        self._task: asyncio.Task | None = None

    def set_rate(self, rate_bytes: float | None) -> None:
        if rate_bytes is not None and rate_bytes <= 0:
            raise ConfigError("throttle rate must be positive (or None for no limit)")
        self.rate = rate_bytes

    async def acquire(self, nbytes: int, priority: str) -> None:
        if self.rate is None:
            return
        fut = asyncio.get_running_loop().create_future()
        tag = max(self._vtime, self._finish[priority]) + nbytes / PRIORITY_WEIGHTS[priority]
        self._finish[priority] = tag
        heapq.heappush(self._heap, (tag, next(self._count), nbytes, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._grant())
        await fut

    async def _grant(self) -> None:
        while self._heap:
            if self.rate is None:
                while self._heap:
                    _, _, _, fut = heapq.heappop(self._heap)
                    if not fut.done():
                        fut.set_result(None)
                return
            now = time.monotonic()
            burst = self.rate * 0.05
            self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            tag, _, nbytes, fut = self._heap[0]
            if self._tokens > 0:  # a grant may overdraw: big bundles still pass
                heapq.heappop(self._heap)
                self._tokens -= nbytes
                self._vtime = tag
                if not fut.done():
                    fut.set_result(None)
            else:
                await asyncio.sleep(-self._tokens / self.rate + 0.001)


@dataclass(frozen=True)
class ReplicationStatus:
    vpg: str
    state: str  # initializing, meeting_sla, rpo_not_meeting_sla, bitmap_syncing,
    #             disconnected, paused
    rpo_seconds: float
    throughput_bytes: float  # acknowledged data bytes per second (recent)
    buffer_used: int
    buffer_bytes: int
    sent_seq: int
    acked_seq: int
    connected: bool
    sync_total_bytes: int
    sync_done_bytes: int
    last_error: str


@dataclass
class _Rate:
    window: float = 2.0
    samples: deque = field(default_factory=deque)

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        self.samples.append((now, nbytes))
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()

    def value(self) -> float:
        now = time.monotonic()
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        return sum(n for _, n in self.samples) / self.window


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
        self._rate = _Rate()
        self._inflight: deque[tuple[int, int]] = deque()  # (last seq, data bytes)
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
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
            await asyncio.sleep(OUTAGE_POLL)
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
        delay = RECONNECT_BACKOFF[0]
        while not self._stopping:
            sessions = self.sessions
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, ssl.SSLError, ProtocolError, ZcoreError,
                    asyncio.IncompleteReadError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("VPG %s: link lost: %s", self.vpg.name, self.last_error)
            finally:
                self.connected = False
            if self.sessions > sessions:  # the link worked: the backoff starts over
                delay = RECONNECT_BACKOFF[0]
            await asyncio.sleep(delay)
            delay = min(RECONNECT_BACKOFF[1], delay * 2)

    async def _session(self) -> None:
        peer = self.site.recovery_peer()
        ctx = client_context(self.site.identity, peer.cert_pem)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=ctx, server_hostname=SERVER_NAME), HANDSHAKE_TIMEOUT)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if fingerprint(der) != peer.fingerprint:
                raise ProtocolError("recovery site presented a certificate that is not pinned")
            frames = _FrameStream(reader)
            writer.write(self.site.hello())
            hello = await asyncio.wait_for(frames.expect(wire.HELLO), HANDSHAKE_TIMEOUT)
            if hello["protocol"] != wire.PROTOCOL_VERSION:
                raise ProtocolError(f"recovery site speaks protocol {hello['protocol']}")
            writer.write(wire.control(wire.ATTACH, self.CHANNEL, **self._attach_message()))
            attached = await asyncio.wait_for(frames.expect(wire.ATTACHED), HANDSHAKE_TIMEOUT)
            durable = attached["durable_seq"]
            last = self.vpg.status().last_seq
            if durable > last:  # acking it would drop this VPG's writes up to it, unsent
                raise ProtocolError(
                    f"recovery site holds VPG {self.vpg.name} up to seq {durable}, beyond "
                    f"this VPG's last seq {last}: it holds another history (start the VPG "
                    f"with min_seq={durable} to continue after it)")
            self.vpg.ack(durable)
            self.sent_seq = max(self.vpg.acked_seq, durable)
            self._inflight.clear()
            self.connected = True
            self.sessions += 1
            self._declared_down = False
            self.vpg.link_up()
            self.last_error = ""
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
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, ssl.SSLError, TimeoutError):
                pass

    def _attach_message(self) -> dict:
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

    async def _recv_loop(self, frames: _FrameStream) -> None:
        while True:
            f = await asyncio.wait_for(frames.next(), PEER_TIMEOUT)
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
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            writer.write(wire.heartbeat(time.time_ns()))

    def status(self) -> ReplicationStatus:
        s = self.vpg.status()
        if self.paused:
            state = "paused"
        elif s.mode == "initial_sync":
            state = "initializing"
        elif s.mode in ("bitmap_syncing",) or (s.mode == "bitmap" and self.connected):
            state = "bitmap_syncing"
        elif not self.connected:
            state = "disconnected"
        elif s.rpo_alert:
            state = "rpo_not_meeting_sla"
        else:
            state = "meeting_sla"
        return ReplicationStatus(
            vpg=self.vpg.name, state=state, rpo_seconds=s.rpo_seconds,
            throughput_bytes=self._rate.value(), buffer_used=s.buffer_used,
            buffer_bytes=s.buffer_bytes, sent_seq=self.sent_seq, acked_seq=s.acked_seq,
            connected=self.connected, sync_total_bytes=s.sync_total_bytes,
            sync_done_bytes=s.sync_done_bytes, last_error=self.last_error)


class _FrameStream:
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

    async def expect(self, ftype: int) -> dict:
        f = await self.next()
        if f.type == wire.ERROR:
            raise ProtocolError(f"recovery site refused: {wire.parse_control(f)['reason']}")
        if f.type != ftype:
            raise ProtocolError(f"expected {wire.TYPE_NAMES[ftype]}, got {f.name}")
        return wire.parse_control(f)


class ProtectedSite:
    """The protected site's side: identity, pairing, and one sender per VPG."""

    def __init__(self, root: str | os.PathLike, name: str = "protected",
                 rate_limit_bytes: float | None = None) -> None:
        self.root = Path(root)
        self.identity = SiteIdentity.load_or_create(self.root / "site", name)
        self.peers = PeerStore(self.root / "site")
        self.throttle = Throttle(rate_limit_bytes)
        self.replications: dict[str, Replication] = {}

    def hello(self) -> bytes:
        return wire.control(wire.HELLO, protocol=wire.PROTOCOL_VERSION,
                            site_id=self.identity.site_id, site_name=self.identity.name,
                            role="protected")

    def recovery_peer(self) -> Peer:
        peers = self.peers.all()
        if not peers:
            raise StateError("this site is not paired with a recovery site")
        return peers[0]

    async def pair(self, host: str, port: int, token: str) -> Peer:
        """Pair with the recovery site at host:port using its one-time token."""
        ctx = client_context(self.identity, None)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=SERVER_NAME), HANDSHAKE_TIMEOUT)
        try:
            server_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            server_fp = fingerprint(server_der)
            frames = _FrameStream(reader)
            writer.write(self.hello())
            await asyncio.wait_for(frames.expect(wire.HELLO), HANDSHAKE_TIMEOUT)
            key = token_key(token)  # the token itself never leaves this site
            writer.write(wire.control(
                wire.PAIR, token_id=token_id(token), cert=self.identity.cert_pem,
                proof=pairing_proof(key, "protected", server_fp, self.identity.fingerprint),
                site_id=self.identity.site_id, site_name=self.identity.name))
            msg = await asyncio.wait_for(frames.expect(wire.PAIRED), HANDSHAKE_TIMEOUT)
            if fingerprint(pem_to_der(msg["cert"])) != server_fp:
                raise ProtocolError("PAIRED certificate differs from the TLS certificate")
            want = pairing_proof(key, "recovery", server_fp, self.identity.fingerprint)
            if not proofs_equal(want, msg["proof"]):
                raise ProtocolError("recovery site could not prove it knows the token")
            return self.peers.add(msg["site_id"], msg["site_name"], msg["cert"])
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, ssl.SSLError, TimeoutError):
                pass

    def protect(self, vpg: VPG, host: str, port: int) -> Replication:
        """Start replicating a started VPG to the paired recovery site (call in the loop)."""
        if vpg.name in self.replications:
            raise ConfigError(f"VPG {vpg.name} is already replicated")
        rep = Replication(self, vpg, host, port)
        self.replications[vpg.name] = rep
        rep.start()
        return rep

    async def stop(self) -> None:
        for rep in self.replications.values():
            await rep.stop()
        self.replications.clear()
