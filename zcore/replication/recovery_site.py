"""The recovery-site server: `RecoverySite` listens for protected sites over TLS, holds
the site's identity, pinned peers and pairing tokens (zcore.security), checks VPG
ownership (zcore.replication.ownership) and opens each attaching VPG's journals, whose
worker (zcore.replication.journals) appends what the connections
(zcore.replication.receiver) receive.  A timer runs the history retention of every
attached VPG (zcore.journal.history) in a worker thread and keeps its events."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from zcore import wire
from zcore.errors import ConfigError, ProtocolError, StateError
from zcore.fsutil import fsync_dir
from zcore.journal import Journal, JournalSettings, VolumeSpec, history
from zcore.journal.adopt import plan as adopt_plan
from zcore.journal.settings import check_volumes
from zcore.replication import timing
from zcore.replication.journals import JournalWorkers, VPGReceiver
from zcore.replication.ownership import read_owner, write_owner
from zcore.replication.receiver import RecoveryConnection
from zcore.replication.scrubbing import ScrubTimer
from zcore.security import PairingTokens, Peer, PeerStore, SiteIdentity, server_context

log = logging.getLogger(__name__)


# A planned move's request (VPG, peer, checkpoint id, reverse): checks it, raising a
# ZcoreError to refuse it with its message, and starts the failover (the site service's).
MoveHook = Callable[[str, Peer, int, bool], Awaitable[None]]


class RecoverySite:
    """The recovery-site server: receives many VPGs into their journals."""

    on_move: MoveHook | None = None

    def __init__(self, root: str | os.PathLike[str], name: str = "recovery",
                 journal_workers: int | None = None, *,
                 retention_interval: float = history.DEFAULT_INTERVAL,
                 on_event: Callable[[history.RetentionEvent], None] | None = None) -> None:
        self.root = Path(root)
        self.retention_interval = retention_interval
        self.on_event = on_event
        # the retention rounds' events (history state, journal full), newest last
        self.events: deque[history.RetentionEvent] = deque(maxlen=1000)
        self._retention: asyncio.Task[None] | None = None
        self._retention_stop = asyncio.Event()
        self.identity = SiteIdentity.load_or_create(self.root / "site", name)
        self.peers = PeerStore(self.root / "site")
        self.tokens = PairingTokens(self.root / "site")
        self.vpgs_dir = self.root / "vpgs"
        self.vpgs_dir.mkdir(parents=True, exist_ok=True)
        self.receivers: dict[str, VPGReceiver] = {}
        self.connections: set[RecoveryConnection] = set()
        self.refused: deque[str] = deque(maxlen=200)  # reasons of refused connections
        self._server: asyncio.AbstractServer | None = None
        self._ssl: ssl.SSLContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._attach_locks: dict[str, asyncio.Lock] = {}  # by VPG name
        self._attaches: set[asyncio.Future[VPGReceiver]] = set()  # running in threads
        self._journal_workers = journal_workers
        self.workers: JournalWorkers | None = None  # every VPG's journal work, bounded
        # every held journal scrubbed in the background (set interval/rate before start)
        self.scrubber = ScrubTimer(self._held_journals)

    def issue_pairing_token(self, ttl: float = 3600.0) -> str:
        return self.tokens.issue(ttl)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0: any free port); returns the address listened on."""
        self.loop = asyncio.get_running_loop()
        raise_nofile_limit()
        if self.workers is None:
            self.workers = JournalWorkers(self._journal_workers)
        self._ssl = ctx = server_context(self.identity, self.peers)
        self._server = await self.loop.create_server(
            lambda: RecoveryConnection(self), host, port, ssl=ctx,
            ssl_handshake_timeout=timing.HANDSHAKE_TIMEOUT)
        sock = self._server.sockets[0].getsockname()
        self._retention_stop = asyncio.Event()
        self._retention = asyncio.create_task(self._run_retention(),
                                              name="recovery-site-retention")
        self.scrubber.start()
        return sock[0], sock[1]

    async def _run_retention(self) -> None:
        """Every `retention_interval` seconds, one retention round per attached VPG, each
        in a worker thread (promotion reads, writes and fsyncs: never on the loop)."""
        stop = self._retention_stop
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.retention_interval)
                return
            except TimeoutError:
                pass
            for receiver in list(self.receivers.values()):
                if stop.is_set():
                    return
                try:
                    await asyncio.to_thread(receiver.retention.run_round)
                except Exception:  # one VPG's failure must not end retention for all
                    log.exception("retention of VPG %s failed", receiver.name)

    def _retention_event(self, event: history.RetentionEvent) -> None:
        """Keep an event of a retention round (called in the round's worker thread)."""
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def stop(self) -> None:
        """Close every connection, stop listening, close every journal."""
        if self._retention is not None:  # a round in progress finishes first
            self._retention_stop.set()
            await self._retention
            self._retention = None
        await self.scrubber.stop()
        if self._server is not None:
            self._server.close()
            conns = list(self.connections)
            for conn in conns:
                conn.close("recovery site stopping")
            # a delta sync's worker step finishes before the journals close under it
            await asyncio.gather(*(c.delta_finished() for c in conns))
            await self._server.wait_closed()
            self._server = None
        if self._attaches:
            await asyncio.gather(*self._attaches, return_exceptions=True)
        for r in self.receivers.values():
            await asyncio.to_thread(r.close)
        self.receivers.clear()
        if self.workers is not None:
            await asyncio.to_thread(self.workers.close)
            self.workers = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The listening TLS context (newly paired peers are trusted in it)."""
        if self._ssl is None:
            raise StateError("the recovery site is not started")
        return self._ssl

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` on the site's event loop (from any thread)."""
        if self.loop is None:
            raise StateError("the recovery site is not started")
        self.loop.call_soon_threadsafe(callback, *args)

    def _held_journals(self) -> list[tuple[str, str, Journal]]:
        return [(vpg, vm, j) for vpg, r in list(self.receivers.items())
                for vm, j in list(r.journals.items())]

    def journals(self, vpg: str) -> dict[str, Journal]:
        """The journals of an attached VPG, by VM name."""
        return self.receivers[vpg].journals

    def refuse(self, reason: str) -> None:
        """Log and keep the reason a connection was refused or closed in error."""
        log.warning("recovery site: %s", reason)
        self.refused.append(reason)

    async def attach_async(self, peer: Peer, msg: dict[str, Any]) -> VPGReceiver:
        """`attach` in a worker thread (journal opens and creates fsync), one at a time
        per VPG, so two connections never open one VPG's journals together (different
        VPGs attach in parallel: 300 VPGs attaching one by one took half a minute)."""
        name = str(msg.get("vpg"))
        lock = self._attach_locks.setdefault(name, asyncio.Lock())
        async with lock:
            # stop() waits for it: an attach that finished after the journals were closed
            # would leave its journals open (and locked) in a stopped site
            fut = asyncio.ensure_future(asyncio.to_thread(self.attach, peer, msg))
            self._attaches.add(fut)
            fut.add_done_callback(self._attaches.discard)
            return await fut

    def attach(self, peer: Peer, msg: dict[str, Any]) -> VPGReceiver:
        """Open (or create) the journals of an attaching VPG; checks ownership."""
        name = msg["vpg"]
        if not wire.safe_name(name):
            raise ProtocolError(f"VPG name {name!r} is not allowed")
        vms = wire.parse_attach_vms(msg)
        try:
            settings = JournalSettings(**msg["journal"])
            settings.check()
        except (TypeError, ConfigError) as exc:
            raise ProtocolError(f"ATTACH journal settings refused: {exc}") from None
        receiver = self.receivers.get(name)
        if receiver is not None:
            if receiver.owner != peer.site_id:
                raise ProtocolError(f"VPG {name} belongs to another site")
            if receiver.vms != [vm for vm, _ in vms]:
                raise ProtocolError(f"VPG {name} was attached with other VMs")
            return receiver
        vpg_dir = self.vpgs_dir / name
        self._claim(vpg_dir, name, peer)
        journals = self._open_journals(vpg_dir, name, vms, settings)
        receiver = VPGReceiver(name, peer.site_id, [vm for vm, _ in vms], journals,
                               self.workers, on_event=self._retention_event)
        self.receivers[name] = receiver
        return receiver

    def _claim(self, vpg_dir: Path, name: str, peer: Peer) -> None:
        """Check that `peer` owns the VPG, or make it the owner of a new one.  A damaged
        owner.json raises CorruptRecordError: the connection is refused with its name."""
        owner = read_owner(vpg_dir)
        if owner is None:
            vpg_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.vpgs_dir)
            write_owner(vpg_dir, peer.site_id, peer.name)
        elif owner != peer.site_id:
            raise ProtocolError(f"VPG {name} belongs to another site")

    def adopt(self, name: str, owner_site_id: str, vms: list[tuple[str, list[VolumeSpec]]],
              settings: JournalSettings,
              replica_files: Mapping[tuple[str, str], str | os.PathLike[str]], *,
              owner_name: str | None = None) -> None:
        """Prepare VPG `name` for reverse protection (blocking: call it in a thread):
        `vpgs/<name>/`, its owner file for `owner_site_id`, and one journal per VM whose
        replicas are the given files ((vm, volume name) -> file, moved in; a volume
        without one gets an empty sparse replica).  A later ATTACH of that owner with the
        same VMs and volumes opens these journals (and a restarted site preloads them);
        its delta sync then sends only what differs.  Every file is checked first
        (ConfigError, nothing moved).  Refused while the VPG is attached or when its
        directory already holds its journals; after a crash midway the same call resumes
        (the VMs whose journals are complete, their files gone, are kept)."""
        if not wire.safe_name(name) or not all(wire.safe_name(vm) for vm, _ in vms):
            raise ConfigError(f"VPG {name!r} or one of its VM names is not allowed")
        if name in self.receivers:
            raise StateError(f"VPG {name} is attached: it cannot adopt replicas now")
        settings.check()
        specs = {vm: check_volumes(vols) for vm, vols in vms}
        ids = [v.id for vols in specs.values() for v in vols]
        if not specs or len(specs) != len(vms) or len(set(ids)) != len(ids):
            raise ConfigError(f"VPG {name}: VM names and volume ids must be distinct")
        names = {(vm, v.name): v.id for vm, vols in specs.items() for v in vols}
        unknown = set(replica_files) - set(names)
        if unknown:
            raise ConfigError(f"VPG {name} has no volume {sorted(unknown)[0]}")
        vpg_dir = self.vpgs_dir / name
        files = {vm: {names[(vm, v.name)]: Path(replica_files[(vm, v.name)])
                      for v in vols if (vm, v.name) in replica_files}
                 for vm, vols in specs.items()}
        todo = [vm for vm in specs if not self._adopted(vpg_dir, vm, specs[vm], files[vm])]
        if not todo:
            raise StateError(f"VPG {name} already holds its journals in {vpg_dir}")
        for vm in todo:  # every file checked before the first one moves
            adopt_plan(vpg_dir / vm, specs[vm], files[vm])
        owner = read_owner(vpg_dir)
        if owner is not None and owner != owner_site_id:
            raise StateError(f"VPG {name} at this site belongs to site {owner}")
        if owner is None:
            vpg_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.vpgs_dir)
            peer = next((p for p in self.peers.all() if p.site_id == owner_site_id), None)
            write_owner(vpg_dir, owner_site_id,
                        owner_name or (peer.name if peer else owner_site_id))
        for vm in todo:
            Journal.create(vpg_dir / vm, specs[vm], vm=vm, settings=settings,
                           replica_files=files[vm]).close()

    @staticmethod
    def _adopted(vpg_dir: Path, vm: str, specs: list[VolumeSpec],
                 files: dict[int, Path]) -> bool:
        """True when `vm`'s journal was created by an adoption of these files that
        completed (its volumes are `specs`, the files are gone); a journal that holds
        anything else is refused (StateError)."""
        path = vpg_dir / vm
        if not (path / "journal.meta").exists():
            return False
        j = Journal.open(path)
        try:
            same = sorted(j.volumes.values(), key=lambda v: v.id) == sorted(
                specs, key=lambda v: v.id)
            ok = same and j.last_seq == 0 and not any(f.exists() for f in files.values())
        finally:
            j.close()
        if not ok:
            raise StateError(f"VPG {vpg_dir.name} already holds a journal of VM {vm}")
        return True

    @staticmethod
    def _open_journals(vpg_dir: Path, name: str,
                       vms: list[tuple[str, list[tuple[int, str, int]]]],
                       settings: JournalSettings) -> dict[str, Journal]:
        journals: dict[str, Journal] = {}
        try:
            for vm, vols in vms:
                specs = [VolumeSpec(*v) for v in vols]
                path = vpg_dir / vm
                if (path / "journal.meta").exists():
                    j = Journal.open(path)
                    if sorted(j.volumes.values(), key=lambda v: v.id) != specs:
                        j.close()
                        raise ProtocolError(f"VM {vm} of VPG {name} has other volumes now")
                else:
                    j = Journal.create(path, specs, vm=vm, settings=settings)
                journals[vm] = j
        except BaseException:
            for j in journals.values():
                j.close()
            raise
        return journals


def raise_nofile_limit() -> int:
    """Raise this process's descriptor limit (RLIMIT_NOFILE) to its hard limit, as a
    service holding many journals must: each journal holds descriptors (its directory
    lock, one per replica volume, one per segment), and the usual soft limit of 1,024 is
    reached by a few hundred journals.  Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit above nr_open
            log.warning("recovery site: could not raise the descriptor limit: %s", exc)
    return soft
