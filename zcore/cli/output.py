"""What the API command groups print for people: rich tables, times, sizes, and a progress
bar while a task runs; `--json` bypasses all of it (zcore.cli.client.print_json).

Sits under the API command groups, beside zcore.cli.client.  Tables go to stdout; the
progress bar goes to stderr, and only when stderr is a terminal, so output piped to a file
holds only the result.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from zcore.cli.client import Client, RefusedError, print_json

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 7 * 86_400.0}


def console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def when(seconds: float | None) -> str:
    """Epoch seconds as local time, to the second."""
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def when_ns(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns / 1e9)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    if s < 2 * 86_400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86_400:.1f}d"


def parse_duration(text: str) -> float:
    """"90", "90s", "15m", "24h", "30d", "2w" -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration (like 90s, 15m, 24h or 30d)")
    return float(match[1]) * _UNITS[match[2]]


def parse_time(text: str) -> float:
    """A point in time as epoch seconds: a duration ago ("1h"), epoch seconds
    ("1764600000"), or an ISO date/time ("2026-12-01T21:00", local time unless it names a
    zone)."""
    if _DURATION.match(text) and not text.strip().isdigit():
        return time.time() - parse_duration(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).astimezone().timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a time: give a duration ago (1h, 30m), "
                                 "an ISO time (2026-12-01T21:00) or epoch seconds") from None


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table, or "no TITLE" when it has no row."""
    rows = list(rows)
    if not rows:
        click.echo(f"no {title}")
        return
    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("-" if v is None else str(v) for v in row))
    console().print(t)


def fields(title: str | None, pairs: Iterable[tuple[str, Any]]) -> None:
    """A two-column table of name and value (one object)."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for name, value in pairs:
        t.add_row(name, "-" if value is None else str(value))
    console().print(t)


def more(next_cursor: str | None, what: str) -> None:
    if next_cursor is not None:
        click.echo(f"more {what}: repeat with --after {next_cursor}")


def task_line(task: dict[str, Any]) -> str:
    line = f"task {task['id']} ({task['kind']}) {task['state']}"
    if task.get("error"):
        line += f": {task['error']['message']} [{task['error']['code']}]"
    elif task.get("message"):
        line += f": {task['message']}"
    return line


def _watch(client: Client, task: dict[str, Any]) -> dict[str, Any]:
    err = Console(stderr=True, highlight=False)
    if not err.is_terminal:
        return client.wait_task(task, lambda _t: None)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        label = f"{task['kind']} {task.get('vpg') or ''}".strip()
        bar = progress.add_task(label, total=1.0)

        def show(t: dict[str, Any]) -> None:
            text = f"{label}: {t['message']}" if t.get("message") else label
            progress.update(bar, completed=float(t["progress"]), description=text)

        return client.wait_task(task, show)


def finish_task(
    client: Client,
    task: dict[str, Any],
    wait: bool,
    as_json: bool,
    done: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """What a command that started a task prints: the task id (--no-wait), or waits with a
    progress bar and prints the ended task; a task that did not succeed exits 1."""
    if not wait:
        if as_json:
            print_json(task)
        else:
            click.echo(f"task {task['id']} started; follow it with `zcore tasks show "
                       f"{task['id']} --wait`")
        return
    try:
        ended = _watch(client, task)
    except KeyboardInterrupt:
        raise click.ClickException(f"stopped waiting; the task goes on: `zcore tasks show "
                                   f"{task['id']}`") from None
    if as_json:
        print_json(ended)
    elif ended["state"] == "succeeded":
        (done or (lambda t: click.echo(task_line(t))))(ended)
    if ended["state"] != "succeeded":
        raise RefusedError(task_line(ended))
