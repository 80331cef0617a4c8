"""Crash-state enumeration of the backup repository's directory store (issue 13): record
a workload of backups and a prune on a repository under the recording file layer
(reliability.fslayer, which follows the store's nested directories), build every crash
state from the trace, open each one and check it against what was acknowledged.

`record(store_class)` runs the workload (Repository.init, a full backup, incrementals, a
prune whose GC deletes the oldest backup, one more backup; a mark after each acknowledged
step) and returns what the states are built from; `enumerate_states(recorded, ...)` checks
the states and returns the counts and the violations found.  Planted bugs are stores that
skip the fsync of an object's data (`SkipFileFsyncStore`) or the directory fsyncs of
`sync` (`SkipDirFsyncStore`) or the file fsyncs of `sync` that make retention locks
durable (`SkipLockFsyncStore`): the workload's backups and prune recorded through one of
them (init is done right), the enumeration must report violations."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.backup import CHUNK, FAST_N, SECRET
from helpers.nbd import build_journal

from reliability import fslayer
from reliability.crashsim import DEEP, scratch_dir
from zcore.backup import DirectoryStore, Repository, Retention, check, prune, restore, run_backup
from zcore.backup import format as fmt
from zcore.errors import ZcoreError
from zcore.journal import Journal
from zcore.records import Checkpoint
from zcore.site.recovery_vpg import RecoveryVPG

KiB, MiB = 1 << 10, 1 << 20
SIZES = (1 * MiB, 512 * KiB)  # two volumes of 16 and 8 chunks of CHUNK (64 KiB)
ROUNDS = 4  # checkpoints: one per backup of the workload
LOCKED_UNTIL = time.time() + 30 * 86400  # the retain-until of the workload's locked backup

__all__ = ["CHUNK", "DEEP", "FAST_N", "SECRET", "Recorded", "Repository", "Result",
           "SkipDirFsyncStore", "SkipFileFsyncStore", "SkipLockFsyncStore", "enumerate_states",
           "plant_gc_order", "record", "summary"]


# ---- planted bugs: stores that skip an fsync ------------------------------------------------

_skipping = threading.local()  # .what: "file" or "dir" while a planted store's call runs


def _skipping_fsync(orig: Callable[[int], None]) -> Callable[[int], None]:
    def fsync(fd: Any) -> None:
        what = getattr(_skipping, "what", None)
        if what is not None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if is_dir == (what == "dir"):
                return  # the planted bug: this fsync never happens
        orig(fd)
    return fsync


class _Skipping(DirectoryStore):
    WHAT = ""

    def put(self, name: str, data: bytes) -> None:
        _skipping.what = self.WHAT
        try:
            super().put(name, data)
        finally:
            _skipping.what = None

    def sync(self) -> None:
        _skipping.what = self.WHAT
        try:
            super().sync()
        finally:
            _skipping.what = None


class SkipFileFsyncStore(_Skipping):
    """A directory store that never fsyncs an object's data before its rename."""

    WHAT = "file"


class SkipDirFsyncStore(_Skipping):
    """A directory store whose `sync` never fsyncs a directory."""

    WHAT = "dir"


class SkipLockFsyncStore(DirectoryStore):
    """A directory store whose `sync` fsyncs no file (a file's fsync there makes the
    retain-until `lock` set durable), so a lock may not survive a crash."""

    def sync(self) -> None:
        _skipping.what = "file"
        try:
            super().sync()
        finally:
            _skipping.what = None


# ---- the workload --------------------------------------------------------------------------


