"""`zcore demo` end to end, as a user runs it: the installed console script on its
embedded defaults (two site services, two 64 MiB VMs, a 4 s workload at 40 MB/s), in a
temporary directory.  The demo must exit 0 and say that it paired, protected, tagged a
durable checkpoint, ran the ransomware, failed over to that same checkpoint byte for
byte, protected the VPG back with a delta sync and failed back, and leave no files
behind.  Throughput and RPO figures are printed, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from helpers.cli import zcore_cmd

# The defaults' run takes ~6 s on an idle machine; this bounds a loaded one.
DEMO_TIMEOUT = 180


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the demo's temporary directory
    return subprocess.run(zcore_cmd("demo", *args), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT)


def test_demo_recovers_the_tagged_checkpoint_byte_for_byte_on_its_defaults(
        tmp_path: Path) -> None:
    done = _demo(tmp_path)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"^site services prod \(http://127\.0\.0\.1:\d+\) and dr "
                     r"\(http://127\.0\.0\.1:\d+\) paired both ways \(dr's certificate "
                     r"[0-9a-f]{16}\.\.\.\)$", out, re.M), out
    assert "protecting VPG 'demo-vpg' from prod to dr: VMs web and db, 64 MiB each" in out
    assert re.search(r"^  t= *\d+\.\ds  RPO= *\d+ ms", out, re.M), out
    tagged = re.search(r"^tagged checkpoint 'before-ransomware' \(id (\d+)\) is durable "
                       r"at dr$", out, re.M)
    assert tagged, out
    assert "ransomware overwrote both disks; the damage is replicated too" in out
    assert f"failed over at dr to checkpoint {tagged[1]}" in out
    assert "verified 128 MiB of recovered volumes at dr: identical" in out
    assert re.search(r"^committed: dr protects demo-vpg back to prod \(.*delta sync.*\)$",
                     out, re.M), out
    assert "failed back: prod protects demo-vpg again, on its own disks" in out
    assert re.search(r"^report$", out, re.M), out
    assert re.search(r"^  workload +\d+\.\d MiB in \d+\.\d s, steady replication "
                     r"\d+\.\d MB/s$", out, re.M), out
    assert re.search(r"^  RPO +worst \d+ ms$", out, re.M), out
    assert re.search(rf"^  recovered +128\.0 MiB at checkpoint {tagged[1]} "
                     r"\('before-ransomware'\)$", out, re.M), out
    assert out.rstrip().endswith("failed-over volumes and failed-back disks byte-for-byte "
                                 "identical to the disks at the checkpoint")
    assert "FAILED" not in out + done.stderr
    assert list(tmp_path.iterdir()) == []  # its temporary directory removed


def test_demo_refuses_a_zero_volume_size_before_starting(tmp_path: Path) -> None:
    done = _demo(tmp_path, "--volume-mib", "0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "must be positive" in done.stderr
    assert "paired" not in done.stdout
