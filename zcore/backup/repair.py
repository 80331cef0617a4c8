"""`check --repair` of a backup repository (docs/format.md 10d.8): what can be mended is
mended, what cannot is set aside so that it stops hiding the data, and nothing a kept
backup could still use is lost.

Under the writers' lock, after a full `check`:

1. **Healing from the journals.**  A chunk that is damaged or missing is read again from
   the recovery site's journals when a `RecoveryVPG` of the backup's VPG is given: at the
   backup's own checkpoint while the journals still hold it, else at the newest one (a
   block nothing rewrote since reads the same).  A chunk id is a keyed hash of the plain
   bytes, so bytes whose id matches are the chunk, whatever their source; anything else
   is not written.  A healed chunk is rewritten in place (its retain-until carried over).
2. **Quarantine.**  A damaged chunk that could not be healed, and a manifest that does not
   read, are copied under `quarantine/` and removed from their names.  A damaged chunk
   left at its name would be taken as held by every later backup (dedup tests presence):
   once it is gone the next backup that meets those bytes stores them again, which heals
   every older backup that lists it.  An object under a retention lock stays where it is
   (reported with its date).
3. **The index** is rebuilt from the manifests left, and leftovers of crashed writes go.

The report says what was healed (and from where), set aside, left locked, and which
backups still cannot be restored whole."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from zcore.backup import format as fmt
from zcore.backup.errors import RetentionLockError
from zcore.backup.prune import CheckReport, check
from zcore.backup.store import Repository
from zcore.errors import CheckpointNotFoundError, CorruptRecordError
from zcore.site.recovery_vpg import RecoveryVPG

QUARANTINE = "quarantine/"


@dataclass
class RepairReport:
    """What `repair` did; `check` is the report of the check it started from."""

    check: CheckReport
    healed: dict[str, str] = field(default_factory=dict)  # chunk -> where its bytes came from
    quarantined_chunks: list[str] = field(default_factory=list)
    quarantined_manifests: list[str] = field(default_factory=list)
    locked: dict[str, float] = field(default_factory=dict)  # object -> retain-until
    unrecoverable: dict[str, list[str]] = field(default_factory=dict)  # chunk -> backups
    leftovers_removed: int = 0

    @property
    def ok(self) -> bool:
        """Every backup left restores whole."""
        return not self.unrecoverable and not self.locked

    def affected(self) -> list[str]:
        return sorted({b for bs in self.unrecoverable.values() for b in bs})


def _places(repo: Repository, cids: set[str], names: list[str]
            ) -> dict[str, dict[str, list[tuple[str, str, int, int]]]]:
    """backup -> chunk -> [(vm, volume, offset, length)] of every listed chunk in `cids`."""
    out: dict[str, dict[str, list[tuple[str, str, int, int]]]] = {}
    for n in names:
        try:
            m = repo.manifest(n)
        except CorruptRecordError:
            continue
        cs = int(m["chunk_size"])
        for vm in m["vms"]:
            for v in vm["volumes"]:
                for idx, cid in enumerate(v["chunks"]):
                    if cid in cids:
                        where = (vm["name"], v["name"], idx * cs,
                                 min(cs, int(v["size"]) - idx * cs))
                        out.setdefault(n, {}).setdefault(cid, []).append(where)
    return out


def _checkpoints(repo: Repository, backup: str, rvpg: RecoveryVPG) -> Iterator[int]:
    """The backup's checkpoint, then the newest, among those the journals hold."""
    own = int(repo.manifest(backup)["checkpoint"]["id"])
    try:
        rvpg.by_id(own)
        yield own
    except CheckpointNotFoundError:  # promoted away since
        pass
    try:
        newest = rvpg.latest().id
    except CheckpointNotFoundError:
        return
    if newest != own:
        yield newest


def _heal(repo: Repository, places: dict[str, dict[str, list[tuple[str, str, int, int]]]],
          vpgs: Mapping[str, RecoveryVPG], report: RepairReport) -> None:
    for backup, chunks in sorted(places.items()):
        rvpg = vpgs.get(repo.manifest(backup)["vpg"])
        if rvpg is None:
            continue
        for ckpt in _checkpoints(repo, backup, rvpg):
            todo = {c: w for c, w in chunks.items() if c not in report.healed}
            if not todo:
                break
            with rvpg.views(ckpt) as views:
                for cid, wheres in sorted(todo.items()):
                    for vm, volume, offset, length in wheres:
                        if vm not in views:
                            continue
                        buf = bytearray(length)
                        views[vm].read_into(volume, offset, buf)
                        if repo.chunk_id(buf) != cid:
                            continue  # rewritten since: not these bytes
                        repo.put_chunk(cid, buf, replace=True)
                        report.healed[cid] = (f"VPG {rvpg.name} {vm}/{volume} at "
                                              f"checkpoint {ckpt}")
                        break


def _set_aside(repo: Repository, name: str, report: RepairReport) -> bool:
    """Copy object `name` under quarantine/ and remove it; False while it is locked."""
    until = repo.store.retain_until(name)
    if until > time.time():
        report.locked[name] = until
        return False
    try:
        raw = repo.store.get(name)
    except FileNotFoundError:
        return True
    repo.store.put(QUARANTINE + name, raw)
    repo.store.sync()  # the copy is durable before the original goes
    try:
        repo.store.delete(name)
    except RetentionLockError as exc:  # an older locked version (S3)
        report.locked[name] = exc.until
        return False
    return True


def repair(repo: Repository, *, vpgs: Mapping[str, RecoveryVPG] | None = None,
           progress: Callable[[int, int], None] | None = None) -> RepairReport:
    """Check the repository, then heal, set aside and re-index (see the module
    docstring).  `vpgs`: recovery VPGs by name, to heal chunks from their journals."""
    with repo.writer():
        found = check(repo, progress=progress)
        report = RepairReport(found)
        bad = {**found.damaged, **found.missing}
        names = repo.backup_names()
        if bad and vpgs:
            _heal(repo, _places(repo, set(bad), names), vpgs, report)
            repo.store.sync()
        for cid in sorted(found.damaged):
            if cid not in report.healed and _set_aside(repo, fmt.chunk_name(cid), report):
                report.quarantined_chunks.append(cid)
        for n in sorted(found.bad_manifests):
            if _set_aside(repo, fmt.manifest_name(n), report):
                report.quarantined_manifests.append(n)
        report.unrecoverable = {c: users for c, users in sorted(bad.items())
                                if c not in report.healed}
        for left in list(repo.store.leftovers()):
            repo.store.remove_leftover(left)
            report.leftovers_removed += 1
        repo.store.sync()
        repo.write_index()
    return report


def report_doc(r: RepairReport) -> dict[str, Any]:
    """The report as JSON-ready data (CLI --json, the API task's result)."""
    return {"ok": r.ok, "affected": r.affected(), "healed": r.healed,
            "quarantined_chunks": r.quarantined_chunks,
            "quarantined_manifests": r.quarantined_manifests, "locked": r.locked,
            "unrecoverable": r.unrecoverable, "leftovers_removed": r.leftovers_removed,
            "checked": {"backups": r.check.backups, "chunks": r.check.chunks,
                        "damaged": len(r.check.damaged), "missing": len(r.check.missing),
                        "bad_manifests": len(r.check.bad_manifests)}}
