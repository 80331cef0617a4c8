"""The protected site's bandwidth cap: one `Throttle` per site, shared by every VPG's
sender (zcore.replication.sender), which acquires each bundle's encoded size before
writing it to the link."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from zcore.errors import ConfigError

PRIORITY_WEIGHTS = {"high": 4, "medium": 2, "low": 1}


class Throttle:
    """Site-wide bandwidth cap shared by VPG priority (weights high 4, medium 2, low 1):
    weighted fair queuing over a token bucket.  `rate` None means unlimited."""

    def __init__(self, rate_bytes: float | None = None) -> None:
        self.rate = rate_bytes
        self._tokens = 0.0
        self._last = time.monotonic()
        # (finish tag, arrival order, bytes, waiter)
        self._heap: list[tuple[float, int, int, asyncio.Future[None]]] = []
        self._vtime = 0.0
        self._finish = dict.fromkeys(PRIORITY_WEIGHTS, 0.0)
        self._count = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def set_rate(self, rate_bytes: float | None) -> None:
        if rate_bytes is not None and rate_bytes <= 0:
            raise ConfigError("throttle rate must be positive (or None for no limit)")
        self.rate = rate_bytes

    async def acquire(self, nbytes: int, priority: str) -> None:
        """Wait until `nbytes` may be sent at `priority` ("high", "medium" or "low")."""
        if self.rate is None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tag = max(self._vtime, self._finish[priority]) + nbytes / PRIORITY_WEIGHTS[priority]
        self._finish[priority] = tag
        heapq.heappush(self._heap, (tag, next(self._count), nbytes, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._grant())
        await fut

    async def _grant(self) -> None:
        while self._heap:
            rate = self.rate
            if rate is None:
                while self._heap:
                    _, _, _, fut = heapq.heappop(self._heap)
                    if not fut.done():
                        fut.set_result(None)
                return
            now = time.monotonic()
            burst = rate * 0.05
            self._tokens = min(burst, self._tokens + (now - self._last) * rate)
            self._last = now
            tag, _, nbytes, fut = self._heap[0]
            if self._tokens > 0:  # a grant may overdraw: big bundles still pass
                heapq.heappop(self._heap)
                self._tokens -= nbytes
                self._vtime = tag
                if not fut.done():
                    fut.set_result(None)
            else:
                await asyncio.sleep(-self._tokens / rate + 0.001)
