"""Smoke test of the site benchmark suite (bench/suites/site.py): it runs with --quick and
its report names every metric with a baseline.  No timing is asserted: the numbers of
--quick mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"
METRICS = {"site.checkpoint_list", "site.volumes_1500"}


def test_quick_site_suite_reports_every_metric(tmp_path):
    report = tmp_path / "site.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(HARNESS), "site", "--quick", "--quiet", "--json", str(report)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "site"
    assert {m["name"] for m in doc["metrics"]} == METRICS
    for m in doc["metrics"]:
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, m
        assert m["note"] and isinstance(m["met"], bool)
        if m["name"] == "site.volumes_1500":  # RPO p99 vs the 1 s budget
            assert m["unit"] == "s" and m["baseline"] == 1.0
            for key in ("threads_per_volume", "fds_per_volume", "rss_per_volume_bytes"):
                assert key in m["details"], m["details"]
        else:
            assert m["unit"] == "ms" and m["details"]["budget_ms"] == 100.0
    assert [p.name for p in tmp_path.iterdir()] == ["site.json"]  # scratch removed
