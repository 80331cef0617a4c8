"""The backup repository against a model (zcore.backup): backups at random checkpoints of
a journal fed random writes, promotions that take parents' checkpoints away, GFS prunes,
retention locks, crashes of backups and garbage collections after any store operation,
and bit flips in stored chunks; after every step `check` reports exactly the damaged
chunks still listed (with the backups listing them) and nothing missing, the repository
holds exactly the backups the model kept (less those an interrupted prune was allowed to
delete), every kept backup restores byte-exact to the model's image at its checkpoint, and
one listing a damaged chunk refuses to restore, leaving nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from helpers.backup import SECRET, Crash, CrashingStore, new_repo, vpg_of
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from zcore.backup import (
    Repository,
    Retention,
    RetentionLockError,
    check,
    forget,
    prune,
    restore,
    run_backup,
)
from zcore.backup import format as fmt
from zcore.backup.prune import select_kept
from zcore.errors import CorruptRecordError
from zcore.journal import Journal, VolumeSpec

SIZES = (320 * 1024, 200 * 1024)  # five and a bit 64 KiB chunks, the last one short


class BackupMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="zcore-backup-model-"))
        specs = [VolumeSpec(i, f"disk{i}", s) for i, s in enumerate(SIZES)]
        self.journal = Journal.create(self.dir / "j", specs, vm="vm1")
        self.vpg = vpg_of(self.journal)
        self.image = {s.name: bytearray(s.size) for s in specs}
        self.snaps: dict[int, dict[str, bytes]] = {}
        self.repo_path = self.dir / "repo"
        new_repo(self.repo_path)
        self.kept: dict[str, tuple[int, float]] = {}  # backup -> (checkpoint id, locked to)
        self.doomed: set[str] = set()  # what an interrupted prune may still delete
        self.damaged: set[str] = set()  # chunks whose stored bytes were damaged
        self.restores = 0

    def teardown(self) -> None:
        if hasattr(self, "journal"):
            self.journal.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def repo(self, after: int | None = None) -> Repository:
        return Repository.open(CrashingStore(self.repo_path, after), SECRET)

    def usable(self) -> list[int]:
        floor = self.journal.promoted_seq
        return sorted(c for c in self.snaps if c >= floor)

    # ---- the journal ---------------------------------------------------------------------

    @rule(vol=st.integers(0, 1), sector=st.integers(0, 1 << 10), sectors=st.integers(1, 160),
          kind=st.sampled_from(["zero", "fill", "random"]), seed=st.integers(0, 255))
    def write(self, vol: int, sector: int, sectors: int, kind: str, seed: int) -> None:
        size = SIZES[vol]
        length = min(sectors * 512, size)
        offset = min(sector * 512, size - length)
        data = (bytes(length) if kind == "zero" else bytes([seed]) * length
                if kind == "fill" else bytes((seed + i * 7) & 0xFF for i in range(length)))
        self.journal.append([(vol, offset, data)])
        self.image[f"disk{vol}"][offset:offset + length] = data

    @rule()
    def checkpoint(self) -> None:
        c = self.journal.checkpoint("m")
        self.journal.commit()
        self.snaps[c.id] = {k: bytes(v) for k, v in self.image.items()}

    @rule(data=st.data())
    def promote(self, data: st.DataObject) -> None:
        usable = self.usable()
        if len(usable) < 2:
            return
        target = data.draw(st.sampled_from(usable[:-1]))
        self.journal.promote_to(target)
        event("promoted")

    # ---- backups ---------------------------------------------------------------------------

    @rule(data=st.data(), full=st.booleans(), lock=st.booleans(),
          crash=st.one_of(st.none(), st.integers(1, 12)))
    def backup(self, data: st.DataObject, full: bool, lock: bool, crash: int | None) -> None:
        usable = self.usable()
        if not usable:
            return
        cid = data.draw(st.sampled_from(usable))
        until = time.time() + 3600 if lock else 0.0
        repo = self.repo(crash)
        before = set(repo.backup_names())
        try:
            r = run_backup(repo, self.vpg, cid, full=full, retain_until=until)
            event(f"backup {r.mode}")
        except Crash:
            event("backup crashed")
        self.reconcile(repo, before, cid, until)

    def reconcile(self, repo: Repository, before: set[str], cid: int | None = None,
                  until: float = 0.0) -> None:
        """Take in what a (maybe interrupted) writer did: at most one new backup, complete;
        deletions only of backups a prune was allowed to delete."""
        names = set(repo.backup_names())
        new = names - before
        assert len(new) <= (1 if cid is not None else 0)
        for n in new:
            assert cid is not None
            self.kept[n] = (cid, until)
        removed = set(self.kept) - names
        assert removed <= self.doomed, f"{removed - self.doomed} deleted against retention"
        for n in removed:
            del self.kept[n]
            self.doomed.discard(n)

    @rule(daily=st.integers(0, 2), last=st.integers(1, 3),
          crash=st.one_of(st.none(), st.integers(1, 25)))
    def prune(self, daily: int, last: int, crash: int | None) -> None:
        repo = self.repo(crash)
        policy = Retention(daily=daily, weekly=0, monthly=0, yearly=0, last=last)
        infos = repo.backups()
        keep = select_kept(infos, policy)
        now = time.time()
        expired = {b.name for b in infos if b.name not in keep and b.retain_until <= now}
        self.doomed |= expired
        before = set(repo.backup_names())
        try:
            result = prune(repo, policy)
            assert set(result.deleted) <= self.doomed
            assert all(self.kept[n][1] > now for n in result.locked)
            event("prune")
        except Crash:
            event("prune crashed")
        self.reconcile(repo, before)

    @rule(data=st.data())
    def forget_locked(self, data: st.DataObject) -> None:
        locked = sorted(n for n, (_, until) in self.kept.items() if until > time.time())
        if not locked:
            return
        with pytest.raises(RetentionLockError):
            forget(self.repo(), data.draw(st.sampled_from(locked)))

    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        if not self.kept:
            return
        name = data.draw(st.sampled_from(sorted(self.kept)))
        out = self.dir / f"restore-{self.restores}"
        self.restores += 1
        repo = self.repo()
        if _listed(repo, name) & self.damaged:
            with pytest.raises(CorruptRecordError):
                restore(repo, name, out)
            assert not any(p.is_file() for p in out.rglob("*"))  # nothing from damage
            event("restore refused: damaged chunk")
            return
        paths = restore(repo, name, out)
        assert {p.stem: p.read_bytes() for p in paths} == self.snaps[self.kept[name][0]]
        shutil.rmtree(out)

    @rule(data=st.data(), at=st.integers(0, 1 << 20))
    def damage_chunk(self, data: st.DataObject, at: int) -> None:
        """Flip one bit of a stored chunk (its retain-until kept)."""
        chunks = sorted(self.repo().chunk_ids())
        if not chunks:
            return
        cid = data.draw(st.sampled_from(chunks))
        path = self.repo_path / fmt.chunk_name(cid)
        st_ = path.stat()
        os.chmod(path, 0o644)
        raw = bytearray(path.read_bytes())
        raw[at % len(raw)] ^= 1 << (at % 8)
        path.write_bytes(bytes(raw))
        os.utime(path, (st_.st_atime, st_.st_mtime))
        os.chmod(path, 0o444)
        self.damaged.add(cid)
        event("chunk damaged")

    # ---- always --------------------------------------------------------------------------

    @invariant()
    def repository_checks(self) -> None:
        if not hasattr(self, "repo_path"):
            return
        repo = self.repo()
        # a damaged chunk heals only by being rewritten whole (an incremental whose parent
        # chunk failed to read reads it from the journal) or leaves with garbage collection
        present = set(repo.chunk_ids())
        self.damaged = {c for c in self.damaged if c in present and _fails(repo, c)}
        report = check(repo)
        listed = {c for n in repo.backup_names() for c in _listed(repo, n)}
        assert set(report.damaged) == self.damaged & listed, (report.damaged, self.damaged)
        for cid, users in report.damaged.items():
            assert users == sorted(n for n in repo.backup_names() if cid in _listed(repo, n))
        assert not report.missing and not report.bad_manifests
        names = set(repo.backup_names())
        assert names <= set(self.kept)
        assert set(self.kept) - names <= self.doomed


def _listed(repo: Repository, name: str) -> set[str]:
    m = repo.manifest(name)
    return {c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c}


def _fails(repo: Repository, cid: str) -> bool:
    try:
        repo.get_chunk(cid)
    except CorruptRecordError:
        return True
    return False


TestBackupModel = BackupMachine.TestCase
