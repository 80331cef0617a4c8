"""`zcore backup site run|list|show|restore|preseed|serve|unserve|files|check|prune|schedule`:
the same backups through a running site service's REST API (zcore.site.api.routes.backup),
as tasks with a progress bar.  The repository is a path at the site; its secret is
`--keyfile` (a path at the site) or this shell's $ZCORE_BACKUP_PASSPHRASE, sent in the
request and never stored (none: the site's own $ZCORE_BACKUP_PASSPHRASE).  Sits over
zcore.cli.client and zcore.cli.output."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options
from zcore.cli.params import gfs_options
from zcore.cli.vpg_cmd import peer_id, wait_option

PASSPHRASE_ENV = "ZCORE_BACKUP_PASSPHRASE"


def _ref(repository: str, keyfile: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"repository": repository}
    if keyfile is not None:
        body["keyfile"] = keyfile
    elif os.environ.get(PASSPHRASE_ENV) is not None:
        body["passphrase"] = os.environ[PASSPHRASE_ENV]
    return body


def _q(name: str) -> str:
    return quote(name, safe="")


def _result(task: dict[str, Any]) -> None:
    result = task.get("result") or {}
    o.fields(f"task {task['id']} {task['state']}", sorted(result.items()))


keyfile_option = click.option("--keyfile", help="the repository's key file (a path at the site)")


@click.group("site")
def backup_site() -> None:
    """Backups through a running site service (its REST API)."""


@backup_site.command("run")
@click.argument("vpg")
@click.argument("repository")
@keyfile_option
@click.option("--checkpoint", type=int, help="checkpoint id (default: the newest usable)")
@click.option("--full", is_flag=True, help="read everything (no incremental)")
@click.option("--retain", type=o.parse_duration, help="retention lock (e.g. 90d)")
@wait_option
@site_options
def site_run(client: Client, as_json: bool, vpg: str, repository: str, keyfile: str | None,
             checkpoint: int | None, full: bool, retain: float | None, wait: bool) -> None:
    """Back up recovery VPG VPG into REPOSITORY (a task)."""
    body = _ref(repository, keyfile) | {"full": full,
                                        "retain_days": (retain or 0.0) / 86400.0}
    if checkpoint is not None:
        body["checkpoint"] = checkpoint
    task = client.post(f"/vpgs/{_q(vpg)}/backups", body)
    o.finish_task(client, task, wait, as_json, _result)


@backup_site.command("list")
@click.argument("repository")
@keyfile_option
@click.option("--vpg", help="only this VPG's backups")
@site_options
def site_list(client: Client, as_json: bool, repository: str, keyfile: str | None,
              vpg: str | None) -> None:
    """The backups in REPOSITORY, oldest first."""
    path = "/backups/list" + (f"?vpg={_q(vpg)}" if vpg else "")
    found = client.post(path, _ref(repository, keyfile))
    if as_json:
        print_json(found)
        return
    o.table("backups", ["backup", "vpg", "checkpoint", "checkpoint time", "mode",
                        "locked until"],
            [(b["backup"], b["vpg"], b["checkpoint"]["id"],
              o.when_ns(b["checkpoint"]["time_ns"]), b["mode"],
              o.when(b["retain_until"]) if b["retain_until"] else None) for b in found])


@backup_site.command("show")
@click.argument("repository")
@click.argument("name")
@keyfile_option
@site_options
def site_show(client: Client, as_json: bool, repository: str, name: str,
              keyfile: str | None) -> None:
    """One backup: checkpoint, VMs, volumes."""
    m = client.post(f"/backups/{_q(name)}/show", _ref(repository, keyfile))
    if as_json:
        print_json(m)
        return
    o.fields(f"backup {name}", [("vpg", m["vpg"]), ("checkpoint", m["checkpoint"]["id"]),
                                ("mode", m["mode"]), ("parent", m["parent"])])
    o.table("volumes", ["vm", "volume", "size", "chunks", "zero chunks"],
            [(vm["name"], v["name"], o.size(v["size"]), v["chunks"], v["zero_chunks"])
             for vm in m["vms"] for v in vm["volumes"]])


@backup_site.command("restore")
@click.argument("repository")
@click.argument("name")
@click.argument("dest")
@keyfile_option
@click.option("--vm", "vms", multiple=True, help="only this VM (repeatable)")
@wait_option
@site_options
def site_restore(client: Client, as_json: bool, repository: str, name: str, dest: str,
                 keyfile: str | None, vms: tuple[str, ...], wait: bool) -> None:
    """Restore backup NAME to images under DEST at the site (a task)."""
    body = _ref(repository, keyfile) | {"dest": dest, "vms": list(vms) or None}
    o.finish_task(client, client.post(f"/backups/{_q(name)}/restore", body), wait, as_json,
                  _result)


@backup_site.command("preseed")
@click.argument("repository")
@click.argument("name")
@click.argument("vpg")
@click.option("--peer", required=True, metavar="SITE",
              help="the protected site that will create VPG (its name or id)")
@keyfile_option
@wait_option
@site_options
def site_preseed(client: Client, as_json: bool, repository: str, name: str, vpg: str,
                 peer: str, keyfile: str | None, wait: bool) -> None:
    """Restore backup NAME at this recovery site as the replicas of a new VPG VPG; then
    `zcore vpg create VPG ... --initial-sync delta` at the protected site sends only what
    differs from them (a task)."""
    body = _ref(repository, keyfile) | {"vpg": vpg, "peer": peer_id(client, peer)}
    o.finish_task(client, client.post(f"/backups/{_q(name)}/preseed", body), wait, as_json,
                  _result)


@backup_site.command("serve")
@click.argument("repository")
@click.argument("name")
@keyfile_option
@click.option("--vm", "vms", multiple=True, help="only this VM (repeatable)")
@click.option("--writable", is_flag=True,
              help="under scratch overlays: writes are discarded by `unserve`")
@site_options
def site_serve(client: Client, as_json: bool, repository: str, name: str,
               keyfile: str | None, vms: tuple[str, ...], writable: bool) -> None:
    """Instant access: serve backup NAME's volumes on the site's NBD server (until
    `unserve`); prints one nbd:// URI per volume."""
    body = _ref(repository, keyfile) | {"vms": list(vms) or None, "writable": writable}
    served = client.post(f"/backups/{_q(name)}/serve", body)
    if as_json:
        print_json(served)
        return
    o.table(f"backup {name} served" + (" (writable, scratch)" if writable else ""),
            ["vm", "volume", "uri"], [(e["vm"], e["volume"], e["uri"]) for e in served])


