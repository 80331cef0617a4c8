"""`zcore vpg create|list|show|update|pause|resume|sync|delete`: the VPGs of a site, through the
REST API (/api/v1/vpgs).  create, sync and delete start a task: they wait for it with a
progress bar (`--no-wait` prints the task id instead).  Sits over zcore.cli.client and
zcore.cli.output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options
from zcore.cli.params import parse_size

F = Callable[..., Any]


def wait_option(fn: F) -> F:
    return click.option("--wait/--no-wait", default=True, show_default=True,
                        help="wait for the task with a progress bar, or print its id at once"
                        )(fn)


def _path(name: str) -> str:
    return f"/vpgs/{quote(name, safe='')}"


def _peer_names(client: Client) -> dict[str, str]:
    return {p["site_id"]: p["name"] for p in client.get("/sites")["peers"]}


def _peer(names: dict[str, str], site_id: str | None) -> str | None:
    return None if site_id is None else names.get(site_id, site_id)


def peer_id(client: Client, peer: str | None) -> str | None:
    """A paired site's id from its id or its name."""
    if peer is None:
        return None
    peers = client.get("/sites")["peers"]
    for p in peers:
        if peer in (p["site_id"], p["name"]):
            return str(p["site_id"])
    return peer  # let the site say it does not know it


def show_vpg(vpg: dict[str, Any], names: dict[str, str],
             status: dict[str, Any] | None = None) -> None:
    peer = _peer(names, vpg["peer"])
    pairs: list[tuple[str, Any]] = [
        ("role", vpg["role"]), ("state", vpg["state"]), ("VMs", ", ".join(vpg["vms"]) or "-"),
        ("peer", peer if peer == vpg["peer"] else f"{peer} ({vpg['peer']})"),
        ("created", o.when(vpg["created_at"])),
        ("updated", o.when(vpg["updated_at"])),
    ]
    if status is not None:
        latest = status.get("latest_checkpoint")
        pairs += [
            ("RPO", o.seconds(status.get("rpo_seconds"))),
            ("history held", o.seconds(status.get("history_seconds_held"))),
            ("history configured", o.seconds(status.get("history_seconds_configured"))),
            ("journal", f"{o.size(status.get('journal_bytes'))} of "
                        f"{o.size(status.get('journal_limit_bytes'))}"),
            ("throughput", o.size(status.get("throughput_bytes_per_s")) + "/s"
             if status.get("throughput_bytes_per_s") is not None else None),
            ("link compression", None if status.get("compression") is None else
             f"{status['compression']} (saved "
             f"{o.size(status.get('compression_bytes_saved') or 0)}"
             + (f"; held at {status.get('compression_held_at') or 'lz4'} for "
                f"{o.seconds(status['compression_held_seconds'])}: a step up did not pay"
                if status.get("compression_held_seconds") else "") + ")"),
            ("sync", None if status.get("sync_progress") is None else
             f"{status['sync_progress']:.0%} (ETA {o.seconds(status.get('sync_eta_seconds'))})"),
            ("latest checkpoint", None if latest is None else
             f"{latest['id']} at {o.when_ns(latest['time_ns'])}"
             + (f" tag {latest['tag']!r}" if latest.get("tag") else "")),
        ]
        pairs += [(f"disk {d['vm']}/{d['volume']}",
                   f"{d['state']} (QEMU node {d['node']}"
                   + (f": {d['error']})" if d.get("error") else ")"))
                  for d in status.get("hypervisor_disks") or ()]
    pairs += [(f"setting {k}", v) for k, v in sorted(vpg["settings"].items())]
    o.fields(f"VPG {vpg['name']}", pairs)


@click.group()
def vpg() -> None:
    """Virtual protection groups: VMs replicated together, with one checkpoint history."""


# option -> the VPG setting it sets (zcore.site.api.models.VpgSettings)
SETTINGS = {
    "rpo_alert": "rpo_alert_seconds",
    "history": "history_seconds",
    "checkpoint_interval": "checkpoint_interval_seconds",
    "journal_limit": "journal_hard_limit_bytes",
    "journal_warn": "journal_warn_bytes",
    "bandwidth_limit": "bandwidth_limit_bytes_per_s",
    "compression": "compression",
}


def settings_options(fn: F) -> F:
    """The VPG settings as options; the command receives `settings`, the ones given."""

    @click.option("--rpo-alert", type=o.parse_duration, metavar="DURATION",
                  help="alert when the RPO passes this (like 5m) [default 300s]")
    @click.option("--history", type=o.parse_duration, metavar="DURATION",
                  help="how far back checkpoints are kept (like 24h, 7d) [default 24h]")
    @click.option("--checkpoint-interval", type=o.parse_duration, metavar="DURATION",
                  help="time between automatic checkpoints [default 5s]")
    @click.option("--journal-limit", type=parse_size, metavar="SIZE",
                  help="journal hard limit (like 50G)")
    @click.option("--journal-warn", type=parse_size, metavar="SIZE",
                  help="journal warning size")
    @click.option("--bandwidth-limit", type=parse_size, metavar="SIZE",
                  help="replication bandwidth limit, bytes per second (like 100M)")
    @click.option("--compression/--no-compression", default=None,
                  help="compress the journal on the link [default: compress]")
    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        given = {SETTINGS[k]: kwargs.pop(k) for k in SETTINGS}
        if given["history_seconds"] is not None:
            given["history_seconds"] = int(given["history_seconds"])
        return fn(settings={k: v for k, v in given.items() if v is not None}, **kwargs)

    return wrapper


