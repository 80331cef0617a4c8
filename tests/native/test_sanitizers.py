"""The C layer under AddressSanitizer and UndefinedBehaviorSanitizer: sanitize_driver.c
exercises zc_record (encode, decode, scan, block-CRC reads, the ZERO-record encoder of
issue 9 finding 10), zc_index and zc_capture; any sanitizer report fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CSRC = HERE.parent.parent / "csrc"
SOURCES = ["zc_crc32c.c", "zc_record.c", "zc_index.c", "zc_capture.c"]
FLAGS = ["-std=gnu11", "-g", "-O1", "-fno-omit-frame-pointer", "-Wall", "-Wextra",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_c_layer_runs_clean_under_address_and_undefined_sanitizers(cc: str,
                                                                   tmp_path: Path) -> None:
    compiler = shutil.which(cc)
    if compiler is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{cc} is not installed (CI installs it)")
        pytest.skip(f"{cc} is not installed")
    exe = tmp_path / "sanitize_driver"
    subprocess.run([compiler, *FLAGS, f"-I{CSRC}", str(HERE / "sanitize_driver.c"),
                    *(str(CSRC / s) for s in SOURCES), "-lpthread", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "runtime error" not in report \
        and "Sanitizer" not in report, report
