"""Power loss at every point of a backup repository workload (issue 13): the crash-state
model of the filesystem repository, as test_crash_states is for the journal.

The workload (reliability.backupsim: Repository.init, a full backup, two incrementals, a
prune whose GC deletes the oldest, one more backup) runs on a DirectoryStore under the
recording file layer, which follows the store's nested directories (chunks/XX/<id>,
manifests/); every crash state built from the trace is opened and checked: it opens once
init returned, check finds no damaged or missing chunk, every backup acknowledged and not
pruned is listed, every listed backup restores byte-exact to its checkpoint's images, an
acknowledged locked backup stays locked, a backup pruned by a returned prune stays gone,
and on a sample of states a backup and a prune run after the crash and leave a repository
that checks clean; states that crashed mid-GC are crashed again at every point of the
recovery that finishes it.  The planted-bug tests
prove the harness: stores that skip the fsync of an object's data, the directory fsyncs
of `sync` or its fsyncs of locked files must produce violations (the last is the
DirectoryStore before its fix: `lock` set the mtime and nothing fsynced it).  The first
tests check the tree model itself."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from reliability import backupsim, crashsim, fslayer
from zcore.backup import DirectoryStore

# the default run enumerates every point of one workload (~550 events); deep runs more
# random states per point over more workloads
SEEDS = (1, 2, 3) if crashsim.DEEP else (1,)
PER_POINT = 12 if crashsim.DEEP else 2
MIN_STATES = 15_000 if crashsim.DEEP else 1_500
RECOVER = 40 if crashsim.DEEP else 4  # states mid-GC also crashed during its recovery


# ---- the tree model -----------------------------------------------------------------------


def _trace(work) -> tuple[dict[str, bytes], list[fslayer.Event]]:  # type: ignore[no-untyped-def]
    root = Path(crashsim.scratch_dir("zc-tree-"))
    try:
        (root / "old").mkdir()
        (root / "old" / "f").write_bytes(b"base")
        base = fslayer.snapshot(root)
        with fslayer.Recorder(root) as rec:
            work(root, rec)
        return base, rec.events
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _states(base: dict[str, bytes], trace: list[fslayer.Event]) -> list[tuple[int, dict]]:
    return [(p, f) for p, _, f, _ in fslayer.crash_states(base, trace, random.Random(0), 0)]


def test_snapshot_and_materialize_keep_a_tree() -> None:
    base, _ = _trace(lambda root, rec: None)
    assert base == {"old/": b"", "old/f": b"base"}
    root = Path(crashsim.scratch_dir("zc-tree-"))
    try:
        tree = {"a/": b"", "a/b/": b"", "a/b/c": b"x", "d": b"y", "e/": b""}
        fslayer.materialize(tree, str(root / "t"))
        assert fslayer.snapshot(root / "t") == tree
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_file_in_a_new_directory_is_durable_only_when_every_parent_is_synced() -> None:
    def work(root: Path, rec: fslayer.Recorder) -> None:
        (root / "d").mkdir()
        (root / "d" / "e").mkdir()
        _put(root / "d" / "e" / "f", b"data")
        rec.mark("written")
        _fsync_dir(root / "d" / "e")
        rec.mark("leaf synced")
        _fsync_dir(root / "d")
        rec.mark("middle synced")
        _fsync_dir(root)
        rec.mark("root synced")

    base, trace = _trace(work)
    assert [ev[0] for ev in trace if ev[0] != "mark"] == [
        "mkdir", "mkdir", "create", "write", "sync", "dirsync", "dirsync", "dirsync"]
    assert ("dirsync", "d/e") in trace and ("dirsync", ".") in trace
    by_point = _states(base, trace)
    marks = {ev[1]: i + 1 for i, ev in enumerate(trace) if ev[0] == "mark"}
    strict = {p: f for p, f in by_point[::2]}  # strict first at each point, then "all"
    for label in ("written", "leaf synced", "middle synced"):
        assert strict[marks[label] - 1] == base, label  # the new path is not reachable
    assert strict[marks["root synced"] - 1] == {**base, "d/": b"", "d/e/": b"",
                                                "d/e/f": b"data"}
    # every state: a path only with its ancestors, and d/e/f never torn once it exists
    for _, files in by_point:
        for path in files:
            parts = path.rstrip("/").split("/")
            for i in range(1, len(parts)):
                assert "/".join(parts[:i]) + "/" in files, (path, files)
        assert files.get("d/e/f", b"data") in (b"", b"data")


def test_a_rename_and_an_unlink_in_a_subdirectory_wait_for_its_fsync_not_the_root() -> None:
    def work(root: Path, rec: fslayer.Recorder) -> None:
        _put(root / "old" / "g.tmp", b"new")
        os.replace(root / "old" / "g.tmp", root / "old" / "g")
        os.unlink(root / "old" / "f")
        _fsync_dir(root)
        rec.mark("root synced")
        _fsync_dir(root / "old")
        rec.mark("old synced")

    base, trace = _trace(work)
    assert ("rename", "old/g.tmp", "old/g") in trace and ("unlink", "old/f") in trace
    by_point = _states(base, trace)
    marks = {ev[1]: i + 1 for i, ev in enumerate(trace) if ev[0] == "mark"}
    strict = {p: f for p, f in by_point[::2]}
    assert strict[marks["root synced"] - 1] == base
    assert strict[marks["old synced"] - 1] == {"old/": b"", "old/g": b"new"}
    # the in-order prefixes: never g without g.tmp's data, never f gone before g is there
    seen = {tuple(sorted(f)) for _, f in by_point}
    assert ("old/", "old/g") in seen and ("old/", "old/f", "old/g") in seen
    assert ("old/",) not in seen


def test_an_rmdir_is_an_entry_of_its_parent_and_drops_its_tree() -> None:
    def work(root: Path, rec: fslayer.Recorder) -> None:
        (root / "x").mkdir()
        _fsync_dir(root)
        rec.mark("made")
        os.unlink(root / "old" / "f")
        os.rmdir(root / "old")
        _fsync_dir(root)
        rec.mark("removed")

    base, trace = _trace(work)
    assert ("rmdir", "old") in trace
    by_point = _states(base, trace)
    marks = {ev[1]: i + 1 for i, ev in enumerate(trace) if ev[0] == "mark"}
    strict = {p: f for p, f in by_point[::2]}
    assert strict[marks["made"] - 1] == {**base, "x/": b""}
    # old/f's unlink was never made durable (old is not fsynced), but old is gone: so is f
    assert strict[marks["removed"] - 1] == {"x/": b""}


# ---- the repository --------------------------------------------------------------------


def test_a_repository_init_made_is_durable_when_init_returns() -> None:
    """init creates the repository's directory (and missing parents): their entries must
    be durable before it returns, or a power loss takes every later backup with them."""
    root = Path(crashsim.scratch_dir("zc-init-"))
    try:
        with fslayer.Recorder(root) as rec:
            backupsim.Repository.init(root / "share" / "repo", backupsim.SECRET,
                                      chunk_size=backupsim.CHUNK, scrypt_n=backupsim.FAST_N)
            rec.mark("init")
        assert ("mkdir", "share/repo", 1) in rec.events
        after = [files for _, marks, files, _ in fslayer.crash_states(
            {}, rec.events, random.Random(0), 4) if marks]
        assert after
        for files in after:
            state = root / "state"
            state.mkdir()
            fslayer.materialize(files, str(state))
            try:
                backupsim.Repository.open(state / "share" / "repo", backupsim.SECRET)
            finally:
                shutil.rmtree(state)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_restores_images_are_durable_when_restore_returns(tmp_path: Path) -> None:
    """restore creates DEST/VM/ (and missing parents) and renames each image into it:
    every entry must be durable when it returns, or a power loss loses a restore the
    caller was told had finished."""
    from helpers.backup import new_repo, vpg_of
    from helpers.nbd import build_journal

    from zcore.backup import restore, run_backup

    journal, snaps = build_journal(tmp_path / "j", sizes=(256 * 1024,), rounds=1, writes=10,
                                   promote_first=False)
    try:
        repo = new_repo(tmp_path / "repo")
        name = run_backup(repo, vpg_of(journal), snaps[0][0]).name
    finally:
        journal.close()
    root = Path(crashsim.scratch_dir("zc-restore-"))
    try:
        with fslayer.Recorder(root) as rec:
            restore(repo, name, root / "out" / "here")
            rec.mark("restored")
        after = [files for _, marks, files, _ in fslayer.crash_states(
            {}, rec.events, random.Random(0), 4) if marks]
        assert after
        for files in after:
            assert files.get("out/here/vm1/disk0.img") == snaps[0][1]["disk0"], \
                sorted(files)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def recorded() -> dict[int, backupsim.Recorded]:
    out = {seed: backupsim.record(seed=seed) for seed in SEEDS}
    yield out  # type: ignore[misc]
    for rec in out.values():
        rec.close()


def test_no_crash_state_loses_an_acknowledged_backup_or_restores_unchecked_bytes(
        recorded: dict[int, backupsim.Recorded]) -> None:
    began = time.monotonic()
    total = checked = carried = recovery = 0
    failures: list[str] = []
    for seed, rec in recorded.items():
        kinds = {ev[0] for ev in rec.trace}
        assert {"mkdir", "rename", "unlink", "dirsync", "sync"} <= kinds, kinds
        result = backupsim.enumerate_states(rec, per_point=PER_POINT, seed=seed,
                                            limit=MIN_STATES * 2, carry_every=20,
                                            recover=RECOVER)
        total += result.states
        checked += result.checked
        carried += result.carried_on
        recovery += result.recovery_states
        assert result.recoveries == RECOVER, "too few crash states hold a gc-plan"
        assert result.recovery_states >= 10 * RECOVER, "the GC recoveries did nothing"
        failures += [f"seed {seed}: {v}" for v in result.violations]
    assert not failures, "\n".join(failures[:20])
    assert total >= MIN_STATES, f"only {total} distinct crash states"
    print(f"{total} crash states ({checked} distinct contents checked, {carried} with a "
          f"backup and a prune after the crash) + {recovery} during GC recoveries over "
          f"{len(recorded)} workloads, "
          f"0 violations, {time.monotonic() - began:.1f} s")


@pytest.mark.parametrize("store", [backupsim.SkipFileFsyncStore, backupsim.SkipDirFsyncStore,
                                   backupsim.SkipLockFsyncStore],
                         ids=["skip-fsync", "skip-dirfsync", "skip-lock-fsync"])
def test_planted_durability_bug_is_reported_as_a_violation(store: type[DirectoryStore]
                                                           ) -> None:
    rec = backupsim.record(store)
    try:
        result = backupsim.enumerate_states(rec, per_point=2, limit=5_000, carry_every=0,
                                            stop_at_first=True)
    finally:
        rec.close()
    assert result.violations, f"the harness found no violation with {store.__name__}"
    # init was done right: what the bug breaks is a backup
    assert "backup" in result.violations[0], result.violations[0]
    print(result.violations[0])


def test_gc_deleting_chunks_before_the_manifests_deletion_is_durable_is_reported(
        recorded: dict[int, backupsim.Recorded]) -> None:
    rec = recorded[SEEDS[0]]
    trace = backupsim.plant_gc_order(rec.trace)
    gc = next(i for i, ev in enumerate(trace) if ev[:1] == ("unlink",))
    result = backupsim.enumerate_states(rec, per_point=1, limit=5_000, carry_every=0,
                                        stop_at_first=True, trace=trace, start=gc)
    assert result.violations, "the harness found no violation with the GC order broken"
    assert "missing [" in result.violations[0], result.violations[0]
    print(result.violations[0])


def test_torn_objects_of_a_store_without_fsyncs_are_caught_by_verification() -> None:
    """With object data unsynced, crash states hold torn and empty chunks and manifests at
    their final names: every one must be refused when read (check, restore), never
    restored as if whole."""
    rec = backupsim.record(backupsim.SkipFileFsyncStore)
    try:
        result = backupsim.enumerate_states(rec, per_point=2, limit=400, carry_every=0)
    finally:
        rec.close()
    caught = [v for v in result.violations
              if any(m in v for m in ("damaged ['", "bad manifests {'", "DamagedError"))]
    assert caught, backupsim.summary(result)
    wrong = [v for v in result.violations if "restores to bytes" in v]
    assert not wrong, wrong[:3]
    print(f"{len(caught)} of {result.checked} states hold damage that verification caught")
