"""Power loss at every point of a journal workload, and during the reopen that follows.

Each seed's workload (writes, checkpoints, commits, promotions, segment rotation) runs
under the recording file layer; every crash state built from the trace (reliability.fslayer)
is reopened and checked against the model (reliability.workload.check_journal).  The
planted-bug tests prove the harness: a trace rewritten as a journal that skipped an fsync,
skipped a directory fsync or reordered a rename must produce violations.
"""

from __future__ import annotations

import pytest

from reliability import crashsim

MIN_STATES = 200_000 if crashsim.DEEP else 20_000
OPS = 150


def test_no_crash_state_loses_an_acknowledged_write_or_returns_unchecked_bytes() -> None:
    total = reopens = 0
    seed = 0
    failures: list[str] = []
    while total < MIN_STATES:
        seed += 1
        rec = crashsim.record(seed, ops=OPS)
        result = crashsim.enumerate_states(rec, per_point=6, seed=seed,
                                           limit=MIN_STATES - total)
        total += result.states + result.reopen_states
        reopens += result.reopen_states
        failures += [f"seed {seed}: {v}" for v in result.violations]
        assert not failures, "\n".join(failures[:20])
    print(f"{total} crash states ({reopens} during reopen) over {seed} workloads, "
          "0 violations")


@pytest.mark.parametrize("bug", ["skip-fsync", "skip-dirfsync", "reorder-rename"])
def test_planted_durability_bug_is_reported_as_a_violation(bug: str) -> None:
    for seed in (1, 2, 3):
        rec = crashsim.record(seed, ops=OPS)
        result = crashsim.run_planted(rec, bug)
        if result.violations:
            return
    pytest.fail(f"the harness found no violation with {bug} planted")


def test_unplanted_traces_of_the_planted_seeds_are_clean() -> None:
    """The planted tests mean something only if the same traces, unplanted, pass."""
    for seed in (1, 2, 3):
        rec = crashsim.record(seed, ops=OPS)
        result = crashsim.enumerate_states(rec, per_point=1, seed=seed, reopen_every=0,
                                           limit=300)
        assert not result.violations, crashsim.summary(result)
