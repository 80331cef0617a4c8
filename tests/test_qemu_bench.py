"""Smoke test of the qemu benchmark suite (bench/suites/qemu.py) through the harness: every
metric comes out in the documented shape; what the mirror forwarded is what zcore
captured; the bitmap sync after the (quick, 2 s) outage read at least what QEMU's bitmap
marked and left the journal exactly like QEMU's disk.  --quick numbers mean nothing, so
no timing or ratio is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

from zcore.errors import ConfigError

BENCH = Path(__file__).resolve().parent.parent / "bench"
HARNESS = BENCH / "harness.py"
TOOLS = ("qemu-storage-daemon", "qemu-nbd", "qemu-img", "qemu-io", "fio")
MIRROR_METRICS = {"qemu.mirror_write_4k", "qemu.mirror_write_seq"}


def _positive(m: dict) -> None:
    for key in ("value", "baseline", "ratio"):
        assert isinstance(m[key], float | int) and math.isfinite(m[key]) and m[key] > 0, m
    assert math.isclose(m["ratio"], m["value"] / m["baseline"], rel_tol=1e-9)
    assert m["target"] and isinstance(m["met"], bool)


def test_quick_qemu_suite_reports_every_metric_beside_its_baseline(tmp_path):
    for tool in TOOLS:
        require_tool(tool)
    report = tmp_path / "qemu.json"
    env = dict(os.environ, ZCORE_BENCH_DIR=str(tmp_path))
    env.pop("ZCORE_QEMU_OUTAGE", None)
    done = subprocess.run([sys.executable, str(HARNESS), "qemu", "--quick", "--quiet",
                           "--json", str(report)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(report.read_text())
    assert doc["suite"] == "qemu"
    metrics = {m["name"]: m for m in doc["metrics"]}
    assert set(metrics) == MIRROR_METRICS | {"qemu.resync_bytes"}
    for name in MIRROR_METRICS:
        m = metrics[name]
        _positive(m)
        details = m["details"]
        assert details["captured_equal"] is True, {
            key: details[key] for key in ("zcore_copy_equal", "journal_checkpoint_equal",
                                          "mirror_at_end", "journal_records", "zcore_stop")}
        assert details["mirror_at_end"] == "ready"
        assert details["zcore_stop"].startswith("protected volumes stopped at checkpoint")
        assert details["journal_records"] > 0

    resync = metrics["qemu.resync_bytes"]
    _positive(resync)
    assert resync["unit"] == "bytes" and resync["target"] == "<= 1.05"
    d = resync["details"]
    assert d["outage_seconds"] == 2 and d["outage_profile"] == "quick"
    assert d["resynced_equal"] is True
    # the outage ended the mirror (the guest wrote on), and QEMU's bitmap marked whole
    # granules: the baseline is what zcore's generation counted when zcore came back
    assert d["mirror_after_outage"]["status"] not in ("running", "ready"), d
    assert d["guest"]["written_bytes"] > 0
    assert resync["baseline"] == d["generation_at_restart"]["count"]
    assert resync["baseline"] % d["bitmap_granularity"] == 0
    assert d["changed_extents"] and d["changed_extents"][-1]["named"] == resync["baseline"]
    # every marked byte held new guest data and the journal matches QEMU's disk: the
    # sync read at least every marked byte, whatever else it read
    assert resync["value"] >= resync["baseline"]
    assert d["initial_sync_read_bytes"] >= d["prefilled_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["qemu.json"]  # scratch removed


def test_the_outage_length_comes_from_the_environment_or_the_profile(tmp_path, monkeypatch):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from benchkit import Context
    from suites import qemu

    quick, full = Context(tmp_path, quick=True), Context(tmp_path)
    monkeypatch.delenv("ZCORE_QEMU_OUTAGE", raising=False)
    assert qemu.outage_seconds(full) == (30, "issue 15")
    assert qemu.outage_seconds(quick) == (2, "quick")
    monkeypatch.setenv("ZCORE_QEMU_OUTAGE", "7")
    assert qemu.outage_seconds(full) == qemu.outage_seconds(quick) == (7, "ZCORE_QEMU_OUTAGE")
    for bad in ("0", "-3", "1.5", "abc", "3601"):
        monkeypatch.setenv("ZCORE_QEMU_OUTAGE", bad)
        with pytest.raises(ConfigError, match="ZCORE_QEMU_OUTAGE"):
            qemu.outage_seconds(quick)
