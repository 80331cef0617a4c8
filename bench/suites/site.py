"""site suite (issue 10): the site service's listing paths.  Started with the library call;
the API-level measurements join as the REST API lands.

  site.checkpoint_list   p99 ms of listing 10,000 usable checkpoints of one VPG through
                         RecoveryVPG.checkpoints()  vs  p99 ms of building the same number
                         of Checkpoint objects from a plain Python list, same run

The VPG is two VM journals holding the same 10,000 checkpoint markers, durable.  Calls
of the measured side and of the baseline alternate, so both meet the same disturbances
(the machine is shared).  Each call of the measured side includes its refresh (one
status() per journal); the p99 of a listing right after a new checkpoint arrived (the
refresh then lists each journal's checkpoints) is in the details, with the issue's
100 ms budget for one unpaginated API response.

To add the API-level figure (issue: one unpaginated response of 10,000 checkpoints
<= 100 ms), add a lister to `listers()` that calls the endpoint (e.g. an httpx client
against a site service in this process): every lister is timed against the same
baseline and VPG and reported as its own metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from benchkit import Context, Metric, gc_paused

from zcore import records
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.records import Checkpoint, CheckpointKind
from zcore.site.recovery_vpg import RecoveryVPG

DESCRIPTION = "site service: checkpoint listing through RecoveryVPG (issue 10)"

# Checkpoints in the VPG (issue 10: one response holding 10,000 checkpoints).
CHECKPOINTS = 10_000
# VMs (journals) in the VPG: two, so usability is an intersection, not one journal's list.
VMS = 2
# Checkpoint markers per appended bundle while building (building is not measured).
BUILD_BUNDLE = 1000
# One tagged checkpoint in this many, as users tag before changes.
TAG_EVERY = 50
# Timed calls per side; p99 of 300 calls is the 3rd-slowest: enough to be a tail, few
# enough to run in well under a second per side at 10,000 checkpoints.
CALLS = 300
# Calls with a fresh checkpoint before each (the refresh lists every journal); each such
# call also appends one checkpoint per journal, which is not timed.
FRESH_CALLS = 50
BUDGET_MS = 100.0  # issue 10: one unpaginated response of 10,000 checkpoints <= 100 ms
TARGET = "<= 1.5"  # the listing costs no more than building the objects, with margin
VOLUME_BYTES = 1 << 20
BASE_NS = 1_800_000_000 * 10**9
STEP_NS = 5 * 10**9  # checkpoints 5 s apart, as the default cadence makes them


def _marker(seq: int) -> bytes:
    tag = f"tag-{seq}" if seq % TAG_EVERY == 0 else None
    kind = records.CKPT_TAGGED if tag else records.CKPT_AUTO
    return records.encode_checkpoint(seq, BASE_NS + seq * STEP_NS, kind, True, tag)


def build_vpg(ctx: Context, n: int) -> RecoveryVPG:
    """A VPG of VMS journals holding the same n durable checkpoint markers."""
    settings = JournalSettings(group_commit_bytes=0)
    journals = {f"vm{i}": Journal.create(ctx.subdir(f"vm{i}"),
                                         [VolumeSpec(i, f"disk{i}", VOLUME_BYTES)],
                                         vm=f"vm{i}", settings=settings)
                for i in range(VMS)}
    for lo in range(1, n + 1, BUILD_BUNDLE):
        bundle = b"".join(_marker(s) for s in range(lo, min(n, lo + BUILD_BUNDLE - 1) + 1))
        for j in journals.values():
            j.append_encoded(bundle)
    for j in journals.values():
        j.commit()
    return RecoveryVPG("bench", journals, owns_journals=True)


def add_checkpoint(vpg: RecoveryVPG) -> None:
    """One more durable checkpoint in every journal (between fresh-listing calls)."""
    journals = vpg.journals
    seq = max(j.status().last_seq for j in journals.values()) + 1
    for j in journals.values():
        j.append_encoded(_marker(seq))
        j.commit()


def listers(vpg: RecoveryVPG) -> dict[str, tuple[str, Callable[[], list[Checkpoint]]]]:
    """Metric name -> (note, the call that lists every checkpoint of the VPG)."""
    return {
        "site.checkpoint_list": ("RecoveryVPG.checkpoints(), unpaginated", vpg.checkpoints),
    }


def _baseline_rows(n: int) -> list[tuple[int, int, int, CheckpointKind, str | None, bool]]:
    rows = []
    for seq in range(1, n + 1):
        tagged = seq % TAG_EVERY == 0
        rows.append((seq, seq, BASE_NS + seq * STEP_NS,
                     CheckpointKind.TAGGED if tagged else CheckpointKind.AUTO,
                     f"tag-{seq}" if tagged else None, True))
    return rows


def _time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_list(ctx: Context, vpg: RecoveryVPG, name: str, note: str,
                 lister: Callable[[], list[Checkpoint]], n: int) -> Metric:
    rows = _baseline_rows(n)

    def baseline() -> list[Checkpoint]:
        return [Checkpoint(*r) for r in rows]

    got = lister()
    if len(got) < n:  # (earlier listers' fresh calls added a few)
        raise RuntimeError(f"{name}: listed {len(got)} checkpoints, expected {n}")
    calls = ctx.scale(CALLS, minimum=20)
    listed, built = [], []
    with gc_paused():
        for k in range(calls):
            first, second = (lister, baseline) if k % 2 == 0 else (baseline, lister)
            a, b = _time_ms(first), _time_ms(second)
            listed.append(a if first is lister else b)
            built.append(b if first is lister else a)
    fresh = []
    for _ in range(ctx.scale(FRESH_CALLS, minimum=5)):
        add_checkpoint(vpg)
        with gc_paused():
            fresh.append(_time_ms(lister))
    p99, base99 = float(np.percentile(listed, 99)), float(np.percentile(built, 99))
    fresh99 = float(np.percentile(fresh, 99))
    ctx.log(f"{name}: p99 {p99:.2f} ms (after a new checkpoint {fresh99:.2f} ms) vs "
            f"{base99:.2f} ms building {n} Checkpoint objects")
    return Metric(
        name, p99, "ms", base99, TARGET,
        note=f"p99 of {note} listing {n} checkpoints of a {VMS}-journal VPG vs p99 of "
             f"building {n} Checkpoint objects from a plain list (alternating, {calls} each)",
        details={"checkpoints": n, "calls": calls,
                 "p50_ms": float(np.percentile(listed, 50)),
                 "baseline_p50_ms": float(np.percentile(built, 50)),
                 "after_new_checkpoint_p99_ms": fresh99,
                 "after_new_checkpoint_p50_ms": float(np.percentile(fresh, 50)),
                 "budget_ms": BUDGET_MS,
                 "within_budget": max(p99, fresh99) <= BUDGET_MS},
    )


def run(ctx: Context):
    n = ctx.scale(CHECKPOINTS, minimum=100)
    ctx.log(f"building a {VMS}-journal VPG with {n} checkpoints")
    vpg = build_vpg(ctx, n)
    try:
        for name, (note, lister) in listers(vpg).items():
            yield measure_list(ctx, vpg, name, note, lister, n)
    finally:
        vpg.close()
