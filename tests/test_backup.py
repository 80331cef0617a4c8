"""Backups of a recovery VPG into a repository (zcore.backup, docs/format.md 10d): restores
byte-exact, incrementals read only what changed, and every kind of damage (a wrong
passphrase, a flipped bit, a missing chunk, another format version) is a clear error with
nothing written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers.backup import CHUNK, FAST_N, SECRET, new_repo, vpg_of
from helpers.nbd import build_journal

from zcore.backup import (
    BackupMode,
    ChunkDamagedError,
    ChunkMissingError,
    Repository,
    Retention,
    RetentionLockError,
    Secret,
    WrongKeyError,
    check,
    forget,
    new_keyfile,
    prune,
    restore,
    run_backup,
)
from zcore.backup import format as fmt
from zcore.backup.prune import select_kept
from zcore.backup.store import BackupInfo
from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError, StateError
from zcore.journal import Journal, VolumeSpec

MiB = 1 << 20


@pytest.fixture
def built(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(1 * MiB, 640 * 1024), rounds=3,
                                   writes=40, promote_first=False)
    yield journal, snaps
    journal.close()


def images(paths):
    return {p.stem: p.read_bytes() for p in paths}


def test_every_backup_restores_byte_exact_full_then_incremental(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    results = [run_backup(repo, vpg, c) for c, _ in snaps]
    assert [r.mode for r in results] == [BackupMode.FULL] + [BackupMode.INCREMENTAL] * 2
    assert results[1].parent == results[0].name
    for i, (r, (_, model)) in enumerate(zip(results, snaps, strict=True)):
        assert images(restore(repo, r.name, tmp_path / f"out{i}")) == model
    report = check(repo)
    assert report.ok and report.backups == 3 and report.index_ok


def test_incremental_reads_only_the_changed_extents(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    full = run_backup(repo, vpg, snaps[1][0])
    inc = run_backup(repo, vpg, snaps[2][0])
    changed = sum(n for v in journal.volumes.values()
                  for _, n in journal.changed_extents(snaps[1][0], snaps[2][0], v.id))
    # the full backup reads every chunk but those lying in a replica hole no write covers
    unread = 0
    for v in journal.volumes.values():
        model = snaps[1][1][v.name]
        for off, n in journal.zero_ranges(snaps[1][0], v.id):
            assert model[off:off + n] == bytes(n)
            first, end = -(-off // CHUNK), (off + n) // CHUNK if off + n < v.size \
                else -(-v.size // CHUNK)
            unread += sum(min(CHUNK, v.size - i * CHUNK) for i in range(first, end))
    assert unread and full.stats.read_bytes == 1 * MiB + 640 * 1024 - unread
    assert inc.stats.read_bytes == changed < full.stats.read_bytes // 2


def test_changed_extents_cover_every_byte_that_differs(built):
    journal, snaps = built
    (c0, m0), _, (c2, m2) = snaps
    for v in journal.volumes.values():
        covered = bytearray(v.size)
        for off, n in journal.changed_extents(c0, c2, v.id):
            covered[off:off + n] = b"\1" * n
        a, b = m0[v.name], m2[v.name]
        assert all(covered[i] for i in range(0, v.size, 512) if a[i:i + 512] != b[i:i + 512])


def test_promoted_parent_checkpoint_falls_back_to_a_full_read_with_dedup(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(1 * MiB, 640 * 1024), rounds=3,
                                   writes=4, promote_first=False)
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    first = run_backup(repo, vpg, snaps[0][0])
    journal.promote_to(snaps[1][0].seq)
    again = run_backup(repo, vpg, snaps[2][0])
    assert again.mode == BackupMode.FULL_DEDUP and again.parent == first.name
    assert again.stats.new_chunks < again.stats.chunks - again.stats.zero_chunks
    assert images(restore(repo, again.name, tmp_path / "out")) == snaps[2][1]
    journal.close()


def test_each_backup_restores_after_its_parent_is_pruned(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    names = [run_backup(repo, vpg, c).name for c, _ in snaps]
    result = prune(repo, Retention(daily=0, weekly=0, monthly=0, last=1))
    assert result.deleted == names[:2] and result.chunks_deleted > 0
    assert repo.backup_names() == names[2:]
    assert images(restore(repo, names[2], tmp_path / "out")) == snaps[2][1]
    report = check(repo)
    assert report.ok and report.unreferenced == 0


def test_wrong_passphrase_is_refused_before_anything_is_read(tmp_path, built):
    repo = new_repo(tmp_path / "repo")
    run_backup(repo, vpg_of(built[0]), built[1][0][0])
    before = sorted(p.name for p in (tmp_path / "repo").rglob("*"))
    with pytest.raises(WrongKeyError, match="wrong passphrase"):
        Repository.open(tmp_path / "repo", Secret(passphrase="wrong"))
    with pytest.raises(WrongKeyError, match="passphrase, not a key file"):
        Repository.open(tmp_path / "repo", Secret(keyfile=tmp_path / "nope"))
    assert sorted(p.name for p in (tmp_path / "repo").rglob("*")) == before


def test_key_file_opens_and_another_key_file_does_not(tmp_path):
    new_keyfile(tmp_path / "k1")
    new_keyfile(tmp_path / "k2")
    Repository.init(tmp_path / "repo", Secret(keyfile=tmp_path / "k1"))
    assert Repository.open(tmp_path / "repo", Secret(keyfile=tmp_path / "k1")).repo_id
    with pytest.raises(WrongKeyError):
        Repository.open(tmp_path / "repo", Secret(keyfile=tmp_path / "k2"))


def _a_chunk(repo, backup):
    m = repo.manifest(backup)
    return next(c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c)


def _flip(path: Path, at: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("at", [5, 12, 20, 30, 60, -1])
def test_flipped_bit_in_a_chunk_fails_restore_and_leaves_nothing(tmp_path, built, at):
    repo = new_repo(tmp_path / "repo")
    name = run_backup(repo, vpg_of(built[0]), built[1][0][0]).name
    cid = _a_chunk(repo, name)
    _flip(tmp_path / "repo" / fmt.chunk_name(cid), at)
    with pytest.raises((ChunkDamagedError, FormatVersionError)):
        restore(repo, name, tmp_path / "out")
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    report = check(repo)
    assert not report.ok and report.damaged == {cid: [name]} and report.affected() == [name]


def test_manifest_naming_a_missing_chunk_is_reported_with_the_backups_it_affects(tmp_path,
                                                                                   built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    names = [run_backup(repo, vpg, c).name for c, _ in snaps]
    cid = _a_chunk(repo, names[0])
    users = [n for n in names if cid in json.dumps(repo.manifest(n)["vms"])]
    (tmp_path / "repo" / fmt.chunk_name(cid)).unlink()
    with pytest.raises(ChunkMissingError, match=cid):
        restore(repo, names[0], tmp_path / "out")
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    report = check(repo)
    assert report.missing == {cid: users} and report.affected() == users


def test_chunk_moved_to_another_name_fails_its_tag(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    name = run_backup(repo, vpg_of(journal), snaps[2][0]).name
    m = repo.manifest(name)
    a, b = [c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c][:2]
    pa, pb = (tmp_path / "repo" / fmt.chunk_name(c) for c in (a, b))
    os.chmod(pa, 0o644)
    pa.write_bytes(pb.read_bytes())
    with pytest.raises(ChunkDamagedError, match="authentication tag"):
        repo.get_chunk(a)


def test_repository_of_another_format_version_is_refused(tmp_path):
    new_repo(tmp_path / "repo")
    cfg = tmp_path / "repo" / "config"
    doc = json.loads(cfg.read_bytes())
    doc["meta"]["version"] = 2
    from zcore.backup.store import _crc
    doc["crc32c"] = _crc(doc["meta"])
    os.chmod(cfg, 0o644)
    cfg.write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError, match="version 2"):
        Repository.open(tmp_path / "repo", SECRET)


def test_sealed_object_of_another_version_is_refused(tmp_path, built):
    repo = new_repo(tmp_path / "repo")
    name = run_backup(repo, vpg_of(built[0]), built[1][0][0]).name
    path = tmp_path / "repo" / fmt.manifest_name(name)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[8] = 2
    path.write_bytes(bytes(data))
    with pytest.raises(FormatVersionError):
        repo.manifest(name)
    assert check(repo).bad_manifests.keys() == {name}


def test_damaged_config_is_refused(tmp_path):
    new_repo(tmp_path / "repo")
    cfg = tmp_path / "repo" / "config"
    os.chmod(cfg, 0o644)
    cfg.write_bytes(cfg.read_bytes().replace(b'"chunk_size": 65536', b'"chunk_size": 65537'))
    with pytest.raises(CorruptRecordError, match="checksum"):
        Repository.open(tmp_path / "repo", SECRET)


def test_locked_backup_is_kept_by_prune_and_refused_by_forget_saying_until_when(tmp_path,
                                                                                 built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    until = time.time() + 3600
    locked = run_backup(repo, vpg, snaps[0][0], retain_until=until).name
    run_backup(repo, vpg, snaps[1][0])
    result = prune(repo, Retention(daily=0, weekly=0, monthly=0, last=1))
    assert result.locked == {locked: until} and result.deleted == []
    with pytest.raises(RetentionLockError, match="locked until") as err:
        forget(repo, locked)
    assert err.value.until == until
    for cid in {c for vm in repo.manifest(locked)["vms"] for v in vm["volumes"]
                for c in v["chunks"] if c}:
        assert repo.store.retain_until(fmt.chunk_name(cid)) >= until
    with pytest.raises(RetentionLockError):
        repo.store.delete(fmt.chunk_name(_a_chunk(repo, locked)))
    assert check(repo).ok


def test_chunks_reused_by_a_locked_backup_get_its_retain_until(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    first = run_backup(repo, vpg, snaps[0][0]).name
    until = time.time() + 7200
    second = run_backup(repo, vpg, snaps[1][0], retain_until=until).name
    shared = {c for vm in repo.manifest(first)["vms"] for v in vm["volumes"]
              for c in v["chunks"] if c} & {
        c for vm in repo.manifest(second)["vms"] for v in vm["volumes"] for c in v["chunks"]
        if c}
    assert shared
    assert all(repo.store.retain_until(fmt.chunk_name(c)) >= until for c in shared)
    forget(repo, first)
    assert images(restore(repo, second, tmp_path / "out")) == snaps[1][1]


def test_restore_refuses_to_overwrite_an_image(tmp_path, built):
    repo = new_repo(tmp_path / "repo")
    name = run_backup(repo, vpg_of(built[0]), built[1][0][0]).name
    restore(repo, name, tmp_path / "out")
    with pytest.raises(ConfigError, match="already exists"):
        restore(repo, name, tmp_path / "out")


def test_second_writer_is_refused_while_one_holds_the_repository(tmp_path):
    repo = new_repo(tmp_path / "repo")
    other = Repository.open(tmp_path / "repo", SECRET)
    with repo.writer(), pytest.raises(StateError, match="in use"):
        with other.writer():
            pass


def _info(name: str, day: float) -> BackupInfo:
    t = int(day * 86400e9)
    return BackupInfo(name, "v", {"time_ns": t}, t, 0.0, "full", 1)


def test_gfs_keeps_the_newest_of_each_day_week_month_and_year():
    # one backup a day for 800 days from 1970-01-01 (a Thursday)
    backups = [_info(f"d{i:03d}", i + 0.5) for i in range(800)]
    kept = select_kept(backups, Retention(daily=7, weekly=4, monthly=12, yearly=3, last=1))
    days = sorted(int(n[1:]) for n in kept)
    assert days[-7:] == list(range(793, 800))  # the last 7 days
    # weekly: the newest day of each of the last 4 ISO weeks (Sundays, plus this week's)
    assert {799, 794, 787, 780} <= set(days)
    # monthly: the last day of each month before; yearly: the last day of 1970 and 1971
    assert {364, 729} <= set(days)
    assert len(kept) <= 7 + 4 + 12 + 3


def test_gfs_with_nothing_to_keep_but_the_last():
    backups = [_info(f"d{i}", i) for i in range(5)]
    assert select_kept(backups, Retention(0, 0, 0, 0, last=2)) == {"d3", "d4"}


def test_chunk_size_must_be_a_power_of_two_in_bounds(tmp_path):
    with pytest.raises(ConfigError):
        Repository.init(tmp_path / "r", SECRET, chunk_size=CHUNK + 512, scrypt_n=FAST_N)
    with pytest.raises(ConfigError):
        Repository.init(tmp_path / "r2", SECRET, chunk_size=1 << 12, scrypt_n=FAST_N)


def test_instant_access_serves_a_backup_over_nbd_byte_exact(tmp_path, built):
    from conftest import require_tool
    from helpers.nbd import run as run_tool
    from helpers.nbd import serving

    from zcore.backup.access import BackupVolume, backup_export

    qemu_img = require_tool("qemu-img")
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    names = [run_backup(repo, vpg, c).name for c, _ in snaps]
    model = tmp_path / "model.img"
    model.write_bytes(snaps[1][1]["disk0"])
    exports = [backup_export(repo, names[1], "vm1", "disk0", "b1")]
    with serving(exports, tmp_path) as srv:
        run_tool([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri("b1"), str(model)])
    vol = BackupVolume(repo, names[2], "vm1", "disk1")
    assert vol.read(100 * 512, 300 * 1024) == snaps[2][1]["disk1"][51200:51200 + 307200]
    with pytest.raises(ConfigError, match="no volume"):
        BackupVolume(repo, names[2], "vm1", "disk9")


def test_gc_plan_naming_a_locked_manifest_keeps_it_and_its_chunks(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    locked = run_backup(repo, vpg, snaps[0][0], retain_until=time.time() + 3600).name
    other = run_backup(repo, vpg, snaps[1][0]).name
    from zcore.backup.prune import collect
    with repo.writer():
        collect(repo, [locked, other])  # as a plan made before a clock was set back
    assert repo.backup_names() == [locked]
    assert not repo.store.exists("gc-plan")
    assert check(repo).ok
    assert images(restore(repo, locked, tmp_path / "out")) == snaps[0][1]


def test_backup_of_another_journal_with_the_same_checkpoint_ids_is_no_incremental(tmp_path):
    a, snaps_a = build_journal(tmp_path / "a", sizes=(1 * MiB,), rounds=2, writes=10, seed=1,
                               promote_first=False)
    b, snaps_b = build_journal(tmp_path / "b", sizes=(1 * MiB,), rounds=2, writes=10, seed=2,
                               promote_first=False)
    assert snaps_a[0][0].id == snaps_b[0][0].id  # same seqs, other writes
    repo = new_repo(tmp_path / "repo")
    run_backup(repo, vpg_of(a), snaps_a[0][0])
    again = run_backup(repo, vpg_of(b), snaps_b[1][0])  # the "same" VPG, recreated
    assert again.mode == BackupMode.FULL_DEDUP
    assert images(restore(repo, again.name, tmp_path / "out")) == snaps_b[1][1]
    a.close()
    b.close()


def test_changed_extents_are_volume_offsets_in_every_plan_window(monkeypatch, built):
    """A volume planned in several windows: each window's fragments are placed at their
    volume offsets (they were once left window-relative, so an incremental of a volume
    over one window patched the wrong chunks)."""
    journal, snaps = built
    (c0, _), _, (c2, _) = snaps
    whole = {v.id: journal.changed_extents(c0, c2, v.id) for v in journal.volumes.values()}
    monkeypatch.setattr("zcore.journal.changes.PLAN_WINDOW", 64 * 1024)
    for v in journal.volumes.values():
        assert journal.changed_extents(c0, c2, v.id) == whole[v.id]
        assert whole[v.id][-1][0] > 64 * 1024  # the fixture writes past the first window


def test_incremental_over_several_plan_windows_restores_byte_exact(monkeypatch, tmp_path,
                                                                  built):
    monkeypatch.setattr("zcore.journal.changes.PLAN_WINDOW", 64 * 1024)
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    results = [run_backup(repo, vpg, c) for c, _ in snaps]
    assert results[-1].mode == BackupMode.INCREMENTAL
    for i, (r, (_, model)) in enumerate(zip(results, snaps, strict=True)):
        assert images(restore(repo, r.name, tmp_path / f"out{i}")) == model


def _adopted_journal(root: Path, image: bytes, chunk: int = CHUNK) -> Journal:
    """A one-volume journal adopting a sparse image: `image`'s all-zero chunks left as
    holes of the file."""
    src = root / "image.img"
    fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(image))
        for off in range(0, len(image), chunk):
            part = image[off:off + chunk]
            if part.count(0) != len(part):
                os.pwrite(fd, part, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Journal.create(root / "j", [VolumeSpec(0, "disk0", len(image))], vm="vm1",
                          replica_files={0: src})


def test_zero_ranges_are_replica_holes_no_journaled_write_covers(tmp_path):
    image = bytearray(6 * CHUNK)
    image[0:CHUNK] = os.urandom(CHUNK)
    image[4 * CHUNK:5 * CHUNK] = os.urandom(CHUNK)
    journal = _adopted_journal(tmp_path, bytes(image))
    try:
        journal.append([(0, 2 * CHUNK + 512, bytes(512))])  # zeros, but journaled
        journal.append([(0, 3 * CHUNK, b"\1" * 4096)])
        c = journal.checkpoint("c")
        journal.commit()
        image[3 * CHUNK:3 * CHUNK + 4096] = b"\1" * 4096
        zeros = journal.zero_ranges(c, 0)
        # cut to whole 4 KiB sum blocks: the block a write touches is never in a range
        assert zeros == [(CHUNK, CHUNK), (2 * CHUNK + 4096, CHUNK - 4096),
                         (3 * CHUNK + 4096, CHUNK - 4096), (5 * CHUNK, CHUNK)]
        repo = new_repo(tmp_path / "repo")
        r = run_backup(repo, vpg_of(journal), c)
        # chunks 1 and 5 are skipped unread; chunk 2 is read (a write covers part of it)
        assert r.stats.read_bytes == 4 * CHUNK and r.stats.zero_chunks == 3
        assert images(restore(repo, r.name, tmp_path / "out")) == {"disk0": bytes(image)}
    finally:
        journal.close()


def test_a_hole_where_the_replica_sums_say_data_is_read_and_refused(tmp_path):
    """Replica bytes lost to a hole (its block sums still say data) are never taken for
    zeros: the backup reads them, the sums fail, and no backup is written."""
    from zcore.errors import ReplicaChecksumError

    image = os.urandom(4 * CHUNK)
    journal = _adopted_journal(tmp_path, image)
    c = journal.checkpoint("c")
    journal.commit()
    journal.close()
    replica = tmp_path / "j" / "replica-0000.img"
    os.truncate(replica, 2 * CHUNK)  # the second half lost: a hole once extended again
    os.truncate(replica, 4 * CHUNK)
    journal = Journal.open(tmp_path / "j")
    try:
        assert journal.zero_ranges(c.id, 0) == []
        repo = new_repo(tmp_path / "repo")
        with pytest.raises(ReplicaChecksumError):
            run_backup(repo, vpg_of(journal), c.id)
        assert repo.backup_names() == []
    finally:
        journal.close()


def test_directory_store_puts_reach_their_names_only_at_sync(tmp_path):
    """A put is seen at once by its own store and by no other until `sync`; a store that
    dies first leaves only a `*.tmp-*` leftover, never a torn or empty object."""
    from zcore.backup import DirectoryStore

    store = DirectoryStore(tmp_path / "r", create=True)
    other = DirectoryStore(tmp_path / "r")
    store.put("chunks/ab/x", b"one")
    store.lock("chunks/ab/x", time.time() + 3600)
    assert store.get("chunks/ab/x") == b"one" and store.exists("chunks/ab/x")
    assert list(store.list("chunks/")) == ["chunks/ab/x"] and not list(store.leftovers())
    assert not other.exists("chunks/ab/x") and list(other.leftovers())
    store.sync()
    assert other.get("chunks/ab/x") == b"one" and other.retain_until("chunks/ab/x") > 0
    assert not list(other.leftovers())
    dead = DirectoryStore(tmp_path / "r")
    dead.put("chunks/cd/y", b"two")
    del dead  # never synced: as a killed process
    fresh = DirectoryStore(tmp_path / "r")
    assert not fresh.exists("chunks/cd/y") and list(fresh.list("chunks/")) == ["chunks/ab/x"]
    assert [n.split(".tmp-")[0] for n in fresh.leftovers()] == ["chunks/cd/y"]


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_restore_is_byte_exact_with_and_without_o_direct(monkeypatch, tmp_path, direct):
    """Whole chunks go through O_DIRECT where the file system takes it, a last chunk off
    the 4 KiB alignment (and every chunk where O_DIRECT is missing) through the page cache;
    the image is the same either way."""
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    journal = Journal.create(tmp_path / "j", [VolumeSpec(0, "disk0", 3 * CHUNK + 1536)],
                             vm="vm1")
    try:
        image = bytearray(3 * CHUNK + 1536)
        for off, data in ((512, os.urandom(5120)), (2 * CHUNK - 512, os.urandom(CHUNK)),
                          (3 * CHUNK + 1024, os.urandom(512))):
            journal.append([(0, off, data)])
            image[off:off + len(data)] = data
        c = journal.checkpoint("c")
        journal.commit()
        repo = new_repo(tmp_path / "repo")
        r = run_backup(repo, vpg_of(journal), c)
        assert images(restore(repo, r.name, tmp_path / "out")) == {"disk0": bytes(image)}
    finally:
        journal.close()
