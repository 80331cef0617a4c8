"""The live objects of one running site: the replication listener and its journals, the
protected VPGs and their senders, the NBD server, the recovery-site VPGs over the
replication's own journals, and the metric history.

Sits under the real SiteBackend (zcore.site.live), the scheduler (zcore.site.scheduler)
and the Prometheus collector (zcore.site.prom); above the library (zcore.replication,
zcore.vpg, zcore.nbd, zcore.site.recovery_vpg).  Every method is called on the service's
event loop; blocking work (journal and volume opens, VPG start and stop) goes to worker
threads.

One site plays both roles: its `RecoverySite` (DIR/vpgs) and its `ProtectedSite` share
one identity and one set of pinned peers (DIR/site), so after this site pairs with a peer
either may protect to the other.  Each protected VPG's sender talks to the peer the VPG
names (`PeerSender`), not to whichever peer was pinned first.

Export names on the NBD server: `<vpg>/<vm>/<volume>` for a protected volume (read-write,
captured) and, at the recovery site, `<vpg>/<vm>/<volume>@<checkpoint id>` for a view at a
usable checkpoint, opened when a client asks for it and closed with its last connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zcore.capture import ProtectedVolume
from zcore.errors import (
    ConfigError,
    ProtocolError,
    StateError,
    ZcoreError,
)
from zcore.hypervisor import QemuAddress, QemuDisk, QemuTarget
from zcore.journal import Journal, JournalSettings
from zcore.nbd import Export, NBDServer, view_export, volume_export
from zcore.recovery.choice import CheckpointChoice
from zcore.replication import ProtectedSite, RecoverySite, Replication, VPGReceiver
from zcore.replication.ownership import read_owner
from zcore.security import Peer, trust
from zcore.site.config import SiteDir
from zcore.site.db import VmRecord, VpgRecord
from zcore.site.metrics import MetricHistory
from zcore.site.mirrors import MirrorKeeper
from zcore.site.recovery_vpg import JOURNAL_MARKER, RecoveryVPG
from zcore.vpg import VPG, VPGSettings
from zcore.vpg.state import STATE_NAME

log = logging.getLogger(__name__)

# A view's export name: VPG/VM/VOLUME@CKPT, CKPT a checkpoint id, `latest` or `tag:TEXT`
# (the newest usable checkpoint tagged exactly TEXT), as `zcore nbd serve --view` takes.
VIEW_NAME = re.compile(r"^(?P<vpg>[^/@]+)/(?P<vm>[^/@]+)/(?P<volume>[^/@]+)"
                       r"@(?P<id>[0-9]{1,19}|latest|tag:.{1,256})$", re.DOTALL)
# The service bounds each VPG's capture buffer below the library's 256 MiB default: a site
# holds many VPGs, and a link outage past this many unacknowledged bytes falls back to the
# dirty bitmaps anyway.
SERVICE_BUFFER_BYTES = 64 << 20


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def export_name(vpg: str, vm: str, volume: str) -> str:
    return f"{vpg}/{vm}/{volume}"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def vpg_settings(settings: dict[str, Any]) -> VPGSettings:
    """The library settings of a VPG from the API's settings document."""
    hard = settings.get("journal_hard_limit_bytes")
    warn = settings.get("journal_warn_bytes")
    journal = JournalSettings(history_seconds=float(settings.get("history_seconds", 86_400)),
                              hard_limit_bytes=hard)
    if hard and warn:
        journal.warning_fraction = min(1.0, warn / hard)
    out = VPGSettings(
        checkpoint_interval=float(settings.get("checkpoint_interval_seconds", 5.0)),
        journal=journal,
        compression=bool(settings.get("compression", True)),
        rpo_alert_seconds=float(settings.get("rpo_alert_seconds", 300.0)),
        buffer_bytes=SERVICE_BUFFER_BYTES,
    )
    out.check()
    return out


class PeerSender(ProtectedSite):
    """The protected site as one VPG's sender sees it: the site's identity and throttle,
    with the VPG's own recovery peer (ProtectedSite.recovery_peer is the first pinned)."""

    def __init__(self, base: ProtectedSite, peer_id: str) -> None:  # no super(): shares base
        self.root = base.root
        self.identity = base.identity
        self.peers = base.peers
        self.throttle = base.throttle
        self.replications = base.replications
        self.peer_id = peer_id

    def recovery_peer(self) -> Peer:
        for peer in self.peers.all():
            if peer.site_id == self.peer_id:
                return peer
        raise StateError(f"site {self.peer_id} is not paired with this site")


