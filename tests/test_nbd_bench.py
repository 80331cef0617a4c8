"""Smoke test of the nbd benchmark suite (bench/suites/nbd.py) through the harness: it runs
with real clients and reports every metric in the documented shape.  --quick numbers mean
nothing, so no timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "harness.py"


def test_quick_nbd_suite_reports_every_metric_beside_its_baseline(tmp_path):
    for tool in ("nbdcopy", "qemu-nbd", "fio", "qemu-io"):
        require_tool(tool)
    report = tmp_path / "nbd.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(HARNESS), "nbd", "--quick", "--quiet",
                           "--json", str(report)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "nbd"
    metrics = {m["name"]: m for m in doc["metrics"]}
    assert set(metrics) == {"nbd.write_seq", "nbd.read_pit_seq", "nbd.randwrite_4k",
                            "nbd.copy_sparse", "nbd.trim"}
    for m in metrics.values():
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], float | int) and math.isfinite(m[key]) and m[key] > 0
        assert math.isclose(m["ratio"], m["value"] / m["baseline"], rel_tol=1e-9)
        assert m["target"] and isinstance(m["met"], bool)
    assert metrics["nbd.read_pit_seq"]["details"]["image_equal"] is True
    assert metrics["nbd.write_seq"]["details"]["captured_writes"] > 0
    assert metrics["nbd.copy_sparse"]["details"]["image_equal"] is True
    trim = metrics["nbd.trim"]["details"]
    assert trim["backing_allocated_after"] < trim["backing_allocated_before"]
    assert [p.name for p in tmp_path.iterdir()] == ["nbd.json"]  # scratch removed
