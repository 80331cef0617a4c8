"""The failover test: a VPG's VMs brought up at a checkpoint on scratch overlays, while
replication and new checkpoints go on, then discarded with the user's verdict.

Sits on zcore.recovery.scratch (one ScratchOverlay per volume of every VM, all under one
ScratchBudget: the VPG's scratch limit is the sum over its overlays) and the recovery
VPG's journals (one view per VM, pinning the checkpoint against promotion until the test
stops); under the site service's operations (zcore.site.operations), which serves the
exports on its NBD server, starts the VMs through an adapter
(zcore.adapters, through the VPG's boot plan) and records the result.

Export names are stable, so a VM definition can point at them once:
`test/<vpg>/<vm>/<volume>`.

Opening costs one view per VM and one sparse scratch file per volume: nothing is read
or copied, so starting a test does not grow with the journal (bench recovery.test_start).

The verdict.  Checkpoints are made by the protected site's stream, so the recovery site
cannot put a tag into a history it received (a tag is a record at a seq of that stream).
Asking the protected site to tag would mark a new checkpoint, not the tested one, and
fails exactly when tests matter most (the protected site unreachable).  So the result is
a `TestRecord` tied to the tested checkpoint's id, labelled "Tested at <start>", kept by
the recovery site (zcore.site.operations stores it with the VPG and logs an event): what
a DR user audits is "which checkpoint was tested when, by whom, and did it pass".
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from zcore.errors import ConfigError
from zcore.journal import Journal, View
from zcore.nbd import Export, ExportKind
from zcore.records import Checkpoint
from zcore.recovery.scratch import ScratchBudget, ScratchOverlay

EXPORT_PREFIX = "test"
# Scratch limit of a VPG's test when its settings give none: 10 GiB over all its volumes
# (a test that writes more than that is a workload, not a test).
DEFAULT_TEST_SCRATCH_BYTES = 10 << 30


def failover_test_export(vpg: str, vm: str, volume: str) -> str:
    return f"{EXPORT_PREFIX}/{vpg}/{vm}/{volume}"


class TestResult(StrEnum):
    __test__ = False  # not a pytest class
    PASSED = "passed"
    FAILED = "failed"
    ABORTED = "aborted"  # ended without a verdict (the site service restarted)


def utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def tested_label(started_at: float) -> str:
    return f"Tested at {utc_stamp(started_at)}"


@dataclass(frozen=True)
class TestRecord:
    """One failover test of a VPG: its checkpoint, when, and the verdict (None while it
    runs)."""

    __test__ = False

    vpg: str
    checkpoint_id: int
    checkpoint_tag: str | None
    checkpoint_time: float
    started_at: float
    stopped_at: float | None = None
    result: TestResult | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return tested_label(self.started_at)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["result"] = None if self.result is None else str(self.result)
        doc["label"] = self.label
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TestRecord:
        result = doc.get("result")
        return cls(str(doc["vpg"]), int(doc["checkpoint_id"]), doc.get("checkpoint_tag"),
                   float(doc["checkpoint_time"]), float(doc["started_at"]),
                   None if doc.get("stopped_at") is None else float(doc["stopped_at"]),
                   None if result is None else TestResult(result), str(doc.get("note", "")))

    def ended(self, result: TestResult, note: str, when: float | None = None) -> TestRecord:
        return TestRecord(self.vpg, self.checkpoint_id, self.checkpoint_tag,
                          self.checkpoint_time, self.started_at,
                          time.time() if when is None else when, result, note)


@dataclass(frozen=True)
class TestVolume:
    __test__ = False
    vm: str
    volume: str
    export: str
    overlay: ScratchOverlay


class FailoverTest:
    """The overlays and exports of one running test (blocking: call from worker threads).

    `open()` opens a view per VM at `checkpoint` and a ScratchOverlay per volume, all
    sharing one ScratchBudget of `limit_bytes`; `exports()` are NBD exports over them
    (not owned by the server: `close()` closes overlays and views after the server
    dropped the exports)."""

    def __init__(self, vpg: str, journals: dict[str, Journal], checkpoint: Checkpoint, *,
                 limit_bytes: int = DEFAULT_TEST_SCRATCH_BYTES,
                 directory: str | None = None, started_at: float | None = None) -> None:
        if not journals:
            raise ConfigError(f"VPG {vpg} has no VMs to test")
        self.vpg = vpg
        self.checkpoint = checkpoint
        self.started_at = time.time() if started_at is None else started_at
        self.budget = ScratchBudget(limit_bytes, f"failover test of VPG {vpg}")
        self._journals = dict(journals)
        self._directory = directory
        self._views: list[View] = []
        self.volumes: list[TestVolume] = []
        self._lock = threading.Lock()
        self._closed = False

    def open(self) -> FailoverTest:
        try:
            for vm in sorted(self._journals):
                journal = self._journals[vm]
                view = journal.view(self.checkpoint.id)
                self._views.append(view)
                for spec in sorted(journal.volumes.values(), key=lambda v: v.name):
                    overlay = ScratchOverlay(view, spec.id, limit_bytes=self.budget.limit_bytes,
                                             directory=self._directory, budget=self.budget)
                    self.volumes.append(TestVolume(vm, spec.name,
                                                   failover_test_export(self.vpg, vm, spec.name),
                                                   overlay))
        except BaseException:
            self.close()
            raise
        return self

    def exports(self) -> list[Export]:
        tag = f" {self.checkpoint.tag!r}" if self.checkpoint.tag else ""
        return [Export(v.export, v.overlay,
                       f"failover test of {v.vm}/{v.volume} at checkpoint "
                       f"{self.checkpoint.id}{tag} (writes discarded at stop)",
                       owned=False, kind=ExportKind.SCRATCH) for v in self.volumes]

    @property
    def used_bytes(self) -> int:
        return self.budget.used_bytes

    @property
    def limit_bytes(self) -> int:
        return self.budget.limit_bytes

    def usage(self) -> list[dict[str, Any]]:
        return [{"vm": v.vm, "volume": v.volume, "export": v.export,
                 "used_bytes": 0 if v.overlay.closed else v.overlay.used_bytes}
                for v in self.volumes]

    def record(self) -> TestRecord:
        c = self.checkpoint
        return TestRecord(self.vpg, c.id, c.tag, c.time, self.started_at)

    def close(self) -> None:
        """Discard every overlay's writes and unpin the checkpoint."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for v in self.volumes:
            v.overlay.close()
        for view in self._views:
            view.close()
        self._views.clear()