class LiveRecoverySite(RecoverySite):
    """The recovery site, telling the service when a VPG attaches."""

    on_attach: Callable[[VPGReceiver, Peer], None] | None = None
    # Called with every ATTACH before its journals open; raises ProtocolError to refuse
    # it.  Reverse protection hangs here (zcore.site.reverse_ops: a VPG this site protects
    # becomes a recovery VPG when its recovery site attaches it reversed).
    before_attach: Callable[[Peer, dict[str, Any]], Awaitable[None]] | None = None
    # VPG -> why its ATTACH is refused (a live failover: zcore.site.failover_ops)
    failed_over: dict[str, str]

    async def attach_async(self, peer: Peer, msg: dict[str, Any]) -> VPGReceiver:
        """The journals open in a worker thread (RecoverySite.attach_async); the service
        hears of the VPG here, back on the loop (its hook schedules database work there:
        called from the worker thread it found no running loop and every attach failed).
        A VPG failed over at this site is refused before anything opens."""
        why = getattr(self, "failed_over", {}).get(str(msg.get("vpg")))
        if why is not None:
            raise ProtocolError(why)
        if self.before_attach is not None:
            await self.before_attach(peer, msg)
        receiver = await super().attach_async(peer, msg)
        if self.on_attach is not None:
            self.on_attach(receiver, peer)
        return receiver

    def preload(self) -> list[str]:
        """Open the journals of every VPG already received (blocking: a worker thread),
        so views, checkpoints and retention work before its protected site reattaches.
        VMs are in name order, the order the site service's protected side attaches in."""
        opened = []
        for vpg_dir in sorted(p for p in self.vpgs_dir.iterdir() if p.is_dir()):
            owner = read_owner(vpg_dir)
            vms = sorted(p.name for p in vpg_dir.iterdir() if (p / JOURNAL_MARKER).exists())
            if owner is None or not vms or vpg_dir.name in self.receivers:
                continue
            journals: dict[str, Journal] = {}
            try:
                for vm in vms:
                    journals[vm] = Journal.open(vpg_dir / vm)
            except BaseException:
                for j in journals.values():
                    j.close()
                raise
            self.receivers[vpg_dir.name] = VPGReceiver(vpg_dir.name, owner, vms, journals)
            opened.append(vpg_dir.name)
        return opened

    def forget(self, name: str) -> VPGReceiver | None:
        """Stop holding a VPG (its journals are closed by the caller, in a thread)."""
        return self.receivers.pop(name, None)


class SiteNBDServer(NBDServer):
    """The NBD server of a site: fixed exports plus views opened on demand."""

    def __init__(self, views: Callable[[str], Export | None]) -> None:
        super().__init__()
        self._make_view = views
        self._lazy: set[str] = set()

    def lookup(self, name: str) -> Export | None:
        export = super().lookup(name)
        if export is None and VIEW_NAME.match(name):
            try:
                export = self._make_view(name)
            except ZcoreError as exc:
                log.info("NBD: no view %s: %s", name, exc)
                return None
            if export is not None:
                self.add_export(export)
                self._lazy.add(name)
        return export

    def unregister_connection(self, conn: Any) -> None:
        super().unregister_connection(conn)
        export = getattr(conn, "export", None)
        name = export.name if export is not None else None
        if name in self._lazy and not any(
                c.export == name for c in self.connection_info()):
            self._lazy.discard(name)
            self.remove_export(name)


@dataclass
class ProtectedEntry:
    vpg: VPG
    replication: Replication
    exports: list[str]
    mirrors: MirrorKeeper | None = None  # the mirrors of QEMU-hosted volumes


