"""Smoke test of the recovery benchmark suite (bench/suites/recovery.py): it runs with
--quick against a delta-sync target in a subprocess, and its report names every metric
with a baseline and its target.  No timing is asserted: the numbers of --quick mean
nothing (the bytes ratio is checked only to be finite and positive)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"


def test_quick_recovery_suite_reports_every_delta_sync_metric(tmp_path):
    report = tmp_path / "recovery.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(HARNESS), "recovery", "--quick", "--quiet", "--json",
         str(report)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "recovery"
    targets = {m["name"]: m["target"] for m in doc["metrics"]}
    assert targets == {"recovery.delta_sync": "<= 1.05", "recovery.delta_sync_time": "<= 0.35"}
    for m in doc["metrics"]:
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, m
        assert m["note"] and m["unit"]
    assert [p.name for p in tmp_path.iterdir()] == ["recovery.json"]  # scratch removed