@vpg.command("create")
@click.argument("name")
@click.option("--vm", "vms", multiple=True, metavar="VM", help="a VM of the VPG; repeat")
@click.option("--peer", metavar="SITE", help="the paired recovery site (its name or id)")
@click.option("--role", type=click.Choice(["protected", "recovery"]), default="protected",
              show_default=True, help="this site's side of the VPG")
@click.option("--initial-sync", type=click.Choice(["full", "delta"]), default="full",
              show_default=True, help="delta: the recovery site holds preseeded replicas "
              "(`zcore backup site preseed`); only what differs is sent")
@settings_options
@wait_option
@site_options
def create_cmd(client: Client, as_json: bool, wait: bool, name: str, vms: tuple[str, ...],
               peer: str | None, role: str, initial_sync: str,
               settings: dict[str, Any]) -> None:
    """Create the VPG NAME of VMs already added (`zcore vm add`), protected to a paired
    site (`zcore site pair`), e.g. `zcore vpg create web --vm web --peer dr --history 7d`.
    Waits for the initial sync."""
    body = {"name": name, "role": role, "vms": list(vms), "peer": peer_id(client, peer),
            "settings": settings, "initial_sync": initial_sync}
    task = client.post("/vpgs", body)

    def done(_task: dict[str, Any]) -> None:
        show_vpg(client.get(_path(name)), _peer_names(client))

    o.finish_task(client, task, wait, as_json, done)


@vpg.command("update")
@click.argument("name")
@settings_options
@site_options
def update_cmd(client: Client, as_json: bool, name: str, settings: dict[str, Any]) -> None:
    """Change some settings of the VPG NAME (the others keep their values), e.g.
    `zcore vpg update web --history 7d --journal-limit 200G`."""
    if not settings:
        raise click.UsageError("give at least one setting to change (see --help)")
    changed = client.request("PATCH", _path(name), json={"settings": settings})
    if as_json:
        print_json(changed)
        return
    show_vpg(changed, _peer_names(client))


@vpg.command("list")
@site_options
def list_cmd(client: Client, as_json: bool) -> None:
    """Every VPG of the site, with its role and state."""
    vpgs = client.get("/vpgs")
    if as_json:
        print_json(vpgs)
        return
    names = _peer_names(client)
    o.table("VPGs", ["name", "role", "state", "VMs", "peer", "created"],
            ([v["name"], v["role"], v["state"], ", ".join(v["vms"]), _peer(names, v["peer"]),
              o.when(v["created_at"])] for v in vpgs))


@vpg.command("show")
@click.argument("name")
@site_options
def show_cmd(client: Client, as_json: bool, name: str) -> None:
    """One VPG: its definition and status (RPO, history, journal, sync).  --json prints
    `{"vpg": GET /vpgs/NAME, "status": GET /vpgs/NAME/status}`."""
    found = client.get(_path(name))
    status = client.get(_path(name) + "/status")
    if as_json:
        print_json({"vpg": found, "status": status})
        return
    show_vpg(found, _peer_names(client), status)


def _state_change(client: Client, as_json: bool, name: str, action: str) -> None:
    changed = client.post(f"{_path(name)}/{action}")
    if as_json:
        print_json(changed)
        return
    click.echo(f"VPG {changed['name']} is {changed['state']}")


@vpg.command("pause")
@click.argument("name")
@site_options
def pause_cmd(client: Client, as_json: bool, name: str) -> None:
    """Pause replication of a VPG (changes are tracked, sent on resume)."""
    _state_change(client, as_json, name, "pause")


@vpg.command("resume")
@click.argument("name")
@site_options
def resume_cmd(client: Client, as_json: bool, name: str) -> None:
    """Resume replication of a paused VPG."""
    _state_change(client, as_json, name, "resume")


@vpg.command("sync")
@click.argument("name")
@wait_option
@site_options
def sync_cmd(client: Client, as_json: bool, wait: bool, name: str) -> None:
    """Force a sync of a VPG (compare and resend what differs)."""
    o.finish_task(client, client.post(f"{_path(name)}/sync"), wait, as_json)


@vpg.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@wait_option
@site_options
def delete_cmd(client: Client, as_json: bool, wait: bool, name: str, yes: bool) -> None:
    """Delete a VPG: replication stops and its journals and checkpoint history go."""
    if not yes:
        click.confirm(f"delete VPG {name} and its checkpoint history?", abort=True, err=True)
    o.finish_task(client, client.delete(_path(name)), wait, as_json,
                  lambda _t: click.echo(f"VPG {name} deleted"))
