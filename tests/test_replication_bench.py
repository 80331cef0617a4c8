"""Smoke test of the replication benchmark suite (bench/suites/replication.py): it runs
with --quick against a recovery site in a subprocess, and its report names every metric
with a baseline.  No timing is asserted: the numbers of --quick mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"
METRICS = {"replication.e2e", "replication.rpo_p99", "replication.resync_bytes",
           "replication.initial_sync", "replication.wan_20mb"}


def test_quick_replication_suite_reports_every_metric(tmp_path):
    report = tmp_path / "replication.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(HARNESS), "replication", "--quick", "--quiet", "--json",
         str(report)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "replication"
    names = [m["name"] for m in doc["metrics"]]
    assert sorted(names) == sorted(METRICS)
    for m in doc["metrics"]:
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, m
        assert m["note"] and m["unit"]
    targets = {m["name"]: m["target"] for m in doc["metrics"]}
    assert targets == {"replication.e2e": ">= 0.85", "replication.rpo_p99": "<= 1",
                       "replication.resync_bytes": "<= 1.05", "replication.initial_sync": None,
                       "replication.wan_20mb": ">= 1.2"}
    wan = next(m for m in doc["metrics"] if m["name"] == "replication.wan_20mb")
    for p in wan["details"]["passes"]["adaptive"] + wan["details"]["passes"]["lz4"]:
        assert p["cpu_seconds_per_mb"]["protected"] and p["codecs"], p
    assert [p.name for p in tmp_path.iterdir()] == ["replication.json"]  # scratch removed
