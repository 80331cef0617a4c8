"""Smoke tests of the benchmark harness (bench/harness.py): it runs, and its JSON report
has the documented shape.  No timing is asserted: the numbers of --quick mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "bench" / "harness.py"
JOURNAL_METRICS = {
    "journal.append",
    "journal.readthrough_4k",
    "journal.reopen",
    "journal.index_bytes_per_write",
    "journal.promote",
}


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(HARNESS), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def _positive_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x) and x > 0)


def test_quick_journal_suite_writes_a_report_with_every_metric(tmp_path):
    report = tmp_path / "journal.json"
    done = _run(["journal", "--quick", "--quiet", "--json", str(report)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    doc = json.loads(report.read_text())
    assert set(doc) == {"suite", "metrics"}
    assert doc["suite"] == "journal"
    assert isinstance(doc["metrics"], list)
    names = [m["name"] for m in doc["metrics"]]
    assert len(names) == len(set(names)), f"duplicate metrics: {names}"
    assert set(names) == JOURNAL_METRICS
    for m in doc["metrics"]:
        assert {"name", "value", "unit", "baseline", "ratio"} <= set(m), m
        assert isinstance(m["unit"], str) and m["unit"], m
        for key in ("value", "baseline", "ratio"):
            assert _positive_number(m[key]), (m["name"], key, m[key])
        assert math.isclose(m["ratio"], m["value"] / m["baseline"], rel_tol=1e-9)
        assert isinstance(m["target"], str)
        assert isinstance(m["met"], bool)
    for name in names:  # the table names every metric too
        assert name in done.stdout
    # the scratch directory is removed
    assert [p.name for p in tmp_path.iterdir()] == ["journal.json"]


def test_unknown_suite_is_refused_with_the_list_of_suites(tmp_path):
    done = _run(["no-such-suite"], tmp_path)
    assert done.returncode != 0
    assert "unknown suite 'no-such-suite'" in done.stderr
    assert "journal" in done.stderr


def test_list_names_the_journal_suite(tmp_path):
    done = _run(["--list"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("journal") for line in done.stdout.splitlines())
