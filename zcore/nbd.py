"""NBD server: protected volumes and point-in-time images served to any NBD client.

qemu (`qemu-img`, `qemu-io`, a VM's disk), libnbd's tools (`nbdinfo`, `nbdcopy`,
`nbdfuse`), fio's nbd engine and the Linux kernel's `nbd-client` all speak NBD.  This
module serves three kinds of export to them:

- a protected volume (read-write): every write goes through `ProtectedVolume.write` and
  is captured; FLUSH and the FUA flag map to durability on its backing store;
- a view of a volume at a checkpoint (read-only);
- the same view under a `zcore.recovery.ScratchOverlay` (writable, the writes kept apart
  from the journal and the replica and discarded on close: the basis of failover test);

and, for tools and tests, a plain file.  Anything with the small `Backend` interface can
be served.

Protocol (the NBD project's doc/proto.md): fixed newstyle handshake with NBD_OPT_GO, INFO,
EXPORT_NAME, LIST, ABORT, STRUCTURED_REPLY and STARTTLS (TLS mandatory when configured);
in transmission READ, WRITE, FLUSH, the FUA flag, WRITE_ZEROES, TRIM (where the export
can) and DISC.  Every export advertises block sizes: 512-byte minimum, 4 KiB preferred,
`max_request` (32 MiB) maximum payload; unaligned reads are served, unaligned writes get
EINVAL.  No block-status metadata contexts: clients read every block.

Design.  One asyncio event loop carries every connection.  Each connection is a
`BufferedProtocol`: it receives into a preallocated staging buffer, parses every complete
request in it and runs them in order on the loop thread, batching the small replies into
one send; a write payload too large for the staging buffer is received straight into a
pooled, 64-byte-aligned buffer, and read data is read into such a buffer behind room for
the reply header, so it goes out in one send with no copy.  Disk I/O runs inline on the
loop thread: handing reads of 128 KiB and more to a thread pool was not faster on these
2-core machines (nbdcopy from a point-in-time export: 410-680 MB/s against 470-1030
inline, same run), and inline execution keeps every request's effect in arrival order.
A connection whose replies back up in its socket takes no new request until they drain:
letting the transport buffer them cost more than the reads themselves.

Hostile clients: every length is bounded before anything is allocated (option data,
request payloads); bad magic, unknown client flags, a stalled handshake or an
out-of-protocol byte drop the connection; a request beyond the end, unaligned, too large,
with unknown flags or for a read-only export gets its NBD error; a write payload that
does not arrive whole is never applied.  A client that stops reading its replies stops
being read (bounded reply buffering).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import logging
import os
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from zcore.errors import (
    AlignmentError,
    ClosedError,
    ConfigError,
    OutOfRangeError,
    ProtocolError,
    ScratchLimitError,
)

log = logging.getLogger("zcore.nbd")

# ---- protocol constants (doc/proto.md) ---------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) + 1

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_HELLO = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_DATA = struct.Struct(">IHHQIQ")
_CHUNK_ERROR = struct.Struct(">IHHQIIH")
_EXPORT_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")
REQUEST_SIZE = _REQUEST.size  # 28

SECTOR = 512
PREFERRED_BLOCK = 4096
DEFAULT_PORT = 10809
DEFAULT_MAX_REQUEST = 32 << 20
MAX_REQUEST_LIMIT = 256 << 20
MAX_OPTION_DATA = 16 << 10  # a GO with a 4096-byte name and every info request fits
MAX_OPTIONS = 1024  # options in one handshake before the client is considered hostile
MAX_NAME = 4096
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
# Staging receive buffer: holds a burst of small requests (about thirty 4 KiB writes with
# their headers) so they are parsed and answered per receive, not per request.
STAGING_BYTES = 128 << 10
STAGING_LIMIT = 4 << 20
# A reply up to this size is copied into the batched output; larger ones go out alone.
SMALL_REPLY = 16 << 10
# Replies the transport may hold before the connection stops taking requests, and the
# level it must drain to before they resume.  Taking no new request while the socket is
# full keeps the transport from copying read data into an ever-growing buffer (that copy
# cost more than the reads themselves: bench/suites/nbd.py nbd.read_pit_seq).
WRITE_HIGH_WATER = 0
WRITE_LOW_WATER = 0
HEADROOM = 64  # room for a reply header in front of read data (keeps data 64-aligned)
POOL_MIN = 64 << 10
POOL_CACHE_BYTES = 96 << 20

_KNOWN_CMD_FLAGS = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_FAST_ZERO

_HANDSHAKE, _TRANSMISSION, _CLOSED = 0, 1, 2


# ---- backends and exports ----------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """What an export serves.  Offsets and lengths of writes are sector-aligned and
    within `size` (the server checks before calling); reads are sector-aligned too.
    An optional `trim(offset, length)` method is advertised to clients as TRIM."""

    size: int
    readonly: bool

    def read_into(self, offset: int, buf) -> None: ...

    def write(self, offset: int, data) -> object: ...

    def write_zeroes(self, offset: int, length: int) -> object: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


_ZEROES = bytes(1 << 20)


class FileBackend:
    """A raw image file or block device, read-write unless `readonly` (for tools and
    tests: writes to it are not captured).  FLUSH is fdatasync."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 size: int | None = None) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if size is not None and not readonly:
            flags |= os.O_CREAT
        self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        try:
            if size is not None and not readonly and os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            if self.size <= 0 or self.size % SECTOR:
                raise ConfigError(f"{self.path}: size {self.size} is not a positive multiple "
                                  f"of {SECTOR}")
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    def read_into(self, offset: int, buf) -> None:
        out = memoryview(buf).cast("B")
        done = 0
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n <= 0:
                out[done:] = bytes(len(out) - done)  # a file shrunk under us reads as zeroes
                return
            done += n

    def write(self, offset: int, data) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        return done

    def write_zeroes(self, offset: int, length: int) -> int:
        done = 0
        while done < length:
            n = min(len(_ZEROES), length - done)
            self.write(offset + done, memoryview(_ZEROES)[:n])
            done += n
        return length

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class VolumeBackend:
    """A `zcore.capture.ProtectedVolume`, read-write: every write is captured; FLUSH and
    FUA make the backing store durable.  Closes the volume only when it `owns` it."""

    readonly = False

    def __init__(self, volume, *, owns: bool = False) -> None:
        self.volume = volume
        self.size = int(volume.size)
        self._owns = owns
        self.read_into = volume.read_into
        self.write = volume.write
        self.write_zeroes = volume.write_zeroes
        self.flush = volume.flush

    def close(self) -> None:
        if self._owns:
            self.volume.close()


