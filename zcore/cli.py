"""The `zcore` command line: the demo, and the tools that sit on top of the library."""

from __future__ import annotations

import os
import sys
import tempfile

import click

from zcore.journal import Journal


@click.group()
@click.version_option(package_name="zcore")
def main() -> None:
    """zcore: continuous data protection for virtual disks."""


@main.command()
@click.option("--volume-mib", default=64, show_default=True, help="size of each VM's disk")
@click.option("--seconds", default=4.0, show_default=True, help="length of the workload")
@click.option("--rate-mb", default=40.0, show_default=True, help="workload write rate, MB/s")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="keep the demo's files in this directory instead of a temporary one")
def demo(volume_mib: int, seconds: float, rate_mb: float, keep: str | None) -> None:
    """Replicate two VMs over TLS on loopback, tag a checkpoint, let ransomware overwrite
    the disks, recover the VPG at the tagged checkpoint and verify it byte for byte."""
    from zcore.demo import run_demo

    if volume_mib < 1 or seconds <= 0 or rate_mb <= 0:
        raise click.BadParameter("volume size, duration and rate must be positive")
    with tempfile.TemporaryDirectory(prefix="zcore-demo-") as tmp:
        base = keep or os.path.join(tmp, "demo")
        report = run_demo(base, volume_bytes=volume_mib << 20, seconds=seconds,
                          rate_bytes=rate_mb * 1e6, say=click.echo)
    click.echo("")
    click.echo("report")
    click.echo(f"  workload          {report.written_bytes / 2**20:8.1f} MiB in "
               f"{report.workload_seconds:.1f} s, steady replication "
               f"{report.throughput_bytes / 1e6:.1f} MB/s")
    click.echo(f"  RPO               worst {report.rpo_max_seconds * 1000:.0f} ms")
    click.echo(f"  journals          {report.journal_bytes / 2**20:8.1f} MiB on disk")
    click.echo(f"  recovered         {report.recovered_bytes / 2**20:8.1f} MiB at checkpoint "
               f"{report.checkpoint_seq} ({report.checkpoint_tag!r})")
    if not report.ok:
        click.echo(f"FAILED: {report.mismatched_chunks} MiB differ from the disks at the "
                   "tagged checkpoint", err=True)
        sys.exit(1)
    click.echo("  verification      byte-for-byte identical to the disks at the checkpoint")


