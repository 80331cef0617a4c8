"""VPG ownership at the recovery site: the first site to attach a VPG owns it, recorded
in `vpgs/<vpg>/owner.json` (a checked state file, docs/format.md 10b).  The recovery
site (zcore.replication.recovery_site) checks it on every ATTACH."""

from __future__ import annotations

from pathlib import Path

from zcore.fsutil import write_state
from zcore.security import SITE_STATE_VERSION, read_site_state, state_str

OWNER_FILE = "owner.json"
OWNER_FORMAT = "zcore-vpg-owner"


def write_owner(vpg_dir: Path, site_id: str, name: str) -> None:
    """Record (atomically) that the site `site_id` named `name` owns the VPG in
    `vpg_dir`."""
    write_state(vpg_dir / OWNER_FILE, OWNER_FORMAT, SITE_STATE_VERSION,
                {"site_id": site_id, "name": name})


def read_owner(vpg_dir: Path) -> str | None:
    """The site id owning the VPG in `vpg_dir`, None when no site owns it yet.  A damaged
    file raises `CorruptRecordError` (never a guess: ownership decides who may write)."""
    path = vpg_dir / OWNER_FILE
    try:
        # the plain layout (before checked files) is {"site_id", "name"} as the document
        meta = read_site_state(path, OWNER_FORMAT, lambda doc: doc)
    except FileNotFoundError:
        return None
    return state_str(meta, "site_id", path)
