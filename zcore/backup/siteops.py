"""Backups as site-service tasks (issue 13): what the REST routes of
zcore.site.api.routes.backup call.  Sits over zcore.backup's engine and prune and under the
API; the live site service holds one `BackupOps` over its recovery VPGs and task runner.

Repositories are named by their path at the recovery site (a directory or a mounted
share).  Their secret is the key file a request names (a path at the site), a passphrase
in the request (used for that request only: never stored, logged or returned), or the
site process's $ZCORE_BACKUP_PASSPHRASE.  The work runs on a worker thread; the task's
progress is the bytes done so far.

Instant access serves a backup's volumes on the site's NBD server (`serve`, as
`backup/BACKUP/VM/VOLUME`, read-only or under scratch overlays), until `unserve`.
File-level restore lists and extracts files of an ext4 volume of a backup or of a
recovery VPG's checkpoint (zcore.backup.files), the extraction a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from zcore import wire
from zcore.backup import engine
from zcore.backup import files as ext4
from zcore.backup.access import backup_export
from zcore.backup.crypto import Secret
from zcore.backup.prune import Retention, check, prune
from zcore.backup.repair import repair as do_repair
from zcore.backup.repair import report_doc
from zcore.backup.schedule import Schedule, ScheduleBook
from zcore.backup.store import Repository
from zcore.errors import ConfigError, CorruptRecordError, StateError, ZcoreError
from zcore.journal import JournalSettings, VolumeSpec
from zcore.nbd import NBDServer
from zcore.nbd.exports import Export
from zcore.replication.recovery_site import RecoverySite
from zcore.site.db import TaskRecord
from zcore.site.errors import NotFoundError
from zcore.site.recovery_vpg import RecoveryVPG
from zcore.site.tasks import Progress, TaskRunner

PASSPHRASE_ENV = "ZCORE_BACKUP_PASSPHRASE"
TICK_S = 0.5  # how often a running backup's progress is written to its task
SCHEDULE_TICK_S = 60.0  # how often the schedules are looked at (a day's window is hours)
log = logging.getLogger(__name__)
R = TypeVar("R")
# (BackupOps has a method named `list`, so its annotations name these instead)
Docs = list[dict[str, Any]]
Entries = list[ext4.FileEntry]
Exports = list[Export]
Names = list[str]


def secret_of(keyfile: str | None, passphrase: str | None) -> Secret:
    if keyfile is not None and passphrase is not None:
        raise ConfigError("give a key file or a passphrase, not both")
    if keyfile is not None:
        return Secret(keyfile=Path(keyfile))
    phrase = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
    if phrase is None:
        raise ConfigError(f"the repository needs its passphrase (in the request, or the "
                          f"site's ${PASSPHRASE_ENV}) or a key file")
    return Secret(passphrase=phrase)


async def _threaded(fn: Callable[[Callable[[int, int], None]], R], progress: Progress,
                    message: str) -> R:
    """Run `fn(progress_callback)` on a worker thread, copying its progress to the task."""
    state = [0.0]
    lock = threading.Lock()

    def report(done: int, total: int) -> None:
        with lock:
            state[0] = done / total if total else 1.0

    job = asyncio.ensure_future(asyncio.to_thread(fn, report))
    while not job.done():
        await asyncio.wait([job], timeout=TICK_S)
        with lock:
            fraction = state[0]
        await progress(fraction, message)
    return job.result()


class BackupOps:
    """Backups, restores, checks and prunes of one site, each a task; and the site's
    backup schedules (zcore.backup.schedule), ticked once `start` ran."""

    def __init__(self, recovery_vpg: Callable[[str], RecoveryVPG], runner: TaskRunner, *,
                 nbd: NBDServer | None = None, uri: Callable[[str], str] = str,
                 recovery_site: Callable[[], RecoverySite | None] = lambda: None) -> None:
        self._vpg = recovery_vpg
        self._runner = runner
        self._recovery_site = recovery_site  # the site's, once started: for preseeding
        self._root: Path | None = None
        self._nbd = nbd  # the site's NBD server, for instant access
        self._uri = uri  # an export's nbd:// URI on it
        self._served: dict[str, list[str]] = {}  # backup -> export names being served
        self.book: ScheduleBook | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._scheduled: set[str] = set()  # VPGs whose scheduled backup is running
        self._repos: dict[tuple[str, str | None], Repository] = {}
        self._book_error = "backup schedules live in a running site service"

    # ---- schedules -----------------------------------------------------------------------

    def start(self, root: str | os.PathLike[str]) -> None:
        """Load the schedules kept under the site directory `root` and tick them every
        SCHEDULE_TICK_S (call on the service's event loop)."""
        self._root = Path(root)
        try:
            self.book = ScheduleBook(root)
        except CorruptRecordError as exc:  # damage is never read as "no schedules"
            log.error("backup schedules not loaded: %s", exc)
            self._book_error = f"{exc}; fix or remove the file, then restart the site"
            return
        self._ticker = asyncio.get_running_loop().create_task(self._ticking(),
                                                              name="zcore-backup-schedules")

    async def stop(self) -> None:
        for backup in list(self._served):
            self.unserve(backup)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def schedules(self) -> ScheduleBook:
        if self.book is None:
            raise StateError(self._book_error)
        return self.book

    async def _ticking(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bad schedule must not stop the others' next ticks
                log.exception("backup schedules: tick failed")
            await asyncio.sleep(SCHEDULE_TICK_S)

    async def tick(self, now: float | None = None) -> list[TaskRecord]:
        """Start the scheduled backups that are due (each a task: backup, then prune)."""
        t = time.time() if now is None else now
        started = []
        for sched in self.schedules().all():
            if sched.vpg in self._scheduled or not sched.in_window(t):
                continue
            try:
                rvpg = self._vpg(sched.vpg)
                repo = await self._repo(sched)
                infos = await asyncio.to_thread(repo.backups)
            except ZcoreError as exc:
                log.warning("backup schedule of %s: %s", sched.vpg, exc)
                continue
            mine = [b.time_ns for b in infos if b.vpg == sched.vpg]
            if sched.due(max(mine) if mine else None, t):
                started.append(await self._scheduled_run(sched, rvpg, repo))
        return started

    async def _repo(self, sched: Schedule) -> Repository:
        key = (sched.repository, sched.keyfile)
        repo = self._repos.get(key)
        if repo is None:
            repo = await asyncio.to_thread(self.open, sched.repository,
                                           secret_of(sched.keyfile, None))
            self._repos[key] = repo
        return repo

    async def _scheduled_run(self, sched: Schedule, rvpg: RecoveryVPG,
                             repo: Repository) -> TaskRecord:
        until = time.time() + sched.retain_days * 86400.0 if sched.retain_days else 0.0
        self._scheduled.add(sched.vpg)

        async def task(progress: Progress) -> dict[str, Any]:
            r = await _threaded(lambda p: engine.run_backup(
                repo, rvpg, retain_until=until, progress=p), progress,
                f"scheduled backup of VPG {sched.vpg}")
            pruned = await asyncio.to_thread(prune, repo, sched.retention(), vpg=sched.vpg)
            return {"backup": r.name, "mode": r.mode, "checkpoint": r.checkpoint.id,
                    **asdict(r.stats), "pruned": pruned.deleted,
                    "chunks_deleted": pruned.chunks_deleted}

        def settle(ok: bool) -> None:
            self._scheduled.discard(sched.vpg)

        return await self._runner.submit("backup_scheduled", task, vpg=sched.vpg,
                                         message=f"scheduled backup of {sched.vpg}",
                                         settle=settle)

    # ---- one-off operations --------------------------------------------------------------

    @staticmethod
    def open(repository: str, secret: Secret) -> Repository:
        return Repository.open(repository, secret)

    async def run(self, vpg: str, repository: str, secret: Secret, *,
                  checkpoint: int | None = None, full: bool = False,
                  retain_days: float = 0.0) -> TaskRecord:
        rvpg = self._vpg(vpg)  # refused now, not in the task, when there is no such VPG
        repo = await asyncio.to_thread(self.open, repository, secret)
        until = time.time() + retain_days * 86400.0 if retain_days > 0 else 0.0

        async def task(progress: Progress) -> dict[str, Any]:
            r = await _threaded(lambda p: engine.run_backup(
                repo, rvpg, checkpoint, full=full, retain_until=until, progress=p),
                progress, f"backing up VPG {vpg}")
            return {"backup": r.name, "mode": r.mode, "checkpoint": r.checkpoint.id,
                    "parent": r.parent, "retain_until": until, "seconds": r.seconds,
                    **asdict(r.stats)}

        return await self._runner.submit("backup_run", task, vpg=vpg,
                                         message=f"backup of {vpg} to {repository}")

    async def restore(self, repository: str, secret: Secret, backup: str, dest: str,
                      vms: list[str] | None) -> TaskRecord:
        repo = await asyncio.to_thread(self.open, repository, secret)
        m = await asyncio.to_thread(repo.manifest, backup)

        async def task(progress: Progress) -> dict[str, Any]:
            paths = await _threaded(lambda p: engine.restore(repo, backup, dest, vms=vms,
                                                             progress=p),
                                    progress, f"restoring {backup}")
            return {"backup": backup, "images": [str(p) for p in paths]}

        return await self._runner.submit("backup_restore", task, vpg=m["vpg"],
                                         message=f"restore of {backup} to {dest}")

    async def check(self, repository: str, secret: Secret, *,
                    repair: bool = False) -> TaskRecord:
        """Verify every manifest and chunk (a task); with `repair`, heal from this site's
        recovery VPGs what their journals still hold and quarantine the rest
        (zcore.backup.repair)."""
        repo = await asyncio.to_thread(self.open, repository, secret)

        async def task(progress: Progress) -> dict[str, Any]:
            if repair:
                vpgs = await asyncio.to_thread(self._sources, repo)
                fixed = await _threaded(lambda p: do_repair(repo, vpgs=vpgs, progress=p),
                                        progress, f"repairing {repository}")
                return report_doc(fixed)
            r = await _threaded(lambda p: check(repo, progress=p), progress,
                                f"checking {repository}")
            return asdict(r) | {"ok": r.ok, "affected": r.affected()}

        return await self._runner.submit("backup_repair" if repair else "backup_check", task,
                                         message=f"{'repair' if repair else 'check'} of "
                                                 f"{repository}")

    def _sources(self, repo: Repository) -> dict[str, RecoveryVPG]:
        """This site's recovery VPGs that the repository's backups name (to heal from)."""
        out = {}
        for b in repo.backups():
            if b.vpg not in out:
                with contextlib.suppress(ZcoreError):
                    out[b.vpg] = self._vpg(b.vpg)
        return out

    async def prune(self, repository: str, secret: Secret, policy: Retention,
                    vpg: str | None, dry_run: bool) -> TaskRecord:
        repo = await asyncio.to_thread(self.open, repository, secret)

        async def task(progress: Progress) -> dict[str, Any]:
            r = await asyncio.to_thread(prune, repo, policy, vpg=vpg, dry_run=dry_run)
            return asdict(r)

        return await self._runner.submit("backup_prune", task, vpg=vpg,
                                         message=f"prune of {repository}")

    async def list(self, repository: str, secret: Secret,
                   vpg: str | None) -> list[dict[str, Any]]:
        repo = await asyncio.to_thread(self.open, repository, secret)
        infos = await asyncio.to_thread(repo.backups)
        return [{"backup": b.name, **b.summary()} for b in infos
                if vpg is None or b.vpg == vpg]

    async def show(self, repository: str, secret: Secret, backup: str) -> dict[str, Any]:
        repo = await asyncio.to_thread(self.open, repository, secret)
        m = await asyncio.to_thread(repo.manifest, backup)
        return {k: m[k] for k in ("backup", "vpg", "checkpoint", "time_ns", "retain_until",
                                  "parent", "mode", "stats")} | {
            "vms": [{"name": vm["name"], "volumes": [
                {"id": v["id"], "name": v["name"], "size": v["size"],
                 "chunks": len(v["chunks"]),
                 "zero_chunks": sum(1 for c in v["chunks"] if c is None)}
                for v in vm["volumes"]]} for vm in m["vms"]]}

    # ---- preseeding a new VPG's replicas -------------------------------------------------

    async def preseed(self, repository: str, secret: Secret, backup: str, vpg: str,
                      owner: str) -> TaskRecord:
        """Restore `backup` as the replicas of a new recovery VPG `vpg` protected from
        paired site `owner` (a site id), a task: its volumes are restored (verified) under
        the site's `preseed/VPG/` and adopted as the replicas of one journal per VM, as
        reverse protection adopts disks.  The protected site then creates VPG `vpg` over
        the same VMs and volumes with `initial_sync="delta"`: its delta sync compares block
        hashes with these replicas and sends only what differs."""
        site = self._recovery_site()
        if site is None or self._root is None:
            raise StateError("preseeding needs the recovery site of a running site service")
        if not any(p.site_id == owner for p in site.peers.all()):
            raise ConfigError(f"site {owner!r} is not paired with this site: preseed for the "
                              f"site id of the protected site that will create the VPG")
        if not wire.safe_name(vpg):  # it names directories here, removed on a retry
            raise ConfigError(f"VPG name {vpg!r} is not allowed (one path component of "
                              f"letters, digits, '.', '_' and '-')")
        if vpg in site.receivers or (site.vpgs_dir / vpg).exists():
            raise StateError(f"VPG {vpg} exists at this site already: a preseed makes the "
                             f"replicas of a new VPG")
        repo = await asyncio.to_thread(self.open, repository, secret)
        m = await asyncio.to_thread(repo.manifest, backup)
        # the volume ids the protected site gives them: VMs by name, their volumes by name
        plan: list[tuple[str, list[VolumeSpec]]] = []
        for vm in sorted(m["vms"], key=lambda x: x["name"]):
            vols = sorted(vm["volumes"], key=lambda v: v["name"])
            first = sum(len(v) for _, v in plan)
            plan.append((vm["name"], [VolumeSpec(first + i, v["name"], int(v["size"]))
                                      for i, v in enumerate(vols)]))
        staging = self._root / "preseed" / vpg

        def run(report: Callable[[int, int], None]) -> list[Path]:
            shutil.rmtree(staging, ignore_errors=True)  # a crashed preseed's images
            paths = engine.restore(repo, backup, staging, progress=report)
            files = {(vm, v.name): staging / vm / f"{v.name}.img"
                     for vm, vols in plan for v in vols}
            site.adopt(vpg, owner, plan, JournalSettings(), files)
            shutil.rmtree(staging, ignore_errors=True)
            return paths

        async def task(progress: Progress) -> dict[str, Any]:
            paths = await _threaded(run, progress, f"preseeding VPG {vpg} from {backup}")
            return {"backup": backup, "vpg": vpg, "owner": owner,
                    "volumes": [f"{vm}/{v.name}" for vm, vols in plan for v in vols],
                    "bytes": sum(p.stat().st_size for p in paths if p.exists())}

        return await self._runner.submit("backup_preseed", task, vpg=vpg,
                                         message=f"preseed of VPG {vpg} from {backup}")

    # ---- instant access ------------------------------------------------------------------

    async def serve(self, repository: str, secret: Secret, backup: str, *,
                    vms: Names | None = None, writable: bool = False,
                    scratch_limit: int | None = None) -> Docs:
        """Export every volume of `backup` (of `vms`, default all) on the site's NBD
        server, read through the repository; with `writable`, each under a scratch overlay
        whose writes are discarded by `unserve`.  One {vm, volume, export, uri} each."""
        if self._nbd is None:
            raise StateError("instant access needs the site's NBD server (a live site)")
        if backup in self._served:
            raise StateError(f"backup {backup} is served already: unserve it first")
        repo = await asyncio.to_thread(self.open, repository, secret)
        m = await asyncio.to_thread(repo.manifest, backup)
        held = [vm["name"] for vm in m["vms"]]
        missing = sorted(set(vms or ()) - set(held))
        if missing:
            raise ConfigError(f"backup {backup} has no VM {', '.join(missing)}; it holds: "
                              f"{', '.join(held)}")

        def make() -> Exports:
            made: Exports = []
            try:
                for vm in m["vms"]:
                    if vms and vm["name"] not in vms:
                        continue
                    for v in vm["volumes"]:
                        made.append(backup_export(
                            repo, backup, vm["name"], v["name"],
                            f"backup/{backup}/{vm['name']}/{v['name']}", writable=writable,
                            scratch_limit=scratch_limit))
            except BaseException:
                for e in made:
                    e.backend.close()
                raise
            return made

        exports = await asyncio.to_thread(make)
        for e in exports:
            if self._nbd.lookup(e.name) is not None:  # served by hand meanwhile
                for x in exports:
                    x.backend.close()
                raise StateError(f"an export named {e.name} exists already")
        for e in exports:
            self._nbd.add_export(e)
        self._served[backup] = [e.name for e in exports]
        log.info("instant access: backup %s served as %d exports", backup, len(exports))
        return [{"vm": e.name.split("/")[2], "volume": e.name.split("/")[3],
                 "export": e.name, "uri": self._uri(e.name), "writable": writable}
                for e in exports]

    def unserve(self, backup: str) -> Names:
        """Stop serving `backup` (connections to its exports drop; scratch writes go)."""
        names = self._served.pop(backup, None)
        if names is None:
            raise NotFoundError(f"backup {backup} is not served here")
        assert self._nbd is not None
        for name in names:
            if self._nbd.lookup(name) is not None:
                self._nbd.remove_export(name)
        return names

    def served(self) -> dict[str, Docs]:
        return {b: [{"export": n, "uri": self._uri(n)} for n in names]
                for b, names in self._served.items()}

    # ---- file-level restore --------------------------------------------------------------

    async def files(self, repository: str, secret: Secret, backup: str, vm: str,
                    volume: str, path: str) -> Docs:
        """The entries of directory `path` of an ext4 volume of a backup."""
        repo = await asyncio.to_thread(self.open, repository, secret)

        def listing() -> Entries:
            with ext4.backup_image(repo, backup, vm, volume) as image:
                return ext4.list_files(image, path)

        return [_entry_doc(e) for e in await asyncio.to_thread(listing)]

    async def extract(self, repository: str, secret: Secret, backup: str, vm: str,
                      volume: str, path: str, dest: str) -> TaskRecord:
        """Copy file or directory `path` of a backup's ext4 volume into directory `dest`
        at this site (a task)."""
        repo = await asyncio.to_thread(self.open, repository, secret)
        m = await asyncio.to_thread(repo.manifest, backup)
        _check_dest(dest)

        async def task(progress: Progress) -> dict[str, Any]:
            def run() -> Path:
                with ext4.backup_image(repo, backup, vm, volume) as image:
                    return ext4.extract(image, path, dest)
            await progress(0.0, f"restoring {vm}/{volume} of {backup} to read {path}")
            return {"backup": backup, "path": path,
                    "extracted": str(await asyncio.to_thread(run))}

        return await self._runner.submit("backup_extract", task, vpg=m["vpg"],
                                         message=f"extract of {path} from {backup}")

    async def checkpoint_files(self, vpg: str, checkpoint: int, vm: str, volume: str,
                               path: str) -> Docs:
        """The entries of directory `path` of an ext4 volume at a journal checkpoint."""
        rvpg = self._vpg(vpg)

        def listing() -> Entries:
            with rvpg.views(checkpoint) as views, \
                    ext4.view_image(views[vm], volume) as image:
                return ext4.list_files(image, path)

        return [_entry_doc(e) for e in await asyncio.to_thread(listing)]

    async def checkpoint_extract(self, vpg: str, checkpoint: int, vm: str, volume: str,
                                 path: str, dest: str) -> TaskRecord:
        """Copy `path` of an ext4 volume at a journal checkpoint into `dest` (a task)."""
        rvpg = self._vpg(vpg)
        rvpg.by_id(checkpoint)  # refused now when there is no such checkpoint
        _check_dest(dest)

        async def task(progress: Progress) -> dict[str, Any]:
            def run() -> Path:
                with rvpg.views(checkpoint) as views, \
                        ext4.view_image(views[vm], volume) as image:
                    return ext4.extract(image, path, dest)
            await progress(0.0, f"copying {vm}/{volume} at checkpoint {checkpoint} out")
            return {"vpg": vpg, "checkpoint": checkpoint, "path": path,
                    "extracted": str(await asyncio.to_thread(run))}

        return await self._runner.submit("checkpoint_extract", task, vpg=vpg,
                                         message=f"extract of {path} at checkpoint "
                                                 f"{checkpoint}")


def _entry_doc(e: ext4.FileEntry) -> dict[str, Any]:
    return asdict(e) | {"type": "dir" if e.is_dir else "file"}


def _check_dest(dest: str) -> None:
    if not Path(dest).is_dir():
        raise ConfigError(f"{dest} is not a directory at this site")