# ---- zcore nbd ---------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_size(text: str) -> int:
    """"4G", "512M", "1048576" -> bytes (binary units)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (like 4G, 512M or 1048576)") from None
    return int(value * _SIZE_UNITS[unit])


def _name_value(option: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise click.BadParameter(f"{option} takes NAME=VALUE, not {text!r}")
    return name, value


def _checkpoint_of(journal, text: str):
    """A checkpoint from "latest", "tag:TEXT" (newest whose tag contains TEXT) or an id."""
    from zcore.errors import CheckpointNotFoundError

    if text in ("", "latest"):
        return journal.latest_checkpoint()
    if text.startswith("tag:"):
        found = journal.checkpoints(tag=text[4:])
        if not found:
            raise CheckpointNotFoundError(f"no checkpoint tagged like {text[4:]!r}")
        return found[-1]
    try:
        return journal.checkpoint_by_id(int(text))
    except ValueError:
        raise click.BadParameter(f"checkpoint {text!r}: give an id, 'latest' or "
                                 "'tag:TEXT'") from None


@main.group()
def nbd() -> None:
    """Serve protected volumes and point-in-time images over NBD."""


@nbd.command("serve")
@click.option("--protect", "protect", multiple=True, metavar="NAME=IMAGE",
              help="serve raw IMAGE as protected volume NAME: every write is captured into "
                   "--journal (repeatable)")
@click.option("--view", "views", multiple=True, metavar="NAME=VOLUME[@CKPT]",
              help="read-only point-in-time export of VOLUME of --journal at checkpoint "
                   "CKPT (an id, 'latest' or 'tag:TEXT'; default latest)")
@click.option("--scratch", "scratches", multiple=True, metavar="NAME=VOLUME[@CKPT]",
              help="like --view, writable through a scratch overlay whose writes are "
                   "discarded when the server stops (failover test)")
@click.option("--file", "files", multiple=True, metavar="NAME=IMAGE",
              help="serve a raw image as is, read-write and not captured")
@click.option("--file-ro", "files_ro", multiple=True, metavar="NAME=IMAGE",
              help="serve a raw image read-only")
@click.option("--journal", type=click.Path(file_okay=False), default=None,
              help="journal directory of one VM: source of --view/--scratch, destination "
                   "of --protect (created on first use; the VM is named after it)")
@click.option("--vpg-state", type=click.Path(file_okay=False), default=None,
              help="state directory of the VPG behind --protect [JOURNAL.vpg]")
@click.option("--checkpoint-interval", type=float, default=5.0, show_default=True,
              help="seconds between automatic checkpoints of protected volumes")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="TCP address to listen on (loopback unless you mean it)")
@click.option("--port", type=int, default=10809, show_default=True, help="TCP port (0: any)")
@click.option("--unix", "unix_path", type=click.Path(dir_okay=False), default=None,
              help="also listen on this Unix socket")
@click.option("--no-tcp", is_flag=True, help="listen on the Unix socket only")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="server certificate chain (PEM): TLS becomes mandatory")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="server private key (PEM)")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA (PEM) that must have signed client certificates")
@click.option("--tls-site", type=click.Path(exists=True, file_okay=False), default=None,
              help="use this site identity directory (as for replication) for the server "
                   "certificate instead of --tls-cert/--tls-key")
@click.option("--scratch-limit", default="16G", show_default=True,
              help="scratch space each --scratch export may use (e.g. 4G)")
@click.option("--scratch-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="where scratch overlays keep their (unlinked) files [system temp]")
@click.option("--max-connections", type=int, default=64, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="log connections and refused requests")
def nbd_serve(protect, views, scratches, files, files_ro, journal, vpg_state,
              checkpoint_interval, bind, port, unix_path, no_tcp, tls_cert, tls_key, tls_ca,
              tls_site, scratch_limit, scratch_dir, max_connections, verbose) -> None:
    """Serve exports over NBD until interrupted, printing their nbd:// URIs.

    \b
    Examples:
      zcore nbd serve --journal /srv/j/vm1 --protect disk0=/vm/disk0.img
      zcore nbd serve --journal /srv/j/vm1 --view d0=disk0@tag:before --scratch t=disk0
    """
    import asyncio
    import logging
    import signal
    from pathlib import Path

    from zcore import nbd as nbdmod
    from zcore.errors import ZcoreError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not (protect or views or scratches or files or files_ro):
        raise click.UsageError("nothing to serve: give --protect, --view, --scratch or --file")
    if (protect or views or scratches) and journal is None:
        raise click.UsageError("--protect, --view and --scratch need --journal")
    if tls_site and (tls_cert or tls_key):
        raise click.UsageError("give --tls-site or --tls-cert/--tls-key, not both")
    if not tls_site and (bool(tls_cert) != bool(tls_key) or (tls_ca and not tls_cert)):
        raise click.UsageError("TLS needs --tls-cert and --tls-key, or --tls-site (and "
                               "optionally --tls-ca)")
    if no_tcp and not unix_path:
        raise click.UsageError("--no-tcp needs --unix")
    limit = _parse_size(scratch_limit)
    cleanup = []  # closed in reverse order at exit
    exports = []
    vpg = link = None
    try:
        jrnl = None
        if protect:
            from zcore.vpg import VPG, LocalLink, VPGSettings

            jpath = Path(journal)
            vm = jpath.name
            vpg = VPG(vm, vpg_state or f"{jpath}.vpg",
                      VPGSettings(checkpoint_interval=checkpoint_interval))
            vpg.add_vm(vm)
            for spec in protect:
                name, image = _name_value("--protect", spec)
                vpg.add_volume(vm, name, image)
            journals = LocalLink.create_journals(vpg, jpath.parent)
            jrnl = journals[vm]
            cleanup.append(jrnl.close)
            link = LocalLink(vpg, journals)
            # a first start copies the images whole; a restart resumes the VPG's state
            vpg.start(initial_sync=True, min_seq=jrnl.last_seq)
            link.start()
            for volume in vpg.volumes.values():
                exports.append(nbdmod.volume_export(volume))
        elif views or scratches:
            jrnl = Journal.open(journal)
            cleanup.append(jrnl.close)
        for kind, specs in (("view", views), ("scratch", scratches)):
            for spec in specs:
                name, target = _name_value(f"--{kind}", spec)
                volume, _, ckpt_text = target.partition("@")
                ckpt = _checkpoint_of(jrnl, ckpt_text)
                vol = int(volume) if volume.isdigit() else volume
                if kind == "view":
                    exports.append(nbdmod.view_export(jrnl, ckpt, vol, name))
                else:
                    exports.append(nbdmod.scratch_export(jrnl, ckpt, vol, name,
                                                         limit_bytes=limit,
                                                         directory=scratch_dir))
        for specs, ro in ((files, False), (files_ro, True)):
            for spec in specs:
                name, image = _name_value("--file", spec)
                exports.append(nbdmod.file_export(image, name, readonly=ro))
        tls = (nbdmod.TLSConfig.from_site(tls_site, ca=tls_ca) if tls_site
               else nbdmod.TLSConfig(tls_cert, tls_key, tls_ca) if tls_cert else None)
        server = nbdmod.NBDServer(exports, tls=tls, max_connections=max_connections)
        exports = []  # the server owns them now

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if not no_tcp:
                await server.start_tcp(bind, port)
            if unix_path:
                await server.start_unix(unix_path)
            for export in server.exports():
                for i in range(len(server._addresses)):
                    click.echo(f"{server.uri(export.name, i)}\t{export.kind}\t"
                               f"{export.description}")
            click.echo("serving; Ctrl-C or SIGTERM stops", err=True)
            sys.stdout.flush()
            try:
                await stop.wait()
            finally:
                await server.close()

        asyncio.run(serve())
        if vpg is not None and vpg.mode == "streaming":
            seq = vpg.checkpoint("zcore nbd serve stopped").seq
            link.stop()
            link.drain()
            click.echo(f"protected volumes stopped at checkpoint {seq}", err=True)
        elif vpg is not None:  # a sync was still running: its bitmaps resume next time
            click.echo(f"protected volumes stopped while the VPG was in {vpg.mode} mode: "
                       "no final checkpoint; the next start resumes the sync", err=True)
    except (ZcoreError, OSError) as exc:
        click.echo(f"zcore nbd serve: {exc}", err=True)
        sys.exit(1)
    finally:
        for export in exports:  # built but never handed to a server
            export.backend.close()
        if link is not None:
            try:
                link.stop()
            except ZcoreError as exc:
                click.echo(f"zcore nbd serve: {exc}", err=True)
        if vpg is not None:
            vpg.close()
        for close in reversed(cleanup):
            close()


if __name__ == "__main__":
    main()
