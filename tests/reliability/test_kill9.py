"""kill -9 of a journal writer at random moments, then reopen and check (reliability.killer)."""

from __future__ import annotations

import shutil
from pathlib import Path

from reliability import crashsim, killer
from zcore.journal import Journal

CYCLES = 2000 if crashsim.DEEP else 200


def test_kill9_of_the_writer_never_loses_an_acknowledged_write_or_checkpoint() -> None:
    root = Path(crashsim.scratch_dir("zc-kill9-"))
    try:
        path = root / "j"
        Journal.create(path, killer.VOLUMES, settings=killer.settings()).close()
        result = killer.run_cycles(path, root / "acks", CYCLES, seed=9)
        assert not result.violations, "\n".join(result.violations)
        assert result.cycles == CYCLES
        # the writer must really be killed mid-run, not die on its own
        assert result.killed_mid_run == CYCLES
        expect = killer.read_acklog(root / "acks")
        assert expect.acked > CYCLES, f"too little was acknowledged: {expect}"
        print(f"{result.cycles} kill -9 cycles, acked up to seq {expect.acked}, 0 violations")
    finally:
        shutil.rmtree(root, ignore_errors=True)
