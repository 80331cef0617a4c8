"""`zcore demo` end to end, as a user runs it: the installed console script on its
embedded defaults (two 64 MiB VMs, a 4 s workload at 40 MB/s; about 6 s here), in a
temporary directory.  The demo must exit 0 and say that it paired, protected, tagged a
durable checkpoint, ran the ransomware and recovered that same checkpoint byte for byte,
and leave no files behind.  Throughput and RPO figures are printed, never asserted."""

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
    assert re.search(r"^paired protected site with recovery site 'recovery' at "
                     r"127\.0\.0\.1:\d+ \(certificate [0-9a-f]{16}\.\.\.\)$", out, re.M), out
    assert "protecting VPG 'demo-vpg': VMs web and db, 64 MiB each" in out
    assert re.search(r"^  t= *\d+\.\ds  state=\w+ +RPO= *\d+ ms", out, re.M), out
    tagged = re.search(r"^tagged checkpoint 'before-ransomware' \(seq (\d+)\) is durable "
                       r"at the recovery site$", out, re.M)
    assert tagged, out
    assert "ransomware overwrote both disks; the damage is replicated too" in out
    assert re.search(r"^report$", out, re.M), out
    assert re.search(r"^  workload +\d+\.\d MiB in \d+\.\d s, steady replication "
                     r"\d+\.\d MB/s$", out, re.M), out
    assert re.search(r"^  RPO +worst \d+ ms$", out, re.M), out
    # both VMs' disks (2 x 64 MiB) recovered at the very checkpoint that was tagged
    assert re.search(rf"^  recovered +128\.0 MiB at checkpoint {tagged[1]} "
                     r"\('before-ransomware'\)$", out, re.M), out
    assert out.rstrip().endswith(
        "  verification      byte-for-byte identical to the disks at the checkpoint")
    assert "FAILED" not in out + done.stderr
    assert list(tmp_path.iterdir()) == []  # its temporary directory removed


def test_demo_refuses_a_zero_volume_size_before_starting(tmp_path: Path) -> None:
    done = _demo(tmp_path, "--volume-mib", "0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "must be positive" in done.stderr
    assert "paired" not in done.stdout
