"""`zcore backup init|run|list|show|restore|serve|files|check|prune|delete`: backups
(zcore.backup, docs/format.md 10d) of a recovery VPG into a repository.

Offline tools today: they work directly on a repository (a directory or a mounted share,
or `s3://bucket/prefix` with the endpoint in $ZCORE_S3_ENDPOINT) and, for `run`, on a VPG
directory (one VM journal per subdirectory, as a recovery site lays them out) or one
journal directory that no process holds.  The repository's
passphrase comes from $ZCORE_BACKUP_PASSPHRASE (or a prompt), or `--keyfile FILE`.

`zcore backup site ...` (zcore.cli.backup_site_cmd) does the same through a running site
service's REST API.

Exit status: 0 done (and `check` found nothing), 1 damage found or refused data, 2 a usage
error (no repository, wrong key, a retention lock, the repository in use)."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from zcore.cli import output as o
from zcore.cli.backup_site_cmd import backup_site
from zcore.cli.params import gfs_options

F = Callable[..., Any]
EXIT_DAMAGE, EXIT_USAGE = 1, 2
PASSPHRASE_ENV = "ZCORE_BACKUP_PASSPHRASE"


def repo_options(fn: F) -> F:
    fn = click.option("--keyfile", type=click.Path(dir_okay=False, path_type=Path),
                      help="key file of the repository (instead of a passphrase)")(fn)
    fn = click.argument("repository")(fn)  # a path, or s3://bucket/prefix
    return fn


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def _secret(keyfile: Path | None, *, confirm: bool = False) -> Any:
    from zcore.backup import Secret
    if keyfile is not None:
        return Secret(keyfile=keyfile)
    phrase = os.environ.get(PASSPHRASE_ENV)
    if phrase is None:
        phrase = click.prompt("repository passphrase", hide_input=True,
                              confirmation_prompt=confirm, err=True)
    return Secret(passphrase=phrase)


def errors(fn: F) -> F:
    """zcore errors as one line on stderr and an exit status (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from zcore.errors import CorruptRecordError, ZcoreError
        try:
            return fn(*args, **kwargs)
        except ZcoreError as exc:
            click.echo(f"zcore backup: {exc}", err=True)
            sys.exit(EXIT_DAMAGE if isinstance(exc, CorruptRecordError) else EXIT_USAGE)
    return wrapper


def _open(repository: str, keyfile: Path | None) -> Any:
    from zcore.backup import Repository
    return Repository.open(repository, _secret(keyfile))


@contextmanager
def _vpg(vpg_dir: Path | None, journal_dir: Path | None, name: str | None) -> Iterator[Any]:
    from zcore.errors import ConfigError
    from zcore.journal import Journal
    from zcore.site.recovery_vpg import RecoveryVPG
    if (vpg_dir is None) == (journal_dir is None):
        raise ConfigError("give exactly one of --vpg-dir and --journal")
    if vpg_dir is not None:
        vpg = RecoveryVPG.open(vpg_dir, name)
    else:
        assert journal_dir is not None
        j = Journal.open(journal_dir)
        vpg = RecoveryVPG(name or journal_dir.name, {journal_dir.name: j}, owns_journals=True)
    try:
        yield vpg
    finally:
        vpg.close()


def _progress(label: str) -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2 or done == total:
            last[0] = now
            click.echo(f"\r{label}: {o.size(done)} / {o.size(total)}", err=True,
                       nl=done == total)
    return show


@click.group()
def backup() -> None:
    """Offsite backups of recovery VPGs: a repository of deduplicated, compressed,
    encrypted checkpoints kept for up to a year."""


backup.add_command(backup_site)


@backup.command()
@repo_options
@click.option("--chunk-size", type=int, default=1 << 20, show_default=True,
              help="bytes per chunk: a power of two from 64 KiB to 16 MiB")
@json_option
@errors
def init(repository: str, keyfile: Path | None, chunk_size: int, as_json: bool) -> None:
    """Create a backup repository at REPOSITORY (a directory, a mounted share, or
    s3://bucket/prefix)."""
    from zcore.backup import Repository
    repo = Repository.init(repository, _secret(keyfile, confirm=True), chunk_size=chunk_size)
    if as_json:
        click.echo(json.dumps({"repo_id": repo.repo_id, "repository": repository}))
    else:
        click.echo(f"repository {repo.repo_id} created at {repository}")


def vpg_source_options(fn: F) -> F:
    """--vpg-dir or --journal (and --vpg): the recovery VPG a command reads."""
    for option in reversed((
            click.option("--vpg-dir", type=click.Path(file_okay=False, path_type=Path),
                         help="a recovery VPG directory (one VM journal per subdirectory)"),
            click.option("--journal", "journal_dir",
                         type=click.Path(file_okay=False, path_type=Path),
                         help="one VM's journal directory"),
            click.option("--vpg", "vpg_name",
                         help="the VPG's name (default: the directory's)"))):
        fn = option(fn)
    return fn


@backup.command()
@repo_options
@vpg_source_options
@click.option("--checkpoint", type=int, help="checkpoint id (default: the newest usable)")
@click.option("--full", is_flag=True, help="read everything (no incremental)")
@click.option("--retain", help="retention lock: keep at least this long (e.g. 30d)")
@json_option
@errors
def run(repository: str, keyfile: Path | None, vpg_dir: Path | None,
        journal_dir: Path | None, vpg_name: str | None, checkpoint: int | None, full: bool,
        retain: str | None, as_json: bool) -> None:
    """Back up a VPG at a checkpoint into REPOSITORY."""
    from zcore.backup import run_backup
    until = time.time() + o.parse_duration(retain) if retain else 0.0
    repo = _open(repository, keyfile)
    with _vpg(vpg_dir, journal_dir, vpg_name) as vpg:
        r = run_backup(repo, vpg, checkpoint, full=full, retain_until=until,
                       progress=_progress("backup"))
    out = {"backup": r.name, "mode": r.mode, "checkpoint": r.checkpoint.id,
           "parent": r.parent, "seconds": round(r.seconds, 3), **asdict(r.stats)}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    o.fields(f"backup {r.name}", [
        ("mode", r.mode), ("checkpoint", r.checkpoint.id), ("parent", r.parent),
        ("read", o.size(r.stats.read_bytes)), ("new chunks", r.stats.new_chunks),
        ("written", o.size(r.stats.new_bytes)), ("zero chunks", r.stats.zero_chunks),
        ("time", o.seconds(r.seconds))])


def _info_doc(b: Any) -> dict[str, Any]:
    return {"backup": b.name, "vpg": b.vpg, "checkpoint": b.checkpoint, "time_ns": b.time_ns,
            "retain_until": b.retain_until, "mode": b.mode, "chunks": b.chunks}


@backup.command("list")
@repo_options
@click.option("--vpg", "vpg_name", help="only this VPG's backups")
@json_option
@errors
def list_(repository: str, keyfile: Path | None, vpg_name: str | None,
          as_json: bool) -> None:
    """List the backups in REPOSITORY, oldest first."""
    repo = _open(repository, keyfile)
    infos = [b for b in repo.backups() if vpg_name is None or b.vpg == vpg_name]
    if as_json:
        click.echo(json.dumps([_info_doc(b) for b in infos], indent=2))
        return
    o.table("backups", ["backup", "vpg", "checkpoint", "checkpoint time", "mode",
                        "locked until"],
            [(b.name, b.vpg, b.checkpoint["id"], o.when_ns(b.checkpoint["time_ns"]), b.mode,
              o.when(b.retain_until) if b.retain_until else None) for b in infos])


@backup.command()
@repo_options
@click.argument("name")
@json_option
@errors
def show(repository: str, keyfile: Path | None, name: str, as_json: bool) -> None:
    """Show one backup: its checkpoint, VMs and volumes."""
    m = _open(repository, keyfile).manifest(name)
    vols = [{"vm": vm["name"], "volume": v["name"], "size": v["size"],
             "chunks": len(v["chunks"]), "zero": sum(1 for c in v["chunks"] if c is None)}
            for vm in m["vms"] for v in vm["volumes"]]
    if as_json:
        click.echo(json.dumps({k: m[k] for k in ("backup", "vpg", "checkpoint", "time_ns",
                                                 "retain_until", "parent", "mode", "stats")}
                              | {"volumes": vols}, indent=2))
        return
    c = m["checkpoint"]
    o.fields(f"backup {name}", [
        ("vpg", m["vpg"]), ("checkpoint", f"{c['id']} ({c['kind']}"
                            + (f", {c['tag']!r})" if c["tag"] else ")")),
        ("checkpoint time", o.when_ns(c["time_ns"])), ("taken", o.when_ns(m["time_ns"])),
        ("mode", m["mode"]), ("parent", m["parent"]),
        ("locked until", o.when(m["retain_until"]) if m["retain_until"] else None)])
    o.table("volumes", ["vm", "volume", "size", "chunks", "zero chunks"],
            [(v["vm"], v["volume"], o.size(v["size"]), v["chunks"], v["zero"]) for v in vols])


@backup.command()
@repo_options
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vm", "vms", multiple=True, help="only this VM (repeatable)")
@json_option
@errors
def restore(repository: str, keyfile: Path | None, name: str, dest: Path,
            vms: tuple[str, ...], as_json: bool) -> None:
    """Restore backup NAME to volume images DEST/<vm>/<volume>.img (verified)."""
    from zcore.backup import restore as do_restore
    paths = do_restore(_open(repository, keyfile), name, dest, vms=vms or None,
                       progress=_progress("restore"))
    if as_json:
        click.echo(json.dumps({"backup": name, "images": [str(p) for p in paths]}))
        return
    for p in paths:
        click.echo(str(p))


@backup.command()
@repo_options
@click.option("--repair", is_flag=True,
              help="heal what the journals still hold, set aside what cannot be healed, "
                   "rebuild the index")
@vpg_source_options
@json_option
@errors
def check(repository: str, keyfile: Path | None, repair: bool, vpg_dir: Path | None,
          journal_dir: Path | None, vpg_name: str | None, as_json: bool) -> None:
    """Decrypt and verify every manifest and every chunk they list; with --repair, heal
    damaged or missing chunks from a recovery VPG's journals (--vpg-dir or --journal)
    where they still hold the bytes, and quarantine the rest."""
    from zcore.backup import check as do_check
    repo = _open(repository, keyfile)
    if repair:
        _repair(repo, vpg_dir, journal_dir, vpg_name, as_json)
        return
    if vpg_dir is not None or journal_dir is not None:
        raise click.UsageError("--vpg-dir and --journal go with --repair")
    r = do_check(repo, progress=_progress("check"))
    if as_json:
        click.echo(json.dumps(asdict(r) | {"ok": r.ok, "affected": r.affected()}, indent=2))
    else:
        click.echo(f"{r.backups} backups, {r.chunks} chunks checked; "
                   f"{len(r.damaged)} damaged, {len(r.missing)} missing, "
                   f"{len(r.bad_manifests)} unreadable manifests, "
                   f"{r.unreferenced} unreferenced chunks"
                   + ("" if r.index_ok else "; the index is stale (rebuilt at the next write)")
                   + ("; a garbage collection is pending" if r.gc_pending else ""))
        for what, found in (("damaged", r.damaged), ("missing", r.missing)):
            for cid, users in sorted(found.items()):
                click.echo(f"  chunk {cid} {what}: affects {', '.join(users)}")
        for n, why in sorted(r.bad_manifests.items()):
            click.echo(f"  manifest {n}: {why}")
    if not r.ok:
        sys.exit(EXIT_DAMAGE)


def _repair(repo: Any, vpg_dir: Path | None, journal_dir: Path | None,
            vpg_name: str | None, as_json: bool) -> None:
    from zcore.backup.repair import repair, report_doc
    if vpg_dir is None and journal_dir is None:
        r = repair(repo, progress=_progress("check"))
    else:
        with _vpg(vpg_dir, journal_dir, vpg_name) as vpg:
            r = repair(repo, vpgs={vpg.name: vpg}, progress=_progress("check"))
    if as_json:
        click.echo(json.dumps(report_doc(r), indent=2))
    else:
        c = r.check
        click.echo(f"{c.backups} backups, {c.chunks} chunks checked; {len(r.healed)} healed, "
                   f"{len(r.quarantined_chunks)} chunks and {len(r.quarantined_manifests)} "
                   f"manifests set aside under quarantine/, {len(r.locked)} locked, "
                   f"{r.leftovers_removed} leftovers removed; the index is rebuilt")
        for cid, source in sorted(r.healed.items()):
            click.echo(f"  chunk {cid} healed from {source}")
        for name, until in sorted(r.locked.items()):
            click.echo(f"  {name} is damaged but locked until {o.when(until)}: left as is")
        for cid, users in sorted(r.unrecoverable.items()):
            click.echo(f"  chunk {cid} is lost: {', '.join(users)} cannot be restored whole "
                       f"until a backup stores those bytes again")
    if not r.ok:
        sys.exit(EXIT_DAMAGE)


@backup.command()
@repo_options
@gfs_options()
@click.option("--vpg", "vpg_name", help="only this VPG's backups")
@click.option("--dry-run", is_flag=True, help="say what would be deleted")
@json_option
@errors
def prune(repository: str, keyfile: Path | None, daily: int, weekly: int, monthly: int,
          yearly: int, last: int, vpg_name: str | None, dry_run: bool,
          as_json: bool) -> None:
    """Delete the backups GFS retention expires (never a locked one), then collect the
    chunks nothing lists any more."""
    from zcore.backup import Retention
    from zcore.backup import prune as do_prune
    r = do_prune(_open(repository, keyfile), Retention(daily, weekly, monthly, yearly, last),
                 vpg=vpg_name, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(asdict(r), indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(r.deleted)} backups, kept {len(r.kept)}"
               + ("" if dry_run else f", {r.chunks_deleted} chunks collected"))
    for n, until in sorted(r.locked.items()):
        click.echo(f"  {n} expired but locked until {o.when(until)}")


@backup.command()
@repo_options
@click.argument("name")
@json_option
@errors
def delete(repository: str, keyfile: Path | None, name: str, as_json: bool) -> None:
    """Delete backup NAME (refused while its retention lock holds) and its unshared
    chunks."""
    from zcore.backup import forget
    n = forget(_open(repository, keyfile), name)
    if as_json:
        click.echo(json.dumps({"deleted": name, "chunks_deleted": n}))
    else:
        click.echo(f"deleted {name}, {n} chunks collected")


@backup.command()
@repo_options
@click.argument("name")
@click.option("--vm", "vms", multiple=True, help="only this VM's volumes (repeatable)")
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=10809, show_default=True, help="TCP port (0: any)")
@json_option
@errors
def serve(repository: str, keyfile: Path | None, name: str, vms: tuple[str, ...],
          bind: str, port: int, as_json: bool) -> None:
    """Instant access: serve backup NAME's volumes over NBD (read-only, read through the
    repository) until Ctrl-C or SIGTERM; prints one nbd:// URI per volume."""
    import asyncio

    from zcore.backup.access import backup_export
    from zcore.nbd import NBDServer

    repo = _open(repository, keyfile)
    m = repo.manifest(name)
    exports = [backup_export(repo, name, vm["name"], v["name"], f"{vm['name']}-{v['name']}")
               for vm in m["vms"] if not vms or vm["name"] in vms for v in vm["volumes"]]
    if not exports:
        click.echo(f"zcore backup: backup {name} has no VM {', '.join(vms)}", err=True)
        sys.exit(EXIT_USAGE)
    asyncio.run(_serve(NBDServer(exports), bind, port, as_json))


