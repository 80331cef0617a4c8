"""The NBD handshake: fixed newstyle negotiation, its options and STARTTLS.

Sits between the connection (`zcore.nbd.connection`, which owns the socket and hands
this module a `HandshakeChannel`) and transmission: `Negotiation.run` reads the client's
options until one of them selects an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or ends
the handshake (NBD_OPT_ABORT).  Options handled: EXPORT_NAME, GO, INFO, LIST, ABORT,
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT (one context: `base:allocation`,
which NBD_CMD_BLOCK_STATUS answers) and STARTTLS (mandatory when the server has TLS).

Hostile clients: option data is bounded before it is read (`MAX_OPTION_DATA`), a
handshake has at most `MAX_OPTIONS` options, and bad magic, unknown client flags or an
export name that cannot be answered by an error reply raise `ProtocolError` (the caller
drops the connection).
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from zcore.errors import ConfigError, ProtocolError
from zcore.nbd.exports import Export
from zcore.nbd.protocol import (
    CLIENT_FIXED_NEWSTYLE,
    CLIENT_NO_ZEROES,
    EXPORT_REPLY,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    HELLO,
    IHAVEOPT,
    INFO_BLOCK_REPLY,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_EXPORT_REPLY,
    INFO_NAME,
    MAX_NAME,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    META_BASE_ALLOCATION,
    META_BASE_ALLOCATION_ID,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION,
    PREFERRED_BLOCK,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    SECTOR,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_DF,
    TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)

if TYPE_CHECKING:
    from zcore.nbd.server import NBDServer

log = logging.getLogger("zcore.nbd")


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for the NBD socket, as for replication: the server's certificate chain
    and key (PEM); with `ca`, clients must present a certificate signed by it."""

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_site(cls, directory: str | os.PathLike[str], *,
                  ca: str | None = None) -> TLSConfig:
        """The site's own identity, the one replication uses (`site.crt` and `site.key`
        of `zcore.security.SiteIdentity`), as the server certificate.  Its only name is
        `zcore.security.SERVER_NAME`: clients trust site.crt as their CA and check that
        name (qemu: `tls-hostname=zcore-site`)."""
        cert = os.path.join(directory, "site.crt")
        key = os.path.join(directory, "site.key")
        for path in (cert, key):
            if not os.path.isfile(path):
                raise ConfigError(f"{os.fspath(directory)} holds no site identity "
                                  f"({path} missing)")
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


class HandshakeChannel(Protocol):
    """The socket as negotiation sees it (implemented by the connection)."""

    async def recv(self, n: int) -> bytes:
        """Exactly `n` bytes; raises `ConnectionError` when the client goes away."""

    async def skip(self, n: int) -> None:
        """Read and drop `n` bytes."""

    def send(self, data: bytes) -> None:
        """Queue `data` for the client."""

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""

    async def start_tls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        """Upgrade the socket to TLS (server side)."""


def transmission_flags(export: Export, structured: bool) -> int:
    """The transmission flags a client is told for `export`.

    NBD_FLAG_CAN_MULTI_CONN on every export: all connections to an export share its one
    backend, every write is applied before its reply, and FLUSH flushes the backend, not
    the connection.  So a FLUSH on any connection covers the writes every connection has
    completed: one fdatasync of the one descriptor of a file or protected volume (page
    cache is per file), a durable overlay's `flush` of every pending map record; views
    take no writes and scratch overlays promise no durability, their writes seen by every
    connection at once (tests/test_nbd_sparse.py)."""
    flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN
    if export.readonly:
        flags |= TF_READ_ONLY
    else:
        flags |= TF_SEND_FUA | TF_SEND_WRITE_ZEROES
        if export.can_trim:
            flags |= TF_SEND_TRIM
        if export.can_fast_zero:
            flags |= TF_SEND_FAST_ZERO
    if structured:
        flags |= TF_SEND_DF
    return flags