class SiteRuntime:
    """Everything live at one site (see the module docstring)."""

    def __init__(self, site: SiteDir, name: str) -> None:
        self.site = site
        self.name = name
        self.recovery: LiveRecoverySite | None = None
        self.protected_site: ProtectedSite | None = None
        self.nbd = SiteNBDServer(self._view_export)
        self.metrics: MetricHistory | None = None
        self.protected: dict[str, ProtectedEntry] = {}
        self.recovery_vpgs: dict[str, RecoveryVPG] = {}
        self.attached: Callable[[str, Peer], None] | None = None
        # a protected VPG's recovery site said it failed over there (VPG, FAILED_OVER's
        # message): zcore.site.reverse_ops applies the shutdown policy
        self.on_failed_over: Callable[[str, dict[str, Any]], None] | None = None
        self.replication_address: tuple[str, int] | None = None
        self.nbd_address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- start and stop ------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Load the identity, open the received journals and the metric history; returns
        the recovery VPGs found on disk."""
        self._loop = asyncio.get_running_loop()
        self.recovery = await asyncio.to_thread(LiveRecoverySite, self.site.root, self.name)
        self.recovery.on_attach = self._on_attach
        # failovers a previous process left refuse their ATTACH from the first moment
        # (zcore.site.failover_ops resumes them after the listeners are up)
        failovers = self.site.root / "failover"
        self.recovery.failed_over = {
            p.name: f"VPG {p.name} is failed over at its recovery site"
            for p in (failovers.iterdir() if failovers.is_dir() else ())
            if (p / "failover.json").exists()}
        self.protected_site = await asyncio.to_thread(ProtectedSite, self.site.root, self.name)
        self.site.protected_dir.mkdir(exist_ok=True)
        found = await asyncio.to_thread(self.recovery.preload)
        for name in found:
            self._add_recovery_vpg(self.recovery.receivers[name])
        self.metrics = await asyncio.to_thread(MetricHistory.open, self.site.metrics_file)
        return found

    async def listen(self, host: str, replication_port: int, nbd_port: int) -> None:
        assert self.recovery is not None
        self.replication_address = await self.recovery.start(host, replication_port)
        self.nbd_address = await self.nbd.start_tcp(host, nbd_port)

    async def close(self) -> None:
        """Stop every sender and VPG cleanly, close the journals and the NBD server."""
        for name in list(self.protected):
            try:
                await self.stop_protected(name)
            except ZcoreError as exc:
                log.error("VPG %s did not stop cleanly: %s", name, exc)
        await self.nbd.close()
        for rvpg in self.recovery_vpgs.values():
            rvpg.close()
        self.recovery_vpgs.clear()
        if self.recovery is not None:
            await self.recovery.stop()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)

    # ---- pairing -------------------------------------------------------------------------

    def issue_pairing_token(self, ttl: float) -> str:
        assert self.recovery is not None
        return self.recovery.issue_pairing_token(ttl)

    async def pair(self, address: str, token: str) -> Peer:
        """Pair with the peer whose replication listener is at `address`; both sites pin
        each other, so either can protect to the other afterwards."""
        assert self.protected_site is not None and self.recovery is not None
        host, port = split_address(address)
        peer = await self.protected_site.pair(host, port, token)
        # our own listener must accept the peer too (it protects to us later)
        trust(self.recovery.ssl_context, peer.cert_pem)
        return peer

    def pinned_peers(self) -> list[Peer]:
        assert self.protected_site is not None
        return self.protected_site.peers.all()

    # ---- protected VPGs ------------------------------------------------------------------

    def build_vpg(self, record: VpgRecord, vms: list[VmRecord]) -> VPG:
        """The library VPG of a definition (blocking: opens every backing file).  VMs and
        their volumes in name order: volume ids and the ATTACH order follow from it."""
        vpg = VPG(record.name, self.site.vpg_state_dir(record.name),
                  vpg_settings(record.settings))
        # a restart: a QEMU unreachable now is probed later (its mirror keeper retries)
        restart = (vpg.state_dir / STATE_NAME).exists()
        try:
            for vm in sorted(vms, key=lambda v: v.name):
                if not vm.volumes:
                    raise ConfigError(f"VM {vm.name!r} has no volume to protect")
                vpg.add_vm(vm.name)
                for vol in sorted(vm.volumes, key=lambda v: v.name):
                    if not vol.path:
                        raise ConfigError(f"volume {vm.name}/{vol.name} has no backing path")
                    qemu = QemuAddress.parse(vol.path)
                    try:
                        if qemu is not None:  # a running QEMU's disk, protected in place
                            disk = QemuDisk(qemu.qmp, qemu.node, QemuAddress.prefix_for(
                                record.name, vm.name, vol.name), nbd_socket=qemu.nbd,
                                size=vol.size if restart else None)
                            vpg.add_volume(vm.name, vol.name, None, vol.size, source=disk)
                            continue
                        vpg.add_volume(vm.name, vol.name, vol.path, vol.size)
                    except OSError as exc:
                        raise ConfigError(f"volume {vm.name}/{vol.name}: cannot open "
                                          f"{vol.path}: {exc.strerror or exc}") from None
        except BaseException:
            vpg.close()
            raise
        return vpg

    async def start_protected(self, record: VpgRecord, vms: list[VmRecord],
                              address: str, paused: bool = False,
                              delta_sync: bool = False) -> VPG:
        """Start (or resume after a restart) a protected VPG and its sender, and export
        its volumes.  A first start runs the initial sync (a delta sync against the
        replicas the recovery site already holds, with `delta_sync`: reverse protection);
        a restart resumes from the VPG's state (bitmaps after a clean stop, a full resend
        after a crash)."""
        assert self.protected_site is not None
        if record.name in self.protected:
            raise StateError(f"VPG {record.name!r} is already running")
        if record.peer is None:
            raise ConfigError(f"VPG {record.name!r} names no recovery site")
        host, port = split_address(address)
        vpg = await asyncio.to_thread(self.build_vpg, record, vms)
        first = not (self.site.vpg_state_dir(record.name) / STATE_NAME).exists()
        mirrors = MirrorKeeper(vpg, self._mirror_target)
        # a sync reads QEMU's disks only once their mirrors forward every later write
        # (MirrorKeeper.start_all releases it): what the guest writes to a block after
        # its read would be lost otherwise
        hold = bool(mirrors.disks)
        try:
            if delta_sync:
                await asyncio.to_thread(vpg.start, delta_sync=True, hold_sync=hold)
            else:
                await asyncio.to_thread(vpg.start, initial_sync=True, hold_sync=hold)
        except BaseException:
            await asyncio.to_thread(vpg.close)
            raise
        rep = Replication(PeerSender(self.protected_site, record.peer), vpg, host, port)
        if self.on_failed_over is not None:
            hook = self.on_failed_over
            rep.on_failed_over = lambda msg: hook(record.name, msg)
        if paused:
            rep.pause()
        entry = self.protected[record.name] = ProtectedEntry(vpg, rep, [])
        if mirrors.disks:
            # the capture exports first, then QEMU's mirrors into them, then the sync
            # and the sender
            self.allow_writes(record.name)
            try:
                await asyncio.to_thread(mirrors.start_all, resync=not first)
            except BaseException:
                self.protected.pop(record.name, None)
                for export in entry.exports:
                    if self.nbd.lookup(export) is not None:
                        self.nbd.remove_export(export)
                await asyncio.to_thread(vpg.close)
                raise
            entry.mirrors = mirrors
            mirrors.start()
        rep.start()
        self.allow_writes(record.name)
        return entry.vpg

    def _mirror_target(self, volume: ProtectedVolume) -> QemuTarget:
        """Where a QEMU-hosted volume's mirror writes: its export on this site's NBD
        server (on loopback when the server listens on every address)."""
        if self.nbd_address is None:
            raise StateError("the site's NBD server is not listening: no mirror target")
        host, port = self.nbd_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        vpg = next(e.vpg.name for e in self.protected.values()
                   if volume in e.vpg.volumes.values())
        return QemuTarget(host, port, export_name(vpg, volume.vm, volume.name))

    def allow_writes(self, name: str) -> None:
        """Export a running protected VPG's volumes (read-write, captured)."""
        entry = self.entry(name)
        for volume in entry.vpg.volumes.values():
            export = export_name(entry.vpg.name, volume.vm, volume.name)
            if self.nbd.lookup(export) is None:
                self.nbd.add_export(volume_export(volume, export))
            if export not in entry.exports:
                entry.exports.append(export)

    async def refuse_writes(self, name: str, timeout: float = 10.0, *,
                            pause: bool = True) -> None:
        """Drop a protected VPG's exports and wait until their connections have ended
        (no write of theirs is in flight any more: a planned move's checkpoint comes
        after every write).  QEMU-hosted disks do not write through the exports: their
        VMs are paused first (HypervisorError when one cannot be; nothing changed then),
        unless `pause` is False."""
        entry = self.entry(name)
        if entry.mirrors is not None and pause:
            await asyncio.to_thread(entry.mirrors.pause_guests)
        for export in entry.exports:
            if self.nbd.lookup(export) is not None:
                self.nbd.remove_export(export)
        names = set(entry.exports)
        entry.exports.clear()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.export in names for c in self.nbd.connection_info()):
            if asyncio.get_running_loop().time() > deadline:
                raise StateError(f"VPG {name}: NBD clients of its volumes did not "
                                 f"disconnect in {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop_protected(self, name: str, *, forget: bool = False) -> None:
        """Stop a protected VPG cleanly: exports dropped, sender stopped, bitmaps saved;
        with `forget` (it is deleted), QEMU-hosted volumes keep no zcore bitmap."""
        entry = self.protected.pop(name, None)
        if entry is None:
            return
        for export in entry.exports:
            if self.nbd.lookup(export) is not None:
                self.nbd.remove_export(export)
        if entry.mirrors is not None:
            await entry.mirrors.stop(forget=forget)
        await entry.replication.stop()
        await asyncio.to_thread(entry.vpg.close)

    def entry(self, name: str) -> ProtectedEntry:
        entry = self.protected.get(name)
        if entry is None:
            raise StateError(f"VPG {name!r} is not running at this site")
        return entry

    # ---- recovery VPGs -------------------------------------------------------------------

    def _add_recovery_vpg(self, receiver: VPGReceiver) -> RecoveryVPG:
        rvpg = self.recovery_vpgs.get(receiver.name)
        if rvpg is None:
            rvpg = RecoveryVPG(receiver.name, receiver.journals,
                               received_bytes=lambda: receiver.stats.bytes,
                               refresh_interval=1.0)
            self.recovery_vpgs[receiver.name] = rvpg
        return rvpg

    def reload_recovery_vpg(self, name: str) -> None:
        """Forget a recovery VPG's checkpoint catalogue and build it again from its
        journals (after a committed failover dropped their history)."""
        old = self.recovery_vpgs.pop(name, None)
        if old is not None:
            old.close()
        receiver = self.receiver(name)
        if receiver is not None:
            self._add_recovery_vpg(receiver)

    def _on_attach(self, receiver: VPGReceiver, peer: Peer) -> None:
        """Called when an attach has opened its journals (LiveRecoverySite.attach_async,
        on the loop); from any other thread it hops to the loop first."""
        loop = self._loop
        if loop is not None and not _on_loop(loop):
            loop.call_soon_threadsafe(self._on_attach, receiver, peer)
            return
        self._add_recovery_vpg(receiver)
        if self.attached is not None:
            self.attached(receiver.name, peer)

    def recovery_vpg(self, name: str) -> RecoveryVPG:
        rvpg = self.recovery_vpgs.get(name)
        if rvpg is None:
            raise StateError(f"VPG {name!r} has no journals at this site (checkpoints are "
                             f"listed at its recovery site)")
        return rvpg

    def receiver(self, name: str) -> VPGReceiver | None:
        return self.recovery.receivers.get(name) if self.recovery is not None else None

    async def drop_recovery(self, name: str) -> Path:
        """Close a recovery VPG's journals; returns its directory (the caller removes it)."""
        assert self.recovery is not None
        receiver = self.recovery.receivers.get(name)
        if receiver is not None and receiver.conn is not None and not receiver.conn.closed:
            raise StateError(f"VPG {name!r} is still replicating into this site: delete it "
                             f"at its protected site first")
        rvpg = self.recovery_vpgs.pop(name, None)
        if rvpg is not None:
            rvpg.close()
        receiver = self.recovery.forget(name)
        if receiver is not None:
            await asyncio.to_thread(receiver.close)
        return self.recovery.vpgs_dir / name

    def _view_export(self, name: str) -> Export | None:
        m = VIEW_NAME.match(name)
        if m is None:
            return None
        rvpg = self.recovery_vpgs.get(m["vpg"])
        if rvpg is None:
            return None
        journal = rvpg.journals.get(m["vm"])
        if journal is None:
            return None
        # usable in every journal of the VPG; CKPT is an id, latest or tag:TEXT (VIEW_NAME)
        ckpt = CheckpointChoice.parse(m["id"]).resolve(rvpg)
        return view_export(journal, ckpt.id, m["volume"], name)
