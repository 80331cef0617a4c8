"""`zcore move|reverse|failback VPG`: what follows a failover, through the REST API
(/api/v1/vpgs/VPG/move, /reverse, /failback).  Each is a task: the command waits with a
progress bar (`--no-wait` prints the task id).  Sits over zcore.cli.client and
zcore.cli.output."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, site_options
from zcore.cli.vpg_cmd import wait_option


def _path(vpg: str, what: str) -> str:
    return f"/vpgs/{quote(vpg, safe='')}/{what}"


def _show(task: dict[str, Any]) -> None:
    result = task.get("result") or {}
    for key, value in sorted(result.items()):
        click.echo(f"{key}: {value}")


@click.command()
@click.argument("vpg")
@click.option("--reverse/--no-reverse", default=True, show_default=True,
              help="protect VPG back to this site once it moved")
@wait_option
@site_options
def move(client: Client, as_json: bool, wait: bool, vpg: str, reverse: bool) -> None:
    """Move VPG to its recovery site with no data loss (run at the protected site): its
    volumes stop taking writes, a checkpoint after the last write reaches the recovery
    site, which fails over to it and commits; reverse protection follows by default."""
    task = client.post(_path(vpg, "move"), {"reverse": reverse})
    o.finish_task(client, task, wait, as_json, _show)


@click.command()
@click.argument("vpg")
@wait_option
@site_options
def reverse(client: Client, as_json: bool, wait: bool, vpg: str) -> None:
    """Protect a committed VPG back to the site it failed over from (run where it was
    committed): a delta sync sends only the blocks that differ from its disks there."""
    task = client.post(_path(vpg, "reverse"))
    o.finish_task(client, task, wait, as_json, _show)


@click.command()
@click.argument("vpg")
@wait_option
@site_options
def failback(client: Client, as_json: bool, wait: bool, vpg: str) -> None:
    """Move a reversed VPG back to its original site and protect it from there again, so
    it ends where it began (run where it is protected now)."""
    task = client.post(_path(vpg, "failback"))
    o.finish_task(client, task, wait, as_json, _show)
