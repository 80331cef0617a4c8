"""A fault-injecting TCP proxy on loopback, for replication tests (no tests here).

`FaultProxy(target)` listens on 127.0.0.1 and forwards every accepted connection to
`target`.  Each direction of each connection ("up": client to server, "down": server to
client) is a reader thread and a writer thread joined by a bounded queue, so the proxy
can hold, delay and alter bytes without losing TCP backpressure for long.

Faults:

- `arm(Fault(...))`: a one-shot fault on the current connection (or the next one when
  none is open), triggered after `after` more bytes in its direction:
    "cut"    forward exactly `after` bytes, then close both sides (FIN): mid-frame
    "reset"  forward exactly `after` bytes, then reset both sides (RST)
    "drop"   forward `after` bytes, then silently drop the next `count` bytes
    "flip"   forward `after` bytes, then flip one bit of the next byte (`bit`)
    "stall"  forward `after` bytes, then hold the direction for `seconds`
- `delay(seconds)`: every chunk is forwarded `seconds` after it arrived (latency).
- `stall()` / `unstall()`: hold every byte in both directions (connections stay open).
- `refuse(True)`: new connections are reset at once (the link is down); `False` heals.
- `reset_all()` / `cut_all()`: end every open connection now.
- `heal()`: clear every armed fault, stall, delay and refusal.

The proxy is threaded (blocking sockets) so it keeps working while the test's event loop
is busy in synchronous calls.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

CHUNK = 64 << 10
# Bytes a direction may hold between its reader and writer before the reader stops
# reading (then TCP pushes back on the sender).
QUEUE_BYTES = 4 << 20
DIRECTIONS = ("up", "down")
KINDS = ("cut", "reset", "drop", "flip", "stall")


@dataclass
class Fault:
    kind: str  # one of KINDS
    direction: str = "up"  # "up" (client -> server) or "down"
    after: int = 0  # bytes forwarded before the fault fires
    count: int = 1  # "drop": bytes dropped
    bit: int = 0  # "flip": which bit of the byte
    seconds: float = 0.0  # "stall": how long

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}")
        if self.after < 0 or self.count < 1 or not 0 <= self.bit < 8:
            raise ValueError(f"bad fault {self}")


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _fin(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Direction:
    """One direction of a connection: src -> queue -> dst, with its armed faults."""

    def __init__(self, link: _Link, name: str, src: socket.socket, dst: socket.socket):
        self.link = link
        self.name = name
        self.src = src
        self.dst = dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.eof = False
        self.forwarded = 0  # bytes that left the proxy (or were dropped) this way
        self.faults: list[tuple[int, Fault]] = []  # (absolute trigger position, fault)
        self.stalled_until = 0.0

    def arm(self, fault: Fault) -> None:
        with self.cond:
            self.faults.append((self.forwarded + fault.after, fault))
            self.faults.sort(key=lambda x: x[0])
            self.cond.notify_all()

    def read_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.queued >= QUEUE_BYTES and not self.link.closed:
                        self.cond.wait(0.1)
                if self.link.closed:
                    return
                data = self.src.recv(CHUNK)
                if not data:
                    break
                with self.cond:
                    self.queue.append((time.monotonic(), data))
                    self.queued += len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _next(self) -> bytes | None:
        """The next chunk once its delay has passed and no stall holds it (None: done)."""
        proxy = self.link.proxy
        with self.cond:
            while True:
                if self.link.closed:
                    return None
                now = time.monotonic()
                hold = max(self.stalled_until, proxy._stalled_until) - now
                if proxy._stalled:
                    hold = max(hold, 0.05)
                if self.queue and hold <= 0:
                    t, data = self.queue[0]
                    wait = t + proxy._delay - now
                    if wait <= 0:
                        self.queue.popleft()
                        self.queued -= len(data)
                        self.cond.notify_all()
                        return data
                    hold = wait
                elif not self.queue:
                    if self.eof:
                        return None
                    hold = 0.1 if hold <= 0 else hold
                self.cond.wait(min(hold, 0.1))

    def write_loop(self) -> None:
        try:
            while True:
                data = self._next()
                if data is None:
                    break
                if not self._forward(data):
                    return
        except OSError:
            pass
        self.link.close()

    def _forward(self, data: bytes) -> bool:
        """Send `data`, firing armed faults at their positions; False ends the link."""
        while data:
            with self.cond:
                pos, fault = self.faults[0] if self.faults else (None, None)
            if fault is None or pos >= self.forwarded + len(data):
                self.dst.sendall(data)
                self.forwarded += len(data)
                return True
            head = pos - self.forwarded
            if head > 0:
                self.dst.sendall(data[:head])
                self.forwarded += head
                data = data[head:]
            with self.cond:
                self.faults.pop(0)
            self.link.proxy._fired.append((self.name, fault))
            if fault.kind == "cut":
                self.link.close()
                return False
            if fault.kind == "reset":
                self.link.close(reset=True)
                return False
            if fault.kind == "drop":
                n = min(fault.count, len(data))
                data = data[n:]
                self.forwarded += n
                if fault.count > n:  # keep dropping in the next chunk
                    rest = Fault("drop", fault.direction, 0, fault.count - n)
                    with self.cond:
                        self.faults.insert(0, (self.forwarded, rest))
            elif fault.kind == "flip":
                data = bytes([data[0] ^ (1 << fault.bit)]) + data[1:]
                self.dst.sendall(data[:1])
                self.forwarded += 1
                data = data[1:]
            elif fault.kind == "stall":
                with self.cond:
                    self.stalled_until = time.monotonic() + fault.seconds
                # re-queue the rest in front so the stall applies to it
                with self.cond:
                    self.queue.appendleft((0.0, data))
                    self.queued += len(data)
                return True
        return True


class _Link:
    """One proxied connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket):
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = False
        self.reset = False
        self._lock = threading.Lock()
        self.up = _Direction(self, "up", client, server)
        self.down = _Direction(self, "down", server, client)
        self.threads = [
            threading.Thread(target=d.read_loop if r else d.write_loop, daemon=True,
                             name=f"faultproxy-{d.name}-{'r' if r else 'w'}")
            for d in (self.up, self.down) for r in (True, False)
        ]

    def direction(self, name: str) -> _Direction:
        return self.up if name == "up" else self.down

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self, reset: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.reset = reset
        for d in (self.up, self.down):
            with d.cond:
                d.cond.notify_all()
        for s in (self.client, self.server):
            (_rst if reset else _fin)(s)