@dataclass
class Recorded:
    journal: Journal  # open (outside the scratch tree): what post-crash backups read
    images: list[dict[str, bytes]]  # the volume images at each checkpoint
    checkpoints: list[Checkpoint]
    backups: dict[str, int]  # every backup the workload made -> its checkpoint's index
    pruned: set[str]  # the backups the workload's prune deleted
    objects: dict[str, list[str]]  # each backup's manifest and chunks (object names)
    base: dict[str, bytes]  # the empty repository directory: init is recorded too
    trace: list[fslayer.Event]
    tmp: Path  # holds the journal: removed by close()

    def close(self) -> None:
        self.journal.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def record(store_class: type[DirectoryStore] = DirectoryStore, seed: int = 1) -> Recorded:
    """Build a journal (unrecorded), then record the workload on a new repository."""
    tmp = Path(scratch_dir("zc-brec-"))
    journal, snaps = build_journal(tmp / "vm1", sizes=SIZES, rounds=ROUNDS, writes=40,
                                   seed=seed, promote_first=False)
    vpg = RecoveryVPG("vpg1", {"vm1": journal})
    where = tmp / "repo"
    where.mkdir()
    backups: dict[str, int] = {}
    pruned: set[str] = set()
    objects: dict[str, list[str]] = {}
    with fslayer.Recorder(where) as rec:
        orig_fsync = os.fsync  # the recording one
        os.fsync = _skipping_fsync(orig_fsync)
        try:
            Repository.init(DirectoryStore(where, create=True), SECRET, chunk_size=CHUNK,
                            scrypt_n=FAST_N)
            rec.mark(("init",))
            # a planted bug starts after init, so its violations are about backups
            repo = Repository.open(store_class(where), SECRET)
            for i in range(ROUNDS):
                if i == ROUNDS - 1:
                    rec.mark(("pruning",))
                    done = prune(repo, Retention(daily=0, weekly=0, monthly=0, last=2))
                    assert len(done.deleted) == 1, done
                    pruned = set(done.deleted)
                    rec.mark(("pruned", tuple(done.deleted)))
                until = LOCKED_UNTIL if i == 1 else 0.0  # the first incremental is locked
                b = run_backup(repo, vpg, snaps[i][0], full=i == 0, retain_until=until)
                assert b.mode == ("full" if i == 0 else "incremental"), b
                backups[b.name] = i
                m = repo.manifest(b.name)
                objects[b.name] = [fmt.manifest_name(b.name), *sorted(
                    {fmt.chunk_name(c) for vm in m["vms"] for v in vm["volumes"]
                     for c in v["chunks"] if c})]
                rec.mark(("backup", b.name))
        finally:
            os.fsync = orig_fsync
    shutil.rmtree(where)
    return Recorded(journal, [img for _, img in snaps], [c for c, _ in snaps], backups, pruned,
                    objects, {}, rec.events, tmp)


# ---- checking one crash state --------------------------------------------------------------


@dataclass
class Expect:
    """What the marks before a crash point acknowledged."""

    init: bool = False
    acked: list[str] = field(default_factory=list)  # backups acknowledged, oldest first
    gone: set[str] = field(default_factory=set)  # backups a returned prune deleted
    pruning: bool = False  # a prune has started: its victims may be gone

    @classmethod
    def of(cls, marks: list[Any]) -> Expect:
        e = cls()
        for m in marks:
            if m[0] == "init":
                e.init = True
            elif m[0] == "backup":
                e.acked.append(m[1])
            elif m[0] == "pruning":
                e.pruning = True
            elif m[0] == "pruned":
                e.gone |= set(m[1])
        return e

    def __str__(self) -> str:
        if not self.init:
            return "before init returned"
        kept = [b for b in self.acked if b not in self.gone]
        return f"{len(kept)} backups acknowledged, {len(self.gone)} pruned"


def _restores(repo: Repository, rec: Recorded, name: str, out: Path) -> str | None:
    """None when backup `name` restores byte-exact to its checkpoint's images."""
    dest = out / name
    try:
        paths = restore(repo, name, dest)
        got = {p.stem: p.read_bytes() for p in paths}
    except ZcoreError as exc:
        return f"backup {name} does not restore: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    want = rec.images[rec.backups[name]] if name in rec.backups else None
    if got != want:
        return f"backup {name} restores to bytes that are not its checkpoint's"
    return None


def _locks_hold(repo: Repository, acked: list[str]) -> list[str]:
    """An acknowledged locked backup's manifest and every chunk it lists are locked until
    at least its retain-until (docs/format.md 10d.6)."""
    bad = []
    for b in acked:
        m = repo.manifest(b)
        until = float(m["retain_until"])
        if not until:
            continue
        chunks = {c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c}
        names = [fmt.manifest_name(b), *sorted(map(fmt.chunk_name, chunks))]
        short = [n for n in names if repo.store.retain_until(n) < until]
        if short:
            bad.append(f"locked backup {b}: {len(short)} of its {len(names)} objects lost "
                       f"their retention lock (e.g. {short[0]})")
    return bad


def _restore_key(files: dict[str, bytes], rec: Recorded, name: str) -> bytes:
    """What a restore of `name` reads: its manifest and its chunks, as in `files`."""
    digest = hashlib.blake2b(name.encode(), digest_size=16)
    for obj in rec.objects[name]:
        data = files.get(obj)
        digest.update(b"-" if data is None else len(data).to_bytes(8, "little") + data)
    return digest.digest()


