"""What every benchmark suite shares: the metric record, the run context, timing helpers.

A suite (a module in bench/suites/) yields `Metric`s; the harness (bench/harness.py)
prints them beside their baselines and writes the JSON report.  Every metric carries a
baseline measured in the same run (plain `os.pwrite`, a plain file, ...) because these
machines are shared and absolute times drift: compare ratios, not values.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6  # throughput units are decimal: MB/s = 10**6 bytes per second

# --quick divides every size and count by this, so the harness can be smoke-tested in
# the test suite in seconds (the numbers it prints are then meaningless).
QUICK_DIVISOR = 100

_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


def parse_target(target: str) -> tuple[str, float]:
    """">= 0.9" -> (">=", 0.9): a condition on a metric's ratio."""
    op, _, number = target.strip().partition(" ")
    if op not in _OPS:
        raise ValueError(f"target {target!r}: expected one of {sorted(_OPS)} then a number")
    return op, float(number)


@dataclass
class Metric:
    """One measurement beside its same-run baseline; ratio = value / baseline.

    `target` is a condition on the ratio (">= 0.9", "<= 1.5"), or None when the metric
    is informational."""

    name: str
    value: float
    unit: str
    baseline: float
    target: str | None = None
    note: str = ""  # what value and baseline measure, in one line
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is not None:
            parse_target(self.target)

    @property
    def ratio(self) -> float:
        if not self.baseline:
            return math.inf
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = parse_target(self.target)
        return bool(_OPS[op](self.ratio, bound))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": _finite(self.value),
            "unit": self.unit,
            "baseline": _finite(self.baseline),
            "ratio": _finite(self.ratio),
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "details": self.details,
        }


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Context:
    """What a suite gets from the harness: its scratch directory and the run mode."""

    workdir: Path  # on a real disk (not tmpfs), removed after the suite
    quick: bool = False
    seed: int = 20240601
    verbose: bool = True

    def scale(self, full: int, *, minimum: int = 1, align: int = 1) -> int:
        """A size or count as given in full mode, divided by QUICK_DIVISOR with --quick;
        never below `minimum`, rounded down to a multiple of `align`."""
        n = full if not self.quick else max(minimum, full // QUICK_DIVISOR)
        return max(align, n // align * align)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def subdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=False)
        return path


def sync_dirty() -> None:
    """Write back the dirty pages of what ran before (os.sync), so the fsyncs of the pass
    about to be measured do not pay for them: left to expire 30 s after their writes,
    they land in the middle of the next metric's passes."""
    os.sync()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a timed loop."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes (perf_counter, collector paused)."""
    with gc_paused():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_through(path: Path, chunk: int = 64 * MiB) -> int:
    """Read a file once, sequentially (pulls it into the page cache); returns its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(chunk)
        pos = 0
        while True:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                return pos
            pos += n
    finally:
        os.close(fd)


# VM-like data: each 4 KiB block of the pool is zero, text-like (a short random word
# repeated) or random, in these proportions, which LZ4 compresses about 1.7x as the
# design notes measured on VM images.
ZERO_FRACTION = 0.20
TEXT_FRACTION = 0.25


def vm_like_pool(nbytes: int, seed: int) -> bytes:
    """`nbytes` of VM-like data (see ZERO_FRACTION), the same for the same seed."""
    rng = np.random.default_rng(seed)
    blocks = nbytes // 4096
    pool = np.frombuffer(rng.bytes(blocks * 4096), dtype=np.uint8).reshape(blocks, 4096).copy()
    kind = rng.random(blocks)
    pool[kind < ZERO_FRACTION] = 0
    text = np.flatnonzero((kind >= ZERO_FRACTION) & (kind < ZERO_FRACTION + TEXT_FRACTION))
    for b in text.tolist():
        word = rng.integers(32, 127, size=int(rng.integers(4, 33)), dtype=np.uint8)
        pool[b] = np.resize(word, 4096)
    return pool.tobytes()
