"""The site service: one asyncio process holding everything of a site (`zcore site serve`).

Sits on top of the site package: it opens the database (zcore.site.db), the live objects
(zcore.site.runtime: replication listener and senders, journals, protected VPGs, NBD
server, metric history), reconciles the database with them, and serves the REST API
(zcore.site.api over zcore.site.live) with uvicorn on its own event loop, beside the
scheduler (zcore.site.scheduler) and /metrics (zcore.site.prom).

Start: RLIMIT_NOFILE raised to its hard limit (3 descriptors per journal plus one per
segment); the listeners bound; one line printed per listener, the API's first:

    API: http://127.0.0.1:PORT          (https when the API is bound beyond loopback)
    replication: HOST:PORT
    NBD: nbd://HOST:PORT

and the API's URL written into the site's client record.  Stop (SIGTERM or SIGINT): the
API stops taking requests, the scheduler and tasks end, every VPG is stopped cleanly
(bitmaps saved), the journals and the database are closed.

Reconciliation at start (the journals and the VPG state directories hold the data; the
database follows them): every received VPG on disk is recorded as a recovery VPG; a
recovery VPG whose journals are gone is marked error; every protected VPG is started
again from its state (paused ones paused, those left deleting deleted); a protected
state directory no VPG names is reported, never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import uvicorn

from zcore.adapters import DEFAULT_TIMEOUT
from zcore.errors import ConfigError, ZcoreError
from zcore.site.api import SiteContext, create_app
from zcore.site.config import (
    DEFAULT_API_PORT,
    DEFAULT_NBD_PORT,
    DEFAULT_REPLICATION_PORT,
    SiteDir,
    read_service,
    set_client_url,
)
from zcore.site.db import Severity, SiteDB, VpgRole, VpgState
from zcore.site.live import LiveSiteBackend
from zcore.site.operations import RecoveryOperations
from zcore.site.prom import install_metrics
from zcore.site.runtime import SiteRuntime
from zcore.site.scheduler import Scheduler
from zcore.site.tasks import TaskRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    host: str = "127.0.0.1"  # the replication and NBD listeners
    replication_port: int = DEFAULT_REPLICATION_PORT
    nbd_port: int = DEFAULT_NBD_PORT
    db_url: str | None = None
    log_json: bool = False
    script_timeout: float = DEFAULT_TIMEOUT  # the site-wide default of scripts (s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE past %d: %s", soft, exc)
    return soft


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"time": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(json_lines: bool, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a line per migration plugin


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the service handles SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket names its protocol; without it every response waited ~40 ms for
    # delayed ACKs (measured by bench/suites/site.py)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class SiteService:
    """One site's service (see the module docstring)."""

    def __init__(self, root: str | Path, options: ServeOptions,
                 out: Callable[[str], None] = print) -> None:
        self.site = SiteDir(Path(root).absolute())
        self.options = options
        self.out = out
        self.db: SiteDB | None = None
        self.runtime: SiteRuntime | None = None
        self.backend: LiveSiteBackend | None = None
        self.scheduler: Scheduler | None = None
        self.runner: TaskRunner | None = None
        self.operations: RecoveryOperations | None = None
        self.api: _Server | None = None
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or `stopping` is set), stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            serving = await self.start()
            await self.stopping.wait()
            if self.api is not None:
                self.api.should_exit = True
            await serving
        finally:
            await self.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def start(self) -> asyncio.Task[None]:
        """Open and reconcile everything, bind the listeners, print them; returns the
        API server's task."""
        opts = self.options
        raise_nofile_limit()
        record = await asyncio.to_thread(read_service, self.site)
        url = opts.db_url or record.db_url
        self.db = db = await asyncio.to_thread(SiteDB.open, url)
        self.runtime = rt = SiteRuntime(self.site, record.name)
        found = await rt.open()
        assert rt.recovery is not None
        site = await asyncio.to_thread(db.get_site)
        if site.id != rt.recovery.identity.site_id:
            raise ConfigError(f"the database at {url} belongs to site {site.name} "
                              f"({site.id}), not to this site directory's "
                              f"({rt.recovery.identity.site_id})")
        self.runner = TaskRunner(db)
        await self.runner.recover()
        self.backend = LiveSiteBackend(db, rt, self.runner)
        self.operations = ops = RecoveryOperations(db, rt, self.runner, self.backend.states,
                                                   default_timeout=opts.script_timeout)
        self.backend.failovers.vms.default_timeout = opts.script_timeout
        self.backend.operations = ops
        self.backend.reverse.install()  # before the listener takes any ATTACH or MOVE
        api_sock = _bind(opts.api_host, opts.api_port)
        try:
            await rt.listen(opts.host, opts.replication_port, opts.nbd_port)
        except OSError as exc:  # name the listener (the API's socket is bound above)
            api_sock.close()
            which, port = (("replication", opts.replication_port)
                           if rt.replication_address is None else ("NBD", opts.nbd_port))
            raise ConfigError(f"cannot listen for {which} on {opts.host}:{port}: "
                              f"{exc.strerror or exc} (--{which.lower()}-port picks another, "
                              "0 any free one)") from None
        await self.reconcile(found)
        await ops.recover()
        await self.backend.failovers.restore()  # before retention rounds can run
        await self.backend.reverse.restore()
        self.scheduler = Scheduler(db, rt)
        self.scheduler.operations = ops
        self.scheduler.start()
        self.backend.backups.start(self.site.root)  # backup schedules (issue 13)
        app = create_app(SiteContext(db, self.backend, ops))
        install_metrics(app, rt, self.scheduler)
        tls = not is_loopback(opts.api_host)
        identity = rt.recovery.identity
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            ssl_certfile=str(identity.cert_path) if tls else None,
            ssl_keyfile=str(identity.key_path) if tls else None)
        self.api = _Server(config)
        serving = asyncio.get_running_loop().create_task(self.api.serve(sockets=[api_sock]))
        while not self.api.started:
            if serving.done():
                serving.result()
                raise ConfigError("the API server stopped while starting")
            await asyncio.sleep(0.01)
        self._announce(api_sock, tls)
        return serving

    def _announce(self, api_sock: socket.socket, tls: bool) -> None:
        rt = self.runtime
        assert rt is not None and rt.replication_address and rt.nbd_address
        host, port = api_sock.getsockname()[:2]
        scheme = "https" if tls else "http"
        api_url = f"{scheme}://{_url_host(host)}:{port}"
        # this host's CLI reaches a wildcard listener through loopback
        local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        cafile = str(rt.recovery.identity.cert_path) if tls and rt.recovery else None
        set_client_url(self.site, f"{scheme}://{_url_host(local)}:{port}", cafile)
        rh, rp = rt.replication_address[:2]
        nh, np_ = rt.nbd_address[:2]
        for line in (f"API: {api_url}", f"replication: {rh}:{rp}", f"NBD: nbd://{nh}:{np_}"):
            self.out(line)
        log.info("site %s serving: API %s, replication %s:%s, NBD %s:%s", rt.name, api_url,
                 rh, rp, nh, np_)

    async def reconcile(self, found: list[str]) -> None:
        """Bring the database in line with the journals and VPG state directories."""
        db, rt, backend = self.db, self.runtime, self.backend
        assert db is not None and rt is not None and backend is not None
        assert rt.recovery is not None
        await backend.sync_peers()
        for name in found:
            receiver = rt.receiver(name)
            if receiver is not None:
                await backend.record_recovery(name, receiver.owner)
        named = set()
        for vpg in await asyncio.to_thread(db.list_vpgs):
            named.add(vpg.name)
            try:
                await self._resume_vpg(vpg.name, vpg.role, vpg.state, found)
            except (ZcoreError, OSError) as exc:
                log.error("VPG %s could not resume: %s", vpg.name, exc)
                await asyncio.to_thread(db.update_vpg, vpg.name, state=VpgState.ERROR)
                await asyncio.to_thread(db.add_event, "vpg_error",
                                        f"VPG {vpg.name} could not resume: {exc}",
                                        vpg=vpg.name, severity=Severity.ERROR)
        for path in sorted(rt.site.protected_dir.iterdir()):
            if path.is_dir() and path.name not in named:
                log.warning("protected state directory %s belongs to no VPG", path)

    async def _resume_vpg(self, name: str, role: VpgRole, state: VpgState,
                          found: list[str]) -> None:
        db, rt, backend = self.db, self.runtime, self.backend
        assert db is not None and rt is not None and backend is not None
        record = await asyncio.to_thread(db.get_vpg, name)
        if state == VpgState.DELETING:
            await backend.finish_delete(record)
            return
        if state == VpgState.MOVED:  # its VMs run at the recovery site now
            return
        if role == VpgRole.RECOVERY:
            if name not in rt.recovery_vpgs:
                raise ConfigError(f"the journals of recovery VPG {name} are missing from "
                                  f"{rt.site.journals_dir}")
            return
        vms = [await asyncio.to_thread(db.get_vm, vm) for vm in record.vms]
        address = await backend.peer_address(record.peer)
        await rt.start_protected(record, vms, address, paused=state == VpgState.PAUSED)
        if state in (VpgState.CREATING, VpgState.ERROR):
            await asyncio.to_thread(db.update_vpg, name, state=VpgState.SYNCING)

    async def close(self) -> None:
        """Stop everything started, in reverse order; safe after a failed start."""
        started = time.monotonic()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.backend is not None:
            await self.backend.backups.stop()
        if self.runner is not None:
            await self.runner.close()
        if self.operations is not None:
            await self.operations.close()
        if self.backend is not None:
            await self.backend.failovers.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.db is not None:
            await asyncio.to_thread(self.db.close)
        log.info("site stopped in %.1f s", time.monotonic() - started)


def serve(root: str | Path, options: ServeOptions) -> None:
    """`zcore site serve`: run the service until SIGTERM/SIGINT (blocks)."""
    setup_logging(options.log_json)

    def out(line: str) -> None:
        print(line, flush=True)

    asyncio.run(SiteService(root, options, out).run())
