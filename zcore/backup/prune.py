"""Retention, garbage collection and check of a backup repository (docs/format.md 10d.6).

`select_expired` applies a GFS policy (daily, weekly, monthly, yearly counts, plus the
newest `last` backups) to each VPG's backups; `prune` deletes the expired ones that no
retention lock holds, then collects the chunks nothing lists any more.  The collection is
a plan first (`gc-plan`, durable), then the manifests' deletion (durable), then the chunks'
(each re-checked against the manifests left), then the plan's removal: a crash at any
step leaves every remaining manifest's chunks in place, and the next writer finishes the
plan.  `check` decrypts and verifies every manifest and every chunk they list."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from zcore.backup import format as fmt
from zcore.backup.errors import ChunkMissingError, RetentionLockError
from zcore.backup.store import BackupInfo, Repository
from zcore.errors import ConfigError, CorruptRecordError


@dataclass(frozen=True)
class Retention:
    """A GFS policy: keep the newest backup of each of the last `daily` days, `weekly` ISO
    weeks, `monthly` months and `yearly` years holding one, and the newest `last` (UTC)."""

    daily: int = 7
    weekly: int = 4
    monthly: int = 12
    yearly: int = 0
    last: int = 1

    def __post_init__(self) -> None:
        if min(self.daily, self.weekly, self.monthly, self.yearly, self.last) < 0:
            raise ConfigError("retention counts are zero or more")


def _buckets(t: float) -> dict[str, tuple[int, ...]]:
    d = datetime.fromtimestamp(t, UTC)
    iso = d.isocalendar()
    return {"daily": (d.year, d.month, d.day), "weekly": (iso[0], iso[1]),
            "monthly": (d.year, d.month), "yearly": (d.year,)}


def select_kept(backups: list[BackupInfo], policy: Retention) -> set[str]:
    """The names GFS keeps among `backups` (one VPG's or many: each VPG on its own)."""
    kept: set[str] = set()
    by_vpg: dict[str, list[BackupInfo]] = {}
    for b in backups:
        by_vpg.setdefault(b.vpg, []).append(b)
    for group in by_vpg.values():
        group.sort(key=lambda b: (b.checkpoint["time_ns"], b.time_ns), reverse=True)
        kept.update(b.name for b in group[:policy.last])
        for rule in ("daily", "weekly", "monthly", "yearly"):
            count = getattr(policy, rule)
            seen: set[tuple[int, ...]] = set()
            for b in group:
                if len(seen) >= count:
                    break
                key = _buckets(b.checkpoint["time_ns"] / 1e9)[rule]
                if key not in seen:
                    seen.add(key)
                    kept.add(b.name)
    return kept


@dataclass
class PruneResult:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    locked: dict[str, float] = field(default_factory=dict)  # expired, locked until
    chunks_deleted: int = 0


def prune(repo: Repository, policy: Retention, *, vpg: str | None = None,
          dry_run: bool = False, now: float | None = None) -> PruneResult:
    """Delete the backups `policy` expires (of `vpg`, or of every VPG) whose retention
    lock has passed, then collect unreferenced chunks."""
    t = time.time() if now is None else now
    with repo.writer():
        every = repo.backups()
        mine = [b for b in every if vpg is None or b.vpg == vpg]
        keep = select_kept(mine, policy)
        result = PruneResult()
        for b in mine:
            if b.name in keep:
                result.kept.append(b.name)
            elif b.retain_until > t:
                result.locked[b.name] = b.retain_until
                result.kept.append(b.name)
            else:
                result.deleted.append(b.name)
        if not dry_run:
            result.chunks_deleted = collect(repo, result.deleted)
    return result


def forget(repo: Repository, backup: str, *, now: float | None = None) -> int:
    """Delete one backup (RetentionLockError while it is locked, saying until when) and
    collect its chunks; returns the chunks deleted."""
    t = time.time() if now is None else now
    with repo.writer():
        m = repo.manifest(backup)
        until = float(m["retain_until"])
        if until > t:
            raise RetentionLockError(
                f"backup {backup} is locked until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}", until)
        return collect(repo, [backup])


def _listed(m: dict[str, Any]) -> set[str]:
    return {c for vm in m["vms"] for v in vm["volumes"] for c in v["chunks"] if c}


def collect(repo: Repository, doomed: list[str]) -> int:
    """Garbage collection under the writers' lock: delete the manifests `doomed` and every
    chunk no other manifest lists (and leftovers of crashed writes), crash-safely."""
    names = repo.backup_names()
    gone = set(doomed)
    live: set[str] = set()
    for n in names:
        if n not in gone:
            live |= _listed(repo.manifest(n))
    candidates = {c for c in repo.chunk_ids() if c not in live}
    plan = {"manifests": sorted(gone), "chunks": sorted(candidates)}
    repo.store.put("gc-plan", fmt.encode_doc(fmt.GC_FORMAT, fmt.GC_VERSION, plan))
    repo.store.sync()
    return finish_gc(repo)


def finish_gc(repo: Repository) -> int:
    """Carry out `gc-plan` from wherever a crash left it; returns the chunks deleted."""
    try:
        doc = json.loads(repo.store.get("gc-plan"))
        if doc.get("format") != fmt.GC_FORMAT or doc.get("version") != fmt.GC_VERSION:
            raise ValueError("not a gc plan of this version")
        manifests = [str(x) for x in doc["manifests"]]
        chunks = [str(x) for x in doc["chunks"]]
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as exc:
        # a plan is written atomically, so this is damage: deleting nothing is safe
        raise CorruptRecordError(f"gc-plan of the repository is unreadable: {exc}; "
                                 f"remove it to let garbage collection start over") from None
    for n in manifests:
        if fmt.is_backup_name(n):
            try:
                repo.store.delete(fmt.manifest_name(n))
            except RetentionLockError:  # locked after all (a clock set back): it stays,
                continue  # and so do its chunks, as it is among the manifests read below
    repo.store.sync()
    live: set[str] = set()
    for n in repo.backup_names():
        live |= _listed(repo.manifest(n))
    deleted = 0
    now = time.time()
    for cid in chunks:
        name = fmt.chunk_name(cid)
        if cid in live or not fmt.is_chunk_id(cid) or repo.store.retain_until(name) > now:
            continue
        try:
            repo.store.delete(name)
        except RetentionLockError:  # an older locked version (S3) still holds it
            continue
        deleted += 1
    for left in list(repo.store.leftovers()):
        repo.store.remove_leftover(left)
    repo.store.sync()
    repo.store.delete("gc-plan")
    repo.store.sync()
    repo.write_index()
    return deleted


# ---- check ----------------------------------------------------------------------------

@dataclass
class CheckReport:
    """What `check` found: damaged and missing chunks with the backups listing them,
    manifests that do not read, unreferenced chunks, and whether the index matched."""

    backups: int = 0
    chunks: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    bad_manifests: dict[str, str] = field(default_factory=dict)
    unreferenced: int = 0
    index_ok: bool = True
    gc_pending: bool = False

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.bad_manifests)

    def affected(self) -> list[str]:
        """Every backup that cannot be restored whole."""
        names = {b for bs in (*self.damaged.values(), *self.missing.values()) for b in bs}
        return sorted(names | set(self.bad_manifests))


def check(repo: Repository, *, progress: Callable[[int, int], None] | None = None
          ) -> CheckReport:
    """Read and verify every manifest and every chunk a manifest lists (each once)."""
    report = CheckReport(gc_pending=repo.store.exists("gc-plan"))
    users: dict[str, list[str]] = {}
    names = repo.backup_names()
    for n in names:
        try:
            m = repo.manifest(n)
        except CorruptRecordError as exc:
            report.bad_manifests[n] = str(exc)
            continue
        report.backups += 1
        for cid in sorted(_listed(m)):
            users.setdefault(cid, []).append(n)
    index = repo.read_index()
    report.index_ok = index is not None and sorted(index) == names
    total = len(users)
    for i, (cid, who) in enumerate(sorted(users.items())):
        try:
            repo.get_chunk(cid)
        except CorruptRecordError as exc:
            (report.missing if isinstance(exc, ChunkMissingError) else report.damaged)[cid] = who
        report.chunks += 1
        if progress is not None:
            progress(i + 1, total)
    report.unreferenced = sum(1 for c in repo.chunk_ids() if c not in users)
    return report
