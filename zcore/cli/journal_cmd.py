"""`zcore journal check PATH`: the offline check of a journal directory no process holds
(the work is `zcore.journal.Journal.scrub`; this module opens, runs and prints it).

Exit status: 0 the journal is clean, 1 damage was found (or the journal cannot be
opened because of damage), 2 a usage error (no journal there, or a process holds it).
Opening does what every open does (a torn unsynced tail truncated, an interrupted
promotion finished, the block sums of a format 1 journal computed): the check then
reads everything the journal holds at full speed.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

EXIT_CLEAN, EXIT_DAMAGE, EXIT_USAGE = 0, 1, 2


@click.group()
def journal() -> None:
    """Offline tools for journal directories that no process holds."""


def _refuse(message: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "exit": EXIT_USAGE}))
    click.echo(f"zcore journal check: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _held(path: Path) -> bool:
    """True when another process holds the journal's directory lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock: Journal.open takes it again
    return False


@journal.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def check(path: Path, as_json: bool) -> None:
    """Check every record, index file and replica block of the journal at PATH."""
    from zcore.errors import ZcoreError
    from zcore.journal import META_NAME, Journal

    if not (path / META_NAME).exists():
        _refuse(f"{path} holds no journal ({META_NAME} missing)", as_json)
    if _held(path):
        _refuse(f"journal {path} is open in another process (a recovery site holds it): "
                "stop that process first; while it runs, its own background scrub "
                "checks the journal", as_json)
    try:
        j = Journal.open(path)
        try:
            report = j.scrub()
            reopen = asdict(j.reopen_report)
            notes = list(j.integrity_notes)
        finally:
            j.close()
    except ZcoreError as exc:  # damage the open itself refuses
        out: dict[str, Any] = {"path": str(path), "clean": False, "opened": False,
                               "error": f"{type(exc).__name__}: {exc}"}
        if as_json:
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(f"journal {path}: cannot be opened: {out['error']}")
        sys.exit(EXIT_DAMAGE)
    result = report.to_dict() | {"opened": True, "reopen": reopen, "notes": notes}
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        _print_report(result)
    sys.exit(EXIT_CLEAN if report.clean else EXIT_DAMAGE)


def _print_report(r: dict[str, Any]) -> None:
    click.echo(f"journal {r['path']}")
    click.echo(f"  checked           {r['segments']} segments, {r['records']} records, "
               f"{r['index_files']} index files, {r['replica_blocks']} replica blocks")
    click.echo(f"  read              {r['bytes_read'] / 2**20:.1f} MiB in "
               f"{r['seconds']:.2f} s")
    reopen = r["reopen"]
    if reopen.get("dropped_bytes") or reopen.get("resumed_promotion"):
        click.echo(f"  on open           {reopen}")
    for note in r["notes"]:
        click.echo(f"  note              {note}")
    if r["clean"]:
        click.echo("  result            clean")
        return
    click.echo(f"  result            {len(r['damage'])} damaged range(s)")
    for d in r["damage"]:
        seqs = f" seqs {d['seqs'][0]}..{d['seqs'][1]}" if d["seqs"] else ""
        vol = f" volume {d['volume']}" if d["volume"] is not None else ""
        click.echo(f"  {d['kind']:<8} {Path(d['file']).name}{vol} bytes {d['offset']}"
                   f"+{d['length']}{seqs}: {d['detail']}")
    kinds = {d["kind"] for d in r["damage"]}
    if "replica" in kinds:
        click.echo("  what to do        resynchronise the damaged volumes from the "
                   "protected site (a delta sync)")
    if kinds - {"replica"}:
        click.echo("  what to do        the listed seqs, and checkpoints after them, are "
                   "not exact: fail over to an earlier checkpoint")
