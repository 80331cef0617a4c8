"""kill -9 of `zcore backup run` at random points: the repository it leaves passes
`check`, holds only complete backups, and the next backup, prune and restore work (the
leftovers of the killed run are garbage-collected)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

from helpers.backup import SECRET, new_repo
from helpers.cli import zcore_cmd
from helpers.nbd import build_journal

from zcore.backup import Repository, Retention, check, prune, restore, run_backup
from zcore.journal import Journal
from zcore.site.recovery_vpg import RecoveryVPG

MiB = 1 << 20


def test_kill_9_of_a_backup_leaves_a_repository_check_passes(tmp_path):
    journal, snaps = build_journal(tmp_path / "vm1", sizes=(48 * MiB,), rounds=2, writes=300,
                                   promote_first=False)
    journal.close()
    new_repo(tmp_path / "repo")
    env = {**os.environ, "ZCORE_BACKUP_PASSPHRASE": SECRET.passphrase or ""}
    argv = zcore_cmd("backup", "run", str(tmp_path / "repo"), "--journal",
                     str(tmp_path / "vm1"), "--full")
    began = time.monotonic()  # one whole run: the kills below land inside its duration
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   check=True, timeout=120)
    whole = time.monotonic() - began
    rng = random.Random(13)
    killed = 0
    for _ in range(4):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        time.sleep(rng.uniform(0.3, 0.9) * whole)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        repo = Repository.open(tmp_path / "repo", SECRET)
        report = check(repo)
        assert report.ok, report
        # emptied, so the next run writes every chunk again as the measured one did (a
        # run that found them all held would be over before its kill)
        prune(repo, Retention(daily=0, weekly=0, monthly=0, last=0))
        assert check(repo).ok and not repo.backup_names()
    assert killed, f"every backup ended before its kill (a whole run took {whole:.2f} s)"
    with Journal.open(tmp_path / "vm1") as j:
        vpg = RecoveryVPG("vm1", {"vm1": j})
        done = run_backup(repo, vpg)
        prune(repo, Retention(daily=0, weekly=0, monthly=0, last=1))
    assert repo.backup_names() == [done.name]
    assert not list(repo.store.leftovers())
    report = check(repo)
    assert report.ok and report.unreferenced == 0
    paths = restore(repo, done.name, tmp_path / "out")
    assert {p.stem: p.read_bytes() for p in paths} == snaps[-1][1]
