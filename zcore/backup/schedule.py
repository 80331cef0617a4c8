"""Backup schedules of a site (issue 13): per recovery VPG, a repository, a daily run
window and GFS retention.  Sits under zcore.backup.siteops, which ticks them in the site
service and runs what is due as tasks; stored in the site directory as a checked state
file (`backup-schedules.json`, format `zcore-backup-schedules`, version 1: `{"schedules":
[{...Schedule fields...}]}`).

One backup a day is taken, the first time the site looks inside the day's window (UTC);
the weekly, monthly and yearly points are the daily backups GFS keeps (`prune` with the
schedule's counts runs after each scheduled backup).  The repository's secret is the
schedule's key file, or the site process's $ZCORE_BACKUP_PASSPHRASE: no passphrase is
ever written to the file."""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from zcore.backup.prune import Retention
from zcore.errors import ConfigError, CorruptRecordError
from zcore.fsutil import read_state, write_state

SCHEDULES_NAME = "backup-schedules.json"
SCHEDULES_FORMAT = "zcore-backup-schedules"
SCHEDULES_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """A VPG's daily backup: where, when (UTC hours), how long it is kept."""

    vpg: str
    repository: str
    keyfile: str | None = None
    window_start: int = 0  # the hour (UTC) the run window opens, 0-23
    window_hours: int = 24  # its length, 1-24
    daily: int = 7
    weekly: int = 4
    monthly: int = 12
    yearly: int = 0
    last: int = 1
    retain_days: float = 0.0  # a retention lock on each backup, in days

    def __post_init__(self) -> None:
        if not self.vpg or not self.repository:
            raise ConfigError("a backup schedule names a VPG and a repository")
        if not 0 <= self.window_start <= 23 or not 1 <= self.window_hours <= 24:
            raise ConfigError("window_start is an hour 0-23 and window_hours 1-24")
        if self.retain_days < 0:
            raise ConfigError("retain_days is zero or more")
        self.retention()  # the counts checked

    def retention(self) -> Retention:
        return Retention(self.daily, self.weekly, self.monthly, self.yearly, self.last)

    def in_window(self, now: float) -> bool:
        hour = datetime.datetime.fromtimestamp(now, datetime.UTC).hour
        return (hour - self.window_start) % 24 < self.window_hours

    def due(self, last_ns: int | None, now: float) -> bool:
        """True inside the window when the VPG has no backup yet today (UTC)."""
        if not self.in_window(now):
            return False
        if last_ns is None:
            return True
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        return datetime.datetime.fromtimestamp(last_ns / 1e9, datetime.UTC).date() < day

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Schedule:
        known = {f.name for f in fields(cls)}
        if not isinstance(doc, dict) or set(doc) - known:
            raise ConfigError(f"unknown backup schedule fields {sorted(set(doc) - known)}")
        return cls(**doc)


class ScheduleBook:
    """The schedules of a site, one per VPG, kept in `root/backup-schedules.json`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / SCHEDULES_NAME
        self._by_vpg: dict[str, Schedule] = {}
        if self.path.exists():
            meta = read_state(self.path, SCHEDULES_FORMAT, SCHEDULES_VERSION)
            try:
                for doc in meta["schedules"]:
                    s = Schedule.from_dict(doc)
                    self._by_vpg[s.vpg] = s
            except (KeyError, TypeError, ConfigError) as exc:
                raise CorruptRecordError(f"{self.path}: {exc}") from None

    def all(self) -> list[Schedule]:
        return [self._by_vpg[k] for k in sorted(self._by_vpg)]

    def get(self, vpg: str) -> Schedule | None:
        return self._by_vpg.get(vpg)

    def put(self, schedule: Schedule) -> None:
        self._by_vpg[schedule.vpg] = schedule
        self._save()

    def remove(self, vpg: str) -> bool:
        found = self._by_vpg.pop(vpg, None) is not None
        if found:
            self._save()
        return found

    def _save(self) -> None:
        write_state(self.path, SCHEDULES_FORMAT, SCHEDULES_VERSION,
                    {"schedules": [asdict(s) for s in self.all()]})