def decode_name(raw: bytes) -> str | None:
    """An export name from the wire; None when it is not UTF-8 or holds a NUL."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in name else name


def context_matches(query: str) -> bool:
    """Whether a metadata context query names (or, as `base:`, lists) base:allocation."""
    return query in (META_BASE_ALLOCATION, "base:")


def parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a metadata context option's data; None when it is
    malformed (lengths running past the data, names that are not UTF-8 or hold a NUL)."""
    if len(data) < 8:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if name_len > len(data) - 8:
        return None
    name = decode_name(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if len(data) - pos < 4:
            return None
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if n > len(data) - pos:
            return None
        query = decode_name(data[pos : pos + n])
        if query is None:
            return None
        queries.append(query)
        pos += n
    if pos != len(data) or name is None:
        return None
    return name, queries


class Negotiation:
    """One client's handshake.  After `run`, `structured` says whether structured replies
    were agreed and `allocation` whether base:allocation was selected for the export."""

    def __init__(self, server: NBDServer, channel: HandshakeChannel, peer: object) -> None:
        self.server = server
        self.channel = channel
        self.peer = peer
        self.structured = False
        self.allocation = False
        self._meta_export: str | None = None  # the export SET_META_CONTEXT selected for
        self.no_zeroes = False
        self.tls = False
        self._done = False
        self._export: Export | None = None

    async def run(self) -> Export | None:
        """Negotiate; the export the client selected, or None after NBD_OPT_ABORT (which
        has been acknowledged: the caller closes gracefully).  Raises `ProtocolError` (and
        `ConnectionError`, `ssl.SSLError`) when the connection must be dropped."""
        channel = self.channel
        channel.send(HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await channel.recv(4))
        if cflags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & CLIENT_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = OPTION.unpack(await channel.recv(OPTION.size))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                await self._refuse_oversized(option, length)
                continue
            data = await channel.recv(length) if length else b""
            if self._admitted(option):
                await self._option(option, data)
                if self._done:
                    return self._export
        raise ProtocolError(f"more than {MAX_OPTIONS} options")

    # -- replies --

    def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.channel.send(OPT_REPLY.pack(OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    def _error(self, option: int, kind: int, message: str) -> None:
        log.debug("nbd: option %d from %s refused: %s", option, self.peer, message)
        self._reply(option, kind, message.encode("utf-8")[:MAX_NAME])

    # -- gates every option passes --

    async def _refuse_oversized(self, option: int, length: int) -> None:
        if option == OPT_EXPORT_NAME:
            raise ProtocolError(f"export name of {length} bytes")
        await self.channel.skip(length)
        self._error(option, REP_ERR_TOO_BIG if option in (OPT_INFO, OPT_GO) else REP_ERR_INVALID,
                    f"option data of {length} bytes is over the {MAX_OPTION_DATA}-byte limit")

    def _admitted(self, option: int) -> bool:
        """False (the option refused) while shutting down, or before STARTTLS on a TLS
        server; EXPORT_NAME cannot be refused by a reply, so it raises instead."""
        if self.server.closing and option != OPT_ABORT:
            if option == OPT_EXPORT_NAME:
                raise ProtocolError("server shutting down")
            self._error(option, REP_ERR_SHUTDOWN, "server is shutting down")
            return False
        if (self.server.ssl_context is not None and not self.tls
                and option not in (OPT_STARTTLS, OPT_ABORT)):
            if option == OPT_EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS server")
            self._error(option, REP_ERR_TLS_REQD, "this server requires TLS")
            return False
        return True

    # -- the options --

    async def _option(self, option: int, data: bytes) -> None:
        if option == OPT_EXPORT_NAME:
            self._export_name(data)
        elif option in (OPT_GO, OPT_INFO):
            export = self._info(option, data)
            if export is not None and option == OPT_GO:
                self._finish(export)
        elif option == OPT_ABORT:
            self._reply(option, REP_ACK)
            self._finish(None)
        elif option == OPT_LIST:
            self._list(data)
        elif option == OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, REP_ERR_INVALID, "takes no data")
                return
            self.structured = True
            self._reply(option, REP_ACK)
        elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == OPT_STARTTLS:
            await self._starttls(len(data))
        else:
            self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")

    def _finish(self, export: Export | None) -> None:
        self._done = True
        self._export = export
        # contexts selected for another export (or none) do not carry over (doc/proto.md)
        self.allocation = (export is not None and self.structured
                           and self._meta_export == export.name)

    def _meta_context(self, option: int, data: bytes) -> None:
        """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name, then queries;
        one REP_META_CONTEXT for base:allocation when a query matches (LIST with no query
        lists it), then REP_ACK.  SET needs structured replies and replaces the selection
        (a failed SET leaves none)."""
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self._meta_export = None
            if not self.structured:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs "
                            "structured replies (NBD_OPT_STRUCTURED_REPLY) first")
                return
        parsed = parse_meta_request(data)
        if parsed is None:
            self._error(option, REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        export = self.server.lookup(name)
        if export is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        matched = export.can_block_status and (any(context_matches(q) for q in queries)
                                               or (not setting and not queries))
        if matched:
            raw = META_BASE_ALLOCATION.encode()
            self._reply(option, REP_META_CONTEXT,
                        struct.pack(">I", META_BASE_ALLOCATION_ID) + raw)
        if setting:
            self._meta_export = name if matched else None
        self._reply(option, REP_ACK)

    def _export_name(self, data: bytes) -> None:
        name = decode_name(data)
        export = self.server.lookup(name) if name is not None else None
        if export is None:
            raise ProtocolError(f"no export named {name!r} (NBD_OPT_EXPORT_NAME)")
        self.channel.send(EXPORT_REPLY.pack(export.size, transmission_flags(export,
                                                                            self.structured))
                          + (b"" if self.no_zeroes else bytes(124)))
        self._finish(export)

    def _list(self, data: bytes) -> None:
        if data:
            self._error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for export in self.server.exports():
            raw = export.name.encode("utf-8")
            self._reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(raw)) + raw
                        + export.description.encode("utf-8"))
        self._reply(OPT_LIST, REP_ACK)

    async def _starttls(self, length: int) -> None:
        ctx = self.server.ssl_context
        if length:
            self._error(OPT_STARTTLS, REP_ERR_INVALID, "takes no data")
            return
        if self.tls:
            self._error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already running")
            return
        if ctx is None:
            self._error(OPT_STARTTLS, REP_ERR_POLICY, "TLS is not configured")
            return
        if self.channel.buffered():
            raise ProtocolError("client sent data after NBD_OPT_STARTTLS")
        self._reply(OPT_STARTTLS, REP_ACK)
        await self.channel.start_tls(ctx, self.server.handshake_timeout)
        self.tls = True

    def _info(self, option: int, data: bytes) -> Export | None:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; the export when it succeeded."""
        if len(data) < 6:
            self._error(option, REP_ERR_INVALID, "option data too short")
            return None
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            self._error(option, REP_ERR_INVALID, "export name runs past the option")
            return None
        name = decode_name(data[4 : 4 + name_len])
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count or name is None:
            self._error(option, REP_ERR_INVALID, "malformed information request")
            return None
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        export = self.server.lookup(name)
        if export is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._reply(option, REP_INFO, INFO_EXPORT_REPLY.pack(
            INFO_EXPORT, export.size, transmission_flags(export, self.structured)))
        if INFO_NAME in wanted:
            self._reply(option, REP_INFO,
                        struct.pack(">H", INFO_NAME) + export.name.encode("utf-8"))
        if INFO_DESCRIPTION in wanted and export.description:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                        + export.description.encode("utf-8"))
        self._reply(option, REP_INFO, INFO_BLOCK_REPLY.pack(
            INFO_BLOCK_SIZE, SECTOR, PREFERRED_BLOCK, self.server.max_request))
        self._reply(option, REP_ACK)
        return export
