"""One NBD client's connection: the asyncio protocol that receives its bytes, runs the
handshake (`zcore.nbd.negotiation`) and then frames its requests for transmission
(`zcore.nbd.transmission`).

Each connection is a `BufferedProtocol`: it receives into a preallocated staging buffer,
parses every complete request in it and runs them in order on the loop thread, batching
the small replies into one send; a write payload too large for the staging buffer is
received straight into a pooled, 64-byte-aligned buffer.  A write payload that does not
arrive whole is never applied.  A connection whose replies back up in its socket takes
no new request until they drain: letting the transport buffer them cost more than the
reads themselves (bench/suites/nbd.py nbd.read_pit_seq).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

from zcore.errors import ProtocolError
from zcore.nbd.exports import Export
from zcore.nbd.negotiation import Negotiation
from zcore.nbd.protocol import (
    CMD_DISC,
    CMD_WRITE,
    REQUEST_SIZE,
    SECTOR,
    Request,
    parse_request,
)
from zcore.nbd.transmission import BufferPool, PooledBuffer, Transmission

if TYPE_CHECKING:
    from zcore.nbd.server import NBDServer

log = logging.getLogger("zcore.nbd")

# Staging receive buffer: holds a burst of small requests (about thirty 4 KiB writes with
# their headers) so they are parsed and answered per receive, not per request.
STAGING_BYTES = 128 << 10
STAGING_LIMIT = 4 << 20
# Replies the transport may hold before the connection stops taking requests, and the
# level it must drain to before they resume.  Taking no new request while the socket is
# full keeps the transport from copying read data into an ever-growing buffer (that copy
# cost more than the reads themselves: bench/suites/nbd.py nbd.read_pit_seq).
WRITE_HIGH_WATER = 0
WRITE_LOW_WATER = 0


class Phase(IntEnum):
    """Where a connection is: negotiating, serving requests, or closed."""

    HANDSHAKE = 0
    TRANSMISSION = 1
    CLOSED = 2


# module-level aliases: an enum member costs a class-attribute lookup (about 0.15 us) per
# comparison, and the receive path compares the phase per request
_HANDSHAKE, _TRANSMISSION, _CLOSED = Phase.HANDSHAKE, Phase.TRANSMISSION, Phase.CLOSED


class NBDClientConnection(asyncio.BufferedProtocol):
    """The server side of one client's NBD connection."""

    def __init__(self, server: NBDServer, pool: BufferPool) -> None:
        self.server = server
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(STAGING_BYTES)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._transport: Any = None
        self._phase = _HANDSHAKE
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False
        self.export: Export | None = None
        self._tx: Transmission | None = None
        self._payload: memoryview | None = None
        self._payload_buf: PooledBuffer | None = None
        self._payload_filled = 0
        self._pending = Request(0, CMD_WRITE, 0, 0, 0)
        self._discard = 0
        self._discard_reply: tuple[int, int, str] = (0, 0, "")
        self._write_paused = False
        self._syncing = False  # a FLUSH/FUA sync or a blocking read runs in a worker thread
        self._reading = True
        self._task: asyncio.Task[None] | None = None
        self.peer: object = None

    @property
    def queued_reply_bytes(self) -> int:
        """Reply bytes the transport holds, not yet taken by the socket."""
        transport = self._transport
        return int(transport.get_write_buffer_size()) if transport is not None else 0

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.peer = transport.get_extra_info("peername")
        refusal = self.server.register_connection(self)
        if refusal is not None:
            log.warning("nbd: refusing connection from %s (%s)", self.peer, refusal)
            self._phase = _CLOSED
            cast(asyncio.Transport, transport).abort()
            return
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._task = self._loop.create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._phase = _CLOSED
        self._release_payload()  # a write whose payload did not arrive whole is dropped
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self.server.unregister_connection(self)
        if exc is not None:
            log.info("nbd: connection from %s lost: %s", self.peer, exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._phase == _TRANSMISSION and self._transport is not None:
            self._update_reading()
            self._loop.call_soon(self._process)

    def _update_reading(self) -> None:
        """Read from the socket in transmission unless replies back up or a sync runs."""
        want = not self._write_paused and not self._syncing
        if (want != self._reading and self._phase == _TRANSMISSION
                and self._transport is not None):
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return self._payload[self._payload_filled :]
        if self._end == len(self._buf):
            self._compact()
        return self._mv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._phase == _CLOSED:
            return
        if self._payload is not None:
            self._payload_filled += nbytes
            if self._payload_filled == len(self._payload):
                self._process(finish_payload=True)
            return
        self._end += nbytes
        if self._phase == _TRANSMISSION:
            self._process()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _compact(self) -> None:
        pending = self._end - self._start
        if self._start:
            self._mv[:pending] = self._mv[self._start : self._end]
            self._start, self._end = 0, pending
            return
        # full of unparsed bytes: only while replies are backed up; grow, boundedly
        if len(self._buf) * 2 > STAGING_LIMIT:
            raise ProtocolError("client keeps sending while not reading its replies")
        bigger = bytearray(len(self._buf) * 2)
        bigger[:pending] = self._mv[:pending]
        self._buf, self._mv = bigger, memoryview(bigger)

    # -- the handshake channel (zcore.nbd.negotiation.HandshakeChannel) --

    async def recv(self, n: int) -> bytes:
        while self._end - self._start < n:
            if self._lost:
                raise ConnectionResetError("client went away during the handshake")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._mv[self._start : self._start + n])
        self._start += n
        return data

    async def skip(self, n: int) -> None:
        while n:
            if self._end == self._start:
                await self.recv(1)
                n -= 1
                continue
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def send(self, data: bytes) -> None:
        self._transport.write(data)

    def buffered(self) -> int:
        return self._end - self._start

    async def start_tls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        # TLS buffers its own output: the SSL layer keeps its default flow control and
        # the socket under it the asyncio default (a zero limit there would stall it).
        self._transport.set_write_buffer_limits()
        self._transport = await self._loop.start_tls(
            self._transport, self, ctx, server_side=True, ssl_handshake_timeout=timeout)

    # -- handshake --

    async def _handshake(self) -> None:
        negotiation = Negotiation(self.server, self, self.peer)
        try:
            export = await asyncio.wait_for(negotiation.run(), self.server.handshake_timeout)
        except TimeoutError:
            log.info("nbd: %s stalled in the handshake; dropped", self.peer)
            self._abort()
            return
        except (ProtocolError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("nbd: handshake with %s ended: %s", self.peer, exc)
            self._abort()
            return
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception:
            log.exception("nbd: handshake with %s failed", self.peer)
            self._abort()
            return
        if export is None:  # NBD_OPT_ABORT, acknowledged
            self._close_gracefully()
        else:
            self._enter_transmission(export, structured=negotiation.structured,
                                     allocation=negotiation.allocation)

    def _enter_transmission(self, export: Export, *, structured: bool,
                            allocation: bool = False) -> None:
        self.export = export
        self._tx = Transmission(export, self._transport, self._pool, structured=structured,
                                max_request=self.server.max_request, peer=self.peer,
                                start_sync=self._start_sync, start_read=self._start_read,
                                allocation=allocation)
        self._phase = _TRANSMISSION
        log.debug("nbd: %s uses export %r", self.peer, export.name)
        if self._end > self._start:
            self._process()

    # -- transmission --

    def _process(self, finish_payload: bool = False) -> None:
        try:
            if finish_payload:
                self._finish_payload()
            self._run_requests()
        except ProtocolError as exc:
            log.info("nbd: dropping %s: %s", self.peer, exc)
            self._abort()
        except Exception:
            log.exception("nbd: internal error serving %s; connection dropped", self.peer)
            self._abort()
        if self._tx is not None and self._phase != _CLOSED:
            self._tx.flush_out()

    def _run_requests(self) -> None:
        """Run every complete request in the staging buffer, in order, until it runs dry
        or the socket backs up.  The loop is the receive hot path: it keeps the buffer
        cursors in locals and writes them back before anything that may re-enter."""
        tx = self._tx
        assert tx is not None
        mv = self._mv
        start, end = self._start, self._end
        max_request = self.server.max_request
        while self._phase == _TRANSMISSION and not self._write_paused and not self._syncing:
            if self._discard:
                take = min(self._discard, end - start)
                start += take
                self._discard -= take
                if self._discard:
                    break
                handle, err, message = self._discard_reply
                tx.error(handle, CMD_WRITE, err, message)
                continue
            if end - start < REQUEST_SIZE:
                break
            req = parse_request(mv[start : start + REQUEST_SIZE])
            start += REQUEST_SIZE
            _, command, _, _, length = req
            if command != CMD_WRITE:
                self._start, self._end = start, end
                if command == CMD_DISC:
                    self._close_gracefully()
                else:
                    tx.request(req)
            elif length > max_request:
                # too big to take: read past the payload, then refuse it
                self._discard = length
                self._discard_reply = (req.handle, tx.too_big_errno(),
                                       f"write of {length} bytes is over the "
                                       f"{max_request}-byte limit")
            elif end - start >= length:
                self._start, self._end = start + length, end
                tx.write(req, mv[start : start + length])
                start += length
            else:
                self._await_payload(req, mv[start:end])
                start = end = 0
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _start_sync(self, handle: int, cmd: int) -> None:
        """FLUSH (or FUA after its write) of request `handle`: the backend's flush in a
        worker thread; no later request of this connection runs until it is replied to."""
        assert self.export is not None
        self._syncing = True
        self._update_reading()
        done = self.server.run_sync(self.export)
        done.add_done_callback(lambda fut: self._synced(fut, handle, cmd))

    def _synced(self, fut: asyncio.Future[None], handle: int, cmd: int) -> None:
        self._syncing = False
        if self._phase != _TRANSMISSION or self._tx is None:
            return  # disconnected meanwhile: no reply
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        self._tx.synced(handle, cmd, exc)
        self._update_reading()
        self._process()

    def _start_read(self, handle: int, offset: int, length: int, a0: int,
                    pbuf: PooledBuffer) -> None:
        """READ of request `handle` on an export with `blocking_reads`: the backend's
        read into `pbuf` in a worker thread, the connection paused as for a sync."""
        assert self.export is not None
        self._syncing = True
        self._update_reading()
        size = -(-(offset + length) // SECTOR) * SECTOR - a0
        done = self.server.run_blocking(self.export, self.export.backend.read_into, a0,
                                        pbuf.data[:size])
        done.add_done_callback(lambda fut: self._read_ended(fut, handle, offset, length, a0,
                                                             pbuf))

    def _read_ended(self, fut: asyncio.Future[None], handle: int, offset: int, length: int,
                    a0: int, pbuf: PooledBuffer) -> None:
        self._syncing = False
        if self._phase != _TRANSMISSION or self._tx is None:
            self._pool.put(pbuf)
            return  # disconnected meanwhile: no reply
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        self._tx.read_done(handle, offset, length, a0, pbuf, exc)
        self._update_reading()
        self._process()

    def _await_payload(self, req: Request, have: memoryview) -> None:
        """The payload of `req` is still arriving: receive the rest straight into a
        pooled buffer (`get_buffer`), then run it (`_finish_payload`)."""
        pbuf = self._pool.get(req.length)
        pbuf.data[: len(have)] = have
        self._payload_buf = pbuf
        self._payload = pbuf.data[: req.length]
        self._payload_filled = len(have)
        self._pending = req

    def _finish_payload(self) -> None:
        req, payload, pbuf = self._pending, self._payload, self._payload_buf
        self._payload = None
        self._payload_buf = None
        assert self._tx is not None and payload is not None and pbuf is not None
        try:
            self._tx.write(req, payload)
        finally:
            self._pool.put(pbuf)

    def _release_payload(self) -> None:
        if self._payload_buf is not None:
            self._pool.put(self._payload_buf)
        self._payload = None
        self._payload_buf = None

    # -- ending --

    def _close_gracefully(self) -> None:
        """Send what is queued, then close (NBD_CMD_DISC, NBD_OPT_ABORT, shutdown)."""
        if self._phase == _CLOSED:
            return
        if self._tx is not None:
            self._tx.flush_out()
        self._phase = _CLOSED
        self._release_payload()
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        """Hard disconnect: nothing more is sent or applied."""
        self._phase = _CLOSED
        self._release_payload()
        if self._tx is not None:
            self._tx.out = bytearray()
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """Disconnect: gracefully in transmission (queued replies are sent), at once in
        the handshake."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._phase == _TRANSMISSION:
            self._close_gracefully()
        else:
            self._abort()