@backup_site.command("unserve")
@click.argument("name")
@site_options
def site_unserve(client: Client, as_json: bool, name: str) -> None:
    """Stop serving backup NAME (its connections drop, scratch writes are discarded)."""
    client.delete(f"/backups/{_q(name)}/serve")
    if as_json:
        print_json({"unserved": name})
    else:
        click.echo(f"backup {name} is no longer served")


@backup_site.command("files")
@click.argument("source")
@click.argument("vm")
@click.argument("volume")
@click.argument("path", default="/")
@click.option("--repository", help="SOURCE is a backup in this repository (at the site)")
@click.option("--checkpoint", type=int,
              help="SOURCE is a recovery VPG, read at this checkpoint of its journals")
@keyfile_option
@click.option("--extract", "dest", help="copy PATH into this directory at the site instead")
@wait_option
@site_options
def site_files(client: Client, as_json: bool, source: str, vm: str, volume: str, path: str,
               repository: str | None, checkpoint: int | None, keyfile: str | None,
               dest: str | None, wait: bool) -> None:
    """File-level restore: list directory PATH of an ext4 VOLUME of VM, in backup SOURCE
    (--repository) or in recovery VPG SOURCE at a checkpoint (--checkpoint), or
    --extract it into a directory at the site (a task)."""
    if (repository is None) == (checkpoint is None):
        raise click.UsageError("give --repository (SOURCE is a backup) or --checkpoint "
                               "(SOURCE is a recovery VPG)")
    at: dict[str, Any] = {"vm": vm, "volume": volume, "path": path}
    if repository is not None:
        base, body = f"/backups/{_q(source)}/files", _ref(repository, keyfile) | at
    else:
        base, body = f"/vpgs/{_q(source)}/checkpoints/{checkpoint}/files", at
    if dest is not None:
        task = client.post(f"{base}/extract", body | {"dest": dest})
        o.finish_task(client, task, wait, as_json, _result)
        return
    if repository is not None:
        entries = client.post(base, body)
    else:
        entries = client.request("GET", base, params=at)  # ("path" is get()'s own)
    if as_json:
        print_json(entries)
        return
    o.table(f"{path} in {source}", ["name", "type", "mode", "uid", "gid", "size"],
            [(e["name"], e["type"], f"{e['mode'] & 0o7777:o}", e["uid"], e["gid"],
              e["size"]) for e in entries])


