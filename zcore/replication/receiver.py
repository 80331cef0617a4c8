"""The recovery site's side of one peer connection: `RecoveryConnection`, an asyncio
BufferedProtocol that parses frames as they arrive (docs/format.md 10.3).

A peer must complete TLS (a pinned certificate, or pairing mode without one) and HELLO
before anything else is read.  A pairing connection then carries exactly one PAIR; a
data connection ATTACHes VPGs on channels and sends their BUNDLEs, which go to each
VPG's journal worker (zcore.replication.journals); acks come back from the worker.
Every refusal closes the connection with its reason recorded in `RecoverySite.refused`.
An ATTACH opens (or creates) its VPG's journals in a worker thread: reading pauses
meanwhile and the frames behind it wait, in order, so the loop never blocks on a journal
open or fsync.  An ATTACH asking for a delta sync (reverse protection) is answered, then
the connection's DSYNC frames drive the VPG's delta-sync target
(zcore.replication.deltarecv) until its DONE; a BUNDLE before that is refused.  An
ATTACH asking for a resync (an unclean protected-site restart) runs a compare-only
target over the journals' head views the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from zcore import records, wire
from zcore.deltasync import DeltaTarget
from zcore.errors import ProtocolError, ZcoreError
from zcore.replication import timing
from zcore.replication.deltarecv import (
    DeltaChannel,
    delta_requested,
    make_compare_target,
    make_target,
    resync_requested,
    run_delta,
)
from zcore.replication.journals import VPGReceiver
from zcore.security import Peer, fingerprint, pairing_proof, pem_to_der, proofs_equal, trust

if TYPE_CHECKING:
    from zcore.replication.recovery_site import RecoverySite

log = logging.getLogger(__name__)

DSYNC_TYPES = frozenset(range(wire.DSYNC_OFFER, wire.DSYNC_COMPARED + 1))


class RecoveryConnection(asyncio.BufferedProtocol):
    """One peer (protected site) connection on the recovery site."""

    def __init__(self, site: RecoverySite) -> None:
        self.site = site
        self.reader = wire.FrameReader(max_payload=timing.UNAUTHENTICATED_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.pairing = False
        self.greeted = False
        self.protocol = 0  # the version HELLO agreed (docs/format.md 10.3)
        self.record_flags = records.FLAGS_V2  # what its BUNDLE records may carry
        self.closed = False
        self.channels: dict[int, VPGReceiver] = {}
        self.queued = 0  # bundle bytes received and not yet acknowledged
        self.paused = False
        self.last_frame = time.monotonic()
        self.remote = ""
        self._heartbeat: asyncio.Task[None] | None = None
        # While an ATTACH opens its journals in a worker thread, reading is paused and
        # frames already parsed wait here, in order (None: no attach running).
        self._held: deque[wire.Frame] | None = None
        self._attaching: asyncio.Task[None] | None = None
        self._moves: set[asyncio.Task[None]] = set()  # MOVE requests being checked
        # the delta sync of the VPG attached with "initial": "delta", while it runs
        self._delta: DeltaChannel | None = None
        self._delta_target: DeltaTarget | None = None
        self._delta_task: asyncio.Task[None] | None = None

    # -- transport callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.remote = str(transport.get_extra_info("peername"))
        self.site.connections.add(self)
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der is None:
            self.pairing = True  # pairing mode: the PAIR proof is the only way in
        else:
            try:
                self.peer = self.site.peers.get(fingerprint(der))
            except ZcoreError as exc:  # a damaged peers.json: refuse, with the reason
                self.close(f"pinned certificates unreadable: {exc}")
                return
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
            frames = self.reader.received(nbytes)
        except ZcoreError as exc:
            self._refuse(exc)
            return
        self.last_frame = time.monotonic() if frames else self.last_frame
        self._handle_all(frames)

    def _handle_all(self, frames: list[wire.Frame] | deque[wire.Frame]) -> None:
        try:
            for f in frames:
                if self._held is not None:  # an attach runs: the rest waits for it
                    self._held.append(f)
                    continue
                self._handle(f)
                if self.closed:
                    return
        except ZcoreError as exc:  # ProtocolError, and damaged state files
            self._refuse(exc)

    def _refuse(self, exc: Exception) -> None:
        reason = str(exc)
        if not self.greeted or self.pairing:
            reason += " (before HELLO or on a pairing connection)"
        self.close(reason, error=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.site.connections.discard(self)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._held = None
        if self._delta is not None:
            self._delta.close("connection lost")
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
            self._hello(wire.parse_control(f))
        elif self.pairing:
            if f.type != wire.PAIR:
                raise ProtocolError(f"{f.name} on a pairing connection")
            self._pair(wire.parse_control(f))
        elif f.type == wire.ATTACH:
            self._attach(f)
        elif f.type in DSYNC_TYPES or (f.type == wire.ERROR and self._delta_running):
            if not self._delta_running:
                raise ProtocolError(f"{f.name} outside a delta sync")
            assert self._delta is not None
            self._delta.put(f)
        elif f.type == wire.BUNDLE:
            if self._delta_running:
                raise ProtocolError("BUNDLE before the delta sync is done")
            self._bundle(f)
        elif f.type == wire.HEARTBEAT:
            pass
        elif f.type == wire.MOVE:
            self._move(f)
        elif f.type == wire.CLOSE:
            self.close("peer closed", error=False, tell=False)
        else:
            raise ProtocolError(f"unexpected {f.name}")

    def _hello(self, msg: dict[str, Any]) -> None:
        version = wire.negotiate(msg)
        if msg["role"] != "protected":
            raise ProtocolError("only protected sites connect to a recovery site")
        self.greeted = True
        self.protocol = version
        self.record_flags = wire.record_flags(version)  # a v1 peer's bundles hold no zstd
        if not self.pairing:
            self.reader.max_payload = wire.MAX_PAYLOAD
        identity = self.site.identity
        self._send(wire.control(wire.HELLO, protocol=version,
                                site_id=identity.site_id, site_name=identity.name,
                                role="recovery"))

    def _attach(self, f: wire.Frame) -> None:
        """Start attaching: the journals open (and are created, with fsyncs) in a worker
        thread, never on the loop; frames after the ATTACH wait for it."""
        peer = self.peer
        assert peer is not None  # a data connection presented a pinned certificate
        if f.channel == 0 or f.channel in self.channels or self._delta_running:
            raise ProtocolError(f"ATTACH on channel {f.channel} is not allowed")
        msg = wire.parse_control(f)
        delta_requested(msg)  # a malformed request is refused before anything opens
        self._held = deque()
        assert self.transport is not None
        self.transport.pause_reading()
        self._attaching = asyncio.get_running_loop().create_task(
            self._attach_async(f.channel, peer, msg))

    async def _attach_async(self, channel: int, peer: Peer, msg: dict[str, Any]) -> None:
        want_delta, resume = delta_requested(msg)
        want_compare = resync_requested(msg)
        try:
            receiver = await self.site.attach_async(peer, msg)
            target = None
            if want_delta or want_compare:
                old = receiver.conn
                if old is not None and old is not self:  # one target over the journals
                    old.close(f"VPG {receiver.name} re-attached by a new connection")
                    await old.delta_finished()
            if want_delta:
                target = await asyncio.to_thread(make_target, receiver, resume)
        except (ZcoreError, OSError) as exc:
            self._held = None
            self.close(f"{exc} (ATTACH)" if isinstance(exc, OSError) else str(exc))
            return
        if want_compare:  # an unclean protected-site restart: compare only (its
            # target fails the compare, not the ATTACH, when the journals cannot be read)
            target = await asyncio.to_thread(make_compare_target, receiver)
        if self.closed:
            return
        self.last_frame = time.monotonic()
        self._attached(channel, peer, receiver)
        if target is not None:
            self._start_delta(receiver, target)
        held, self._held = self._held, None
        if held:
            self._handle_all(held)
        if not self.closed and not self.paused and self._held is None:
            assert self.transport is not None
            self.transport.resume_reading()

    def _attached(self, channel: int, peer: Peer, receiver: VPGReceiver) -> None:
        if receiver.conn is not None and receiver.conn is not self:
            receiver.conn.close(f"VPG {receiver.name} re-attached by a new connection")
        receiver.conn = self
        receiver.stats.connected = True
        receiver.stats.peer = peer.name
        self.channels[channel] = receiver
        self._send(wire.control(wire.ATTACHED, channel,
                                durable_seq=receiver.durable_seq(),
                                max_seq=receiver.max_seq()))

    @property
    def _delta_running(self) -> bool:
        return self._delta_target is not None and not self._delta_target.done

    def _start_delta(self, receiver: VPGReceiver, target: DeltaTarget) -> None:
        self._delta = DeltaChannel(self._send, self._pause_for_delta)
        self._delta_target = target
        self._delta_task = asyncio.get_running_loop().create_task(
            self._run_delta(self._delta, target, receiver))

    async def _run_delta(self, channel: DeltaChannel, target: DeltaTarget,
                         receiver: VPGReceiver) -> None:
        try:
            await run_delta(channel, target, receiver.name)
        except (ZcoreError, OSError) as exc:
            if not self.closed:
                self.close(f"VPG {receiver.name}: delta sync failed: {exc}")
            else:
                self.site.refuse(f"{self.remote}: VPG {receiver.name}: delta sync ended: {exc}")
        finally:
            if self._delta is channel:
                self._delta = None

    async def delta_finished(self) -> None:
        """Wait until this connection's delta sync, if any, has stopped touching the
        journals (its last worker-thread step done)."""
        task = self._delta_task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _pause_for_delta(self, pause: bool) -> None:
        if self.transport is None or self.closed:
            return
        if pause:
            self.transport.pause_reading()
        elif not self.paused and self._held is None:
            self.transport.resume_reading()

    def _bundle(self, f: wire.Frame) -> None:
        receiver = self.channels.get(f.channel)
        if receiver is None:
            raise ProtocolError(f"BUNDLE for channel {f.channel}, which this peer "
                                "did not attach")
        bundle = wire.parse_bundle(f.payload, len(receiver.vms))
        size = len(f.payload)
        self.queued += size
        if self.queued > timing.RECEIVE_QUEUE_BYTES and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        receiver.submit(self, f.channel, bundle, size)

    def _move(self, f: wire.Frame) -> None:
        """A planned move (docs/format.md 10.3, step 7): the site's `on_move` hook checks
        it and starts the failover; MOVING answers either way."""
        receiver = self.channels.get(f.channel)
        if receiver is None:
            raise ProtocolError(f"MOVE for channel {f.channel}, which this peer did not "
                                "attach")
        msg = wire.parse_control(f)
        assert self.peer is not None
        task = asyncio.get_running_loop().create_task(
            self._move_async(f.channel, receiver.name, self.peer, msg["checkpoint_id"],
                             msg["reverse"]))
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)

    async def _move_async(self, channel: int, vpg: str, peer: Peer, checkpoint_id: int,
                          reverse: bool) -> None:
        hook = self.site.on_move
        reason = ""
        if hook is None:
            reason = "this recovery site runs no recovery operations (a site service does)"
        else:
            try:
                await hook(vpg, peer, checkpoint_id, reverse)
            except ZcoreError as exc:
                reason = str(exc)
        self._send(wire.control(wire.MOVING, channel, accepted=not reason, reason=reason))

    def tell_failed_over(self, vpg: str, checkpoint_id: int, shutdown: str) -> None:
        """Tell the protected site that VPG `vpg` failed over here (FAILED_OVER on its
        channel, so it can apply the shutdown policy); the caller closes afterwards."""
        for channel, receiver in self.channels.items():
            if receiver.name == vpg:
                self._send(wire.control(wire.FAILED_OVER, channel,
                                        checkpoint_id=checkpoint_id, shutdown=shutdown))

    def _pair(self, msg: dict[str, Any]) -> None:
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
        trust(site.ssl_context, msg["cert"])
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
        """Acknowledge `seq` on `channel` (from the journal worker's thread)."""
        self.site.call_soon_threadsafe(self._acked, channel, seq, size)

    def _acked(self, channel: int, seq: int, size: int) -> None:
        self.queued -= size
        if (self.paused and self.queued <= timing.RECEIVE_QUEUE_BYTES // 2
                and not self.closed and self.transport is not None and self._held is None):
            self.paused = False
            self.transport.resume_reading()
        self._send(wire.ack(channel, seq))

    def fail_threadsafe(self, reason: str, channel: int = 0) -> None:
        """Close with an error (from the journal worker's thread)."""
        self.site.call_soon_threadsafe(self.close, reason, True)

    def close(self, reason: str, error: bool = True, tell: bool = True) -> None:
        """Close the connection; an `error` records `reason` in `RecoverySite.refused`,
        and `tell` sends it to a greeted peer first (ERROR, or CLOSE if no error)."""
        if self.closed:
            return
        if error:
            self.site.refuse(f"{self.remote}: {reason}")
        if tell and self.transport is not None and self.greeted:
            self.transport.write(wire.control(wire.ERROR if error else wire.CLOSE,
                                              reason=reason))
        self.closed = True
        if self._delta is not None:
            self._delta.close(reason)
        if self.transport is not None:
            self.transport.close()

    async def _beat(self) -> None:
        while not self.closed:
            await asyncio.sleep(timing.HEARTBEAT_INTERVAL)
            if self._held is not None:  # reading is paused while an attach runs
                self.last_frame = time.monotonic()
            elif time.monotonic() - self.last_frame > timing.PEER_TIMEOUT:
                self.close("peer silent for too long")
                return
            if self.greeted:
                self._send(wire.heartbeat(time.time_ns()))
