"""The NBD server: its exports, its listeners (TCP and Unix sockets) and the registry of
its connections, on one asyncio event loop; `ServerThread` runs one in a background
thread for the CLI, tools and tests.

One event loop carries every connection (`zcore.nbd.connection`); the server bounds
their number and closes them, and the exports it owns, when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from zcore.errors import ConfigError
from zcore.nbd.connection import NBDClientConnection
from zcore.nbd.exports import Export
from zcore.nbd.negotiation import TLSConfig
from zcore.nbd.protocol import (
    DEFAULT_MAX_REQUEST,
    DEFAULT_PORT,
    MAX_REQUEST_LIMIT,
    PREFERRED_BLOCK,
)
from zcore.nbd.transmission import BufferPool

log = logging.getLogger("zcore.nbd")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HANDSHAKE_TIMEOUT = 30.0

T = TypeVar("T")

# A listener's address: ("tcp", host, port) or ("unix", path).
Address = tuple[Any, ...]


@dataclass(frozen=True)
class ConnectionInfo:
    """One client connection as the server sees it (see `NBDServer.connection_info`)."""

    peer: object
    export: str | None
    queued_reply_bytes: int


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
        self._pool = BufferPool()
        self._listeners: list[asyncio.AbstractServer] = []
        self._addresses: list[Address] = []
        self._connections: set[NBDClientConnection] = set()
        # backend calls in worker threads (FLUSHes, blocking reads), by the export they use
        self._syncs: dict[asyncio.Future[None], Export] = {}
        self._closing = False
        for export in exports:
            self.add_export(export)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's `ssl.SSLContext` when TLS is configured (then mandatory), else None."""
        return self._ssl

    @property
    def closing(self) -> bool:
        """True once `close` has begun: new connections and options are refused."""
        return self._closing

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
            self._close_backend(export)

    def _close_backend(self, export: Export) -> None:
        """Close an owned backend now, or when the syncs running on it have ended."""
        pending = [fut for fut, e in self._syncs.items() if e is export]
        if not pending:
            export.backend.close()
            return
        gathered = asyncio.gather(*pending, return_exceptions=True)
        gathered.add_done_callback(lambda _: export.backend.close())

    def run_sync(self, export: Export) -> asyncio.Future[None]:
        """`export.backend.flush()` in a worker thread (FLUSH, FUA)."""
        return self.run_blocking(export, export.backend.flush)

    def run_blocking(self, export: Export, fn: Callable[..., None],
                     *args: Any) -> asyncio.Future[None]:
        """`fn(*args)`, a call on `export`'s backend, in a worker thread (a sync, or a read
        of an export with `blocking_reads`); the backend is not closed before it ends."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._syncs[fut] = export
        fut.add_done_callback(self._sync_ended)
        return fut

    def _sync_ended(self, fut: asyncio.Future[None]) -> None:
        del self._syncs[fut]

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

    # -- connections --

    def register_connection(self, conn: NBDClientConnection) -> str | None:
        """Admit a new connection; the reason it is refused, or None (for connections)."""
        if self._closing:
            return "shutting down"
        if len(self._connections) >= self.max_connections:
            return "too many connections"
        self._connections.add(conn)
        return None

    def unregister_connection(self, conn: NBDClientConnection) -> None:
        self._connections.discard(conn)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def connection_info(self) -> list[ConnectionInfo]:
        """Every open connection (call on the server's loop thread)."""
        return [ConnectionInfo(conn.peer, conn.export.name if conn.export else None,
                               conn.queued_reply_bytes) for conn in self._connections]

    # -- listening --

    async def start_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on TCP (loopback by default); returns the bound (host, port)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(self._new_connection, host, port,
                                            reuse_address=True)
        self._listeners.append(listener)
        bound = listener.sockets[0].getsockname()[:2]
        self._addresses.append(("tcp", bound[0], bound[1]))
        return bound[0], bound[1]

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a Unix socket at `path` (replacing a stale socket file)."""
        loop = asyncio.get_running_loop()
        path = os.fspath(path)
        listener = await loop.create_unix_server(self._new_connection, path)
        self._listeners.append(listener)
        self._addresses.append(("unix", path))
        return path

    def _new_connection(self) -> NBDClientConnection:
        return NBDClientConnection(self, self._pool)

    @property
    def addresses(self) -> list[Address]:
        """The listeners' addresses in the order they started: ("tcp", host, port) or
        ("unix", path)."""
        return list(self._addresses)

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
        if self._syncs:  # no backend closes under a running fdatasync
            await asyncio.gather(*self._syncs, return_exceptions=True)
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
                 unix: str | os.PathLike[str] | None = None) -> None:
        self.server = server
        self._host, self._port, self._unix = host, port, unix
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> ServerThread:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(ready, failure),
                                        name="zcore-nbd", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
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

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the server's loop thread and return its result."""
        async def run() -> T:
            return fn(*args)
        assert self._loop is not None, "the server thread is not running"
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

    def __exit__(self, *exc: object) -> None:
        self.stop()
