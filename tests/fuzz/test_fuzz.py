"""Coverage-guided fuzzing with atheris: one test per target runs it as a subprocess for
FUZZ_SECONDS (20 s; ZCORE_DEEP=1: 300 s; ZCORE_FUZZ_SECONDS overrides), seeded from
corpus/<target>/ (new inputs go to a scratch copy), crash reproducers written to
crashes/<target>/ and kept: a crash fails the test and its file stays for the replay
test below.  Every file under crashes/ is replayed; files named "findingN-..." reproduce
a known issue 9 finding and are strict xfails until it is fixed.

Only the Python code is instrumented unless the extensions are built for coverage:
build_native_for_fuzzing.sh OUT, then ZCORE_FUZZ_NATIVE=OUT runs every target on that
build (PYTHONPATH=OUT, LD_PRELOAD=OUT/libfuzzer.so)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DEEP = os.environ.get("ZCORE_DEEP") == "1"
FUZZ_SECONDS = int(os.environ.get("ZCORE_FUZZ_SECONDS") or (300 if DEEP else 20))
TARGETS = ["wire", "records", "bitmap", "journal_dir", "nbd"]
# crash directories replayed with extra environment (crashes/<dir>/ -> target, env)
VARIANTS = {"journal_dir-meta": ("journal_dir", {"ZC_FUZZ_META": "1"})}
KNOWN = {
    6: "issue 9 finding 6: a crafted journal.meta with a valid CRC is not validated "
       "(open raises a non-zcore error)",
    9: "issue 9 finding 9: wire.parse_control raises RecursionError on deeply nested JSON",
}


def _need_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("atheris is not installed (pip install atheris)")
        pytest.skip("atheris is not installed (pip install atheris)")


def _run(target: str, args: list[str], env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    scratch = tempfile.mkdtemp(prefix="zc-fuzzrun-",
                               dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        full = dict(os.environ, ZC_FUZZ_TMP=scratch, **(env or {}))
        native = os.environ.get("ZCORE_FUZZ_NATIVE")
        if native:  # the coverage-instrumented extensions of build_native_for_fuzzing.sh
            full["PYTHONPATH"] = os.pathsep.join(filter(None, [native,
                                                                full.get("PYTHONPATH")]))
            full["LD_PRELOAD"] = os.path.join(native, "libfuzzer.so")
        return subprocess.run([sys.executable, str(HERE / f"fuzz_{target}.py"), *args],
                              capture_output=True, text=True, env=full, timeout=timeout,
                              cwd=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    _need_atheris()
    crashes = HERE / "crashes" / target
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = _run(target, [f"-max_total_time={FUZZ_SECONDS}", "-timeout=30",
                         "-rss_limit_mb=2048", f"-artifact_prefix={crashes}/",
                         str(corpus), str(HERE / "corpus" / target)],
                timeout=FUZZ_SECONDS * 3 + 120)
    new = sorted(set(crashes.iterdir()) - before)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0 and not new, (
        f"fuzz_{target} crashed (reproducer kept: {[str(p) for p in new]}):\n{tail}")
    assert "Done" in proc.stderr, tail


def _reproducers() -> list:
    out = []
    for d in sorted((HERE / "crashes").iterdir()):
        if not d.is_dir():
            continue
        target, env = VARIANTS.get(d.name, (d.name, {}))
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            marks = []
            if f.name.startswith("finding"):
                number = int(f.name[7:].split("-", 1)[0])
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[number]))
            out.append(pytest.param(target, env, f, marks=marks, id=f"{d.name}/{f.name}"))
    return out


@pytest.mark.parametrize(("target", "env", "path"), _reproducers())
def test_fuzz_reproducer_replays_clean(target: str, env: dict[str, str], path: Path) -> None:
    _need_atheris()
    proc = _run(target, [str(path)], env=env, timeout=300)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, f"{path.name} still crashes fuzz_{target}:\n{tail}"