class FaultProxy:
    """See the module docstring.  Use as a context manager or call `close()`."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.links: list[_Link] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._pending: list[Fault] = []  # armed with no open connection: for the next
        self._fired: list[tuple[str, Fault]] = []
        self._delay = 0.0
        self._stalled = False
        self._stalled_until = 0.0
        self._refusing = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="faultproxy-accept")
        self._thread.start()

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def fired(self) -> list[tuple[str, Fault]]:
        """(direction, fault) of every fault that fired, in order."""
        return list(self._fired)

    def open_links(self) -> list[_Link]:
        with self._lock:
            return [link for link in self.links if not link.closed]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._refusing:
                _rst(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _rst(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._lock:
                self.links = [x for x in self.links if not x.closed]
                self.links.append(link)
                pending, self._pending = self._pending, []
            for fault in pending:
                link.direction(fault.direction).arm(fault)
            link.start()

    # ---- controls -----------------------------------------------------------------------

    def arm(self, fault: Fault) -> None:
        """Fire `fault` on the newest open connection, or on the next one accepted."""
        with self._lock:
            live = [x for x in self.links if not x.closed]
            if not live:
                self._pending.append(fault)
                return
            link = live[-1]
        link.direction(fault.direction).arm(fault)

    def armed(self) -> int:
        """Faults armed that have not fired yet (on open connections or pending)."""
        with self._lock:
            n = len(self._pending)
            links = [x for x in self.links if not x.closed]
        return n + sum(len(d.faults) for x in links for d in (x.up, x.down))

    def delay(self, seconds: float) -> None:
        self._delay = max(0.0, seconds)
        self._wake()

    def stall(self, seconds: float | None = None) -> None:
        """Hold every byte (for `seconds`, or until `unstall`)."""
        if seconds is None:
            self._stalled = True
        else:
            self._stalled_until = time.monotonic() + seconds
        self._wake()

    def unstall(self) -> None:
        self._stalled = False
        self._stalled_until = 0.0
        self._wake()

    def refuse(self, on: bool = True) -> None:
        self._refusing = on

    def reset_all(self) -> None:
        for link in self.open_links():
            link.close(reset=True)

    def cut_all(self) -> None:
        for link in self.open_links():
            link.close()

    def heal(self) -> None:
        """Clear every fault: armed ones, stalls, delay and refusal."""
        with self._lock:
            self._pending.clear()
            links = list(self.links)
        for link in links:
            for d in (link.up, link.down):
                with d.cond:
                    d.faults.clear()
                    d.stalled_until = 0.0
        self._delay = 0.0
        self._refusing = False
        self.unstall()

    def _wake(self) -> None:
        with self._lock:
            links = list(self.links)
        for link in links:
            for d in (link.up, link.down):
                with d.cond:
                    d.cond.notify_all()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(2)
        for link in list(self.links):
            link.close(reset=True)
        for link in list(self.links):
            for t in link.threads:
                t.join(2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
