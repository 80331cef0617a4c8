"""backup suite (issue 13): extended-recovery backups of a VM-like volume from a journal
into a filesystem repository on the same disk, each beside a baseline in the same run.

  backup.full              MB/s of a full backup of a 2 GiB volume (half zero, the rest
                           VM-like), durable at the end  vs  `zstd -1` of the same image to
                           the same disk followed by an fsync
  backup.incremental       bytes read from the journal and the replica by the incremental
                           after random 4 KiB-1 MiB writes at 4 KiB-aligned offsets changed
                           5 % of the volume  vs  the changed bytes (ratio <= 1.1; bytes
                           written to the repository in the details)
  backup.incremental_time  wall time of that incremental  vs  the full backup's (<= 0.15)
  backup.dedup             repository bytes after 12 "monthly" backups of a 256 MiB volume
                           changing 3 % a month  vs  12 x the full backup's bytes
                           (informational; expect <= 0.2)
  backup.restore           MB/s restoring the full backup to an image, durable  vs  `zstd -d`
                           of the zstd file to an image followed by an fsync

  backup.instant_first_read  ms from opening a repository of 100 backups to the first 4 KiB
                           read over NBD of the oldest one's volume (`qemu-io`, a fresh
                           process)  vs  the same read of the raw image served by zcore's
                           NBD server (informational)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from benchkit import MB, Context, GiB, KiB, Metric, MiB, fsync_path, vm_like_pool

from zcore.backup import Repository, Secret, restore, run_backup
from zcore.journal import Journal, VolumeSpec
from zcore.site.recovery_vpg import RecoveryVPG

DESCRIPTION = "extended-recovery backups: full vs zstd -1, incremental reads, dedup, restore"

VOLUME = 2 * GiB  # issue 13: a 2 GiB VM-like volume, half zero
POOL = 64 * MiB  # VM-like pool the non-zero half is cut from
CHANGE = 0.05  # the incremental: 5 % of the volume changed
WRITE_MIN, WRITE_MAX = 4 * KiB, 1 * MiB
DEDUP_VOLUME = 256 * MiB
DEDUP_MONTHS, DEDUP_CHANGE = 12, 0.03
INSTANT_VOLUME = 64 * MiB
INSTANT_BACKUPS = 100
SECRET = Secret(passphrase="bench")
TOOLS = ("zstd", "qemu-io")


def _image(path: Path, size: int, seed: int) -> None:
    """Half zero (the second of every pair of 1 MiB regions), half VM-like data."""
    pool = vm_like_pool(min(POOL, max(size // 2, 1 * MiB)), seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        step = 1 * MiB
        for i, off in enumerate(range(0, size, 2 * step)):
            start = (i * 7 * step) % (len(pool) - step + 1) if len(pool) > step else 0
            os.pwrite(fd, pool[start:start + min(step, size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _journal(root: Path, size: int, seed: int) -> tuple[Journal, Path]:
    src = root / "image.img"
    _image(src, size, seed)
    journal = Journal.create(root / "j", [VolumeSpec(0, "disk0", size)], vm="vm1",
                             replica_files={0: src})
    return journal, root / "j" / "replica-0000.img"


def _change(journal: Journal, size: int, fraction: float, rng: np.random.Generator) -> int:
    """Random 4 KiB-1 MiB writes at 4 KiB-aligned offsets until `fraction` of the volume
    changed; returns the changed bytes (the union of the writes)."""
    blocks = size // (4 * KiB)
    dirty = np.zeros(blocks, dtype=bool)
    target = int(blocks * fraction)
    while int(dirty.sum()) < target:
        n = int(rng.integers(WRITE_MIN // (4 * KiB), WRITE_MAX // (4 * KiB) + 1))
        b = int(rng.integers(0, blocks - n + 1))
        journal.append([(0, b * 4 * KiB, rng.bytes(n * 4 * KiB))])
        dirty[b:b + n] = True
    journal.commit()
    return int(dirty.sum()) * 4 * KiB


def _zstd(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["zstd", "-1", "-q", "-f", "-T1", str(src), "-o", str(dst)], check=True)
    fsync_path(dst)
    return time.perf_counter() - t0


def _unzstd(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["zstd", "-d", "-q", "-f", str(src), "-o", str(dst)], check=True)
    fsync_path(dst)
    return time.perf_counter() - t0


def _repo_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(ctx: Context):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"backup suite needs {', '.join(missing)} (apt-get install zstd)")
    size = ctx.scale(VOLUME, minimum=16 * MiB, align=1 * MiB)
    root = ctx.subdir("full")
    journal, replica = _journal(root, size, ctx.seed)
    vpg = RecoveryVPG("bench", {"vm1": journal})
    try:
        yield from _full_and_incremental(ctx, root, journal, vpg, replica, size)
    finally:
        vpg.close()
        journal.close()
    yield _dedup(ctx)
    yield _instant(ctx)


def _full_and_incremental(ctx: Context, root: Path, journal: Journal, vpg: RecoveryVPG,
                          replica: Path, size: int):
    base = journal.checkpoint("base")
    journal.commit()
    ctx.log(f"zstd -1 of the {size / MiB:.0f} MiB image")
    t_zstd = _zstd(replica, root / "image.zst")
    repo = Repository.init(root / "repo", SECRET)
    ctx.log("full backup")
    full = run_backup(repo, vpg, base)
    yield Metric("backup.full", size / full.seconds / MB, "MB/s", size / t_zstd / MB,
                 ">= 1.0", "full backup (zero chunks skipped), durable, vs zstd -1 + fsync",
                 {"seconds": full.seconds, "zstd_seconds": t_zstd,
                  "repository_bytes": _repo_bytes(root / "repo"),
                  "zstd_bytes": (root / "image.zst").stat().st_size,
                  "new_chunks": full.stats.new_chunks, "zero_chunks": full.stats.zero_chunks})
    rng = np.random.default_rng(ctx.seed + 1)
    changed = _change(journal, size, CHANGE, rng)
    after = journal.checkpoint("changed")
    journal.commit()
    before_bytes = _repo_bytes(root / "repo")
    ctx.log(f"incremental backup after {changed / MiB:.1f} MiB changed")
    inc = run_backup(repo, vpg, after)
    written = _repo_bytes(root / "repo") - before_bytes
    yield Metric("backup.incremental", inc.stats.read_bytes, "bytes", changed, "<= 1.1",
                 "bytes the incremental read from the journal and the replica vs changed",
                 {"repository_bytes_written": written, "new_chunks": inc.stats.new_chunks,
                  "mode": inc.mode})
    yield Metric("backup.incremental_time", inc.seconds, "s", full.seconds, "<= 0.15",
                 "wall time of the 5 % incremental vs the full backup",
                 {"incremental_seconds": inc.seconds, "full_seconds": full.seconds})
    ctx.log("restore of the full backup")
    t0 = time.perf_counter()
    restore(repo, full.name, root / "restored")
    t_restore = time.perf_counter() - t0
    t_unzstd = _unzstd(root / "image.zst", root / "unzstd.img")
    yield Metric("backup.restore", size / t_restore / MB, "MB/s", size / t_unzstd / MB,
                 ">= 1.0", "restore of the full backup, durable, vs zstd -d + fsync",
                 {"seconds": t_restore, "zstd_seconds": t_unzstd})


def _dedup(ctx: Context) -> Metric:
    size = ctx.scale(DEDUP_VOLUME, minimum=8 * MiB, align=1 * MiB)
    root = ctx.subdir("dedup")
    journal, _ = _journal(root, size, ctx.seed + 2)
    vpg = RecoveryVPG("bench", {"vm1": journal})
    rng = np.random.default_rng(ctx.seed + 3)
    try:
        repo = Repository.init(root / "repo", SECRET)
        first = 0
        ctx.log(f"{DEDUP_MONTHS} monthly backups of {size / MiB:.0f} MiB")
        for month in range(DEDUP_MONTHS):
            if month:
                _change(journal, size, DEDUP_CHANGE, rng)
            c = journal.checkpoint(f"month {month}")
            journal.commit()
            run_backup(repo, vpg, c)
            if month == 0:
                first = _repo_bytes(root / "repo")
        total = _repo_bytes(root / "repo")
    finally:
        vpg.close()
        journal.close()
    return Metric("backup.dedup", total, "bytes", DEDUP_MONTHS * first, None,
                  "repository bytes of 12 monthly backups (3 %/month) vs 12 x the first",
                  {"first_backup_bytes": first, "volume_bytes": size})


def _first_read(uri: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", uri], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def _instant(ctx: Context) -> Metric:
    from zcore import nbd
    from zcore.backup.access import backup_export

    size = ctx.scale(INSTANT_VOLUME, minimum=8 * MiB, align=1 * MiB)
    root = ctx.subdir("instant")
    journal, replica = _journal(root, size, ctx.seed + 4)
    vpg = RecoveryVPG("bench", {"vm1": journal})
    rng = np.random.default_rng(ctx.seed + 5)
    count = ctx.scale(INSTANT_BACKUPS, minimum=10)
    try:
        repo = Repository.init(root / "repo", SECRET)
        ctx.log(f"{count} backups of {size / MiB:.0f} MiB")
        oldest = ""
        for i in range(count):
            journal.append([(0, int(rng.integers(0, size // MiB)) * MiB, rng.bytes(64 * KiB))])
            c = journal.checkpoint(f"b{i}")
            journal.commit()
            name = run_backup(repo, vpg, c).name
            oldest = oldest or name
        t0 = time.perf_counter()
        opened = Repository.open(root / "repo", SECRET)
        server = nbd.NBDServer([backup_export(opened, oldest, "vm1", "disk0", "b"),
                                nbd.file_export(replica, "raw", readonly=True)])
        thread = nbd.ServerThread(server, port=0).start()
        try:
            t_backup = time.perf_counter() - t0 + _first_read(thread.uri("b"))
            t_raw = _first_read(thread.uri("raw"))
        finally:
            thread.stop()
    finally:
        vpg.close()
        journal.close()
    return Metric("backup.instant_first_read", t_backup * 1000, "ms", t_raw * 1000, None,
                  f"open a repository of {count} backups + first NBD read of the oldest vs "
                  f"the raw image over zcore's NBD server",
                  {"backups": count, "volume_bytes": size})