async def _serve(server: Any, bind: str, port: int, as_json: bool) -> None:
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start_tcp(bind, port)
        for export in server.exports():
            if as_json:
                click.echo(json.dumps({"uri": server.uri(export.name),
                                       "description": export.description}))
            else:
                click.echo(f"{server.uri(export.name)}\t{export.description}")
        click.echo("serving; Ctrl-C or SIGTERM stops", err=True)
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.close()


@backup.command()
@repo_options
@click.argument("name")
@click.argument("vm")
@click.argument("volume")
@click.argument("path", default="/")
@click.option("--extract", "dest", type=click.Path(file_okay=False, path_type=Path),
              help="copy PATH (a file or a directory) into this directory instead")
@json_option
@errors
def files(repository: str, keyfile: Path | None, name: str, vm: str, volume: str, path: str,
          dest: Path | None, as_json: bool) -> None:
    """File-level restore: list directory PATH of an ext4 VOLUME of VM in backup NAME, or
    --extract it (through debugfs on a temporary image: no mount needed)."""
    from zcore.backup.files import backup_image, extract, list_files
    repo = _open(repository, keyfile)
    with backup_image(repo, name, vm, volume) as image:
        if dest is not None:
            written = extract(image, path, dest)
            click.echo(json.dumps({"extracted": str(written)}) if as_json else str(written))
            return
        entries = list_files(image, path)
    if as_json:
        click.echo(json.dumps([asdict(e) for e in entries], indent=2))
        return
    o.table(f"{path} in {name}", ["name", "type", "mode", "uid", "gid", "size"],
            [(e.name, "dir" if e.is_dir else "file", f"{e.mode & 0o7777:o}", e.uid, e.gid,
              e.size) for e in entries])
