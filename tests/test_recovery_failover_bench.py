"""Smoke test of the live-failover benchmark suite (bench/suites/recovery_failover.py): it
runs with --quick and reports both metrics with a baseline.  No timing is asserted: the
numbers of --quick mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"
METRICS = {"recovery.rto_first_read", "recovery.promote_under_load"}


def test_quick_recovery_failover_suite_reports_every_metric(tmp_path):
    report = tmp_path / "recovery.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(HARNESS), "recovery_failover", "--quick", "--quiet", "--json",
         str(report)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "recovery_failover"
    assert {m["name"] for m in doc["metrics"]} == METRICS
    for m in doc["metrics"]:
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, m
        assert m["note"] and isinstance(m["met"], bool)
    assert [p.name for p in tmp_path.iterdir()] == ["recovery.json"]  # scratch removed