def check_state(path: Path, rec: Recorded, expect: Expect, out: Path,
                files: dict[str, bytes] | None = None,
                restored: set[bytes] | None = None) -> list[str]:
    """The violations of the repository at `path` (a crash state) against `expect`.
    `restored` (with `files`, the state): the restores verified already, by what they
    read; one that reads the same bytes again is not repeated."""
    try:
        repo = Repository.open(path, SECRET)
    except ZcoreError as exc:
        if expect.init:
            return [f"the repository does not open after init returned: "
                    f"{type(exc).__name__}: {exc}"]
        return []
    bad: list[str] = []
    try:
        listed = repo.backup_names()
        doomed = rec.pruned if expect.pruning else set()
        bad += [f"acknowledged backup {b} is not listed" for b in expect.acked
                if b not in doomed and b not in listed]
        bad += [f"backup {b} is listed after a prune deleted it" for b in expect.gone
                if b in listed]
        bad += [f"backup {b} is listed but the workload never made it" for b in listed
                if b not in rec.backups]
        bad += _locks_hold(repo, [b for b in expect.acked if b in listed])
        report = check(repo)
        if not report.ok:
            bad.append(f"check: damaged {sorted(report.damaged)} missing "
                       f"{sorted(report.missing)} bad manifests {report.bad_manifests}")
        for b in listed:
            if b in rec.backups:
                key = None if files is None else _restore_key(files, rec, b)
                if restored is not None and key in restored:
                    continue
                why = _restores(repo, rec, b, out)
                if why:
                    bad.append(why)
                elif restored is not None and key is not None:
                    restored.add(key)
    except ZcoreError as exc:
        bad.append(f"reading the repository failed: {type(exc).__name__}: {exc}")
    return bad


