"""kill -9 of `zcore backup run` at random points: the repository it leaves passes
`check`, holds only complete backups, and the next backup, prune and restore work (the
leftovers of the killed run are garbage-collected)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

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
    env = {**os.environ, "ZCORE_BACKUP_PASSPHRASE": SECRET.passphrase or ""}

    def argv(repo: str) -> list[str]:
        return zcore_cmd("backup", "run", repo, "--journal", str(tmp_path / "vm1"), "--full")

    # each run below writes into a new repository and is killed once it has written a
    # random number of its chunk files (temporary until the store's sync renames them),
    # some a little later still: while the chunks sync, or the manifest is written
    new_repo(tmp_path / "whole")
    began = time.monotonic()
    subprocess.run(argv(str(tmp_path / "whole")), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=env, check=True, timeout=120)
    whole = time.monotonic() - began
    per_run = _files(tmp_path / "whole" / "chunks")
    rng = random.Random(13)
    killed = mid_write = 0
    for i in range(4):
        path = tmp_path / f"repo{i}"
        new_repo(path)
        target = rng.randrange(1, per_run)
        proc = subprocess.Popen(argv(str(path)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _files(path / "chunks") < target \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        if i % 2:
            time.sleep(rng.uniform(0.0, 0.3) * whole)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        repo = Repository.open(path, SECRET)
        report = check(repo)
        assert report.ok, report
        mid_write += bool(list(repo.store.leftovers()))  # killed before its chunks' sync
    assert killed, f"every backup ended before its kill (a whole run took {whole:.2f} s)"
    assert mid_write, "no kill landed while chunks were being written"
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


def _files(path: Path) -> int:
    """Files under `path` (chunk files and temporary ones), 0 while it does not exist."""
    return sum(len(files) for _, _, files in os.walk(path))
