"""`zcore nbd serve`: protected volumes, point-in-time views, scratch overlays and raw
files served over NBD (the server is `zcore.nbd`) until SIGINT or SIGTERM; and
`zcore nbd checkpoints`, the listing of a journal's checkpoints a view or scratch picks from.

The command is staged: check the options (`_check_options`: everything that can be checked
before anything is created), open what is served into a `_Session` (protection through a
VPG, a journal, the exports), serve (`_serve`), then stop the protection with a final
checkpoint and close the session in reverse order.  A start that fails before it listens
closes what it opened and removes the journal and VPG state directories it created.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from zcore.cli.params import (
    check_checkpoint_text,
    checkpoint_line,
    checkpoint_of,
    name_value,
    parse_size,
)

if TYPE_CHECKING:
    from zcore.journal import Journal
    from zcore.nbd import Export, NBDServer, TLSConfig
    from zcore.vpg import VPGSettings


@click.group()
def nbd() -> None:
    """Serve protected volumes and point-in-time images over NBD."""


@dataclass(frozen=True)
class ServeOptions:
    """The options of `zcore nbd serve`, as click parsed them."""

    protect: tuple[str, ...]
    views: tuple[str, ...]
    scratches: tuple[str, ...]
    files: tuple[str, ...]
    files_ro: tuple[str, ...]
    journal: str | None
    vpg_state: str | None
    checkpoint_interval: float
    buffer: str
    bind: str
    port: int
    unix_path: str | None
    no_tcp: bool
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    tls_site: str | None
    scratch_limit: str
    scratch_dir: str | None
    max_connections: int
    stop_wait: float
    verbose: bool


@nbd.command("serve")
@click.option("--protect", "protect", multiple=True, metavar="NAME=IMAGE",
              help="serve raw IMAGE as protected volume NAME: every write is captured into "
                   "--journal (repeatable)")
@click.option("--view", "views", multiple=True, metavar="NAME=VOLUME[@CKPT]",
              help="read-only point-in-time export of VOLUME of --journal at checkpoint "
                   "CKPT (an id as `zcore nbd checkpoints` lists, 'latest' or "
                   "'tag:TEXT'; default latest)")
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
@click.option("--buffer", default="256M", show_default=True,
              help="captured bytes held until the journal has them, beyond which writes "
                   "only mark the dirty bitmap until a bitmap sync catches up")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="TCP address to listen on (loopback unless you mean it)")
@click.option("--port", type=click.IntRange(0, 65535), default=10809, show_default=True,
              help="TCP port (0: any)")
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
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--stop-wait", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="when stopped after a buffer overflow, seconds to let the bitmap sync "
                   "catch up so the final checkpoint holds every write")
@click.option("-v", "--verbose", is_flag=True, help="log connections and refused requests")
def nbd_serve(**options: Any) -> None:
    """Serve exports over NBD until interrupted, printing their nbd:// URIs.

    \b
    Examples:
      zcore nbd serve --journal /srv/j/vm1 --protect disk0=/vm/disk0.img
      zcore nbd serve --journal /srv/j/vm1 --view d0=disk0@tag:before --scratch t=disk0
    """
    import asyncio
    import logging

    from zcore.errors import ZcoreError

    opts = ServeOptions(**options)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # the VPG's events (bitmap mode on an overflow, its sync, checkpoints refused) are
    # what a user of --protect needs to see
    logging.getLogger("zcore.vpg").setLevel(logging.INFO)
    _check_options(opts)
    limit = parse_size(opts.scratch_limit)
    session = _Session(opts)
    failed = True
    try:
        server = session.open(limit)
        asyncio.run(_serve(server, opts, session))
        session.stop_protection()
        failed = False
    except (ZcoreError, OSError) as exc:
        click.echo(f"zcore nbd serve: {exc}", err=True)
        sys.exit(1)
    finally:
        session.close()
        if failed and not session.served:
            session.remove_created()


def _check_options(opts: ServeOptions) -> None:
    """Refuse combinations that cannot work, before anything is opened."""
    if not (opts.protect or opts.views or opts.scratches or opts.files or opts.files_ro):
        raise click.UsageError("nothing to serve: give --protect, --view, --scratch or --file")
    if (opts.protect or opts.views or opts.scratches) and opts.journal is None:
        raise click.UsageError("--protect, --view and --scratch need --journal")
    if opts.tls_site and (opts.tls_cert or opts.tls_key):
        raise click.UsageError("give --tls-site or --tls-cert/--tls-key, not both")
    if not opts.tls_site and (bool(opts.tls_cert) != bool(opts.tls_key)
                              or (opts.tls_ca and not opts.tls_cert)):
        raise click.UsageError("TLS needs --tls-cert and --tls-key, or --tls-site (and "
                               "optionally --tls-ca)")
    if opts.no_tcp and not opts.unix_path:
        raise click.UsageError("--no-tcp needs --unix")
    if opts.unix_path:
        parent = os.path.dirname(os.path.abspath(opts.unix_path))
        if not os.path.isdir(parent):
            raise click.BadParameter(f"{opts.unix_path}: directory {parent} does not exist",
                                     param_hint="--unix")
    if opts.protect:
        _protect_settings(opts)
    for spec in opts.protect:
        _check_image("--protect", name_value("--protect", spec)[1])
    for option, specs in (("--view", opts.views), ("--scratch", opts.scratches)):
        for spec in specs:
            check_checkpoint_text(option, name_value(option, spec)[1].partition("@")[2])
    for option, specs in (("--file", opts.files), ("--file-ro", opts.files_ro)):
        for spec in specs:
            name_value(option, spec)


def _protect_settings(opts: ServeOptions) -> VPGSettings:
    """The settings of the VPG behind --protect, checked: a bad --buffer or
    --checkpoint-interval is a usage error before anything is created."""
    from zcore.errors import ConfigError
    from zcore.vpg import VPGSettings

    try:
        buffer_bytes = parse_size(opts.buffer)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--buffer") from None
    settings = VPGSettings(checkpoint_interval=opts.checkpoint_interval,
                           buffer_bytes=buffer_bytes)
    try:
        settings.check()
    except ConfigError as exc:
        raise click.UsageError(f"{exc} (--buffer {opts.buffer}, --checkpoint-interval "
                               f"{opts.checkpoint_interval:g})") from None
    return settings


def _check_image(option: str, image: str) -> None:
    """A --protect image must be there and a positive multiple of 512 bytes, as --file
    requires: a partial last sector could not be captured."""
    from zcore.nbd import SECTOR

    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise click.BadParameter(f"{image}: {exc.strerror}", param_hint=option) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size <= 0 or size % SECTOR:
        raise click.BadParameter(f"{image}: size {size} is not a positive multiple of "
                                 f"{SECTOR}", param_hint=option)


def _tls_config(opts: ServeOptions) -> TLSConfig | None:
    from zcore.nbd import TLSConfig

    if opts.tls_site:
        return TLSConfig.from_site(opts.tls_site, ca=opts.tls_ca)
    if opts.tls_cert and opts.tls_key:
        return TLSConfig(opts.tls_cert, opts.tls_key, opts.tls_ca)
    return None


class _Session:
    """What one `zcore nbd serve` opened: the VPG and its link behind --protect, the
    journal, and the exports until a server owns them.  `close` undoes it in reverse."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.vpg: Any = None
        self.link: Any = None
        self.journal: Journal | None = None
        self.exports: list[Export] = []  # built and not yet handed to a server
        self._cleanup: list[Callable[[], None]] = []  # closed in reverse order
        self.served = False  # listening began: what was created is kept from then on
        # directories this start creates (--journal, --vpg-state and missing parents):
        # removed again when the start fails before serving, if this start got hold of
        # the journal (its lock: no other process was creating the same one)
        self.created: list[str] = []
        self._journal_ours = False
        if opts.protect:
            assert opts.journal is not None
            for path in (opts.journal, self.vpg_state_dir):
                top = _topmost_missing(path)
                if top is not None and top not in self.created:
                    self.created.append(top)

    @property
    def vpg_state_dir(self) -> str:
        assert self.opts.journal is not None
        return self.opts.vpg_state or f"{self.opts.journal.rstrip(os.sep)}.vpg"

    def remove_created(self) -> None:
        """After a failed start (and `close`): remove the directories this start made."""
        import shutil

        if not self._journal_ours:
            return
        for path in self.created:
            shutil.rmtree(path, ignore_errors=True)

    def open(self, scratch_limit: int) -> NBDServer:
        """Open every export; the server that owns them (not yet listening)."""
        from zcore.journal import Journal
        from zcore.nbd import NBDServer

        opts = self.opts
        if opts.protect:
            self._protect()
        elif opts.views or opts.scratches:
            assert opts.journal is not None
            self.journal = Journal.open(opts.journal)
            self._cleanup.append(self.journal.close)
        self._add_checkpoint_exports(scratch_limit)
        self._add_file_exports()
        server = NBDServer(self.exports, tls=_tls_config(opts),
                           max_connections=opts.max_connections)
        self.exports = []  # the server owns them now
        return server

    def _protect(self) -> None:
        """A VPG of one VM (named after --journal) protecting every --protect image, its
        journal and a local link; started, so writes through the exports are captured."""
        from pathlib import Path

        from zcore.nbd import volume_export
        from zcore.vpg import VPG, LocalLink

        opts = self.opts
        assert opts.journal is not None
        jpath = Path(opts.journal)
        vm = jpath.name
        self.vpg = vpg = VPG(vm, self.vpg_state_dir, _protect_settings(opts))
        vpg.add_vm(vm)
        for spec in opts.protect:
            name, image = name_value("--protect", spec)
            vpg.add_volume(vm, name, image)
        journals = LocalLink.create_journals(vpg, jpath.parent)
        self.journal = journals[vm]
        self._journal_ours = True
        self._cleanup.append(self.journal.close)
        self.link = LocalLink(vpg, journals)
        # a first start copies the images whole; a restart resumes the VPG's state
        vpg.start(initial_sync=True, min_seq=self.journal.last_seq)
        self.link.start()
        for volume in vpg.volumes.values():
            self.exports.append(volume_export(volume))

    def _add_checkpoint_exports(self, scratch_limit: int) -> None:
        from zcore.nbd import scratch_export, view_export

        opts = self.opts
        for kind, specs in (("view", opts.views), ("scratch", opts.scratches)):
            for spec in specs:
                name, target = name_value(f"--{kind}", spec)
                volume, _, ckpt_text = target.partition("@")
                assert self.journal is not None
                ckpt = checkpoint_of(self.journal, ckpt_text)
                vol: int | str = int(volume) if volume.isdigit() else volume
                if kind == "view":
                    self.exports.append(view_export(self.journal, ckpt, vol, name))
                else:
                    self.exports.append(scratch_export(self.journal, ckpt, vol, name,
                                                       limit_bytes=scratch_limit,
                                                       directory=opts.scratch_dir))

    def _add_file_exports(self) -> None:
        from zcore.nbd import file_export

        for specs, readonly in ((self.opts.files, False), (self.opts.files_ro, True)):
            for spec in specs:
                name, image = name_value("--file", spec)
                self.exports.append(file_export(image, name, readonly=readonly))

    def stop_protection(self) -> None:
        """After serving (no write arrives any more): a final checkpoint when the VPG is
        streaming, or once a bitmap sync after an overflow has caught up (at most
        --stop-wait seconds); then the link stopped and drained."""
        import time

        from zcore.vpg import VPGMode

        vpg, link = self.vpg, self.link
        if vpg is None:
            return
        if vpg.mode in (VPGMode.BITMAP, VPGMode.BITMAP_SYNCING) and self.opts.stop_wait:
            click.echo(f"letting the bitmap sync catch up before the final checkpoint "
                       f"({self.opts.stop_wait:g} s at most)", err=True)
            deadline = time.monotonic() + self.opts.stop_wait
            while (vpg.mode in (VPGMode.BITMAP, VPGMode.BITMAP_SYNCING)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        if vpg.mode == VPGMode.STREAMING:
            seq = vpg.checkpoint("zcore nbd serve stopped").seq
            link.stop()
            link.drain()
            click.echo(f"protected volumes stopped at checkpoint {seq}", err=True)
        else:  # a sync was still running: its bitmaps resume next time
            click.echo(f"protected volumes stopped while the VPG was in {vpg.mode} mode: "
                       "no final checkpoint; the next start resumes the sync", err=True)

    def close(self) -> None:
        from zcore.errors import ZcoreError

        for export in self.exports:  # built but never handed to a server
            export.backend.close()
        if self.link is not None:
            try:
                self.link.stop()
            except ZcoreError as exc:
                click.echo(f"zcore nbd serve: {exc}", err=True)
        if self.vpg is not None:
            self.vpg.close()
        for close in reversed(self._cleanup):
            close()


def _topmost_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (None: it exists)."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while True:
        parent = os.path.dirname(path)
        if parent == path or os.path.lexists(parent):
            return path
        path = parent


async def _serve(server: NBDServer, opts: ServeOptions, session: _Session) -> None:
    """Listen, print every export's URIs, serve until SIGINT or SIGTERM, close."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not opts.no_tcp:
            await server.start_tcp(opts.bind, opts.port)
        if opts.unix_path:
            try:
                await server.start_unix(opts.unix_path)
            except OSError as exc:
                raise OSError(exc.errno, f"--unix {opts.unix_path}: {exc.strerror}") from None
        session.served = True
        for export in server.exports():
            for i in range(len(server.addresses)):
                click.echo(f"{server.uri(export.name, i)}\t{export.kind}\t"
                           f"{export.description}")
        click.echo("serving; Ctrl-C or SIGTERM stops", err=True)
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.close()


@nbd.command("checkpoints")
@click.option("--journal", type=click.Path(file_okay=False, exists=True), required=True,
              help="journal directory of one VM")
@click.option("--tag", default=None, help="only checkpoints whose tag contains TEXT")
def nbd_checkpoints(journal: str, tag: str | None) -> None:
    """List the checkpoints a journal holds, oldest first: id, local time, kind, tag.

    An id is the checkpoint's seq in its VPG's stream: the same id names the same
    checkpoint in every journal of the VPG and stays valid until history retention
    promotes it away.  Ids grow with every write, not by one per checkpoint; an orderly
    restart continues where the last run stopped, a crash skips ahead (docs/format.md
    10a.1).  Give one to --view/--scratch as VOLUME@ID.
    """
    from zcore.errors import ZcoreError
    from zcore.journal import Journal

    try:
        with Journal.open(journal) as j:
            held = j.checkpoints(tag=tag)
            volumes = ", ".join(v.name for v in j.volumes.values())
    except (ZcoreError, OSError) as exc:
        click.echo(f"zcore nbd checkpoints: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{'id':>12}  {'time':19}  kind")
    for ckpt in held:
        click.echo(checkpoint_line(ckpt))
    click.echo(f"{len(held)} checkpoint(s); volumes: {volumes}", err=True)
