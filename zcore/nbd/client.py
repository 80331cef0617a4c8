"""A small blocking NBD client: how the site service reads a running QEMU's disk through
QEMU's own NBD export (initial and bitmap syncs of a VM protected in the hypervisor).

Beside the server, not under it: it shares only `zcore.nbd.protocol`'s constants.  Fixed
newstyle handshake with STRUCTURED_REPLY (required), SET_META_CONTEXT (`base:allocation`,
`qemu:dirty-bitmap:NAME`...) and GO with NBD_INFO_BLOCK_SIZE; in transmission READ
(data, hole and error chunks), WRITE (+FUA), FLUSH, BLOCK_STATUS and DISC.

One request is in flight at a time (a lock serialises the threads that share a client).
Every reply is checked before any byte of it is trusted: magic, handle, chunk types,
lengths, offsets within the request, no overlap, complete coverage, the done flag.  A
server that breaks the protocol (or closes mid-reply) raises `ProtocolError` and the
connection is closed; an error the server reports for a request raises `RemoteIOError`
(its errno) and the connection stays usable.  `timeout` bounds every socket operation
(`TimeoutError`, which also closes the connection).
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType

from zcore.errors import (
    AlignmentError,
    ClosedError,
    ConfigError,
    OutOfRangeError,
    ProtocolError,
    RemoteIOError,
    StateError,
)
from zcore.fsutil import short_socket_path
from zcore.nbd import protocol as p

# the largest READ or WRITE sent as one request (fewer if the server's maximum is lower)
MAX_REQUEST = 32 << 20
# the span one BLOCK_STATUS request asks about (servers may answer less: we ask again)
MAX_STATUS_REQUEST = 1 << 30
# bounds on what a server may send before it is believed
_MAX_OPTION_REPLY = 1 << 16
_MAX_STATUS_EXTENTS = 1 << 20
_DEFAULT_PREFERRED = 4096

_OPT_NAMES = {p.OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
              p.OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT", p.OPT_GO: "NBD_OPT_GO"}
_REP_ERRORS = {
    p.REP_ERR_UNSUP: "unsupported option (NBD_REP_ERR_UNSUP)",
    p.REP_ERR_POLICY: "refused by server policy (NBD_REP_ERR_POLICY)",
    p.REP_ERR_INVALID: "invalid request (NBD_REP_ERR_INVALID)",
    p.REP_ERR_PLATFORM: "unsupported on this platform (NBD_REP_ERR_PLATFORM)",
    p.REP_ERR_TLS_REQD: "the server requires TLS, which this client does not speak "
                        "(NBD_REP_ERR_TLS_REQD)",
    p.REP_ERR_UNKNOWN: "no such export (NBD_REP_ERR_UNKNOWN)",
    p.REP_ERR_SHUTDOWN: "the server is shutting down (NBD_REP_ERR_SHUTDOWN)",
    p.REP_ERR_BLOCK_SIZE_REQD: "block size information required "
                               "(NBD_REP_ERR_BLOCK_SIZE_REQD)",
    p.REP_ERR_TOO_BIG: "request too big (NBD_REP_ERR_TOO_BIG)",
}
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_EXTENT = struct.Struct(">II")
_CHUNK_HEAD = struct.Struct(">HHQI")  # a structured chunk after its magic
_SIMPLE_TAIL = struct.Struct(">IQ")  # a simple reply after its magic


def _errno_text(code: int) -> str:
    name = _errno.errorcode.get(code, f"errno {code}")
    return f"{name} ({os.strerror(code)})"


class NBDClient:
    """One connection to one export of an NBD server; blocking, thread-safe (one request
    in flight).  Made by `connect_unix` or `connect_tcp`; a context manager."""

    size: int  # the export's size in bytes
    read_only: bool  # NBD_FLAG_READ_ONLY
    contexts: dict[str, int]  # metadata context name -> the id the server gave it
    flags: int  # the transmission flags
    min_block: int  # the server's block sizes (NBD_INFO_BLOCK_SIZE, or the defaults)
    preferred_block: int
    max_block: int

    def __init__(self, sock: socket.socket, export: str, meta_contexts: Sequence[str]) -> None:
        """Negotiate `export` on the connected `sock` (use `connect_unix`/`connect_tcp`)."""
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self._handle = 0
        self.export = export
        self.contexts = {}
        self.min_block = 1
        self.preferred_block = _DEFAULT_PREFERRED
        self.max_block = MAX_REQUEST
        self.flags = 0
        try:
            self._handshake(export, meta_contexts)
        except BaseException:
            self._drop()
            raise

    # ---- connecting --------------------------------------------------------------------

    @classmethod
    def connect_unix(cls, path: str | os.PathLike[str], export: str, *,
                     meta_contexts: Sequence[str] = (p.META_BASE_ALLOCATION,),
                     timeout: float = 30.0) -> NBDClient:
        """Connect to the server's Unix socket `path` (any length) and open `export`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            with short_socket_path(path) as address:
                sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return cls(sock, export, meta_contexts)

    @classmethod
    def connect_tcp(cls, host: str, port: int, export: str, *,
                    meta_contexts: Sequence[str] = (p.META_BASE_ALLOCATION,),
                    timeout: float = 30.0) -> NBDClient:
        """Connect to `host`:`port` over TCP and open `export`."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return cls(sock, export, meta_contexts)

    # ---- socket I/O ---------------------------------------------------------------------

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise ClosedError(f"NBD connection to export {self.export!r} is closed")
        return self._sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _recv_into(self, view: memoryview) -> None:
        sock = self._live()
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ProtocolError(f"NBD server closed the connection {len(view) - got} "
                                    f"bytes short of a {len(view)}-byte message")
            got += n

    def _recv(self, size: int) -> bytes:
        buf = bytearray(size)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    # ---- handshake ----------------------------------------------------------------------

    def _handshake(self, export: str, meta_contexts: Sequence[str]) -> None:
        name = export.encode()
        if len(name) > p.MAX_NAME:
            raise ConfigError(f"export name of {len(name)} bytes (at most {p.MAX_NAME})")
        magic, opt_magic, server_flags = p.HELLO.unpack(self._recv(p.HELLO.size))
        if magic != p.NBDMAGIC:
            raise ProtocolError(f"not an NBD server: greeting magic {magic:#x}")
        if opt_magic != p.IHAVEOPT:
            raise ProtocolError(f"NBD server is not newstyle (magic {opt_magic:#x})")
        if not server_flags & p.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("NBD server does not speak fixed newstyle negotiation")
        client_flags = p.CLIENT_FIXED_NEWSTYLE | (server_flags & p.FLAG_NO_ZEROES
                                                  and p.CLIENT_NO_ZEROES)
        self._live().sendall(p.CLIENT_FLAGS.pack(client_flags))

        self._send_option(p.OPT_STRUCTURED_REPLY)
        kind, data = self._option_reply(p.OPT_STRUCTURED_REPLY)
        if kind == p.REP_ERR_UNSUP:
            self._abort()
            raise ProtocolError("NBD server does not support structured replies "
                                "(NBD_OPT_STRUCTURED_REPLY), which this client requires")
        self._check_ack(p.OPT_STRUCTURED_REPLY, kind, data)

        if meta_contexts:
            self._set_meta_contexts(name, meta_contexts)

        self._send_option(p.OPT_GO, _U32.pack(len(name)) + name
                          + _U16.pack(1) + _U16.pack(p.INFO_BLOCK_SIZE))
        size: int | None = None
        while True:
            kind, data = self._option_reply(p.OPT_GO)
            if kind == p.REP_ACK:
                break
            if kind != p.REP_INFO:
                self._check_ack(p.OPT_GO, kind, data)  # raises for errors and others
            if len(data) < 2:
                raise ProtocolError(f"NBD_REP_INFO of {len(data)} bytes")
            (info,) = _U16.unpack_from(data)
            if info == p.INFO_EXPORT:
                if len(data) != p.INFO_EXPORT_REPLY.size:
                    raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
                _, size, self.flags = p.INFO_EXPORT_REPLY.unpack(data)
            elif info == p.INFO_BLOCK_SIZE:
                if len(data) != p.INFO_BLOCK_REPLY.size:
                    raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
                _, minimum, preferred, maximum = p.INFO_BLOCK_REPLY.unpack(data)
                self._set_block_sizes(minimum, preferred, maximum)
            # other information (name, description) is not needed
        if size is None:
            raise ProtocolError("NBD server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
        if not self.flags & p.TF_HAS_FLAGS:
            raise ProtocolError(f"NBD transmission flags {self.flags:#x} lack HAS_FLAGS")
        if size >= 1 << 63:
            raise ProtocolError(f"NBD export size {size} is impossible")
        self.size = size
        self.read_only = bool(self.flags & p.TF_READ_ONLY)
        # the request limit: MAX_REQUEST or less, a whole number of minimum blocks
        self._max_request = max(self.min_block,
                                min(MAX_REQUEST, self.max_block) // self.min_block
                                * self.min_block)
        self._max_status = MAX_STATUS_REQUEST // self.min_block * self.min_block

    def _set_block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        def power_of_two(v: int) -> bool:
            return v > 0 and not v & (v - 1)

        if not (power_of_two(minimum) and minimum <= 1 << 16 and power_of_two(preferred)
                and preferred >= minimum and maximum >= minimum
                and (maximum % minimum == 0 or maximum == 0xFFFFFFFF)):
            raise ProtocolError(f"NBD block sizes min {minimum} preferred {preferred} max "
                                f"{maximum} break doc/proto.md's rules")
        self.min_block, self.preferred_block, self.max_block = minimum, preferred, maximum

    def _set_meta_contexts(self, name: bytes, queries: Sequence[str]) -> None:
        body = [_U32.pack(len(name)), name, _U32.pack(len(queries))]
        for query in queries:
            q = query.encode()
            if not q or len(q) > p.MAX_NAME:
                raise ConfigError(f"metadata context name {query!r} is empty or too long")
            body += [_U32.pack(len(q)), q]
        self._send_option(p.OPT_SET_META_CONTEXT, b"".join(body))
        while True:
            kind, data = self._option_reply(p.OPT_SET_META_CONTEXT)
            if kind == p.REP_ACK:
                return
            if kind == p.REP_ERR_UNSUP:
                # no metadata contexts at all: block_status will say the context is missing
                return
            if kind != p.REP_META_CONTEXT:
                self._check_ack(p.OPT_SET_META_CONTEXT, kind, data)
            if len(data) < 5:
                raise ProtocolError(f"NBD_REP_META_CONTEXT of {len(data)} bytes")
            (context_id,) = _U32.unpack_from(data)
            try:
                context = data[4:].decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError("NBD_REP_META_CONTEXT name is not UTF-8") from exc
            if context in self.contexts or context_id in self.contexts.values():
                raise ProtocolError(f"NBD server gave metadata context {context!r} "
                                    f"(id {context_id}) twice")
            self.contexts[context] = context_id

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._live().sendall(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, replied, kind, length = p.OPT_REPLY.unpack(self._recv(p.OPT_REPLY.size))
        if magic != p.OPT_REPLY_MAGIC:
            raise ProtocolError(f"bad NBD option reply magic {magic:#x}")
        if replied != option:
            raise ProtocolError(f"NBD server answered option {replied} to option {option}")
        if length > _MAX_OPTION_REPLY:
            raise ProtocolError(f"NBD option reply of {length} bytes")
        return kind, self._recv(length)

    def _abort(self) -> None:
        """End a refused negotiation softly (doc/proto.md: NBD_OPT_ABORT, no reply awaited),
        as a client must after NBD_REP_ERR_SHUTDOWN."""
        with contextlib.suppress(OSError):
            self._send_option(p.OPT_ABORT)

    def _check_ack(self, option: int, kind: int, data: bytes) -> None:
        what = _OPT_NAMES.get(option, f"option {option}")
        if kind == p.REP_ACK:
            if data:
                raise ProtocolError(f"NBD_REP_ACK to {what} carries {len(data)} bytes")
            return
        if kind & p.REP_FLAG_ERROR:
            reason = _REP_ERRORS.get(kind, f"error reply {kind:#x}")
            message = data.decode(errors="replace")
            self._abort()
            raise ProtocolError(f"NBD server refused {what} for export {self.export!r}: "
                                f"{reason}" + (f": {message}" if message else ""))
        raise ProtocolError(f"NBD server sent reply type {kind:#x} to {what}")

    # ---- transmission -------------------------------------------------------------------

    def _send_request(self, command: int, offset: int, length: int, flags: int = 0,
                      payload: memoryview | None = None) -> int:
        self._handle = (self._handle + 1) & 0xFFFFFFFFFFFFFFFF
        sock = self._live()
        sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, self._handle,
                                    offset, length))
        if payload is not None:
            sock.sendall(payload)
        return self._handle

    def _chunk_header(self, handle: int, simple_ok: bool) -> tuple[int, int, int] | int:
        """The next reply header for `handle`: (flags, type, length) of a structured chunk,
        or the error of a simple reply (only where `simple_ok`)."""
        (magic,) = _U32.unpack(self._recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, got = _SIMPLE_TAIL.unpack(self._recv(_SIMPLE_TAIL.size))
            if got != handle:
                raise ProtocolError(f"NBD reply for handle {got:#x}, expected {handle:#x}")
            if not simple_ok:
                raise ProtocolError("NBD server sent a simple reply where structured "
                                    "replies were negotiated")
            return int(error)
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad NBD reply magic {magic:#x}")
        flags, kind, got, length = _CHUNK_HEAD.unpack(self._recv(_CHUNK_HEAD.size))
        if got != handle:
            raise ProtocolError(f"NBD reply chunk for handle {got:#x}, expected {handle:#x}")
        return int(flags), int(kind), int(length)

    def _error_chunk(self, kind: int, length: int, lo: int, hi: int) -> RemoteIOError:
        """Read the payload of an error chunk and make its exception."""
        if length < 6 or length > 6 + p.MAX_ERROR_MESSAGE + 8:
            raise ProtocolError(f"NBD error chunk of {length} bytes")
        data = self._recv(length)
        code, size = struct.unpack_from(">IH", data)
        tail = length - 6 - size
        if tail != (8 if kind == p.REPLY_TYPE_ERROR_OFFSET else 0) and (
                kind in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET) or tail < 0):
            raise ProtocolError(f"NBD error chunk of {length} bytes with a {size}-byte "
                                "message")
        if code == 0:
            raise ProtocolError("NBD error chunk with error 0")
        message = data[6:6 + size].decode(errors="replace")
        where = ""
        if kind == p.REPLY_TYPE_ERROR_OFFSET:
            (at,) = _U64.unpack_from(data, 6 + size)
            if not lo <= at < hi:
                raise ProtocolError(f"NBD error offset {at} outside the request "
                                    f"[{lo}, {hi})")
            where = f" at offset {at}"
        text = f"NBD server error {_errno_text(code)}{where}"
        return RemoteIOError(code, text + (f": {message}" if message else ""))

    def _simple_command(self, command: int, offset: int, length: int, flags: int = 0,
                        payload: memoryview | None = None) -> None:
        """A command whose reply carries no data (WRITE, FLUSH)."""
        handle = self._send_request(command, offset, length, flags, payload)
        error: RemoteIOError | None = None
        while True:
            head = self._chunk_header(handle, simple_ok=True)
            if isinstance(head, int):
                if head:
                    raise RemoteIOError(head, f"NBD server error {_errno_text(head)}")
                return
            cflags, kind, clen = head
            if kind & p.REPLY_TYPE_FLAG_ERROR:
                error = self._error_chunk(kind, clen, offset, offset + length)
            elif kind == p.REPLY_TYPE_NONE and clen == 0 and cflags & p.REPLY_FLAG_DONE:
                pass
            else:
                raise ProtocolError(f"NBD reply chunk type {kind} to command {command}")
            if cflags & p.REPLY_FLAG_DONE:
                if error is not None:
                    raise error
                return

    def _read_request(self, offset: int, view: memoryview) -> None:
        """One READ of len(view) bytes at `offset` into `view`, every byte accounted for."""
        length = len(view)
        handle = self._send_request(p.CMD_READ, offset, length)
        end = offset + length
        starts: list[int] = []  # covered ranges, sorted and disjoint
        ends: list[int] = []
        covered = 0
        error: RemoteIOError | None = None
        while True:
            head = self._chunk_header(handle, simple_ok=False)
            assert not isinstance(head, int)
            cflags, kind, clen = head
            if kind == p.REPLY_TYPE_OFFSET_DATA or kind == p.REPLY_TYPE_OFFSET_HOLE:
                if kind == p.REPLY_TYPE_OFFSET_DATA:
                    if not 8 < clen <= length + 8:
                        raise ProtocolError(f"NBD data chunk of {clen} bytes for a "
                                            f"{length}-byte read")
                    (at,) = _U64.unpack(self._recv(8))
                    size = clen - 8
                else:
                    if clen != _HOLE.size:
                        raise ProtocolError(f"NBD hole chunk of {clen} bytes")
                    at, size = _HOLE.unpack(self._recv(_HOLE.size))
                if size == 0 or at < offset or at + size > end:
                    raise ProtocolError(f"NBD chunk [{at}, {at + size}) outside the read "
                                        f"[{offset}, {end})")
                i = bisect.bisect_left(starts, at)
                if (i < len(starts) and starts[i] < at + size) or (i and ends[i - 1] > at):
                    raise ProtocolError(f"NBD chunk [{at}, {at + size}) overlaps another")
                starts.insert(i, at)
                ends.insert(i, at + size)
                covered += size
                piece = view[at - offset:at - offset + size]
                if kind == p.REPLY_TYPE_OFFSET_DATA:
                    self._recv_into(piece)
                else:
                    piece[:] = bytes(size)
            elif kind & p.REPLY_TYPE_FLAG_ERROR:
                error = self._error_chunk(kind, clen, offset, end)
            elif kind == p.REPLY_TYPE_NONE:
                if clen or not cflags & p.REPLY_FLAG_DONE:
                    raise ProtocolError("NBD none chunk without the done flag or with data")
            else:
                raise ProtocolError(f"NBD reply chunk type {kind} to a read")
            if cflags & p.REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        if covered != length:
            raise ProtocolError(f"NBD read reply covered {covered} of {length} bytes")

    def _status_request(self, offset: int, length: int,
                        context_id: int) -> list[tuple[int, int]]:
        """One BLOCK_STATUS: the (length, flags) extents of `context_id` from `offset`."""
        handle = self._send_request(p.CMD_BLOCK_STATUS, offset, length)
        seen: set[int] = set()
        extents: list[tuple[int, int]] | None = None
        error: RemoteIOError | None = None
        while True:
            head = self._chunk_header(handle, simple_ok=False)
            assert not isinstance(head, int)
            cflags, kind, clen = head
            if kind == p.REPLY_TYPE_BLOCK_STATUS:
                if clen < 12 or (clen - 4) % 8 or (clen - 4) // 8 > _MAX_STATUS_EXTENTS:
                    raise ProtocolError(f"NBD block status chunk of {clen} bytes")
                data = self._recv(clen)
                (got,) = _U32.unpack_from(data)
                if got not in self.contexts.values() or got in seen:
                    raise ProtocolError(f"NBD block status for context id {got}, not "
                                        "negotiated or sent twice")
                seen.add(got)
                runs = list(_EXTENT.iter_unpack(memoryview(data)[4:]))
                total = 0
                for i, (n, _) in enumerate(runs):
                    if n == 0 or (total >= length and i):
                        raise ProtocolError("NBD block status extents of length 0 or "
                                            "past the request")
                    total += n
                if got == context_id:
                    extents = runs
            elif kind & p.REPLY_TYPE_FLAG_ERROR:
                error = self._error_chunk(kind, clen, offset, offset + length)
            elif kind == p.REPLY_TYPE_NONE:
                if clen or not cflags & p.REPLY_FLAG_DONE:
                    raise ProtocolError("NBD none chunk without the done flag or with data")
            else:
                raise ProtocolError(f"NBD reply chunk type {kind} to block status")
            if cflags & p.REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        if extents is None:
            raise ProtocolError(f"NBD block status reply lacks context id {context_id}")
        return extents

    # ---- the public calls -----------------------------------------------------------------

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """One request at a time; anything but the server's own error reply (a broken
        protocol, a timeout, an interrupt) leaves the stream unusable: it is closed."""
        with self._lock:
            self._live()
            try:
                yield
            except RemoteIOError as exc:
                if exc.errno == p.ESHUTDOWN:
                    # the server is going away: doc/proto.md asks for a soft disconnect
                    with contextlib.suppress(OSError):
                        self._send_request(p.CMD_DISC, 0, 0)
                    self._drop()
                raise
            except BaseException:
                self._drop()
                raise

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"range [{offset}, {offset + length}) outside the "
                                  f"{self.size}-byte export {self.export!r}")

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` (a writable byte buffer) with the export's bytes at `offset`.
        Unaligned ranges are widened to the server's minimum block and cut back."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise ConfigError("readinto needs a writable buffer")
        self._check_range(offset, len(view))
        with self._request():
            self._readinto(offset, view)

    def _readinto(self, offset: int, view: memoryview) -> None:
        block = self.min_block
        pos, end = offset, offset + len(view)
        while pos < end:
            if pos % block or (end - pos < block and end != self.size):
                # a partial minimum block: read it whole and keep the part asked for
                b0 = pos - pos % block
                b1 = min(b0 + block, self.size)
                tmp = memoryview(bytearray(b1 - b0))
                self._read_request(b0, tmp)
                n = min(end, b1) - pos
                view[pos - offset:pos - offset + n] = tmp[pos - b0:pos - b0 + n]
                pos += n
                continue
            n = end - pos if end == self.size else (end - pos) // block * block
            n = min(n, self._max_request)
            self._read_request(pos, view[pos - offset:pos - offset + n])
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes of the export at `offset` (split into requests the server takes)."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        """Write `data` at `offset`, aligned to the server's minimum block; with `fua`,
        durable when this returns.  For tests and tools."""
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if self.read_only:
            raise StateError(f"NBD export {self.export!r} is read-only")
        if fua and not self.flags & p.TF_SEND_FUA:
            raise StateError(f"NBD export {self.export!r} does not take FUA")
        block = self.min_block
        if offset % block or (len(view) % block and offset + len(view) != self.size):
            raise AlignmentError(f"write [{offset}, {offset + len(view)}) is not aligned "
                                 f"to the server's {block}-byte minimum block")
        flags = p.CMD_FLAG_FUA if fua else 0
        with self._request():
            for pos in range(0, len(view), self._max_request):
                piece = view[pos:pos + self._max_request]
                self._simple_command(p.CMD_WRITE, offset + pos, len(piece), flags, piece)

    def flush(self) -> None:
        """Make every completed write durable (NBD_CMD_FLUSH)."""
        if not self.flags & p.TF_SEND_FLUSH:
            raise StateError(f"NBD export {self.export!r} does not take FLUSH")
        with self._request():
            self._simple_command(p.CMD_FLUSH, 0, 0)

    def block_status(self, offset: int, length: int,
                     context: str = p.META_BASE_ALLOCATION) -> list[tuple[int, int, int]]:
        """(offset, length, flags) extents of metadata `context` that cover
        [offset, offset+length) exactly, in order, as the server gave them (clipped to the
        range, not merged).  base:allocation flags: `STATE_HOLE` (1), `STATE_ZERO` (2); a
        qemu:dirty-bitmap:NAME context's: `STATE_DIRTY` (1)."""
        self._check_range(offset, length)
        if context not in self.contexts:
            raise StateError(f"metadata context {context!r} was not negotiated with "
                             f"export {self.export!r} (have {sorted(self.contexts)})")
        context_id = self.contexts[context]
        out: list[tuple[int, int, int]] = []
        end = offset + length
        block = self.min_block
        pos = offset - offset % block
        with self._request():
            while pos < end:
                span = min(self.size - pos, self._max_status, -(-(end - pos) // block) * block)
                done = 0
                for n, flags in self._status_request(pos, span, context_id):
                    n = min(n, span - done)  # the last extent may reach past the request
                    lo, hi = max(pos + done, offset), min(pos + done + n, end)
                    if hi > lo:
                        out.append((lo, hi - lo, flags))
                    done += n
                pos += done
                if pos < end and pos % block:
                    raise ProtocolError(f"NBD block status extent ends at {pos}, not on "
                                        f"the {block}-byte minimum block")
        return out

    def close(self) -> None:
        """Say NBD_CMD_DISC and close the connection (again: nothing)."""
        if self._sock is None:
            return
        with self._lock:
            try:
                self._send_request(p.CMD_DISC, 0, 0)
                self._live().shutdown(socket.SHUT_WR)
            except OSError:
                pass
            finally:
                self._drop()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