@backup_site.command("check")
@click.argument("repository")
@keyfile_option
@click.option("--repair", is_flag=True, help="heal from the site's journals what they "
              "still hold, quarantine the rest, rebuild the index")
@wait_option
@site_options
def site_check(client: Client, as_json: bool, repository: str, keyfile: str | None,
               repair: bool, wait: bool) -> None:
    """Verify every manifest and chunk of REPOSITORY at the site, or repair it (a task)."""
    body = _ref(repository, keyfile) | {"repair": repair}
    o.finish_task(client, client.post("/backups/check", body), wait, as_json, _result)


@backup_site.command("prune")
@click.argument("repository")
@keyfile_option
@gfs_options()
@click.option("--vpg", help="only this VPG's backups")
@click.option("--dry-run", is_flag=True, help="say what would be deleted")
@wait_option
@site_options
def site_prune(client: Client, as_json: bool, repository: str, keyfile: str | None,
               daily: int, weekly: int, monthly: int, yearly: int, last: int,
               vpg: str | None, dry_run: bool, wait: bool) -> None:
    """GFS retention and garbage collection of REPOSITORY at the site (a task)."""
    body = _ref(repository, keyfile) | {"daily": daily, "weekly": weekly, "monthly": monthly,
                                        "yearly": yearly, "last": last, "vpg": vpg,
                                        "dry_run": dry_run}
    o.finish_task(client, client.post("/backups/prune", body), wait, as_json, _result)


@backup_site.command("schedule")
@click.argument("vpg")
@click.argument("repository", required=False)
@click.option("--keyfile", help="key file at the site (else the site's "
              "$ZCORE_BACKUP_PASSPHRASE)")
@click.option("--window", default="0-24", show_default=True,
              help="run window, UTC hours START-END (e.g. 22-4)")
@gfs_options(last=False)
@click.option("--retain", type=o.parse_duration, help="retention lock of each backup")
@click.option("--delete", "remove", is_flag=True, help="stop the VPG's scheduled backups")
@site_options
def site_schedule(client: Client, as_json: bool, vpg: str, repository: str | None,
                  keyfile: str | None, window: str, daily: int, weekly: int, monthly: int,
                  yearly: int, retain: float | None, remove: bool) -> None:
    """Show (no REPOSITORY), set or --delete VPG's daily backup schedule."""
    path = f"/vpgs/{_q(vpg)}/backup-schedule"
    if remove:
        client.delete(path)
        click.echo(f"VPG {vpg}: scheduled backups stopped (its backups stay)")
        return
    if repository is None:
        shown = client.get(path)
    else:
        start, _, end = window.partition("-")
        try:
            first, stop = int(start), int(end or 24)
        except ValueError:
            raise click.BadParameter(f"{window!r} is not START-END hours") from None
        hours = (stop - first) % 24 or 24
        body = {"repository": repository, "keyfile": keyfile, "window_start": first % 24,
                "window_hours": hours, "daily": daily, "weekly": weekly,
                "monthly": monthly, "yearly": yearly,
                "retain_days": (retain or 0.0) / 86400.0}
        shown = client.request("PUT", path, json=body)
    if as_json:
        print_json(shown)
        return
    o.fields(f"backup schedule of {vpg}", sorted(shown.items()))
