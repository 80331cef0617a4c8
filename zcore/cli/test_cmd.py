"""`zcore test start|stop|status|settings`: the failover test of a VPG at its recovery
site, through the REST API (/api/v1/vpgs/NAME/test, /test/stop, /recovery-settings).
start and stop are tasks: they wait with a progress bar (`--no-wait` prints the task id).
Sits over zcore.cli.client and zcore.cli.output."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options
from zcore.cli.params import parse_size
from zcore.cli.vpg_cmd import wait_option

CHECKPOINT_HELP = ("latest (default), latest-tagged, latest-consistent, id:N, tag:NAME or "
                   "before:TIME (ISO 8601, UTC without a zone, or epoch seconds)")


def _path(vpg: str) -> str:
    return f"/vpgs/{quote(vpg, safe='')}"


@click.group("test")
def test() -> None:
    """Failover tests: a VPG's VMs up at a checkpoint on scratch volumes, while
    replication goes on; the writes are discarded at stop."""


@test.command("start")
@click.argument("vpg")
@click.option("--checkpoint", default="latest", show_default=True, metavar="CHOICE",
              help=CHECKPOINT_HELP)
@wait_option
@site_options
def start_cmd(client: Client, as_json: bool, vpg: str, checkpoint: str, wait: bool) -> None:
    """Start a failover test of VPG, e.g. `zcore test start web --checkpoint
    tag:before-upgrade` or `--checkpoint before:2026-12-01T14:05`."""
    task = client.post(_path(vpg) + "/test", {"checkpoint": checkpoint})

    def done(t: dict[str, Any]) -> None:
        r = t["result"]
        c = r["checkpoint"]
        tag = f" tag {c['tag']!r}" if c.get("tag") else ""
        click.echo(f"failover test of {vpg} running at checkpoint {c['id']}{tag} "
                   f"({o.when_ns(c['time_ns'])}); VMs by the {r['adapter']} adapter; "
                   f"volumes:")
        for uri in r["exports"]:
            click.echo(f"  {uri}")
        click.echo(f"stop it with `zcore test stop {vpg} --result passed|failed`")

    o.finish_task(client, task, wait, as_json, done)


@test.command("stop")
@click.argument("vpg")
@click.option("--result", type=click.Choice(["passed", "failed"]), required=True,
              help="what the test showed")
@click.option("--note", default="", help="a note kept with the result")
@wait_option
@site_options
def stop_cmd(client: Client, as_json: bool, vpg: str, result: str, note: str,
             wait: bool) -> None:
    """Stop the failover test of VPG: VMs stopped, scratch writes discarded, the result
    recorded against the tested checkpoint."""
    task = client.post(_path(vpg) + "/test/stop", {"result": result, "note": note})

    def done(t: dict[str, Any]) -> None:
        rec = t["result"]["record"]
        click.echo(f"{rec['label']}: checkpoint {rec['checkpoint_id']} of {vpg} "
                   f"{rec['result']}" + (f" ({rec['note']})" if rec["note"] else ""))
        for problem in t["result"]["problems"]:
            click.echo(f"warning: {problem}", err=True)

    o.finish_task(client, task, wait, as_json, done)


@test.command("status")
@click.argument("vpg")
@site_options
def status_cmd(client: Client, as_json: bool, vpg: str) -> None:
    """The failover test of VPG: the running one (exports, scratch use) and past results."""
    status = client.get(_path(vpg) + "/test")
    if as_json:
        print_json(status)
        return
    run = status["running"]
    pairs: list[tuple[str, Any]] = [("state", status["state"])]
    if run is not None:
        pairs += [("checkpoint", f"{run['checkpoint']['id']} "
                                 f"({o.when_ns(run['checkpoint']['time_ns'])})"),
                  ("started", o.when(run["started_at"])), ("adapter", run["adapter"]),
                  ("scratch", f"{o.size(run['scratch_used_bytes'])} of "
                              f"{o.size(run['scratch_limit_bytes'])}")]
        pairs += [(f"export {i}", uri) for i, uri in enumerate(run["exports"])]
    o.fields(f"failover test of {vpg}", pairs)
    o.table("results", ["started", "checkpoint", "tag", "result", "note"],
            ([o.when(r["started_at"]), r["checkpoint_id"], r["checkpoint_tag"], r["result"],
              r["note"]] for r in status["history"]))


@test.command("settings")
@click.argument("vpg")
@click.option("--adapter", help="none (serve the exports only), command or qemu")
@click.option("--start-command", help="the command adapter's start command")
@click.option("--stop-command", help="the command adapter's stop command")
@click.option("--scratch-limit", type=parse_size, metavar="SIZE",
              help="scratch space for a test of the whole VPG (like 20G)")
@click.option("--period-days", type=click.FloatRange(min=0, min_open=True),
              help="alert when the VPG was not tested (passed) within this many days")
@click.option("--set", "others", multiple=True, metavar="KEY=JSON",
              help="any other recovery setting as JSON, e.g. boot_order='[\"db\", \"web\"]', "
              "qemu='{\"memory_mib\": 1024}', pre_scripts, post_scripts (repeatable)")
@site_options
def settings_cmd(client: Client, as_json: bool, vpg: str, adapter: str | None,
                 start_command: str | None, stop_command: str | None,
                 scratch_limit: int | None, period_days: float | None,
                 others: tuple[str, ...]) -> None:
    """Show or change the recovery settings of VPG (given options change): how its VMs
    start at this site (the adapter, boot order, scripts) and its failover tests."""
    patch: dict[str, Any] = {
        k: v for k, v in (("adapter", adapter), ("start_command", start_command),
                          ("stop_command", stop_command),
                          ("test_scratch_limit_bytes", scratch_limit),
                          ("test_period_days", period_days)) if v is not None}
    for item in others:
        key, sep, text = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError("not KEY=JSON")
            patch[key] = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{item!r}: {exc}", param_hint="--set") from None
    found = client.request("PATCH", _path(vpg) + "/recovery-settings", json=patch) \
        if patch else client.get(_path(vpg) + "/recovery-settings")
    if as_json:
        print_json(found)
        return
    o.fields(f"recovery settings of {vpg}", sorted(found.items()))
