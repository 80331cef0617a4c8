"""EIO and ENOSPC on each write, fsync, rename, truncate, unlink and file creation of a
full workload (promotion and rotation included), in turn (reliability.faults)."""

from __future__ import annotations

import pytest

from reliability import crashsim, faults

OPS = 150
# every operation of each kind fails in turn; ZCORE_DEEP=1 sweeps more workloads
SEEDS = (4, 5, 6, 7, 8) if crashsim.DEEP else (4,)


@pytest.fixture(scope="module")
def counts() -> dict[int, dict[str, int]]:
    out = {}
    for seed in SEEDS:
        out[seed] = counts = faults.count_ops(seed, OPS)
        # the sweep means something only if the workload does every kind of operation
        for kind in ("write", "fsync", "rename", "truncate", "unlink", "open"):
            assert counts.get(kind, 0) > 0, f"the workload never does a {kind}: {counts}"
    return out


UNLINK_LEAK = pytest.mark.xfail(
    strict=True, reason="new finding (not in issue 9): a failed unlink in promotion leaves "
    "the segment listed with its descriptor closed; close() closes it again (EBADF, or "
    "another file's descriptor) and leaks the journal lock, so it cannot be reopened")


@pytest.mark.parametrize("kind", ["write", "fsync", "rename", "truncate",
                                  pytest.param("unlink", marks=UNLINK_LEAK), "open"])
@pytest.mark.parametrize("err", faults.ERRNOS, ids=["EIO", "ENOSPC"])
def test_failed_operation_stops_the_journal_cleanly_and_loses_nothing_acknowledged(
        counts: dict[int, dict[str, int]], kind: str, err: int) -> None:
    failures = []
    for seed in SEEDS:
        for nth in range(counts[seed][kind]):
            out = faults.run_with_fault(seed, OPS, kind, nth, err)
            assert out.fired is not None, f"{kind} #{nth} was never reached"
            failures += [f"seed {seed} {kind} #{nth} ({out.fired}): {v}"
                         for v in out.violations]
    assert not failures, "\n".join(failures[:20])