def carry_on(path: Path, rec: Recorded, out: Path) -> list[str]:
    """After the crash: another backup (of the newest checkpoint) and a prune keeping only
    it must work, and leave a repository that checks clean and restores it."""
    try:
        repo = Repository.open(path, SECRET)
    except ZcoreError:
        return []  # before init: check_state has judged that
    bad: list[str] = []
    try:
        b = run_backup(repo, RecoveryVPG("vpg1", {"vm1": rec.journal}), rec.checkpoints[-1])
        report = check(repo)
        if not report.ok:
            bad.append(f"check after a backup run after the crash: {report}")
        got = restore(repo, b.name, out / "after")
        if {p.stem: p.read_bytes() for p in got} != rec.images[-1]:
            bad.append(f"the backup run after the crash ({b.mode}) restores to wrong bytes")
        shutil.rmtree(out / "after", ignore_errors=True)
        locked = {x for x in repo.backup_names() if float(repo.manifest(x)["retain_until"])}
        prune(repo, Retention(daily=0, weekly=0, monthly=0, last=1))
        report = check(repo)
        listed = {c for x in repo.backup_names() for vm in repo.manifest(x)["vms"]
                  for v in vm["volumes"] for c in v["chunks"] if c}
        # a locked backup that crashed before its manifest leaves locked chunks: they stay
        # until their lock expires; any other unreferenced chunk is GC's to delete
        left = [c for c in repo.chunk_ids() if c not in listed
                and not repo.store.retain_until(fmt.chunk_name(c))]
        leftovers = list(repo.store.leftovers())
        if not report.ok or left or leftovers or repo.backup_names() != sorted(
                locked | {b.name}):
            bad.append(f"check after a prune after the crash: {report}, "
                       f"listed {repo.backup_names()}, {len(left)} unlocked chunks and "
                       f"{len(leftovers)} interrupted writes left")
    except ZcoreError as exc:
        bad.append(f"a backup or prune after the crash failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out / "after", ignore_errors=True)
    return bad


# ---- the enumeration -----------------------------------------------------------------------


@dataclass
class Result:
    states: int = 0  # distinct crash states (by the choices that built them)
    checked: int = 0  # of which distinct contents, each opened and checked
    carried_on: int = 0  # of which a backup and a prune were run after the crash
    recoveries: int = 0  # states holding a gc-plan whose recovery was recorded too
    recovery_states: int = 0  # distinct crash states of those recoveries, checked
    duplicates: int = 0
    violations: list[str] = field(default_factory=list)


def _recovery_trace(files: dict[str, bytes], root: Path) -> list[fslayer.Event]:
    """The file operations of the recovery the next writer performs on a crash state that
    holds a gc-plan (`Repository.writer` finishes the collection first)."""
    path = root / "r"
    path.mkdir()
    try:
        fslayer.materialize(files, str(path))
        repo = Repository.open(path, SECRET)
        with fslayer.Recorder(path) as rec, repo.writer():
            pass
        return rec.events
    except ZcoreError:
        return []  # the state's own check has judged it
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plant_gc_order(trace: list[fslayer.Event]) -> list[fslayer.Event]:
    """The trace of a garbage collection that deletes chunks before the manifests'
    deletion is durable: the fsync of `manifests/` after their unlinks never happens."""
    out, armed = [], False
    for ev in trace:
        if ev[0] == "unlink" and ev[1].startswith("manifests/"):
            armed = True
        elif armed and ev == ("dirsync", "manifests"):
            armed = False
            continue
        out.append(ev)
    assert len(out) < len(trace), "the trace deletes no manifest"
    return out


def enumerate_states(rec: Recorded, *, per_point: int, limit: int, carry_every: int,
                     recover: int = 0, seed: int = 0, stop_at_first: bool = False,
                     trace: list[fslayer.Event] | None = None, start: int = 0) -> Result:
    """Check the distinct crash states of `rec.trace`: at most `limit` (the crash points
    strided evenly when the trace has more), strict, all-pending and `per_point` random
    ones at each; one in `carry_every` checked states also gets a backup and a prune; the
    first `recover` states holding a gc-plan are also crashed at every point of the
    garbage collection the next writer finishes (strict, all-pending and one random).
    `trace`: another trace of the workload (a planted bug) instead of the recorded one;
    `start`: the first crash point considered."""
    rng = random.Random(seed)
    events = rec.trace if trace is None else trace
    result = Result()
    seen: set[tuple] = set()
    contents: set[tuple[bytes, int]] = set()
    restored: set[bytes] = set()
    root = Path(scratch_dir("zc-bcrash-"))

    def judge(files: dict[str, bytes], expect: Expect, carry: bool) -> list[str]:
        path = root / "s"
        out = root / "out"
        path.mkdir()
        try:
            fslayer.materialize(files, str(path))
            bad = check_state(path, rec, expect, out, files, restored)
            if not bad and carry:
                bad = carry_on(path, rec, out)
            return bad
        finally:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    total = sum(1 for ev in events if ev[0] != "mark") + 1
    stride = max(1, -(-total * (2 + per_point) // limit))
    picked = set(range(0, len(events) + 1, stride))
    picked |= {i + 1 for i, ev in enumerate(events) if ev[0] == "mark"}  # acked points
    picked |= {i for i, ev in enumerate(events) if ev[0] == "mark"}  # just before them
    picked = {p for p in picked if p >= start}
    try:
        states = fslayer.crash_states(rec.base, events, rng, per_point, picked.__contains__)
        for point, marks, files, key in states:
            if (key, len(marks)) in seen:  # the trace's last states come again under its
                result.duplicates += 1  # last mark
                continue
            seen.add((key, len(marks)))
            result.states += 1
            expect = Expect.of(marks)
            digest = hashlib.blake2b(digest_size=16)
            for p, data in sorted(files.items()):
                digest.update(p.encode() + b"\0" + len(data).to_bytes(8, "little"))
                if isinstance(data, fslayer.Stamped):
                    digest.update(repr(data.mtime).encode())
                digest.update(data)
            what = (digest.digest(), len(marks))
            if what in contents:
                continue  # the same files under the same marks: checked already
            contents.add(what)
            result.checked += 1
            carry = carry_every and result.checked % carry_every == 0
            bad = judge(files, expect, carry)
            result.carried_on += bool(carry and not bad)
            if not bad and result.recoveries < recover and "gc-plan" in files:
                result.recoveries += 1
                sub = _recovery_trace(files, root)
                for spoint, _, sfiles, skey in fslayer.crash_states(files, sub, rng, 1):
                    if (key, skey) in seen:
                        continue
                    seen.add((key, skey))
                    result.recovery_states += 1
                    why = judge(sfiles, expect, False)
                    if why:
                        bad.append(f"crash at step {spoint} of the GC recovery: "
                                   f"{'; '.join(why)}")
                        break
            if bad:
                result.violations.append(f"crash point {point} ({expect}): {'; '.join(bad)}")
                if stop_at_first:
                    break
            if result.states >= limit:
                break
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def summary(result: Result) -> str:
    head = (f"{result.states} distinct crash states ({result.checked} distinct contents "
            f"checked, {result.carried_on} with a backup and a prune after the crash; "
            f"{result.recovery_states} more during {result.recoveries} GC recoveries; "
            f"{result.duplicates} duplicates skipped), {len(result.violations)} violations")
    return "\n".join([head, *result.violations[:10]])
