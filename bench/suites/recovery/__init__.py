"""recovery suite (issue 11): the recovery operations' six metrics (the issue's five and
the unclean-restart resync), each beside a baseline measured in the same run
(`python bench/harness.py recovery --json out.json`):

  recovery.rto_first_read      ms from `Failover.start` to the first 4 KiB read served by
                               the recovered volume's NBD export, 4 GiB journaled vs
                               0.5 GiB: <= 1.2 (RTO must not grow with the journal)
  recovery.delta_sync          bytes on the wire of the delta sync of a 2 GiB volume made
                               5 % different vs the differing bytes: <= 1.05
  recovery.delta_sync_time     wall time of that delta sync vs a full resend of the volume
                               over the same link: <= 0.35
  recovery.promote_under_load  background promotion MB/s while the recovered VM writes at
                               50 MB/s vs `journal.promote_to` alone: >= 0.5
  recovery.test_start          ms to start a failover test of a 4-VM VPG, 4 GiB journaled
                               vs 0.5 GiB: <= 1.2
  recovery.unclean_resync      bytes sent after an unclean restart of a 1 GiB volume with
                               1 % changed (the compare and the resync) vs the volume's
                               size: <= 0.05

A package because the three measurements together pass the harness's ~500 lines a module:
`failover` (live failover: the RTO and promotion under load), `delta` (the delta sync of
reverse protection, against a target in a subprocess: `delta.py` run as a script is that
target), `teststart` (starting a failover test) and `resync` (the compare and resync
after an unclean protected-site restart).  Each part runs in its own scratch
subdirectory, removed when it ends, so the suite holds one part's files at a time (the
largest, the journals of `rto` and of `teststart`, about 4.5 GiB in full mode).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable, Iterator

from benchkit import Context, Metric

from suites.recovery import delta, failover, resync, teststart

DESCRIPTION = ("recovery operations: RTO, delta sync bytes and time, promotion under load, "
               "failover test start, unclean-restart resync (issue 11)")


def _part(ctx: Context, name: str,
          measure: Callable[[Context], Iterable[Metric]]) -> Iterator[Metric]:
    sub = dataclasses.replace(ctx, workdir=ctx.subdir(name))
    try:
        yield from measure(sub)
    finally:
        shutil.rmtree(sub.workdir, ignore_errors=True)


def run(ctx: Context) -> Iterator[Metric]:
    # the order: rto_first_read, delta_sync(_time), promote_under_load, test_start
    yield from _part(ctx, "rto", lambda c: [failover.measure_rto(c)])
    yield from _part(ctx, "delta", delta.measure_delta_sync)
    yield from _part(ctx, "promote", lambda c: [failover.measure_promote_under_load(c)])
    yield from _part(ctx, "teststart", lambda c: [teststart.measure_test_start(c)])
    yield from _part(ctx, "resync", resync.measure_unclean_resync)