class ViewBackend:
    """One volume of a journal view (a point-in-time image), read-only."""

    readonly = True

    def __init__(self, view, volume: int | str, *, owns: bool = True) -> None:
        self.view = view
        self.volume = volume
        self.size = view.size(volume)
        self._owns = owns

    def read_into(self, offset: int, buf) -> None:
        self.view.read_into(self.volume, offset, buf)

    def write(self, offset: int, data) -> int:
        raise PermissionError("a point-in-time view is read-only")

    def write_zeroes(self, offset: int, length: int) -> int:
        raise PermissionError("a point-in-time view is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._owns:
            self.view.close()


@dataclass
class Export:
    """A named backend.  `owned`: the server closes the backend when it closes or drops
    the export.  `kind` is informational ("volume", "view", "scratch", "file")."""

    name: str
    backend: Backend
    description: str = ""
    owned: bool = True
    kind: str = "file"

    def __post_init__(self) -> None:
        raw = self.name.encode("utf-8")
        if len(raw) > MAX_NAME or "\0" in self.name:
            raise ConfigError(f"export name {self.name[:40]!r}... is longer than {MAX_NAME} "
                              "bytes or holds a NUL")
        if len(self.description.encode("utf-8")) > MAX_NAME:
            raise ConfigError(f"description of export {self.name!r} is too long")
        size = int(self.backend.size)
        if size <= 0 or size % SECTOR:
            raise ConfigError(f"export {self.name!r}: size {size} is not a positive multiple "
                              f"of {SECTOR}")

    @property
    def size(self) -> int:
        return int(self.backend.size)

    @property
    def readonly(self) -> bool:
        return bool(self.backend.readonly)

    @property
    def can_trim(self) -> bool:
        return not self.readonly and callable(getattr(self.backend, "trim", None))


def file_export(path: str | os.PathLike, name: str | None = None, *,
                readonly: bool = False) -> Export:
    """A raw file served as is (writes are not captured)."""
    backend = FileBackend(path, readonly=readonly)
    return Export(name if name is not None else os.path.basename(os.fspath(path)), backend,
                  f"raw file {os.fspath(path)}", kind="file")


def volume_export(volume, name: str | None = None, *, owned: bool = False) -> Export:
    """A protected volume, read-write; every write is captured."""
    return Export(name if name is not None else volume.name, VolumeBackend(volume, owns=owned),
                  f"protected volume {volume.name}", owned=True, kind="volume")


def view_export(journal, checkpoint, volume: int | str, name: str | None = None) -> Export:
    """Volume `volume` of `journal` at `checkpoint`, read-only.  The export owns the view
    (it pins the checkpoint against promotion until the export is closed)."""
    spec = _volume_spec(journal, volume)
    view = journal.view(checkpoint)
    try:
        backend = ViewBackend(view, spec.id, owns=True)
        ckpt = view.checkpoint
        return Export(name if name is not None else f"{spec.name}@{ckpt.id}", backend,
                      _checkpoint_text(journal, spec.name, ckpt), kind="view")
    except BaseException:
        view.close()
        raise


def scratch_export(journal, checkpoint, volume: int | str, name: str | None = None, *,
                   limit_bytes: int | None = None,
                   directory: str | os.PathLike | None = None) -> Export:
    """Volume `volume` of `journal` at `checkpoint` under a scratch overlay: writable, the
    writes discarded when the export closes; the journal and replica stay untouched."""
    from zcore.recovery import ScratchOverlay

    spec = _volume_spec(journal, volume)
    overlay = ScratchOverlay.open(journal, checkpoint, spec.id, limit_bytes=limit_bytes,
                                  directory=directory)
    ckpt = overlay.checkpoint
    try:
        return Export(name if name is not None else f"{spec.name}@{ckpt.id}-scratch", overlay,
                      "scratch overlay on " + _checkpoint_text(journal, spec.name, ckpt),
                      kind="scratch")
    except BaseException:
        overlay.close()
        raise


def _volume_spec(journal, volume: int | str):
    for spec in journal.volumes.values():
        if volume in (spec.id, spec.name):
            return spec
    raise OutOfRangeError(f"journal {journal.path} has no volume {volume!r}")


def _checkpoint_text(journal, volume_name: str, ckpt) -> str:
    tag = f" {ckpt.tag!r}" if ckpt.tag else ""
    return f"{journal.vm}/{volume_name} at checkpoint {ckpt.id}{tag} ({ckpt.kind})"


# ---- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for the NBD socket, as for replication: the server's certificate chain
    and key (PEM); with `ca`, clients must present a certificate signed by it."""

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_site(cls, directory: str | os.PathLike, *, ca: str | None = None) -> TLSConfig:
        """The site's own identity, the one replication uses (`site.crt` and `site.key`
        of `zcore.security.SiteIdentity`), as the server certificate.  Its only name is
        `zcore.security.SERVER_NAME`: clients trust site.crt as their CA and check that
        name (qemu: `tls-hostname=zcore-site`)."""
        cert = os.path.join(directory, "site.crt")
        key = os.path.join(directory, "site.key")
        for path in (cert, key):
            if not os.path.isfile(path):
                raise ConfigError(f"{directory} holds no site identity ({path} missing)")
        return cls(cert, key, ca)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(cafile=self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS certificates for the NBD server: {exc}") from exc
        return ctx


# ---- buffers ------------------------------------------------------------------------------


class _Buffer:
    """`HEADROOM` bytes for a reply header, then `cap` bytes of data; data is 64-aligned."""

    __slots__ = ("arr", "cap", "data", "mv")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.arr = np.empty(cap + HEADROOM + 64, dtype=np.uint8)  # no zero-fill
        skew = (-(self.arr.ctypes.data + HEADROOM)) % 64
        self.mv = memoryview(self.arr)[skew : skew + HEADROOM + cap]
        self.data = self.mv[HEADROOM:]


class _BufferPool:
    """Free lists of buffers by power-of-two capacity; used from the loop thread only."""

    def __init__(self, cache_bytes: int = POOL_CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self._free: dict[int, list[_Buffer]] = {}
        self._cached = 0

    def get(self, n: int) -> _Buffer:
        cap = max(POOL_MIN, 1 << max(0, n - 1).bit_length())
        free = self._free.get(cap)
        if free:
            self._cached -= cap
            return free.pop()
        return _Buffer(cap)

    def put(self, buf: _Buffer) -> None:
        if self._cached + buf.cap <= self.cache_bytes:
            self._free.setdefault(buf.cap, []).append(buf)
            self._cached += buf.cap


# ---- errors -------------------------------------------------------------------------------


def nbd_errno(exc: BaseException, *, writing: bool = False) -> int:
    """The NBD error value for an exception raised by a backend."""
    if isinstance(exc, ScratchLimitError):
        return ENOSPC
    if isinstance(exc, ClosedError):
        return ESHUTDOWN
    if isinstance(exc, OutOfRangeError):
        return ENOSPC if writing else EINVAL
    if isinstance(exc, AlignmentError | ConfigError):
        return EINVAL
    if isinstance(exc, PermissionError):
        return EPERM
    if isinstance(exc, MemoryError):
        return ENOMEM
    if isinstance(exc, OSError):
        code = exc.errno
        if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            return ENOSPC
        if code in (_errno.EPERM, _errno.EACCES, _errno.EROFS):
            return EPERM
        if code == _errno.ENOMEM:
            return ENOMEM
        return EIO
    if isinstance(exc, ValueError):
        return EINVAL
    return EIO


# ---- one connection -----------------------------------------------------------------------


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(STAGING_BYTES)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._transport: asyncio.BaseTransport | None = None
        self._phase = _HANDSHAKE
        self._waiter: asyncio.Future | None = None
        self._lost = False
        self._tls = False
        self._structured = False
        self._no_zeroes = False
        self.export: Export | None = None
        self._backend: Backend | None = None
        self._size = 0
        self._readonly = True
        self._can_trim = False
        self._out = bytearray()
        self._payload: memoryview | None = None
        self._payload_buf: _Buffer | None = None
        self._payload_filled = 0
        self._pending: tuple[int, int, int] = (0, 0, 0)
        self._discard = 0
        self._discard_reply: tuple[int, int, str] = (0, 0, "")
        self._write_paused = False
        self._task: asyncio.Task | None = None
        self.peer = None

    # -- transport callbacks --

    def connection_made(self, transport) -> None:
        self._transport = transport
        self.peer = transport.get_extra_info("peername")
        server = self.server
        if server._closing or len(server._connections) >= server.max_connections:
            log.warning("nbd: refusing connection from %s (%s)", self.peer,
                        "shutting down" if server._closing else "too many connections")
            self._phase = _CLOSED
            transport.abort()
            return
        server._connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._task = self._loop.create_task(self._handshake())

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._phase = _CLOSED
        self._release_payload()  # a write whose payload did not arrive whole is dropped
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self.server._connections.discard(self)
        if exc is not None:
            log.info("nbd: connection from %s lost: %s", self.peer, exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._phase == _TRANSMISSION and self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._phase == _TRANSMISSION and self._transport is not None:
            self._transport.resume_reading()
            self._loop.call_soon(self._process)

    def get_buffer(self, sizehint: int):
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

    # -- handshake --

    async def _handshake(self) -> None:
        try:
            await asyncio.wait_for(self._negotiate(), self.server.handshake_timeout)
        except TimeoutError:
            log.info("nbd: %s stalled in the handshake; dropped", self.peer)
            self._abort()
        except (ProtocolError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("nbd: handshake with %s ended: %s", self.peer, exc)
            self._abort()
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception:
            log.exception("nbd: handshake with %s failed", self.peer)
            self._abort()

    async def _recv(self, n: int) -> bytes:
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

    async def _skip(self, n: int) -> None:
        while n:
            if self._end == self._start:
                await self._recv(1)
                n -= 1
                continue
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def _opt_reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self._transport.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    def _opt_error(self, option: int, kind: int, message: str) -> None:
        log.debug("nbd: option %d from %s refused: %s", option, self.peer, message)
        self._opt_reply(option, kind, message.encode("utf-8")[:MAX_NAME])

    async def _negotiate(self) -> None:
        server = self.server
        self._transport.write(_HELLO.pack(NBDMAGIC, IHAVEOPT,
                                          FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self._recv(4))
        if cflags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        self._no_zeroes = bool(cflags & CLIENT_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPTION.unpack(await self._recv(_OPTION.size))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                if option == OPT_EXPORT_NAME:
                    raise ProtocolError(f"export name of {length} bytes")
                await self._skip(length)
                self._opt_error(option, REP_ERR_TOO_BIG if option in (OPT_INFO, OPT_GO)
                                else REP_ERR_INVALID, f"option data of {length} bytes is "
                                f"over the {MAX_OPTION_DATA}-byte limit")
                continue
            data = await self._recv(length) if length else b""
            if server._closing and option != OPT_ABORT:
                if option == OPT_EXPORT_NAME:
                    raise ProtocolError("server shutting down")
                self._opt_error(option, REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if server._ssl is not None and not self._tls and option not in (OPT_STARTTLS,
                                                                            OPT_ABORT):
                if option == OPT_EXPORT_NAME:
                    raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS server")
                self._opt_error(option, REP_ERR_TLS_REQD, "this server requires TLS")
                continue
            if option == OPT_EXPORT_NAME:
                name = self._decode_name(data)
                export = server.lookup(name) if name is not None else None
                if export is None:
                    raise ProtocolError(f"no export named {name!r} (NBD_OPT_EXPORT_NAME)")
                self._transport.write(
                    _EXPORT_REPLY.pack(export.size, self._transmission_flags(export))
                    + (b"" if self._no_zeroes else bytes(124))
                )
                self._enter_transmission(export)
                return
            if option in (OPT_GO, OPT_INFO):
                export = self._info(option, data)
                if export is not None and option == OPT_GO:
                    self._enter_transmission(export)
                    return
            elif option == OPT_ABORT:
                self._opt_reply(option, REP_ACK)
                self._close_gracefully()
                return
            elif option == OPT_LIST:
                if length:
                    self._opt_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for export in server.exports():
                    raw = export.name.encode("utf-8")
                    self._opt_reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw
                                    + export.description.encode("utf-8"))
                self._opt_reply(option, REP_ACK)
            elif option == OPT_STRUCTURED_REPLY:
                if length:
                    self._opt_error(option, REP_ERR_INVALID, "takes no data")
                    continue
                self._structured = True
                self._opt_reply(option, REP_ACK)
            elif option == OPT_STARTTLS:
                await self._starttls(length)
            else:
                self._opt_error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        raise ProtocolError(f"more than {MAX_OPTIONS} options")

    async def _starttls(self, length: int) -> None:
        if length:
            self._opt_error(OPT_STARTTLS, REP_ERR_INVALID, "takes no data")
            return
        if self._tls:
            self._opt_error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already running")
            return
        if self.server._ssl is None:
            self._opt_error(OPT_STARTTLS, REP_ERR_POLICY, "TLS is not configured")
            return
        if self._end != self._start:
            raise ProtocolError("client sent data after NBD_OPT_STARTTLS")
        self._opt_reply(OPT_STARTTLS, REP_ACK)
        # TLS buffers its own output: the SSL layer keeps its default flow control and
        # the socket under it the asyncio default (a zero limit there would stall it).
        self._transport.set_write_buffer_limits()
        self._transport = await self._loop.start_tls(
            self._transport, self, self.server._ssl, server_side=True,
            ssl_handshake_timeout=self.server.handshake_timeout,
        )
        self._tls = True

    @staticmethod
    def _decode_name(raw: bytes) -> str | None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\0" in name else name

    def _info(self, option: int, data: bytes) -> Export | None:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; the export when it succeeded."""
        if len(data) < 6:
            self._opt_error(option, REP_ERR_INVALID, "option data too short")
            return None
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            self._opt_error(option, REP_ERR_INVALID, "export name runs past the option")
            return None
        name = self._decode_name(data[4 : 4 + name_len])
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count or name is None:
            self._opt_error(option, REP_ERR_INVALID, "malformed information request")
            return None
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        export = self.server.lookup(name)
        if export is None:
            self._opt_error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._opt_reply(option, REP_INFO, _INFO_EXPORT.pack(
            INFO_EXPORT, export.size, self._transmission_flags(export)))
        if INFO_NAME in wanted:
            self._opt_reply(option, REP_INFO,
                            struct.pack(">H", INFO_NAME) + export.name.encode("utf-8"))
        if INFO_DESCRIPTION in wanted and export.description:
            self._opt_reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                            + export.description.encode("utf-8"))
        self._opt_reply(option, REP_INFO, _INFO_BLOCK.pack(
            INFO_BLOCK_SIZE, SECTOR, PREFERRED_BLOCK, self.server.max_request))
        self._opt_reply(option, REP_ACK)
        return export

    def _transmission_flags(self, export: Export) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN
        if export.readonly:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_WRITE_ZEROES
            if export.can_trim:
                flags |= TF_SEND_TRIM
        if self._structured:
            flags |= TF_SEND_DF
        return flags

    def _enter_transmission(self, export: Export) -> None:
        self.export = export
        self._backend = export.backend
        self._size = export.size
        self._readonly = export.readonly
        self._can_trim = export.can_trim
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
        if self._out and self._phase != _CLOSED:
            self._flush_out()

    def _run_requests(self) -> None:
        buf, mv = self._buf, self._mv
        start, end = self._start, self._end
        max_request = self.server.max_request
        while self._phase == _TRANSMISSION and not self._write_paused:
            if self._discard:
                take = min(self._discard, end - start)
                start += take
                self._discard -= take
                if self._discard:
                    break
                handle, err, message = self._discard_reply
                self._error(handle, CMD_WRITE, err, message)
                continue
            if end - start < REQUEST_SIZE:
                break
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, start)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            start += REQUEST_SIZE
            if cmd != CMD_WRITE:
                self._start, self._end = start, end
                self._request(handle, flags, cmd, offset, length)
                continue
            if length > max_request:
                # too big to take: read past the payload, then refuse it
                self._discard = length
                self._discard_reply = (handle, EOVERFLOW if self._structured else EINVAL,
                                       f"write of {length} bytes is over the "
                                       f"{max_request}-byte limit")
                continue
            if end - start >= length:
                self._start, self._end = start + length, end
                self._write(handle, flags, offset, mv[start : start + length])
                start += length
                continue
            # the payload is still arriving: receive the rest straight into a buffer
            pbuf = self.server._pool.get(length)
            have = end - start
            pbuf.data[:have] = mv[start:end]
            self._payload_buf = pbuf
            self._payload = pbuf.data[:length]
            self._payload_filled = have
            self._pending = (handle, flags, offset)
            start = end = 0
            break
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _finish_payload(self) -> None:
        handle, flags, offset = self._pending
        payload, pbuf = self._payload, self._payload_buf
        self._payload = None
        self._payload_buf = None
        try:
            self._write(handle, flags, offset, payload)
        finally:
            self.server._pool.put(pbuf)

    def _release_payload(self) -> None:
        if self._payload_buf is not None:
            self.server._pool.put(self._payload_buf)
        self._payload = None
        self._payload_buf = None

    def _check(self, flags: int, offset: int, length: int, *, writes: bool) -> tuple[int, str]:
        if flags & ~_KNOWN_CMD_FLAGS:
            return EINVAL, f"unknown command flags {flags:#x}"
        if writes and self._readonly:
            return EPERM, f"export {self.export.name!r} is read-only"
        if offset + length > self._size:
            return (ENOSPC if writes else EINVAL,
                    f"{offset}+{length} passes the export's end ({self._size})")
        if writes and (offset | length) % SECTOR:
            return EINVAL, f"{offset}+{length} is not aligned to {SECTOR}-byte sectors"
        return 0, ""

    def _request(self, handle: int, flags: int, cmd: int, offset: int, length: int) -> None:
        if cmd == CMD_READ:
            self._read(handle, flags, offset, length)
        elif cmd == CMD_FLUSH:
            if flags & ~CMD_FLAG_FUA:
                self._error(handle, cmd, EINVAL, f"unexpected flags {flags:#x} on FLUSH")
                return
            self._run(handle, cmd, self._backend.flush)
        elif cmd == CMD_WRITE_ZEROES:
            err, message = self._check(flags, offset, length, writes=True)
            if not err and flags & CMD_FLAG_FAST_ZERO:
                err, message = ENOTSUP, "fast zeroing is not offered"
            if err:
                self._error(handle, cmd, err, message)
            elif length:
                self._run(handle, cmd, self._backend.write_zeroes, offset, length,
                          fua=bool(flags & CMD_FLAG_FUA))
            else:
                self._ok(handle)
        elif cmd == CMD_TRIM:
            err, message = self._check(flags, offset, length, writes=True)
            if not err and not self._can_trim:
                err, message = EINVAL, "TRIM is not offered on this export"
            if err:
                self._error(handle, cmd, err, message)
            elif length:
                self._run(handle, cmd, self._backend.trim, offset, length,
                          fua=bool(flags & CMD_FLAG_FUA))
            else:
                self._ok(handle)
        elif cmd == CMD_DISC:
            self._close_gracefully()
        else:
            self._error(handle, cmd, EINVAL, f"unknown command {cmd}")

    def _run(self, handle: int, cmd: int, fn, *args, fua: bool = False) -> None:
        try:
            fn(*args)
            if fua:
                self._backend.flush()
        except Exception as exc:
            self._backend_error(handle, cmd, exc)
            return
        self._ok(handle)

    def _write(self, handle: int, flags: int, offset: int, data: memoryview) -> None:
        length = len(data)
        err, message = self._check(flags, offset, length, writes=True)
        if flags & CMD_FLAG_DF:
            err, message = EINVAL, "DF is a flag of READ"
        if err:
            self._error(handle, CMD_WRITE, err, message)
        elif length:
            self._run(handle, CMD_WRITE, self._backend.write, offset, data,
                      fua=bool(flags & CMD_FLAG_FUA))
        else:
            self._ok(handle)

    def _read(self, handle: int, flags: int, offset: int, length: int) -> None:
        err, message = self._check(flags, offset, length, writes=False)
        if not err and length > self.server.max_request:
            err = EOVERFLOW if self._structured else EINVAL
            message = f"read of {length} bytes is over the {self.server.max_request}-byte limit"
        if err:
            self._error(handle, CMD_READ, err, message)
            return
        if length == 0:
            self._ok(handle, read=True)
            return
        a0 = offset - offset % SECTOR
        a1 = -(-(offset + length) // SECTOR) * SECTOR
        pool = self.server._pool
        pbuf = pool.get(a1 - a0)
        try:
            self._backend.read_into(a0, pbuf.data[: a1 - a0])
        except Exception as exc:
            pool.put(pbuf)
            self._backend_error(handle, CMD_READ, exc)
            return
        at = HEADROOM + offset - a0
        if self._structured:
            head = _CHUNK_DATA.size
            _CHUNK_DATA.pack_into(pbuf.mv, at - head, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                  REPLY_TYPE_OFFSET_DATA, handle, length + 8, offset)
        else:
            head = _SIMPLE.size
            _SIMPLE.pack_into(pbuf.mv, at - head, SIMPLE_REPLY_MAGIC, 0, handle)
        frame = pbuf.mv[at - head : at + length]
        if len(frame) <= SMALL_REPLY:
            self._out += frame
            pool.put(pbuf)
            return
        self._flush_out()
        transport = self._transport
        transport.write(frame)
        if transport.get_write_buffer_size() == 0:  # sent whole: no one holds the buffer
            pool.put(pbuf)

    # -- replies --

    def _ok(self, handle: int, *, read: bool = False) -> None:
        if read and self._structured:
            self._out += _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                                     handle, 0)
        else:
            self._out += _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def _error(self, handle: int, cmd: int, err: int, message: str) -> None:
        log.debug("nbd: %s: command %d refused (%d): %s", self.peer, cmd, err, message)
        if self._structured:
            text = message.encode("utf-8")[:MAX_NAME]
            self._out += _CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                           REPLY_TYPE_ERROR, handle, 6 + len(text), err,
                                           len(text)) + text
        else:
            self._out += _SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, handle)

    def _backend_error(self, handle: int, cmd: int, exc: Exception) -> None:
        err = nbd_errno(exc, writing=cmd != CMD_READ)
        if err == EIO:
            log.error("nbd: export %r: command %d failed: %r", self.export.name, cmd, exc)
        self._error(handle, cmd, err, str(exc) or type(exc).__name__)

    def _flush_out(self) -> None:
        if self._out:
            out, self._out = self._out, bytearray()  # the transport may keep a reference
            self._transport.write(out)

    # -- ending --

    def _close_gracefully(self) -> None:
        """Send what is queued, then close (NBD_CMD_DISC, NBD_OPT_ABORT, shutdown)."""
        if self._phase == _CLOSED:
            return
        self._flush_out()
        self._phase = _CLOSED
        self._release_payload()
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        """Hard disconnect: nothing more is sent or applied."""
        self._phase = _CLOSED
        self._release_payload()
        self._out = bytearray()
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._phase == _TRANSMISSION:
            self._close_gracefully()
        else:
            self._abort()


