"""Live failover of one VPG at its recovery site: start, commit, rollback, and resuming
any of them after a crash of the site service.

Sits on the journals of a recovery VPG (zcore.journal, through its public API) and the
durable overlay (zcore.recovery.overlay); the site service (zcore.site.failover_ops) runs
it as tasks, serves its volumes over NBD and refuses the VPG's ATTACH while it lasts.

Start: every volume of every VM gets a durable overlay over a view at the checkpoint, at
once (the recovered VMs run on them); a worker thread promotes each journal up to the
checkpoint ("promoting", progress in `status()`), segment by segment.  Nothing waits for
the promotion.  Rollback: the overlays are deleted, the journals are left as they are (the
checkpoint and every later one still there: only the history *before* the checkpoint is
promoted into the replicas), and replication may attach again.  Commit: the overlays are
flushed and their views closed, each journal `discard_after`s the checkpoint (promotion
finished, everything after it dropped), each overlay is folded into its replica
(`Journal.replica_write`, then `replica_sync`), and only then are the overlays deleted;
the recovered volumes are the replicas from then on.

State file DIR/failover.json (a checked state file): the VPG, the checkpoint, the
policies and the state.  Written before each step it names, so a restart finds where it
was: promoting / failed_over (overlays reopened with their flushed writes, promotion goes
on), committing (the commit is redone: every step is idempotent), rolling_back (redone),
committed (the replicas are served).

Which operation each state allows is zcore.recovery.states' table (`OPERATION_STATE`
places each failover state in it).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from zcore.errors import ConfigError, StateError
from zcore.fsutil import fsync_dir, read_state, write_state
from zcore.journal import Journal
from zcore.recovery.overlay import DurableOverlay, remove_overlay
from zcore.recovery.states import Operation, OperationState, check

log = logging.getLogger(__name__)

STATE_NAME = "failover.json"
STATE_FORMAT = "zcore-failover"
STATE_VERSION = 1


class FailoverState(StrEnum):
    PROMOTING = "promoting"  # serving on overlays; promotion to the checkpoint running
    FAILED_OVER = "failed_over"  # serving on overlays; promotion finished
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"
    COMMITTED = "committed"  # serving the replicas (plain volumes)


class CommitPolicy(StrEnum):
    NONE = "none"  # wait for the user
    COMMIT = "commit"  # commit after commit_after_minutes (0: at once)
    ROLLBACK = "rollback"  # roll back after commit_after_minutes


class ShutdownPolicy(StrEnum):
    NONE = "none"
    GRACEFUL = "graceful"
    FORCE = "force"


# Where each state of a failover stands in the VPG's operation table
# (zcore.recovery.states, the one table of what each state allows).
OPERATION_STATE: dict[FailoverState, OperationState] = {
    FailoverState.PROMOTING: OperationState.FAILED_OVER,  # commit or rollback meanwhile
    FailoverState.FAILED_OVER: OperationState.FAILED_OVER,
    FailoverState.COMMITTING: OperationState.COMMITTING,
    FailoverState.ROLLING_BACK: OperationState.ROLLING_BACK,
    FailoverState.COMMITTED: OperationState.COMMITTED,
}


@dataclass(frozen=True)
class FailoverPlan:
    checkpoint_id: int
    commit_policy: CommitPolicy = CommitPolicy.NONE
    commit_after_minutes: float | None = None
    shutdown_policy: ShutdownPolicy = ShutdownPolicy.NONE
    reverse: bool = False  # reverse protection starts once committed (zcore.site.reverse_ops)

    def check(self) -> None:
        m = self.commit_after_minutes
        if m is not None and m < 0:
            raise ConfigError(f"commit_after_minutes {m} cannot be negative")
        if self.commit_policy != CommitPolicy.NONE and m is None:
            raise ConfigError(f"commit policy {self.commit_policy.value} needs "
                              "commit_after_minutes (0: at once)")


@dataclass
class Promotion:
    """Background promotion's progress (bytes of journal segments below the checkpoint)."""

    total_bytes: int = 0
    done_bytes: int = 0
    finished: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


def volume_dir(directory: Path, vm: str, volume: str) -> Path:
    return directory / vm / volume


