"""`zcore events`, `zcore alerts list|ack`, `zcore tasks list|show`: what happened at a site
and what is running, through the REST API.  Sits over zcore.cli.client and
zcore.cli.output."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from zcore.cli import output as o
from zcore.cli.client import Client, print_json, site_options

LIMIT = click.IntRange(1, 10_000)
SEVERITIES = click.Choice(["info", "warning", "error", "critical"])
TASK_STATES = click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])


@click.command("events")
@click.option("--vpg", help="only events of this VPG")
@click.option("--severity", type=SEVERITIES, help="only events of this severity")
@click.option("--since", type=o.parse_time, metavar="TIME",
              help="from this time: a duration ago (1h), an ISO time or epoch seconds")
@click.option("--until", type=o.parse_time, metavar="TIME", help="before this time")
@click.option("--limit", type=LIMIT, default=100, show_default=True, help="at most this many")
@click.option("--after", metavar="CURSOR", help="the next page: the cursor a page ends with")
@site_options
def events(client: Client, as_json: bool, vpg: str | None, severity: str | None,
           since: float | None, until: float | None, limit: int, after: str | None) -> None:
    """The site's events, newest first."""
    page = client.get("/events", vpg=vpg, severity=severity, start=since, end=until,
                      limit=limit, cursor=after)
    if as_json:
        print_json(page)
        return
    o.table("events", ["time", "severity", "VPG", "code", "text"],
            ([o.when(e["time"]), e["severity"], e["vpg"], e["code"], e["text"]]
             for e in page["items"]))
    o.more(page["next_cursor"], "events")


@click.group()
def alerts() -> None:
    """The site's alerts (RPO, journal, SLA): list and acknowledge them."""


def _alert_rows(found: list[dict[str, Any]]) -> None:
    o.table("alerts", ["id", "time", "severity", "VPG", "code", "text", "state"],
            ([a["id"], o.when(a["time"]), a["severity"], a["vpg"], a["code"], a["text"],
              ("cleared" if a["cleared"] else "active")
              + (", acknowledged" if a["acknowledged"] else "")] for a in found))


@alerts.command("list")
@click.option("--vpg", help="only alerts of this VPG")
@click.option("--active/--all", "active", default=None,
              help="only alerts not cleared yet, or every alert (default: every alert)")
@click.option("--limit", type=LIMIT, default=100, show_default=True, help="at most this many")
@site_options
def alerts_list(client: Client, as_json: bool, vpg: str | None, active: bool | None,
                limit: int) -> None:
    """Alerts, newest first."""
    found = client.get("/alerts", vpg=vpg, limit=limit,
                       active=None if not active else "true")
    if as_json:
        print_json(found)
        return
    _alert_rows(found)


@alerts.command("ack")
@click.argument("alert_id", metavar="ID", type=click.IntRange(0))
@site_options
def alerts_ack(client: Client, as_json: bool, alert_id: int) -> None:
    """Acknowledge the alert ID (`zcore alerts list` shows the ids)."""
    acked = client.post(f"/alerts/{alert_id}/acknowledge")
    if as_json:
        print_json(acked)
        return
    click.echo(f"alert {acked['id']} ({acked['code']}) acknowledged")


@click.group()
def tasks() -> None:
    """The site's long operations (VPG create, sync, delete): progress and results."""


@tasks.command("list")
@click.option("--state", type=TASK_STATES, help="only tasks in this state")
@click.option("--vpg", help="only tasks of this VPG")
@click.option("--kind", help="only tasks of this kind (like vpg_sync)")
@click.option("--limit", type=LIMIT, default=100, show_default=True, help="at most this many")
@site_options
def tasks_list(client: Client, as_json: bool, state: str | None, vpg: str | None,
               kind: str | None, limit: int) -> None:
    """Tasks, newest first."""
    found = client.get("/tasks", state=state, vpg=vpg, kind=kind, limit=limit)
    if as_json:
        print_json(found)
        return
    o.table("tasks", ["id", "kind", "VPG", "state", "progress", "created", "message"],
            ([t["id"], t["kind"], t["vpg"], t["state"], f"{t['progress']:.0%}",
              o.when(t["created_at"]), (t["error"] or {}).get("message") or t["message"]]
             for t in found))


def show_task(task: dict[str, Any]) -> None:
    error = task["error"]
    o.fields(f"task {task['id']}", [
        ("kind", task["kind"]), ("VPG", task["vpg"]), ("state", task["state"]),
        ("progress", f"{task['progress']:.0%}"), ("message", task["message"] or None),
        ("result", None if task["result"] is None else task["result"]),
        ("error", None if error is None else f"{error['message']} [{error['code']}]"),
        ("created", o.when(task["created_at"])), ("started", o.when(task["started_at"])),
        ("ended", o.when(task["ended_at"])),
    ])


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@click.option("--wait", is_flag=True, help="wait for the task to end, with a progress bar")
@site_options
def tasks_show(client: Client, as_json: bool, task_id: str, wait: bool) -> None:
    """One task: state, progress, result or error."""
    task = client.get(f"/tasks/{quote(task_id, safe='')}")
    if wait:
        o.finish_task(client, task, True, as_json, show_task)
        return
    if as_json:
        print_json(task)
        return
    show_task(task)
