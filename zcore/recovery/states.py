"""The VPG's operation state machine at the recovery site: the states a VPG passes through
while recovery operations run on it, and THE table of which operation each state allows.

Sits under every recovery operation (zcore.recovery.test_op, zcore.recovery.failover) and
the site service that runs them as tasks (zcore.site.operations, failover_ops,
reverse_ops), which share one `OperationStates`.  The lifecycle state of the site database
(creating, protecting, paused, moved, ...) says whether a VPG replicates; this one says
which recovery operation holds it.  A planned move and a failback run at the protected
site; their recovery-site half is a failover, its commit and reverse protection, here.

A refusal raises zcore.errors.StateError with a message saying what the VPG is doing and
what is allowed now; the REST API answers it with 409 and that message.

Each row maps (state, operation) to the state the VPG is in while the operation runs;
`SETTLED` maps each such running state to where a success and a failure leave the VPG.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from zcore.errors import StateError


class OperationState(StrEnum):
    """Where a VPG is among the recovery operations (at its recovery site)."""

    REPLICATING = "replicating"  # no operation: replication and history as usual
    TEST_STARTING = "test_starting"
    TESTING = "testing"  # a failover test runs; replication goes on
    TEST_STOPPING = "test_stopping"
    FAILING_OVER = "failing_over"
    FAILED_OVER = "failed_over"  # recovered VMs run (promoting or not): commit or rollback
    COMMITTING = "committing"  # also a commit that failed: it is redone
    ROLLING_BACK = "rolling_back"  # also a rollback that failed: it is redone
    COMMITTED = "committed"  # the recovered volumes are the replicas: reverse next
    REVERSING = "reversing"  # the volumes leave the journals; protected here after it


class Operation(StrEnum):
    """What a user (or a policy) asks of a VPG."""

    TEST_START = "test start"
    TEST_STOP = "test stop"
    FAILOVER = "failover"
    COMMIT = "failover commit"
    ROLLBACK = "failover rollback"
    REVERSE = "reverse"


S, Op = OperationState, Operation

# (state now, operation) -> the state while the operation runs.  A failover is refused
# during a failover test: the test is stopped first (its verdict recorded).
TRANSITIONS: dict[tuple[OperationState, Operation], OperationState] = {
    (S.REPLICATING, Op.TEST_START): S.TEST_STARTING,
    (S.TESTING, Op.TEST_STOP): S.TEST_STOPPING,
    (S.REPLICATING, Op.FAILOVER): S.FAILING_OVER,
    (S.FAILED_OVER, Op.COMMIT): S.COMMITTING,
    (S.FAILED_OVER, Op.ROLLBACK): S.ROLLING_BACK,
    (S.COMMITTING, Op.COMMIT): S.COMMITTING,
    (S.ROLLING_BACK, Op.ROLLBACK): S.ROLLING_BACK,
    (S.COMMITTED, Op.REVERSE): S.REVERSING,
}

# running state -> (state after success, state after failure)
SETTLED: dict[OperationState, tuple[OperationState, OperationState]] = {
    S.TEST_STARTING: (S.TESTING, S.REPLICATING),  # a failed start leaves nothing open
    S.TEST_STOPPING: (S.REPLICATING, S.REPLICATING),  # overlays are gone either way
    S.FAILING_OVER: (S.FAILED_OVER, S.REPLICATING),  # a failed start opened nothing
    S.COMMITTING: (S.COMMITTED, S.COMMITTING),  # the failover's state file says so too
    S.ROLLING_BACK: (S.REPLICATING, S.ROLLING_BACK),
    S.REVERSING: (S.REPLICATING, S.COMMITTED),  # protected here afterwards
}

# why a state refuses what it does not allow (the first half of a refusal's message)
DOING: dict[OperationState, str] = {
    S.REPLICATING: "is replicating with no recovery operation running",
    S.TEST_STARTING: "is starting a failover test",
    S.TESTING: "is in a failover test",
    S.TEST_STOPPING: "is stopping its failover test",
    S.FAILING_OVER: "is failing over",
    S.FAILED_OVER: "is failed over, awaiting commit or rollback",
    S.COMMITTING: "is committing its failover",
    S.ROLLING_BACK: "is rolling back its failover",
    S.COMMITTED: "is failed over and committed",
    S.REVERSING: "is starting reverse protection",
}


def allowed(state: OperationState,
            table: Mapping[tuple[OperationState, Operation], OperationState] = TRANSITIONS,
            ) -> list[Operation]:
    """The operations `state` allows, in the table's order."""
    return [op for (st, op) in table if st == state]


def refusal(vpg: str, state: OperationState, op: Operation, detail: str = "") -> str:
    """The message of a refused operation: what the VPG is doing, what is allowed now."""
    now = allowed(state)
    what = ", ".join(str(o) for o in now) if now else "nothing until it finishes"
    extra = f" ({detail})" if detail else ""
    return f"VPG {vpg} {DOING[state]}{extra}: {op} is not allowed; allowed now: {what}"


def check(vpg: str, state: OperationState, op: Operation, detail: str = "") -> None:
    """Raise StateError (the refusal's message) unless `state` allows `op`."""
    if (state, op) not in TRANSITIONS:
        raise StateError(refusal(vpg, state, op, detail))


@dataclass
class Transition:
    vpg: str
    before: OperationState
    running: OperationState
    operation: Operation
    settled: bool = False


class OperationStates:
    """The current operation state of every VPG of a site (thread-safe, in memory: a
    restart ends every running test, so each VPG starts at `replicating` unless an
    operation restores its own state through `set`)."""

    def __init__(self) -> None:
        self._states: dict[str, OperationState] = {}
        self._details: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, vpg: str) -> OperationState:
        with self._lock:
            return self._states.get(vpg, S.REPLICATING)

    def set(self, vpg: str, state: OperationState, detail: str = "") -> None:
        with self._lock:
            self._states[vpg] = state
            self._details[vpg] = detail

    def begin(self, vpg: str, op: Operation) -> Transition:
        """Enter the running state of `op`, or raise StateError saying why not."""
        with self._lock:
            state = self._states.get(vpg, S.REPLICATING)
            check(vpg, state, op, self._details.get(vpg, ""))
            running = TRANSITIONS[(state, op)]
            self._states[vpg] = running
            return Transition(vpg, state, running, op)

    def check(self, vpg: str, op: Operation) -> None:
        """`check` against the VPG's current state (nothing changes)."""
        with self._lock:
            check(vpg, self._states.get(vpg, S.REPLICATING), op, self._details.get(vpg, ""))

    def finish(self, t: Transition, ok: bool, detail: str = "") -> OperationState:
        """Leave the running state of `t`: where SETTLED says success or failure goes.
        Once only: a second call (a task's end after its own) changes nothing."""
        if t.settled:
            return self.get(t.vpg)
        t.settled = True
        done, failed = SETTLED[t.running]
        state = done if ok else failed
        self.set(t.vpg, state, detail)
        return state

    def forget(self, vpg: str) -> None:
        with self._lock:
            self._states.pop(vpg, None)
            self._details.pop(vpg, None)
