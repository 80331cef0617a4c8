"""Static checks as tests: ruff, mypy and mypy's stubtest run inside the suite (CI runs
nothing else), so a lint error, a type error or a stub that drifted from its compiled
module fails `pytest` with the tool's own report.

mypy reads its configuration from pyproject.toml (strict for the public modules).
stubtest checks the `.pyi` stubs of zcore._native against the compiled extensions;
tests/stubtest_allowlist.txt lists, each with its reason, the names Cython adds.
The version, too, is checked to be written once (pyproject.toml).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import zcore

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ["zcore._native.record", "zcore._native.index", "zcore._native.capture"]

# stubtest must judge the stubs alone: errors in the modules they import (zcore's package
# __init__ pulls in the journal) are the mypy test's to report, not this one's
STUBTEST_CONFIG = """\
[mypy]
[mypy-zcore.*]
ignore_errors = True
[mypy-zcore._native.*]
ignore_errors = False
[mypy-lz4.*]
ignore_missing_imports = True
"""


def run_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_ruff_finds_no_lint_errors() -> None:
    proc = run_tool("ruff", "check", "--no-cache", "zcore", "tests", "bench")
    assert proc.returncode == 0, report(proc)


def test_mypy_finds_no_type_errors_in_zcore() -> None:
    proc = run_tool("mypy", "--config-file", "pyproject.toml")
    assert proc.returncode == 0, report(proc)


def test_stubs_of_native_modules_match_the_compiled_extensions(tmp_path: Path) -> None:
    config = tmp_path / "stubtest.ini"
    config.write_text(STUBTEST_CONFIG)
    # `python -m` puts the working directory first on sys.path (and mypy searches it):
    # an editable install is checked from the source tree, where its compiled modules
    # are; a plain install from outside it, or the source tree's zcore (no compiled
    # modules there) would shadow the installed one, which carries the stubs
    installed_from = Path(zcore.__file__).resolve().parent.parent
    where = ROOT if installed_from == ROOT else tmp_path
    proc = run_tool(
        "mypy.stubtest",
        "--mypy-config-file", str(config),
        "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt"),
        *NATIVE,
        cwd=where,
    )
    assert proc.returncode == 0, report(proc)


def test_version_is_written_once_in_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert zcore.__version__ == version("zcore") == declared
