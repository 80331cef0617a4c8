"""Crash-state enumeration: record a workload's trace, build every crash state from it,
reopen each one (also crashing during that reopen) and check it against the model.

`record(seed)` runs a Workload on a fresh journal under a Recorder and returns what the
states are built from; `enumerate_states(recorded, ...)` returns the counts and the
violations found (each with the crash point and the marks that applied)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reliability import fslayer
from reliability.workload import Expect, Workload, check_journal, create
from zcore.journal import Journal

DEEP = os.environ.get("ZCORE_DEEP") == "1"
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass
class Recorded:
    work: Workload
    base: dict[str, bytes]
    trace: list[fslayer.Event]


@dataclass
class Result:
    states: int = 0
    reopen_states: int = 0
    duplicates: int = 0
    violations: list[str] = field(default_factory=list)


def scratch_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=SCRATCH)


def record(seed: int, ops: int = 60, hard_limit: int | None = None,
           setup: Callable[[Journal], None] | None = None) -> Recorded:
    """Run Workload(seed) on a new journal (created and closed before recording starts:
    its files are the durable base) and record every file operation."""
    work = Workload(seed, ops)
    root = Path(scratch_dir("zc-rec-"))
    try:
        path = root / "j"
        journal = create(path, hard_limit)
        if setup is not None:
            setup(journal)
        journal.close()
        base = fslayer.snapshot(path)
        with fslayer.Recorder(path) as rec:
            journal = Journal.open(path)
            rec.mark(("ack", journal.durable_seq))
            work.run(journal, rec.mark)
            journal.close()
        return Recorded(work, base, rec.events)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reopen_trace(files: dict[str, bytes], root: Path) -> list[fslayer.Event]:
    """The file operations `Journal.open` performs on a crash state (its recovery)."""
    path = root / "r"
    path.mkdir()
    fslayer.materialize(files, str(path))
    try:
        with fslayer.Recorder(path) as rec:
            journal = Journal.open(path)
        journal.close()
    except Exception:
        return []  # the state itself fails to open: its check reports that
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return rec.events


def enumerate_states(rec: Recorded, *, per_point: int, seed: int = 0,
                     reopen_every: int = 100, limit: int | None = None,
                     trace: list[fslayer.Event] | None = None,
                     stop_at_first: bool = False) -> Result:
    """Check every distinct crash state of `trace` (default: the recorded one); one in
    `reopen_every` states is also crashed during its own reopen, at every point."""
    rng = random.Random(seed)
    result = Result()
    seen: set[tuple] = set()
    root = Path(scratch_dir("zc-crash-"))
    events = rec.trace if trace is None else trace
    try:
        for point, marks, files, key in fslayer.crash_states(rec.base, events, rng, per_point):
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            expect = Expect.of(marks)
            result.states += 1
            bad = _check_state(files, rec.work, expect, root)
            if bad:
                result.violations.append(f"crash point {point} ({expect}): {'; '.join(bad)}")
                if stop_at_first:
                    return result
            elif reopen_every and result.states % reopen_every == 0:
                sub = _reopen_trace(files, root)
                for spoint, _, sfiles, skey in fslayer.crash_states(files, sub, rng, 1):
                    skey = (key, *skey)
                    if skey in seen:
                        continue
                    seen.add(skey)
                    result.reopen_states += 1
                    bad = _check_state(sfiles, rec.work, expect, root)
                    if bad:
                        result.violations.append(
                            f"crash at reopen step {spoint} after point {point}: "
                            f"{'; '.join(bad)}")
            if limit is not None and result.states + result.reopen_states >= limit:
                break
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _check_state(files: dict[str, bytes], work: Workload, expect: Expect,
                 root: Path) -> list[str]:
    path = root / "s"
    path.mkdir()
    try:
        fslayer.materialize(files, str(path))
        return check_journal(path, work, expect)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def summary(result: Result) -> str:
    head = (f"{result.states} states + {result.reopen_states} crashed reopens "
            f"({result.duplicates} duplicates skipped), {len(result.violations)} violations")
    return "\n".join([head, *result.violations[:10]])


def names_of(base: dict[str, bytes]) -> dict[int, str]:
    return {i: name for i, name in enumerate(sorted(base))}


def planted(rec: Recorded, bug: str) -> list[fslayer.Event]:
    return fslayer.plant(rec.trace, bug, names_of(rec.base))


def run_planted(rec: Recorded, bug: str, per_point: int = 4) -> Result:
    return enumerate_states(rec, per_point=per_point, trace=planted(rec, bug),
                            reopen_every=0, stop_at_first=True)

