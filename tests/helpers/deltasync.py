"""Delta-sync test helpers: an in-memory volume that can lose its unflushed writes, and a
synchronous pump that carries frames between a DeltaSource and a DeltaTarget (every
frame re-parsed from its bytes, as the transport would), with crash and tamper hooks."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from zcore import wire
from zcore.deltasync import MAX_DSYNC_FRAME, DeltaSource, DeltaTarget


class MemVolume:
    """A volume in memory.  `pwrite` lands in `data` at once but stays pending until
    `flush`; `crash(rng)` keeps a random subset of the pending writes (a power loss)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.durable = bytearray(data)
        self.pending: list[tuple[int, bytes]] = []
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        assert 0 <= offset and offset + len(view) <= self.size
        view[:] = self.data[offset : offset + len(view)]
        self.bytes_read += len(view)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert 0 <= offset and offset + len(data) <= self.size, (offset, len(data))
        self.data[offset : offset + len(data)] = data
        self.pending.append((offset, bytes(data)))

    def flush(self) -> None:
        self.durable[:] = self.data
        self.pending.clear()

    def crash(self, rng: random.Random) -> None:
        image = bytearray(self.durable)
        for offset, data in self.pending:
            if rng.random() < 0.5:
                image[offset : offset + len(data)] = data
        self.data[:] = image
        self.durable[:] = image
        self.pending.clear()


class Stalled(Exception):
    """Neither side has anything to send and the sync has not ended."""


class Crashed(Exception):
    """The pump stopped after `crash_after` deliveries."""


def frames(buf: bytes) -> list[wire.Frame]:
    return wire.FrameReader(MAX_DSYNC_FRAME).feed(buf)


Tamper = Callable[[str, wire.Frame], "list[bytes] | None"]


def pump(source: DeltaSource, target: DeltaTarget, *, rng: random.Random | None = None,
         crash_after: int | None = None, tamper: Tamper | None = None) -> int:
    """Run a sync to its end; returns the number of frames delivered.  `tamper(direction,
    frame)` ("to_target"/"to_source") may return replacement frame bytes (None: keep)."""
    rng = rng or random.Random(0)
    to_target: deque[wire.Frame] = deque(frames(source.offer()))
    to_source: deque[wire.Frame] = deque()

    def deliver(direction: str, queue: deque[wire.Frame], out: list[bytes]) -> None:
        for buf in out:
            for f in frames(buf):
                replaced = tamper(direction, f) if tamper else None
                if replaced is None:
                    queue.append(f)
                else:
                    for r in replaced:
                        queue.extend(frames(r))

    deliver("to_source", to_source, [target.on_offer(to_target.popleft())])
    steps = 0
    while not (source.done and target.done):
        if crash_after is not None and steps >= crash_after:
            raise Crashed
        steps += 1
        if target.wants_hashing() and rng.random() < 0.7:
            deliver("to_source", to_source, [target.next_hashes()])
        elif to_source and (not to_target or rng.random() < 0.5):
            deliver("to_target", to_target, source.on_frame(to_source.popleft()))
        elif to_target:
            deliver("to_source", to_source, target.on_frame(to_target.popleft()))
        elif not target.wants_hashing():
            raise Stalled
    return steps
