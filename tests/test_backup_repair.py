"""`check --repair` (zcore.backup.repair, docs/format.md 10d.8): damaged and missing chunks
are healed from the journals while they hold the bytes (and only with bytes whose id
matches), set aside under quarantine/ otherwise so the next backup that meets those bytes
heals them, unreadable manifests are set aside, locked objects are left, the index is
rebuilt; from the library, the command line and the API."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from helpers.backup import SECRET, flip, new_repo, vpg_of
from helpers.nbd import build_journal

from zcore.backup import Repository, check, restore, run_backup
from zcore.backup import format as fmt
from zcore.backup.repair import QUARANTINE, repair
from zcore.cli import main

MiB = 1 << 20


@pytest.fixture
def built(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(1 * MiB,), rounds=2, writes=40,
                                   promote_first=False)
    yield journal, snaps
    journal.close()


def images(paths):
    return {p.stem: p.read_bytes() for p in paths}


def chunk_path(repo: Repository, cid: str):
    return repo.store.root / fmt.chunk_name(cid)


def listed(repo: Repository, backup: str) -> list[str]:
    m = repo.manifest(backup)
    return [c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c]


def test_damaged_and_missing_chunks_are_healed_from_the_journal(tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    names = [run_backup(repo, vpg, c).name for c, _ in snaps]
    damaged, missing = listed(repo, names[0])[:2]
    flip(chunk_path(repo, damaged))
    chunk_path(repo, missing).unlink()
    found = check(repo)
    assert damaged in found.damaged and missing in found.missing

    r = repair(repo, vpgs={vpg.name: vpg})
    assert r.ok and set(r.healed) == {damaged, missing}, r
    assert all("checkpoint" in where for where in r.healed.values())
    assert not r.quarantined_chunks and not r.unrecoverable
    assert check(repo).ok
    for name, (_, model) in zip(names, snaps, strict=True):
        assert images(restore(repo, name, tmp_path / name))["disk0"] == model["disk0"]


def test_an_unhealable_chunk_is_set_aside_and_the_next_backup_of_its_bytes_heals_it(
        tmp_path, built):
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    first = run_backup(repo, vpg, snaps[0][0]).name
    cid = listed(repo, first)[0]
    flip(chunk_path(repo, cid))
    r = repair(repo)  # no journal to heal from
    assert not r.ok and r.quarantined_chunks == [cid] and r.affected() == [first], r
    assert not chunk_path(repo, cid).exists()
    assert (repo.store.root / QUARANTINE / fmt.chunk_name(cid)).is_file()  # kept aside
    assert cid in check(repo).missing
    # a full backup at the same checkpoint meets those bytes and stores them again
    run_backup(repo, vpg, snaps[0][0], full=True)
    assert check(repo).ok
    assert images(restore(repo, first, tmp_path / "out"))["disk0"] == snaps[0][1]["disk0"]


def test_healing_takes_only_bytes_whose_id_matches(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(1 * MiB,), rounds=1, writes=40,
                                   promote_first=False)
    try:
        repo = new_repo(tmp_path / "repo")
        vpg = vpg_of(journal)
        first = run_backup(repo, vpg, snaps[0][0]).name
        m = repo.manifest(first)
        chunks = m["vms"][0]["volumes"][0]["chunks"]
        idx = next(i for i, c in enumerate(chunks) if c)
        # the journal moves on: that chunk is rewritten and the old checkpoint promoted
        journal.append([(0, idx * m["chunk_size"], os.urandom(4096))])
        newer = journal.checkpoint("newer")
        journal.commit()
        journal.promote_to(newer.seq)
        vpg = vpg_of(journal)
        chunk_path(repo, chunks[idx]).unlink()
        r = repair(repo, vpgs={vpg.name: vpg})
        assert chunks[idx] in r.unrecoverable and chunks[idx] not in r.healed, r
        assert not repo.has_chunk(chunks[idx])  # nothing wrong was written in its name
    finally:
        journal.close()


def test_an_unreadable_manifest_is_set_aside_and_a_locked_chunk_is_left(tmp_path, built):
    import time
    journal, snaps = built
    repo = new_repo(tmp_path / "repo")
    vpg = vpg_of(journal)
    bad = run_backup(repo, vpg, snaps[0][0], full=True).name
    locked = run_backup(repo, vpg, snaps[1][0], full=True,
                        retain_until=time.time() + 3600).name
    only_locked = sorted(set(listed(repo, locked)) - set(listed(repo, bad)))
    assert only_locked, "the two backups must differ in some chunk"
    flip(repo.store.root / fmt.manifest_name(bad))
    flip(chunk_path(repo, only_locked[0]))
    r = repair(repo)
    assert r.quarantined_manifests == [bad], r
    assert fmt.chunk_name(only_locked[0]) in r.locked and not r.ok
    assert repo.backup_names() == [locked]
    assert [b.name for b in repo.backups()] == [locked]  # the index was rebuilt
    assert (repo.store.root / QUARANTINE / fmt.manifest_name(bad)).is_file()
    assert chunk_path(repo, only_locked[0]).exists()  # a locked object stays where it is


def test_cli_check_repair_heals_from_a_journal_and_says_what_is_lost(tmp_path, monkeypatch):
    journal, snaps = build_journal(tmp_path / "vm1", sizes=(1 * MiB,), rounds=2, writes=40,
                                   promote_first=False)
    repo = new_repo(tmp_path / "repo")
    name = run_backup(repo, vpg_of(journal), snaps[1][0]).name
    journal.close()
    cid = listed(repo, name)[0]
    flip(chunk_path(repo, cid))
    monkeypatch.setenv("ZCORE_BACKUP_PASSPHRASE", SECRET.passphrase or "")
    runner = CliRunner()
    base = ["backup", "check", str(tmp_path / "repo")]
    assert runner.invoke(main, base).exit_code == 1
    r = runner.invoke(main, [*base, "--journal", str(tmp_path / "vm1")])
    assert r.exit_code == 2 and "--repair" in r.output, r.output
    r = runner.invoke(main, [*base, "--repair", "--journal", str(tmp_path / "vm1"), "--vpg",
                             "vpg1", "--json"])
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.output)["healed"]) == [cid]
    assert runner.invoke(main, base).exit_code == 0
    flip(chunk_path(repo, cid))
    r = runner.invoke(main, [*base, "--repair"])
    assert r.exit_code == 1 and f"chunk {cid} is lost" in r.output, r.output
