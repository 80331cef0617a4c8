"""The recovery suite's failover-test part (issue 11; bench/suites/recovery/__init__.py
runs it): starting a failover test, beside a baseline measured in the same run.

  recovery.test_start    median ms to start a failover test of a 4-VM VPG (one view per
                         VM at the newest checkpoint, one scratch overlay and NBD export
                         per volume: zcore.recovery.FailoverTest open + exports) with
                         4 GiB journaled  vs  the same with 0.5 GiB journaled; ratio
                         <= 1.2: starting a test must not grow with the journal

Each VM's journal is grown with the same bundle sequence (so the four share their seqs and
checkpoints, as the journals of one VPG share the stream's checkpoint seqs): raw 4-64 KiB
writes at 4 KiB-aligned offsets of a 4 GiB volume, an automatic checkpoint every 16 MiB.
The small VPG is grown first, then a second VPG to the large size.  Starts of the two
alternate, so both meet the same disturbances (the machine is shared); each start is
closed (overlays discarded, views closed) before the next.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchkit import Context, Metric

from suites.journal import BUNDLE_BYTES, Workload
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.recovery import FailoverTest

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
VMS = 4
VOLUME_BYTES = 4 * GiB
SMALL_TOTAL = 512 * MiB  # journaled over the whole VPG (issue: 0.5 GiB)
LARGE_TOTAL = 4 * GiB  # issue: 4 GiB
CHECKPOINT_EVERY = 16 * MiB
# Starts per size, alternating; one start takes a few ms, so the median of 21 is stable.
STARTS = 21
TARGET = "<= 1.2"


def _grow(ctx: Context, root: Path, per_vm: int) -> dict[str, Journal]:
    """VMS journals holding the same `per_vm` bytes of bundles and checkpoints."""
    every = ctx.scale(CHECKPOINT_EVERY, minimum=256 * KiB)
    settings = JournalSettings() if not ctx.quick else JournalSettings(segment_bytes=4 * MiB)
    journals: dict[str, Journal] = {}
    t0 = time.perf_counter()
    for i in range(VMS):
        vm = f"vm{i}"
        j = Journal.create(root / vm, [VolumeSpec(0, "disk0", VOLUME_BYTES)], vm=vm,
                           settings=settings)
        journals[vm] = j
        wl = Workload(ctx, VOLUME_BYTES, ctx.seed)  # the same bundles in every VM
        appended = since = 0
        stamp = 1_700_000_000_000_000_000
        while appended < per_vm:
            b, _, _ = wl.bundle(j.last_seq + 1, stamp)
            j.append_encoded(b)
            appended += len(b)
            since += len(b)
            if since >= every:
                j.checkpoint()
                since = 0
        j.checkpoint("bench")
        j.commit()
    ctx.log(f"{VMS} journals of {per_vm / MiB:.0f} MiB each grown in "
            f"{time.perf_counter() - t0:.1f} s")
    return journals


def _start_ms(vpg: str, journals: dict[str, Journal], scratch: Path) -> float:
    first = next(iter(journals.values()))
    ckpt = first.checkpoints()[-1]
    t0 = time.perf_counter()
    test = FailoverTest(vpg, journals, ckpt, directory=str(scratch)).open()
    exports = test.exports()
    elapsed = (time.perf_counter() - t0) * 1e3
    assert len(exports) == len(journals)
    test.close()
    return elapsed


def measure_test_start(ctx: Context) -> Metric:
    """recovery.test_start: alternating starts of a small and a large VPG's test."""
    small_total = ctx.scale(SMALL_TOTAL, minimum=4 * BUNDLE_BYTES)
    large_total = ctx.scale(LARGE_TOTAL, minimum=8 * BUNDLE_BYTES)
    small = _grow(ctx, ctx.subdir("small"), small_total // VMS)
    large = _grow(ctx, ctx.subdir("large"), large_total // VMS)
    scratch = ctx.subdir("scratch")
    try:
        times: dict[str, list[float]] = {"small": [], "large": []}
        for r in range(STARTS if not ctx.quick else 3):
            order = (("small", small), ("large", large))
            for name, js in order if r % 2 == 0 else order[::-1]:
                times[name].append(_start_ms(f"g-{name}", js, scratch))
        value = statistics.median(times["large"])
        baseline = statistics.median(times["small"])
        ctx.log(f"test start: {value:.2f} ms at {large_total / GiB:.2f} GiB, "
                f"{baseline:.2f} ms at {small_total / GiB:.2f} GiB")
        return Metric(
            "recovery.test_start", value, "ms", baseline, TARGET,
            note=f"median ms to start a failover test of a {VMS}-VM VPG, "
                 f"{large_total / GiB:g} GiB journaled vs {small_total / GiB:g} GiB",
            details={"large_ms": times["large"], "small_ms": times["small"],
                     "large_bytes": large_total, "small_bytes": small_total,
                     "vms": VMS})
    finally:
        for j in (*small.values(), *large.values()):
            j.close()
