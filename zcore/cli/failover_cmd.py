"""`zcore failover start|commit|rollback|show VPG`: live failover of a VPG at its recovery
site, through the REST API (/api/v1/vpgs/VPG/failover).  start, commit and rollback are
tasks: they wait with a progress bar (`--no-wait` prints the task id).  Sits over
zcore.cli.client and zcore.cli.output."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options
from zcore.cli.test_cmd import CHECKPOINT_HELP
from zcore.cli.vpg_cmd import wait_option


def _path(vpg: str) -> str:
    return f"/vpgs/{quote(vpg, safe='')}/failover"


def show_failover(status: dict[str, Any]) -> None:
    if status.get("state") is None:
        click.echo(f"VPG {status['vpg']}: no failover under way")
        return
    p = status["promotion"]
    o.fields(f"failover of {status['vpg']}", [
        ("state", status["state"]), ("checkpoint", status["checkpoint_id"]),
        ("commit policy", status["commit_policy"]
         + (f" after {status['commit_after_minutes']} min"
            if status.get("commit_after_minutes") is not None else "")),
        ("shutdown policy", status["shutdown_policy"]),
        ("started", o.when(status["started"])),
        ("promotion", f"{p['progress']:.0%} of {o.size(p['total_bytes'])}"
         + (f" (error: {p['error']})" if p.get("error") else "")),
        ("exports", ", ".join(status.get("exports", [])) or "-"),
    ])


@click.group()
def failover() -> None:
    """Live failover: recovered volumes served at once on durable overlays at a checkpoint,
    then committed (the replicas become the volumes) or rolled back."""


@failover.command("start")
@click.argument("vpg")
@click.option("--checkpoint", default="latest", show_default=True, help=CHECKPOINT_HELP)
@click.option("--commit-policy", type=click.Choice(["none", "commit", "rollback"]),
              default="none", show_default=True,
              help="none waits for you; commit or rollback after --commit-after")
@click.option("--commit-after", "commit_after", type=float, metavar="MINUTES",
              help="minutes before the commit policy acts (0: at once)")
@click.option("--shutdown-policy", type=click.Choice(["none", "graceful", "force"]),
              default="none", show_default=True,
              help="what happens to the protected site's VMs when it is reachable")
@click.option("--reverse", is_flag=True,
              help="start reverse protection once the failover is committed")
@wait_option
@site_options
def start_cmd(client: Client, as_json: bool, wait: bool, vpg: str, checkpoint: str,
              commit_policy: str, commit_after: float | None, shutdown_policy: str,
              reverse: bool) -> None:
    """Fail VPG over at a checkpoint, e.g. `zcore failover start web --checkpoint
    latest_tagged`; waits for the background promotion (the volumes are served before)."""
    body = {"checkpoint": int(checkpoint) if checkpoint.isdigit() else checkpoint,
            "commit_policy": commit_policy, "commit_after_minutes": commit_after,
            "shutdown_policy": shutdown_policy, "reverse": reverse}
    task = client.post(_path(vpg), body)
    o.finish_task(client, task, wait, as_json,
                  lambda _t: show_failover(client.get(_path(vpg))))


@failover.command("commit")
@click.argument("vpg")
@wait_option
@site_options
def commit_cmd(client: Client, as_json: bool, wait: bool, vpg: str) -> None:
    """Commit VPG's failover: history after the checkpoint dropped, the overlays folded
    into the replicas, served as plain volumes."""
    task = client.post(_path(vpg) + "/commit")
    o.finish_task(client, task, wait, as_json,
                  lambda _t: show_failover(client.get(_path(vpg))))


@failover.command("rollback")
@click.argument("vpg")
@wait_option
@site_options
def rollback_cmd(client: Client, as_json: bool, wait: bool, vpg: str) -> None:
    """Roll VPG's failover back: the overlays discarded, replication may attach again."""
    task = client.post(_path(vpg) + "/rollback")
    o.finish_task(client, task, wait, as_json,
                  lambda _t: show_failover(client.get(_path(vpg))))


@failover.command("show")
@click.argument("vpg")
@site_options
def show_cmd(client: Client, as_json: bool, vpg: str) -> None:
    """The failover of VPG: state, checkpoint, policies, promotion, exports."""
    status = client.get(_path(vpg))
    if as_json:
        print_json(status)
        return
    show_failover(status)
