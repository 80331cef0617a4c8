"""A running QEMU's block node as a zcore volume source: protection in the hypervisor.

Sits under the protected site's VPG (zcore.vpg), beside zcore.capture: `QemuDisk` is the
`VolumeSource` of a capture-only `ProtectedVolume`.  Over the VM's QMP socket it

- keeps dirty bitmaps on the node (persistent where the image is qcow2), in generations
  named `PREFIX.N`: `checkpoint` adds the next one in a QMP transaction, which drains the
  node's in-flight requests first, so every write not in the new bitmap had finished,
  its mirrored copy included, when the transaction returned; `release` drops the older
  generations once the recovery site holds what they cover (clear-on-ack: a dirty bit is
  never dropped before its data is durable there);
- exports the node read-only on QEMU's own NBD server (`PREFIX-read`), which syncs read
  through zcore.nbd.client, skipping holes (block status base:allocation);
- starts `blockdev-mirror` with sync=none, copy-mode=write-blocking and
  on-target-error=report into the volume's zcore NBD export: QEMU writes its disk, then
  the mirrored copy, before the guest sees the write complete.  When zcore or its link
  goes away, the job ends with an error and the guest runs on; the bitmaps go on
  recording, and `changed_extents` (their union, read as `qemu:dirty-bitmap:`) tells the
  VPG what to resend.

Every call blocks (QMP and NBD sockets with timeouts): callers run it in worker threads.
One QMP session per call, as the `qemu` adapter does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

from zcore.adapters.qmp import QMPClient
from zcore.errors import AdapterError, HypervisorError, ZcoreError
from zcore.nbd.client import NBDClient
from zcore.nbd.protocol import STATE_DIRTY, STATE_ZERO

# blockdev-mirror copy-mode (3.0), block-export-add (5.2), NBD export `bitmaps` (7.1)
MIN_QEMU = (7, 1)
# how long a mirror job may take to become ready, or to end when cancelled
_JOB_WAIT = 10.0
# after a failed connection to QEMU's NBD server, reads fail at once for this long
_RECONNECT_PAUSE = 1.0
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,40}")
# a refused QMP connection (another client is on the monitor) is retried this long
_CONNECT_RETRY = 2.0
_QMP_LOCKS: dict[str, threading.Lock] = {}
_QMP_LOCKS_GUARD = threading.Lock()


def _qmp_lock(path: Path) -> threading.Lock:
    """The lock of one QMP socket, shared by every QemuDisk on it in this process."""
    with _QMP_LOCKS_GUARD:
        return _QMP_LOCKS.setdefault(os.fspath(path), threading.Lock())


@dataclass(frozen=True)
class NodeInfo:
    """What `probe_node` found of a block node: its virtual size and image format."""

    size: int
    format: str


@contextlib.contextmanager
def qmp_session(path: Path, timeout: float) -> Iterator[QMPClient]:
    """One QMP session; sessions on one socket are one at a time in this process (a
    QEMU monitor serves one client: a second one is refused while the first is on,
    so a refusal is retried briefly too, for a client of another process)."""
    with _qmp_lock(path):
        deadline = time.monotonic() + _CONNECT_RETRY
        while True:
            try:
                client = QMPClient(path, timeout=timeout)
                break
            except ConnectionRefusedError as exc:
                if time.monotonic() > deadline:
                    raise HypervisorError(f"QMP socket {path}: cannot connect "
                                          f"({exc})") from None
                time.sleep(0.05)
            except (OSError, EOFError, AdapterError) as exc:
                raise HypervisorError(f"QMP socket {path}: cannot connect "
                                      f"({exc})") from None
        try:
            yield client
        except (OSError, EOFError) as exc:
            raise HypervisorError(f"QMP socket {path}: {exc}") from None
        finally:
            client.close()


def probe_node(qmp: str | os.PathLike[str], node: str, *, timeout: float = 10.0) -> NodeInfo:
    """The size and format of block node `node` of the QEMU at `qmp`: HypervisorError,
    saying why, when it cannot be protected (no such socket or node, QEMU too old, a
    read-only node or an odd size).  Blocks."""
    path = Path(qmp)
    with qmp_session(path, timeout) as q:
        try:
            version = q.execute("query-version")["qemu"]
            nodes = q.execute("query-named-block-nodes", {"flat": True})
        except (AdapterError, KeyError, TypeError) as exc:
            raise HypervisorError(f"QEMU at {path} did not answer its version "
                                  f"and block nodes: {exc}") from None
    have = (int(version["major"]), int(version["minor"]))
    if have < MIN_QEMU:
        raise HypervisorError(
            f"QEMU {have[0]}.{have[1]} at {path} cannot mirror with dirty "
            f"bitmaps over NBD: {MIN_QEMU[0]}.{MIN_QEMU[1]} or newer is needed")
    for n in nodes:
        if n.get("node-name") == node:
            size = int(n["image"]["virtual-size"])
            if size <= 0 or size % 512:
                raise HypervisorError(f"node {node}: size {size} is not a multiple "
                                      "of 512")
            if n.get("ro"):
                raise HypervisorError(f"node {node} is read-only: nothing to protect")
            return NodeInfo(size, str(n.get("drv", "")))
    names = sorted(str(n.get("node-name")) for n in nodes if n.get("node-name"))
    raise HypervisorError(f"QEMU at {path} has no block node {node!r} "
                          f"(it has: {', '.join(names[:12]) or 'none'})")


@dataclass(frozen=True)
class QemuAddress:
    """A volume's place in a running QEMU, as the site's inventory records it in the
    volume's path: `qemu:QMP_SOCKET?node=NODE[&nbd=QEMU_NBD_SOCKET]`."""

    qmp: str
    node: str
    nbd: str | None = None

    SCHEME: ClassVar[str] = "qemu:"

    @classmethod
    def parse(cls, text: str) -> QemuAddress | None:
        """The address in a volume path; None for a path that is not one (a file)."""
        if not text.startswith(cls.SCHEME):
            return None
        parts = urlsplit(text)
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
        node = query.pop("node", [""])
        nbd = query.pop("nbd", [None])
        if not parts.path.startswith("/") or len(node) != 1 or not node[0] or query \
                or len(nbd) != 1:
            raise HypervisorError(f"{text!r} is not qemu:/ABSOLUTE/QMP.sock?node=NODE"
                                  "[&nbd=/QEMU/NBD.sock]")
        return cls(unquote(parts.path), node[0], nbd[0])

    def __str__(self) -> str:
        text = f"{self.SCHEME}{quote(self.qmp)}?node={quote(self.node, safe='')}"
        return text + (f"&nbd={quote(self.nbd, safe='/')}" if self.nbd else "")

    @staticmethod
    def prefix_for(*names: str) -> str:
        """zcore's name prefix on QEMU for one protected volume (`names`: VPG, VM,
        volume): stable across restarts, a valid QEMU node name."""
        return "zcore-" + hashlib.sha256("/".join(names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QemuTarget:
    """Where the mirror writes: a zcore NBD export, by TCP address and name."""

    host: str
    port: int
    export: str


@dataclass(frozen=True)
class MirrorState:
    """What `QemuDisk.mirror_state` found: `running` (the job mirrors), else why not."""

    running: bool
    status: str
    error: str | None = None


class QemuDisk:
    """One block node of a running QEMU, read, tracked and mirrored for a VPG.

    `qmp`: the VM's QMP socket; `node`: the block node's name (query-named-block-nodes);
    `prefix`: names zcore's bitmaps, export, target node and job on it (unique per volume
    on that QEMU); `nbd_socket`: QEMU's NBD server if it already runs one (zcore starts
    its own, on an abstract Unix socket, otherwise); `size`: what the site's inventory
    says the node holds, so that a QEMU unreachable now (restarting, say) is probed later
    instead of failing the VPG's start (every call raises HypervisorError until it
    answers)."""

    def __init__(self, qmp: str | os.PathLike[str], node: str, prefix: str, *,
                 nbd_socket: str | None = None, timeout: float = 10.0,
                 size: int | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise HypervisorError(f"bitmap prefix {prefix!r} is not a QEMU node name")
        self.qmp_path = Path(qmp)
        self.node = node
        self.prefix = prefix
        self.timeout = timeout
        self._nbd_socket = nbd_socket
        self._lock = threading.Lock()  # one NBD reader, shared by sync reads
        self._reader: NBDClient | None = None
        self._reader_failed_at = 0.0
        # the generation started after QEMU lost every one this object had seen (it
        # restarted without persistent bitmaps): until the generations below it are
        # released, `changed_extents` cannot tell what changed
        self._seen_gen = 0
        self._lost_gen: int | None = None
        self._persistent: bool | None = None  # a qcow2 node: bitmaps survive QEMU restarts
        try:
            info = probe_node(self.qmp_path, node, timeout=timeout)
        except HypervisorError:
            if size is None:
                raise
            self.size = size
        else:
            self.size, self._persistent = info.size, info.format == "qcow2"

    @property
    def persistent(self) -> bool:
        """Whether zcore's bitmaps persist in the image (probed when first needed)."""
        if self._persistent is None:
            info = probe_node(self.qmp_path, self.node, timeout=self.timeout)
            if info.size != self.size:
                raise HypervisorError(f"node {self.node} now holds {info.size} bytes, not "
                                      f"the volume's {self.size}")
            self._persistent = info.format == "qcow2"
        return self._persistent

    # ---- QMP ------------------------------------------------------------------------------

    def _session(self) -> contextlib.AbstractContextManager[QMPClient]:
        return qmp_session(self.qmp_path, self.timeout)

    def _qmp(self, command: str, **arguments: Any) -> Any:
        with self._session() as q:
            try:
                return q.execute(command, arguments or None)
            except AdapterError as exc:
                raise HypervisorError(f"QEMU at {self.qmp_path} refused {command}: {exc}") \
                    from None

    def _bitmaps(self) -> dict[int, dict[str, Any]]:
        """zcore's bitmap generations on the node: N -> QEMU's description."""
        out: dict[int, dict[str, Any]] = {}
        for n in self._qmp("query-named-block-nodes", flat=True):
            if n.get("node-name") != self.node:
                continue
            for bm in n.get("dirty-bitmaps") or ():
                name = str(bm.get("name", ""))
                head, dot, gen = name.rpartition(".")
                if head == self.prefix and dot and gen.isdigit():
                    out[int(gen)] = bm
        return out

    # ---- bitmap generations ---------------------------------------------------------------

    def ensure_tracking(self) -> int:
        """Make sure a bitmap records the node's writes; returns the newest generation.
        A first call adds generation 1: the node's contents before it are what the
        initial sync reads."""
        gens = self._usable(self._generations())
        if gens:
            return max(gens)
        gen = self.checkpoint()
        if self._seen_gen and self._lost_gen is None:
            self._lost_gen = gen  # tracking again, after writes no bitmap recorded
        self._seen_gen = gen
        return gen

    def _generations(self) -> dict[int, dict[str, Any]]:
        """zcore's generations on the node, noting the newest seen."""
        gens = self._bitmaps()
        if gens:
            self._seen_gen = max(self._seen_gen, *gens)
        return gens

    def _usable(self, gens: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Generations QEMU can still vouch for (a persistent bitmap of a QEMU that crashed
        comes back inconsistent: `inconsistent` or `recording` false)."""
        return {g: bm for g, bm in gens.items()
                if not bm.get("inconsistent") and bm.get("recording", True)}

    def checkpoint(self) -> int:
        """Add the next bitmap generation (one transaction: QEMU drains the node first, so
        every earlier write, with its mirrored copy, is complete); returns its number.
        Read the capture's next seq after this returns: every write the new bitmap does
        not hold has a lower one."""
        gens = self._bitmaps()
        gen = max(max(gens, default=0), self._seen_gen) + 1  # never reused in this process
        args: dict[str, Any] = {"node": self.node, "name": f"{self.prefix}.{gen}",
                                "granularity": 65536}
        if self.persistent:
            args["persistent"] = True
        self._qmp("transaction", actions=[{"type": "block-dirty-bitmap-add", "data": args}])
        return gen

    def release(self, below: int) -> int:
        """Drop the generations older than `below` (the recovery site holds what they
        recorded); returns how many went."""
        if self._lost_gen is not None and below > self._lost_gen:
            self._lost_gen = None  # what no bitmap recorded is at the recovery site
        dropped = 0
        for gen in sorted(self._bitmaps()):
            if gen < below:
                self._qmp("block-dirty-bitmap-remove", node=self.node,
                          name=f"{self.prefix}.{gen}")
                dropped += 1
        return dropped

    # ---- reads through QEMU's NBD server -------------------------------------------------

    def _nbd_address(self) -> str:
        """QEMU's NBD server's socket.  Unless one was given, zcore runs it on an abstract
        socket named after the QMP socket (not the volume or the process: QEMU runs one NBD
        server, which every volume on it and a restarted zcore then find again), started
        again on each use, so a restarted QEMU gets it back."""
        if self._nbd_socket is not None:
            return self._nbd_socket
        name = "zcore-nbd-" + hashlib.sha256(
            os.fsencode(os.path.realpath(self.qmp_path))).hexdigest()[:16]
        try:
            # nbd-server-start takes the legacy address form ("data" wraps the address)
            self._qmp("nbd-server-start", addr={"type": "unix", "data": {
                "path": name, "abstract": True}})
        except HypervisorError as exc:
            if "already running" not in str(exc):
                raise
            if not _serves_nbd("\0" + name):
                raise HypervisorError(
                    f"QEMU at {self.qmp_path} already runs an NBD server zcore did not "
                    "start: give its Unix socket (nbd=PATH in the volume's qemu: address)"
                ) from None
        return "\0" + name

    def _add_export(self, export: str, bitmaps: Sequence[str] = ()) -> str:
        address = self._nbd_address()
        args: dict[str, Any] = {"type": "nbd", "id": export, "node-name": self.node,
                                "name": export, "writable": False}
        if bitmaps:
            args["bitmaps"] = list(bitmaps)
        try:
            self._qmp("block-export-add", **args)
        except HypervisorError as exc:
            if "already" not in str(exc) and "exists" not in str(exc):
                raise
        return address

    def _del_export(self, export: str) -> None:
        """Remove an export once its clients are gone (mode safe: QEMU 7.2's storage
        daemon was seen corrupting its heap when a hard delete raced a client's
        disconnect), waiting a little for it to go."""
        with contextlib.suppress(HypervisorError):
            self._qmp("block-export-del", id=export)
        deadline = time.monotonic() + _JOB_WAIT
        while time.monotonic() < deadline:
            try:
                exports = self._qmp("query-block-exports")
            except HypervisorError:
                return
            if not any(e.get("id") == export for e in exports):
                return
            time.sleep(0.02)

    def _connect(self, export: str, contexts: Sequence[str]) -> NBDClient:
        address = self._nbd_address()
        try:
            return NBDClient.connect_unix(address, export, meta_contexts=contexts,
                                          timeout=self.timeout)
        except (OSError, ZcoreError) as exc:
            raise HypervisorError(f"QEMU's NBD export {export} of node {self.node}: "
                                  f"{exc}") from None

    def _read_client(self) -> NBDClient:
        if self._reader is None:
            if time.monotonic() - self._reader_failed_at < _RECONNECT_PAUSE:
                raise HypervisorError(f"QEMU's NBD export of node {self.node} is unreachable "
                                      "(retrying)")
            try:
                self._add_export(f"{self.prefix}-read")
                self._reader = self._connect(f"{self.prefix}-read", ("base:allocation",))
            except HypervisorError:
                self._reader_failed_at = time.monotonic()
                raise
        return self._reader

    def _close_reader(self) -> None:
        with self._lock:
            if self._reader is not None:
                with contextlib.suppress(OSError, ZcoreError):
                    self._reader.close()
                self._reader = None

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill `buf` from the node at `offset` (a sync's read).  A connection that
        served earlier reads and then fails is replaced at once, one time (QEMU may have
        restarted since); a new one that fails pauses reads for a moment."""
        with self._lock:
            while True:
                fresh = self._reader is None
                client = self._read_client()
                try:
                    client.readinto(offset, memoryview(buf).cast("B"))
                    return
                except (OSError, ZcoreError) as exc:
                    with contextlib.suppress(OSError, ZcoreError):
                        client.close()
                    self._reader = None
                    if fresh:
                        self._reader_failed_at = time.monotonic()
                        raise HypervisorError(f"reading node {self.node} at {offset}: "
                                              f"{exc}") from None

    def zero_extents(self) -> list[tuple[int, int]]:
        """The node's ranges that read as zeros (base:allocation's ZERO flag)."""
        with self._lock:
            client = self._read_client()
            return [(o, n) for o, n, flags in client.block_status(0, self.size)
                    if flags & STATE_ZERO]

    def changed_extents(self) -> list[tuple[int, int]] | None:
        """The union of zcore's bitmap generations on the node: what was written since
        the recovery site last held it (None when no usable generation is left: a QEMU
        that crashed with them or restarted without them, or a node that never had one)."""
        gens = self._generations()
        usable = self._usable(gens)
        if not usable or len(usable) < len(gens) or self._lost_gen is not None:
            return None
        merged = f"{self.prefix}.merge"
        with contextlib.suppress(HypervisorError):
            self._qmp("block-dirty-bitmap-remove", node=self.node, name=merged)
        self._qmp("block-dirty-bitmap-add", node=self.node, name=merged, granularity=65536,
                  disabled=True)  # a frozen union: QEMU exports only disabled bitmaps
        export = f"{self.prefix}-bitmap"
        try:
            self._qmp("block-dirty-bitmap-merge", node=self.node, target=merged,
                      bitmaps=[f"{self.prefix}.{g}" for g in sorted(usable)])
            self._add_export(export, bitmaps=[merged])
            context = f"qemu:dirty-bitmap:{merged}"
            client = self._connect(export, (context,))
            try:
                runs = client.block_status(0, self.size, context)
            finally:
                with contextlib.suppress(OSError, ZcoreError):
                    client.close()
        finally:
            self._del_export(export)
            with contextlib.suppress(HypervisorError):
                self._qmp("block-dirty-bitmap-remove", node=self.node, name=merged)
        return _merge([(o, n) for o, n, flags in runs if flags & STATE_DIRTY])

    # ---- the mirror ----------------------------------------------------------------------

    @property
    def job(self) -> str:
        return f"{self.prefix}-mirror"

    @property
    def target_node(self) -> str:
        return f"{self.prefix}-target"

    def mirror_state(self) -> MirrorState:
        """Whether the mirror job runs (status of query-block-jobs)."""
        for job in self._qmp("query-block-jobs"):
            if job.get("device") == self.job:
                status = str(job.get("status", "unknown"))
                running = status in ("running", "ready")
                return MirrorState(running, status, job.get("error"))
        return MirrorState(False, "absent")

    def start_mirror(self, target: QemuTarget) -> None:
        """Mirror every later guest write into `target` (write-blocking); afterwards each
        write reaches zcore before the guest sees it complete.  Leftovers of an earlier
        job are cleared first."""
        self.stop_mirror()
        self._qmp("blockdev-add", driver="nbd", **{"node-name": self.target_node},
                  server={"type": "inet", "host": target.host, "port": str(target.port)},
                  export=target.export)
        try:
            self._qmp("blockdev-mirror", **{"job-id": self.job}, device=self.node,
                      target=self.target_node, sync="none", **{"copy-mode": "write-blocking",
                                                               "on-target-error": "report",
                                                               "on-source-error": "report",
                                                               "auto-dismiss": False})
            deadline = time.monotonic() + _JOB_WAIT
            while True:
                state = self.mirror_state()
                if state.status == "ready":
                    return
                if state.status in ("concluded", "aborting", "null", "absent"):
                    raise HypervisorError(f"the mirror of node {self.node} ended at once: "
                                          f"{state.error or state.status}")
                if time.monotonic() > deadline:
                    raise HypervisorError(f"the mirror of node {self.node} did not become "
                                          f"ready in {_JOB_WAIT:.0f} s ({state.status})")
                time.sleep(0.02)
        except BaseException:
            with contextlib.suppress(HypervisorError):
                self.stop_mirror()
            raise

    def stop_mirror(self) -> None:
        """End the mirror job (if any: cancelled, dismissed) and drop its target node."""
        state = self.mirror_state()
        if state.status != "absent":
            if state.status not in ("concluded", "null"):
                # a ready mirror ends by a cancel without force (it completes without a
                # pivot, in-flight writes drained): QEMU 7.2's storage daemon was seen
                # corrupting its heap when forced while a guest wrote
                with contextlib.suppress(HypervisorError):
                    self._qmp("block-job-cancel", device=self.job,
                              force=state.status != "ready")
                deadline = time.monotonic() + _JOB_WAIT
                while self.mirror_state().status not in ("concluded", "null", "absent"):
                    if time.monotonic() > deadline:
                        raise HypervisorError(f"the mirror job {self.job} did not end")
                    time.sleep(0.02)
            with contextlib.suppress(HypervisorError):
                self._qmp("job-dismiss", id=self.job)
        with contextlib.suppress(HypervisorError):
            self._qmp("blockdev-del", **{"node-name": self.target_node})

    # ---- the guest ------------------------------------------------------------------------

    def pause_guest(self) -> None:
        """Pause the VM (QMP `stop`: its vCPUs stop and its disk requests drain), so no
        write is issued past this point: a planned move's last checkpoint comes after it."""
        try:
            self._qmp("stop")
        except HypervisorError as exc:
            raise HypervisorError(f"the VM at {self.qmp_path} cannot be paused ({exc}): its "
                                  "guest would go on writing unprotected") from None

    def resume_guest(self) -> None:
        """Let a paused VM run again (QMP `cont`)."""
        self._qmp("cont")

    def close(self) -> None:
        """Let go of the reader (the mirror and the bitmaps stay: `stop_mirror`, `release`
        or `forget`)."""
        self._close_reader()

    def forget(self) -> None:
        """Leave nothing of zcore's on the node (its volume is no longer protected): the
        mirror, the read export and every bitmap generation, persistent ones included
        (an NBD server zcore started stays: other disks of that QEMU may read through it)."""
        self.stop_mirror()
        self._close_reader()
        for export in (f"{self.prefix}-read", f"{self.prefix}-bitmap"):
            self._del_export(export)
        with contextlib.suppress(HypervisorError):
            self._qmp("block-dirty-bitmap-remove", node=self.node, name=f"{self.prefix}.merge")
        self.release(max(self._bitmaps(), default=0) + 1)


def _serves_nbd(address: str) -> bool:
    """Whether an NBD server answers on the Unix socket `address` (asked for an export
    that no one names: its refusal ends the negotiation cleanly, unlike a bare connect,
    which QEMU logs as a failed negotiation)."""
    try:
        NBDClient.connect_unix(address, "zcore-probe", meta_contexts=(),
                               timeout=_CONNECT_RETRY).close()
    except OSError:
        return False
    except ZcoreError:
        pass
    return True


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] >= offset:
            start, n = out[-1]
            out[-1] = (start, max(n, offset + length - start))
        else:
            out.append((offset, length))
    return out
