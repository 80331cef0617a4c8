"""I/O errors below Python: the LD_PRELOAD shim (tests/native/fail_shim.c) fails pread,
pwrite and fdatasync inside the C read-through and libc, in a child process
(native_io_child.py).  A failed read must raise a zcore.errors class or OSError, never
return bytes; a failed commit must stop the journal; either way the journal reopens
clean, with every acknowledged write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reliability import crashsim
from zcore import errors
from zcore.journal import Journal, JournalSettings

HERE = Path(__file__).parent
SHIM_SRC = HERE.parent / "native" / "fail_shim.c"
VOLUMES = [(1, "a", 256 << 10), (2, "b", 256 << 10)]


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("shim") / "fail_shim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out), str(SHIM_SRC),
                    "-ldl"], check=True)
    return out


def _digest(journal: Journal) -> str:
    h = hashlib.sha256()
    with journal.view(journal.latest_checkpoint()) as view:
        for vid, _, size in VOLUMES:
            h.update(view.read(vid, 0, size))
    return h.hexdigest()


@pytest.fixture
def journal_dir():
    root = Path(crashsim.scratch_dir("zc-native-"))
    path = root / "j"
    rng = random.Random(5)
    with Journal.create(path, VOLUMES, settings=JournalSettings(group_commit_bytes=0)) as j:
        for _ in range(3):  # promoted: read from the replicas
            j.append([(1, rng.randrange(0, 64) * 4096, rng.randbytes(4096)) for _ in range(8)],
                     compress=False)
        j.promote_to(j.checkpoint().seq)
        for _ in range(3):  # journaled: read from the segments (block-CRC records)
            j.append([(v, rng.randrange(0, 64) * 4096, rng.randbytes(8192))
                      for v in (1, 2)], compress=False)
        j.checkpoint("last")
        j.commit()
        digest = _digest(j)
    yield path, digest
    shutil.rmtree(root, ignore_errors=True)


def _child(shim: Path, path: Path, scenario: str, ops: str, where: str) -> dict:
    env = dict(os.environ, LD_PRELOAD=str(shim), ZC_SHIM_OPS=ops, ZC_SHIM_PATH=where,
               ZC_SHIM_ARM="0", ZC_SHIM_ERRNO="5")
    proc = subprocess.run([sys.executable, str(HERE / "native_io_child.py"), str(path),
                           scenario], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is_clear_error(text: str | None) -> bool:
    if text is None:
        return False
    name = text.split(":", 1)[0].rsplit(".", 1)[-1]
    cls = getattr(errors, name, None) or getattr(__builtins__, name, None)
    if cls is None and name in ("OSError", "IOError"):
        cls = OSError
    return isinstance(cls, type) and issubclass(cls, (errors.ZcoreError, OSError))


@pytest.mark.parametrize("where", ["seg-", "replica-"])
def test_failed_native_pread_raises_instead_of_returning_bytes(shim: Path, journal_dir,
                                                               where: str) -> None:
    path, digest = journal_dir
    out = _child(shim, path, "read", "pread", where)
    assert _is_clear_error(out["error"]), out
    assert out["after"] == digest  # the same read succeeds once the disk is healthy
    with Journal.open(path) as j:
        assert _digest(j) == digest


def test_failed_native_fdatasync_stops_the_journal(shim: Path, journal_dir) -> None:
    path, digest = journal_dir
    out = _child(shim, path, "commit", "fdatasync,fsync", "seg-")
    assert _is_clear_error(out["error"]), out
    assert out["again"] is not None, f"a commit after a failed fsync succeeded: {out}"
    with Journal.open(path) as j:
        assert _digest(j) == digest


def test_failed_native_pwrite_refuses_the_append(shim: Path, journal_dir) -> None:
    path, digest = journal_dir
    out = _child(shim, path, "append", "pwrite", "seg-")
    assert _is_clear_error(out["error"]), out
    with Journal.open(path) as j:
        assert _digest(j) == digest