class Failover:
    """One VPG's live failover (see the module docstring).  `journals`: VM -> Journal.
    Thread-safe; commit and rollback block (run them in a worker thread)."""

    def __init__(self, name: str, journals: Mapping[str, Journal], directory: Path,
                 meta: dict[str, Any]) -> None:
        self.name = name
        self.journals = dict(journals)
        self.directory = Path(directory)
        self._meta = meta
        self.plan = FailoverPlan(int(meta["checkpoint_id"]), CommitPolicy(meta["commit_policy"]),
                                 meta.get("commit_after_minutes"),
                                 ShutdownPolicy(meta["shutdown_policy"]),
                                 bool(meta.get("reverse", False)))
        self.overlays: dict[tuple[str, str], DurableOverlay] = {}
        self.promotion = Promotion()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- state file ----------------------------------------------------------------------

    @property
    def state(self) -> FailoverState:
        return FailoverState(self._meta["state"])

    @property
    def operation_state(self) -> OperationState:
        return OPERATION_STATE[self.state]

    @property
    def started(self) -> float:
        return float(self._meta["started"])

    @property
    def deadline(self) -> float | None:
        """When the commit policy acts (seconds since the epoch), or None."""
        m = self.plan.commit_after_minutes
        if self.plan.commit_policy == CommitPolicy.NONE or m is None:
            return None
        return self.started + 60.0 * m

    def _set_state(self, state: FailoverState) -> None:
        self._meta["state"] = state.value
        write_state(self.directory / STATE_NAME, STATE_FORMAT, STATE_VERSION, self._meta)

    @staticmethod
    def read(directory: Path) -> dict[str, Any] | None:
        try:
            return read_state(Path(directory) / STATE_NAME, STATE_FORMAT, STATE_VERSION)
        except FileNotFoundError:
            return None

    # ---- start and resume ----------------------------------------------------------------

    @classmethod
    def start(cls, name: str, journals: Mapping[str, Journal], directory: Path,
              plan: FailoverPlan) -> Failover:
        """Open the overlays at the plan's checkpoint and start promoting (returns at once
        after the overlays are open)."""
        plan.check()
        directory = Path(directory)
        if cls.read(directory) is not None:
            raise StateError(f"VPG {name} already has a failover in {directory}")
        for j in journals.values():
            j.checkpoint_by_id(plan.checkpoint_id)  # usable in every journal, or refused
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
        meta = {"vpg": name, "checkpoint_id": plan.checkpoint_id,
                "commit_policy": plan.commit_policy.value,
                "commit_after_minutes": plan.commit_after_minutes,
                "shutdown_policy": plan.shutdown_policy.value, "reverse": plan.reverse,
                "started": time.time(), "state": FailoverState.PROMOTING.value}
        write_state(directory / STATE_NAME, STATE_FORMAT, STATE_VERSION, meta)
        fo = cls(name, journals, directory, meta)
        try:
            fo._open_overlays()
        except BaseException:
            fo.close()
            raise
        fo._start_promotion()
        return fo

    @classmethod
    def resume(cls, name: str, journals: Mapping[str, Journal],
               directory: Path) -> Failover | None:
        """The failover a previous process left in `directory` (None when there is none),
        brought back to where it was: serving again, or its commit or rollback redone."""
        meta = cls.read(directory)
        if meta is None:
            return None
        fo = cls(name, journals, directory, meta)
        state = fo.state
        if state == FailoverState.COMMITTING:
            fo.commit()
        elif state == FailoverState.ROLLING_BACK:
            fo.rollback()
            return None
        elif state in (FailoverState.PROMOTING, FailoverState.FAILED_OVER):
            fo._open_overlays()
            fo._start_promotion()
        return fo

    def _open_overlays(self) -> None:
        cid = self.plan.checkpoint_id
        for vm, journal in self.journals.items():
            for spec in journal.volumes.values():
                view = journal.view(cid)
                try:
                    ov = DurableOverlay(view, spec.id, volume_dir(self.directory, vm, spec.name),
                                        owns_view=True)
                except BaseException:
                    view.close()
                    raise
                self.overlays[(vm, spec.name)] = ov

    # ---- promotion -----------------------------------------------------------------------

    def _start_promotion(self) -> None:
        plan: list[tuple[Journal, int, list[tuple[int, int]]]] = []
        total = 0
        for journal in self.journals.values():
            seq = journal.checkpoint_by_id(self.plan.checkpoint_id).seq
            steps = [(s.max_seq + 1, s.size) for s in journal.segments()
                     if s.records and s.max_seq + 1 < seq]
            steps.append((seq, sum(s.size for s in journal.segments()
                                   if s.records and s.min_seq < seq <= s.max_seq + 1)))
            total += sum(size for _, size in steps)
            plan.append((journal, seq, steps))
        self.promotion = Promotion(total_bytes=total)
        self._thread = threading.Thread(target=self._promote, args=(plan,), daemon=True,
                                        name=f"zcore-failover-promote-{self.name}")
        self._thread.start()

    def _promote(self, plan: list[tuple[Journal, int, list[tuple[int, int]]]]) -> None:
        p = self.promotion
        try:
            for journal, _seq, steps in plan:
                for target, size in steps:
                    if self._stop.is_set():
                        return
                    journal.promote_to(target)
                    p.done_bytes += size
            p.finished = True
            with self._lock:
                if self.state == FailoverState.PROMOTING and not self._stop.is_set():
                    self._set_state(FailoverState.FAILED_OVER)
        except Exception as exc:  # reported in status; commit redoes the promotion
            log.error("failover of %s: promotion failed: %s", self.name, exc)
            p.error = str(exc)
        finally:
            p.ended = time.monotonic()

    def wait_promoted(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _stop_promotion(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- commit and rollback -------------------------------------------------------------

    def commit(self, on_committed: Callable[[Failover], None] | None = None) -> None:
        """Finish promotion, drop the journal after the checkpoint, fold the overlays into
        the replicas (durable), then delete the overlays.  `on_committed` is the hook
        reverse protection hangs on (called once the replicas are the volumes)."""
        check(self.name, self.operation_state, Operation.COMMIT)
        self._stop_promotion()  # never under _lock: the promoting thread takes it
        with self._lock:
            check(self.name, self.operation_state, Operation.COMMIT)
            self._set_state(FailoverState.COMMITTING)
            self._close_overlays(flush=True)
            for vm, journal in self.journals.items():
                if not journal.empty:
                    journal.discard_after(self.plan.checkpoint_id)
                for spec in journal.volumes.values():
                    path = volume_dir(self.directory, vm, spec.name)
                    if not path.exists():
                        continue
                    ov = DurableOverlay(None, spec.id, path, size=spec.size)
                    try:
                        ov.fold_into(functools.partial(journal.replica_write, spec.id))
                    finally:
                        ov.close()
                journal.replica_sync()
            self._set_state(FailoverState.COMMITTED)
            self._remove_overlays()
        if on_committed is not None:
            on_committed(self)

    def rollback(self) -> None:
        """Discard the overlays; the journals keep the checkpoint and all after it."""
        check(self.name, self.operation_state, Operation.ROLLBACK)
        self._stop_promotion()  # never under _lock: the promoting thread takes it
        with self._lock:
            check(self.name, self.operation_state, Operation.ROLLBACK)
            self._set_state(FailoverState.ROLLING_BACK)
            self._close_overlays(flush=False)
            self._remove_overlays()
            (self.directory / STATE_NAME).unlink(missing_ok=True)
            fsync_dir(self.directory)

    def _close_overlays(self, *, flush: bool) -> None:
        for ov in self.overlays.values():
            if flush and not ov.closed:
                ov.flush()
            ov.close()
        self.overlays.clear()

    def _remove_overlays(self) -> None:
        for vm, journal in self.journals.items():
            for spec in journal.volumes.values():
                remove_overlay(volume_dir(self.directory, vm, spec.name))
            try:
                (self.directory / vm).rmdir()
            except OSError:
                pass

    # ---- what is served ------------------------------------------------------------------

    def replica_paths(self) -> dict[tuple[str, str], str]:
        """(vm, volume) -> replica file, the recovered volumes once committed."""
        return {(vm, spec.name): j.replica_path(spec.id) for vm, j in self.journals.items()
                for spec in j.volumes.values()}

    def status(self) -> dict[str, Any]:
        p = self.promotion
        return {
            "vpg": self.name, "state": self.state.value,
            "checkpoint_id": self.plan.checkpoint_id,
            "commit_policy": self.plan.commit_policy.value,
            "commit_after_minutes": self.plan.commit_after_minutes,
            "shutdown_policy": self.plan.shutdown_policy.value,
            "reverse": self.plan.reverse, "started": self.started, "deadline": self.deadline,
            "promotion": {"total_bytes": p.total_bytes, "done_bytes": p.done_bytes,
                          "finished": p.finished, "error": p.error,
                          "progress": p.done_bytes / p.total_bytes if p.total_bytes else 1.0},
            "overlay_bytes": sum(ov.written_bytes for ov in self.overlays.values()
                                 if not ov.closed),
        }

    def close(self) -> None:
        """Stop promoting and close the overlays (their flushed writes stay on disk)."""
        self._stop_promotion()
        with self._lock:
            self._close_overlays(flush=False)

