"""I/O error injection: a failing-Nth-operation sweep over a full journal workload.

`count_ops(seed)` runs the workload once under the recording layer and counts the file
operations of each class; `run_with_fault(seed, kind, nth, err)` runs it again with the
`nth` operation of `kind` failing with `err`, then checks what the issue asks of the
journal:

* the error that reaches the caller is a zcore.errors class or an OSError;
* after a failed fsync nothing more is acknowledged (a later commit must raise: the page
  cache may have dropped the pages the failed fsync was for); after any other failure a
  commit that still succeeds is recorded as acknowledged and checked like the others;
* closing may fail, but reopening (with the disk healthy again) succeeds and shows every
  write and checkpoint acknowledged before the error (workload.check_journal).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from reliability import crashsim, fslayer
from reliability.workload import Expect, Workload, check_journal, create
from zcore.errors import ZcoreError
from zcore.journal import Journal

KINDS = {  # what the Recorder calls an operation -> the sweep's class of it
    "write": "write", "fsync": "fsync", "fdatasync": "fsync", "rename": "rename",
    "truncate": "truncate", "unlink": "unlink", "open": "open",
    "mkdir": "mkdir", "rmdir": "rmdir",
}
ERRNOS = (errno.EIO, errno.ENOSPC)


class _Injector:
    def __init__(self, kind: str | None, nth: int, err: int) -> None:
        self.kind, self.nth, self.err = kind, nth, err
        self.counts: dict[str, int] = {}
        self.fired: str | None = None

    def __call__(self, op: str, name: str) -> None:
        kind = KINDS[op]
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if kind == self.kind and n == self.nth and self.fired is None:
            self.fired = f"{op} of {name}"
            raise OSError(self.err, f"injected {os.strerror(self.err)}", name)


def count_ops(seed: int, ops: int) -> dict[str, int]:
    inj = _Injector(None, 0, 0)
    _run(seed, ops, inj)
    return inj.counts


@dataclass
class Outcome:
    fired: str | None
    error: BaseException | None
    violations: list[str]


def run_with_fault(seed: int, ops: int, kind: str, nth: int, err: int) -> Outcome:
    return _run(seed, ops, _Injector(kind, nth, err))


def _run(seed: int, ops: int, inj: _Injector) -> Outcome:
    work = Workload(seed, ops)
    root = Path(crashsim.scratch_dir("zc-fault-"))
    marks: list[object] = []
    try:
        path = root / "j"
        create(path).close()
        error, bad = _open_and_run(path, inj, marks, work)
        if error is None:
            # phase 2: a crash left a torn record after the tail (the "disk" is written
            # directly, unrecorded); the reopen under injection truncates it
            _tear_tail(path)
            error, more = _open_and_run(path, inj, marks, None)
            bad += more
        bad += check_journal(path, work, Expect.of(marks))  # type: ignore[arg-type]
        return Outcome(inj.fired, error, bad)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _open_and_run(path: Path, inj: _Injector, marks: list[object],
                  work: Workload | None) -> tuple[BaseException | None, list[str]]:
    """Open the journal under injection, run `work` on it (if any) and close it: the first
    error and the violations seen after it."""
    error: BaseException | None = None
    bad: list[str] = []
    with fslayer.Recorder(path, inj):
        try:
            journal = Journal.open(path)
        except Exception as exc:
            return exc, _after_error(None, exc, inj, marks)
        if work is not None:
            try:
                work.run(journal, marks.append)
            except Exception as exc:
                error = exc
                bad += _after_error(journal, error, inj, marks)
        bad += _close(journal)
    return error, bad


def _close(journal: Journal) -> list[str]:
    try:
        journal.close()
    except (ZcoreError, OSError):
        pass
    except Exception as exc:
        return [f"close raised {type(exc).__name__}: {exc}"]
    return []


def _tear_tail(path: Path) -> None:
    newest = max(path.glob("seg-*.zcj"))
    with open(newest, "ab") as f:
        f.write(b"\x5a" * 700)


def _after_error(journal: Journal | None, error: BaseException, inj: _Injector,
                 marks: list[object]) -> list[str]:
    bad = []
    if not isinstance(error, (ZcoreError, OSError)):
        bad.append(f"the error is not a zcore.errors class or OSError: "
                   f"{type(error).__name__}: {error}")
    if inj.fired is None:
        bad.append(f"the workload failed without an injected error: {error!r}")
    elif journal is not None:
        # after a failed fsync nothing more may be acknowledged; after other failures a
        # commit that still succeeds is a promise the reopen below must keep
        try:
            durable = journal.commit()
        except (ZcoreError, OSError):
            pass
        else:
            marks.append(("ack", durable))
            if inj.kind == "fsync":
                bad.append(f"commit acknowledged seq {durable} after a failed fsync")
    return bad
