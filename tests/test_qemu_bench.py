"""Smoke test of the qemu benchmark suite (bench/suites/qemu.py) through the harness: the
mirror metrics come out in the documented shape, and what the mirror forwarded is what
zcore captured.  --quick numbers mean nothing, so no timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

BENCH = Path(__file__).resolve().parent.parent / "bench"
HARNESS = BENCH / "harness.py"


def test_quick_qemu_suite_reports_every_mirror_metric_beside_its_baseline(tmp_path):
    for tool in ("qemu-storage-daemon", "qemu-nbd", "fio"):
        require_tool(tool)
    report = tmp_path / "qemu.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(HARNESS), "qemu", "--quick", "--quiet",
                           "--json", str(report)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "qemu.resync_bytes: not yet measurable" in done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "qemu"
    metrics = {m["name"]: m for m in doc["metrics"]}
    assert set(metrics) == {"qemu.mirror_write_4k", "qemu.mirror_write_seq"}
    for m in metrics.values():
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], float | int) and math.isfinite(m[key]) and m[key] > 0
        assert math.isclose(m["ratio"], m["value"] / m["baseline"], rel_tol=1e-9)
        assert m["target"] and isinstance(m["met"], bool)
        details = m["details"]
        assert details["captured_equal"] is True, details
        assert details["zcore_stop"].startswith("protected volumes stopped at checkpoint")
        assert details["journal_records"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["qemu.json"]  # scratch removed


def test_resync_measurement_counts_what_the_bitmap_marked_during_the_outage(tmp_path):
    for tool in ("qemu-storage-daemon", "qemu-nbd", "fio"):
        require_tool(tool)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from benchkit import Context
    from suites import qemu

    seen = {}

    def sync(daemon, bitmap):  # stands for zcore's bitmap sync: reads nothing
        seen["job"] = daemon.block_job("zcore-mirror")
        seen["marked"] = qemu.bitmap_count(daemon, bitmap)
        return 0

    metric = qemu.measure_resync_bytes(Context(workdir=tmp_path, quick=True, verbose=False),
                                       sync)
    assert seen["job"] is None  # the outage ended the mirror before the sync
    assert metric.name == "qemu.resync_bytes" and metric.value == 0
    assert metric.baseline == seen["marked"] > 0 and metric.baseline % 4096 == 0
    assert metric.target == "<= 1.05"