# ---- the server ---------------------------------------------------------------------------


class NBDServer:
    """Serves `exports` on TCP and Unix sockets from the running asyncio loop.

    `await start_tcp()` / `await start_unix(path)` listen (several listeners may run at
    once); `uris()` lists the nbd:// URIs; `await close()` drops every connection and closes
    the exports the server owns.  `ServerThread` runs one in a background thread."""

    def __init__(
        self,
        exports: Iterable[Export] = (),
        *,
        tls: TLSConfig | None = None,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        default_export: str | None = None,
    ) -> None:
        if max_request % PREFERRED_BLOCK or not PREFERRED_BLOCK <= max_request <= MAX_REQUEST_LIMIT:
            raise ConfigError(f"max request {max_request} must be a multiple of "
                              f"{PREFERRED_BLOCK} between {PREFERRED_BLOCK} and "
                              f"{MAX_REQUEST_LIMIT}")
        if max_connections < 1 or handshake_timeout <= 0:
            raise ConfigError("max_connections and handshake_timeout must be positive")
        self.tls = tls
        self._ssl = tls.server_context() if tls is not None else None
        self.max_request = max_request
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.default_export = default_export
        self._exports: dict[str, Export] = {}
        self._pool = _BufferPool()
        self._listeners: list[asyncio.AbstractServer] = []
        self._addresses: list[tuple] = []
        self._connections: set[_Connection] = set()
        self._closing = False
        for export in exports:
            self.add_export(export)

    # -- exports --

    def add_export(self, export: Export) -> Export:
        if export.name in self._exports:
            raise ConfigError(f"export {export.name!r} already exists")
        self._exports[export.name] = export
        return export

    def remove_export(self, name: str) -> None:
        """Drop an export: its connections are disconnected, an owned backend closed."""
        export = self._exports.pop(name)
        for conn in list(self._connections):
            if conn.export is export:
                conn.shutdown()
        if export.owned:
            export.backend.close()

    def exports(self) -> list[Export]:
        return list(self._exports.values())

    def lookup(self, name: str) -> Export | None:
        export = self._exports.get(name)
        if export is None and name == "":
            if self.default_export is not None:
                return self._exports.get(self.default_export)
            if len(self._exports) == 1:
                return next(iter(self._exports.values()))
        return export

    # -- listening --

    async def start_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on TCP (loopback by default); returns the bound (host, port)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(lambda: _Connection(self), host, port,
                                            reuse_address=True)
        self._listeners.append(listener)
        bound = listener.sockets[0].getsockname()[:2]
        self._addresses.append(("tcp", bound[0], bound[1]))
        return bound[0], bound[1]

    async def start_unix(self, path: str | os.PathLike) -> str:
        """Listen on a Unix socket at `path` (replacing a stale socket file)."""
        loop = asyncio.get_running_loop()
        path = os.fspath(path)
        listener = await loop.create_unix_server(lambda: _Connection(self), path)
        self._listeners.append(listener)
        self._addresses.append(("unix", path))
        return path

    def uri(self, export: str, listener: int = 0) -> str:
        """nbd:// URI of `export` on the `listener`-th listener (nbds:// with TLS)."""
        address = self._addresses[listener]
        scheme = "nbds" if self._ssl is not None else "nbd"
        name = urllib.parse.quote(export, safe="")
        if address[0] == "unix":
            return f"{scheme}+unix:///{name}?socket={urllib.parse.quote(address[1])}"
        host = address[1]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{address[2]}/{name}"

    def uris(self) -> list[str]:
        return [self.uri(e, i) for i in range(len(self._addresses)) for e in self._exports]

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, disconnect every client, close the owned exports."""
        if self._closing:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.shutdown()
        for listener in self._listeners:
            await listener.wait_closed()
        await asyncio.sleep(0)
        for address in self._addresses:
            if address[0] == "unix":
                try:
                    os.unlink(address[1])
                except FileNotFoundError:
                    pass
        for export in self._exports.values():
            if export.owned:
                try:
                    export.backend.close()
                except Exception:
                    log.exception("nbd: closing export %r failed", export.name)


class ServerThread:
    """An `NBDServer` on its own event loop in a background thread: for the CLI, tools
    and tests.  `start()` returns once it listens; `stop()` closes it and its exports."""

    def __init__(self, server: NBDServer, *, host: str | None = "127.0.0.1", port: int = 0,
                 unix: str | os.PathLike | None = None) -> None:
        self.server = server
        self._host, self._port, self._unix = host, port, unix
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> ServerThread:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                if self._host is not None:
                    self.address = loop.run_until_complete(
                        self.server.start_tcp(self._host, self._port))
                if self._unix is not None:
                    loop.run_until_complete(self.server.start_unix(self._unix))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="zcore-nbd", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def call(self, fn, *args):
        """Run `fn(*args)` on the server's loop thread and return its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def uri(self, export: str, listener: int = 0) -> str:
        return self.server.uri(export, listener)

    def uris(self) -> list[str]:
        return self.server.uris()

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
