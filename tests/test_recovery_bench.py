"""Smoke test of the recovery benchmark suite (bench/suites/recovery/, issue 11): one suite
runs with --quick (its delta sync against a target in a subprocess) and its report names
all six metrics, each with a baseline and its target.  No timing is asserted: the numbers
of --quick mean nothing (each ratio is checked only to be finite and positive)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"
TARGETS = {
    "recovery.rto_first_read": "<= 1.2",
    "recovery.delta_sync": "<= 1.05",
    "recovery.delta_sync_time": "<= 0.35",
    "recovery.promote_under_load": ">= 0.5",
    "recovery.test_start": "<= 1.2",
    "recovery.unclean_resync": "<= 0.05",
}


def _harness(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    return subprocess.run([sys.executable, str(HARNESS), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_quick_recovery_suite_reports_every_metric_of_the_issue(tmp_path: Path) -> None:
    report = tmp_path / "recovery.json"
    done = _harness(["recovery", "--quick", "--quiet", "--json", str(report)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "recovery"
    names = [m["name"] for m in doc["metrics"]]
    assert names == list(TARGETS)  # once each, in the issue's order
    for m in doc["metrics"]:
        assert m["target"] == TARGETS[m["name"]], m
        for key in ("value", "baseline", "ratio"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, m
        assert math.isclose(m["ratio"], m["value"] / m["baseline"], rel_tol=1e-9)
        assert m["note"] and m["unit"] and isinstance(m["met"], bool), m
    for name in names:
        assert name in done.stdout  # the table
    assert [p.name for p in tmp_path.iterdir()] == ["recovery.json"]  # scratch removed


def test_recovery_metrics_are_one_suite_not_one_per_part(tmp_path: Path) -> None:
    done = _harness(["--list"], tmp_path)
    assert done.returncode == 0, done.stderr
    suites = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert [s for s in suites if s.startswith("recovery")] == ["recovery"]
    for part in ("recovery_ops", "recovery_failover", "delta", "teststart"):
        refused = _harness([part], tmp_path)
        assert refused.returncode != 0 and f"unknown suite {part!r}" in refused.stderr
