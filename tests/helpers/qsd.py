"""QEMU as the hypervisor of the tests and benchmarks (no tests here): `QemuStorageDaemon`
runs Debian's `qemu-storage-daemon` on one image, and `CaptureTarget` runs the zcore side
of issue 15 as it exists today, `zcore nbd serve --protect`, for QEMU to mirror into.

`QemuStorageDaemon(workdir, image, ...)` starts the daemon with

- a QMP monitor on a Unix socket (`qmp(command, **args)`, one `QMPClient` session per
  command, so zcore's own QMP client can use the monitor between them);
- one block node named `node` (default "disk0"): a `file` node under a `raw` or `qcow2`
  node, given as `--blockdev` JSON (with `direct=True`, O_DIRECT and Linux native AIO, the
  `cache=none` a production VM disk uses);
- an NBD server on a Unix socket and a writable export of that node, `export` (default
  "disk0"), through which "guest" writes come: `nbd_uri` is its nbd+unix URI for qemu-io,
  qemu-img and fio's nbd engine.  No iothread: QEMU 7.2's daemon aborts (an assertion in
  nbd_blockdev_client_closed) when a client of an export in an iothread disconnects.

`restart(kill=False)` stops the daemon (SIGTERM, or SIGKILL: a crash) and starts it again
on the same image and sockets.  `start_mirror(host, port, export)` adds an `nbd` node for
the target and starts the issue's mirror job (`blockdev-mirror` sync=none,
copy-mode=write-blocking, on-target-error=report: every guest write is written to the
target before the guest sees it complete), returning
once query-block-jobs reports it ready; `stop_mirror()` cancels it (for a ready mirror, a
clean completion without pivot) and removes the target node.  `kill()` is SIGKILL, `close()`
the orderly end; both are idempotent.  Every wait is bounded, the daemon's output goes to
`workdir/qsd.log`, and `QemuError` carries the log's tail.  The sockets live in a short
directory under the system temp directory (sun_path holds 107 bytes), removed by `close`.

`Guest(daemon, size, seed)` writes through the daemon's export with qemu-io and keeps a
model of the disk; `close_daemon(daemon)` closes a daemon, warning (not failing) when it
did not exit cleanly (QEMU 7.2's daemon was seen dying of heap corruption).

`CaptureTarget(workdir, image, ...)` runs `zcore nbd serve --protect NAME=IMAGE --journal
DIR` on an ephemeral loopback port, waits until the VPG's initial sync has finished (its
vpg.json says so), and stops it with SIGTERM (a final checkpoint) or SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from helpers.cli import zcore_cmd
from zcore.adapters.qmp import QMPClient
from zcore.errors import AdapterError
from zcore.vpg.state import STATE_NAME, read_vpg_state

START_TIMEOUT = 30.0  # seconds for a process to listen (qemu starts in well under one)
STOP_TIMEOUT = 30.0  # seconds for an orderly exit before SIGKILL
JOB_TIMEOUT = 30.0  # seconds for a block job to become ready or to go away
LOG_TAIL = 4000  # characters of a process log quoted in an error


class QemuError(RuntimeError):
    """qemu-storage-daemon or `zcore nbd serve` did not do what the fixture asked."""


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL:] or "(log empty)"


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Send `sig` (if still running) and reap; SIGKILL after `timeout`. The exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class QemuStorageDaemon:
    """A qemu-storage-daemon serving one image as block node `node` (see the module)."""

    def __init__(self, workdir: Path, image: Path, *, fmt: str = "raw",
                 size: int | None = None, node: str = "disk0", export: str = "disk0",
                 direct: bool = False, binary: str = "qemu-storage-daemon",
                 timeout: float = START_TIMEOUT) -> None:
        """Serve `image` (format `fmt`, "raw" or "qcow2"); with `size`, create it first
        (raw: a sparse file; qcow2: `qemu-img create`), refusing to overwrite one."""
        if fmt not in ("raw", "qcow2"):
            raise ValueError(f"image format {fmt!r}: expected 'raw' or 'qcow2'")
        path = shutil.which(binary)
        if path is None:
            raise QemuError(f"{binary} is not installed (Debian: qemu-system-common)")
        self.workdir = Path(workdir)
        self.image = Path(image)
        self.fmt, self.node, self.export = fmt, node, export
        self.log_path = self.workdir / "qsd.log"
        self.mirror_job: str | None = None
        self.mirror_target: str | None = None
        self._running = False  # QMP answered once: qmp() may connect
        if size is not None:
            create_image(self.image, fmt, size)
        elif not self.image.exists():
            raise QemuError(f"{self.image} does not exist (give size= to create it)")
        self._sockdir = Path(tempfile.mkdtemp(prefix="zc-qsd-"))
        self.qmp_path = self._sockdir / "qmp.sock"
        self.nbd_path = self._sockdir / "nbd.sock"
        file_node: dict[str, Any] = {"driver": "file", "node-name": f"{node}-file",
                                     "filename": str(self.image.resolve())}
        if direct:
            file_node |= {"cache": {"direct": True}, "aio": "native"}
        format_node = {"driver": fmt, "node-name": node, "file": f"{node}-file"}
        argv = [path,
                "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=m",
                "--blockdev", json.dumps(file_node),
                "--blockdev", json.dumps(format_node),
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
                "--export", f"type=nbd,id={export}-export,node-name={node},name={export},"
                            "writable=on"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._argv = argv
        try:
            self._spawn()
        except BaseException:
            self._cleanup()
            raise
        try:
            self._wait_started(timeout)
        except BaseException:
            self.kill()
            self._cleanup()
            raise

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            # glibc writes a heap corruption's message to /dev/tty unless told
            self.proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "LIBC_FATAL_STDERR_": "1"})

    def restart(self, *, kill: bool = False, timeout: float = START_TIMEOUT) -> None:
        """The hypervisor restarts on the same image and sockets: an orderly exit
        (SIGTERM: persistent bitmaps are saved in a qcow2) or, with `kill`, SIGKILL (they
        come back inconsistent); whatever a mirror or client had is gone."""
        self._running = False
        _stop_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM, STOP_TIMEOUT)
        self.mirror_job = self.mirror_target = None
        for sock in (self.qmp_path, self.nbd_path):
            sock.unlink(missing_ok=True)
        self._spawn()
        try:
            self._wait_started(timeout)
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> QemuStorageDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbd_uri(self) -> str:
        """The guest-facing export: nbd+unix:///EXPORT?socket=PATH."""
        return f"nbd+unix:///{self.export}?socket={self.nbd_path}"

    def fail(self, message: str) -> QemuError:
        """An error saying `message`, with the daemon's log."""
        return QemuError(f"{message}\n--- {self.log_path} ---\n{_tail(self.log_path)}")

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"qemu-storage-daemon exited with {self.proc.returncode}")
            if self.nbd_path.exists() and self.qmp_path.exists():
                try:
                    QMPClient(self.qmp_path).close()
                    self._running = True
                    return
                except (OSError, EOFError, AdapterError):
                    pass
            if time.monotonic() > deadline:
                raise self.fail(f"qemu-storage-daemon did not listen within {timeout:.0f} s")
            time.sleep(0.02)

    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command; keyword names have `_` spelled `-` (node_name= is
        "node-name"), nested values are passed as they are.  Its "return" value; a QMP
        error raises `QemuError` with the log."""
        if not self._running:
            raise QemuError(f"QMP {command}: qemu-storage-daemon is not running")
        arguments = {key.replace("_", "-"): value for key, value in args.items()}
        try:
            # a session per command: QEMU's monitor serves one client at a time, and
            # zcore.hypervisor.QemuDisk needs it between the fixture's calls
            with QMPClient(self.qmp_path) as q:
                return q.execute(command, arguments or None)
        except (AdapterError, OSError, EOFError) as exc:
            raise self.fail(f"QMP {command} {arguments}: {exc}") from None

    def block_job(self, job_id: str) -> dict[str, Any] | None:
        """query-block-jobs' entry of `job_id`, None when there is none."""
        for job in self.qmp("query-block-jobs"):
            if job.get("device") == job_id:
                return job
        return None

    def start_mirror(self, target_host: str, target_port: int, export_name: str, *,
                     job_id: str = "zcore-mirror", target_node: str = "zcore-target",
                     granularity: int | None = None,
                     timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """Mirror every write to the node into NBD export `export_name` at
        host:port (sync=none, copy-mode=write-blocking, on-target-error=report;
        `granularity` is the job's dirty-bitmap granularity, QEMU's default when None).
        Returns the job's query-block-jobs entry once it is ready; the target must have
        the node's size."""
        if self.mirror_job is not None:
            raise QemuError(f"mirror {self.mirror_job} is already running")
        self.qmp("blockdev-add", driver="nbd", node_name=target_node,
                 server={"type": "inet", "host": target_host, "port": str(target_port)},
                 export=export_name)
        self.mirror_target = target_node
        try:
            self.qmp("blockdev-mirror", job_id=job_id, device=self.node, target=target_node,
                     sync="none", copy_mode="write-blocking", on_target_error="report",
                     **({"granularity": granularity} if granularity else {}))
        except QemuError:
            self._del_target()
            raise
        self.mirror_job = job_id
        deadline = time.monotonic() + timeout
        while True:
            job = self.block_job(job_id)
            if job is None or job.get("status") in ("aborting", "concluded", "null"):
                raise self.fail(f"mirror {job_id} ended before it was ready: {job}")
            if job.get("ready") or job.get("status") == "ready":
                return job
            if time.monotonic() > deadline:
                raise self.fail(f"mirror {job_id} not ready within {timeout:.0f} s: {job}")
            time.sleep(0.02)

    def stop_mirror(self, timeout: float = JOB_TIMEOUT) -> None:
        """Cancel the mirror (a ready mirror completes without pivot: what it forwarded
        stays written) and remove its target node.  A no-op without a mirror; a job that
        already ended (a target error) is only cleaned up."""
        job_id = self.mirror_job
        if job_id is None:
            return
        if self.block_job(job_id) is not None:
            with contextlib.suppress(QemuError):  # it may end on its own meanwhile
                self.qmp("block-job-cancel", device=job_id)
        self.wait_mirror_end(timeout)

    def wait_mirror_end(self, timeout: float = JOB_TIMEOUT) -> None:
        """Wait for the mirror job to go away (cancelled, or ended by a target error:
        on-target-error=report ends it once it fails to forward), then remove its target
        node.  `QemuError` when it still runs after `timeout`."""
        job_id = self.mirror_job
        if job_id is None:
            return
        deadline = time.monotonic() + timeout
        while (job := self.block_job(job_id)) is not None:
            if job.get("status") == "concluded":  # auto-dismiss is on: not for long
                with contextlib.suppress(QemuError):
                    self.qmp("job-dismiss", id=job_id)
            elif time.monotonic() > deadline:
                raise self.fail(f"mirror {job_id} still runs after {timeout:.0f} s: {job}")
            time.sleep(0.02)
        self.mirror_job = None
        self._del_target()

    def _del_target(self) -> None:
        if self.mirror_target is not None:
            self.qmp("blockdev-del", node_name=self.mirror_target)
            self.mirror_target = None

    def kill(self) -> None:
        """SIGKILL the daemon (a hypervisor crash); close() still cleans up."""
        self._running = False
        _stop_process(self.proc, signal.SIGKILL, STOP_TIMEOUT)
        self.mirror_job = self.mirror_target = None

    def close(self) -> None:
        """Stop the mirror if one runs, then the daemon (SIGTERM: it flushes its images
        and exits), and remove the sockets' directory."""
        try:
            if self.proc.poll() is None and self._running:
                self.stop_mirror()
        finally:
            self._running = False
            status = _stop_process(self.proc, signal.SIGTERM, STOP_TIMEOUT)
            self._cleanup()
        if status not in (0, -signal.SIGTERM, -signal.SIGKILL):
            raise self.fail(f"qemu-storage-daemon exited with {status}")

    def _cleanup(self) -> None:
        shutil.rmtree(self._sockdir, ignore_errors=True)


def close_daemon(daemon: QemuStorageDaemon) -> None:
    """`daemon.close()`; a daemon that did not exit cleanly is warned about, not failed
    on: QEMU 7.2's was seen dying of heap corruption (about 1 run in 8 of the
    concurrent-guest test of tests/test_qemu_mirror.py, after its checks passed)."""
    try:
        daemon.close()
    except QemuError as exc:
        warnings.warn(f"qemu-storage-daemon did not exit cleanly: {exc}", stacklevel=2)


class Guest:
    """A guest writing through `daemon`'s export with qemu-io (one pattern per write),
    each write in `model` once qemu-io says it completed; `daemon` may be replaced (a
    restarted hypervisor)."""

    def __init__(self, daemon: QemuStorageDaemon, size: int, seed: int) -> None:
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.model = bytearray(size)
        self.lock = threading.Lock()
        self.writes: list[tuple[int, int]] = []  # (offset, length), in completion order

    def put(self, offset: int, length: int, pattern: int) -> None:
        subprocess.run(["qemu-io", "-f", "raw", "-c",
                        f"write -P {pattern} {offset} {length}", self.daemon.nbd_uri],
                       check=True, capture_output=True, timeout=60)
        with self.lock:
            self.model[offset:offset + length] = bytes([pattern]) * length
            self.writes.append((offset, length))

    def write(self, n: int) -> None:
        """`n` writes of 4 KiB, 64 KiB or 512 B-150 KiB at random sector offsets."""
        for _ in range(n):
            length = self.rng.choice((4096, 65536, 512 * self.rng.randrange(1, 300)))
            offset = self.rng.randrange(0, (len(self.model) - length) // 512) * 512
            self.put(offset, length, self.rng.randrange(1, 256))

    @property
    def count(self) -> int:
        return len(self.writes)

    def image(self) -> bytes:
        with self.lock:
            return bytes(self.model)


def create_image(path: Path, fmt: str, size: int) -> Path:
    """A new zero image of `size` bytes: raw (sparse) or qcow2 (qemu-img create)."""
    if path.exists():
        raise QemuError(f"{path} exists: not overwriting it")
    if fmt == "raw":
        with open(path, "xb") as f:
            f.truncate(size)
    else:
        done = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise QemuError(f"qemu-img create {path}: {done.stderr.strip()}")
    return path


def raw_bytes(path: Path, fmt: str) -> bytes:
    """The guest-visible contents of an image (qcow2 through `qemu-img convert`)."""
    if fmt == "raw":
        return Path(path).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "image.raw"
        done = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path),
                               str(out)], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise QemuError(f"qemu-img convert {path}: {done.stderr.strip()}")
        return out.read_bytes()


class CaptureTarget:
    """`zcore nbd serve --protect NAME=IMAGE --journal JOURNAL` on 127.0.0.1 (ephemeral
    port), its output in `workdir/zcore.log`; ready once the initial sync is done."""

    def __init__(self, workdir: Path, image: Path, journal: Path, *, name: str = "disk0",
                 checkpoint_interval: float = 5.0, timeout: float = START_TIMEOUT) -> None:
        self.workdir = Path(workdir)
        self.image, self.journal, self.name = Path(image), Path(journal), name
        self.vpg_state = Path(f"{self.journal}.vpg")
        self.log_path = self.workdir / "zcore.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = zcore_cmd("nbd", "serve", "--protect", f"{name}={self.image}",
                         "--journal", str(self.journal), "--bind", "127.0.0.1",
                         "--port", "0", "--checkpoint-interval", str(checkpoint_interval))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=self.workdir)
        self.host, self.port = "127.0.0.1", 0
        try:
            self._wait_uri(timeout)
            self._wait_initial_sync(timeout)
        except BaseException:
            self.kill()
            raise

    def fail(self, message: str) -> QemuError:
        return QemuError(f"{message}\n--- {self.log_path} ---\n{_tail(self.log_path)}")

    def _wait_uri(self, timeout: float) -> None:
        """Read the first line `zcore nbd serve` prints: nbd://HOST:PORT/NAME, kind..."""
        assert self.proc.stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            raise self.fail(f"zcore nbd serve printed no URI within {timeout:.0f} s")
        uri = lines[0].decode().split("\t")[0]
        hostport = uri.removeprefix("nbd://").split("/", 1)[0]
        self.port = int(hostport.rsplit(":", 1)[1])
        # drain what else it prints, so it never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self.proc.stdout:
                self._log.write(line)

    def _wait_initial_sync(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"zcore nbd serve exited with {self.proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                if not read_vpg_state(self.vpg_state / STATE_NAME)["initial_sync_pending"]:
                    return
            if time.monotonic() > deadline:
                raise self.fail(f"initial sync not done within {timeout:.0f} s")
            time.sleep(0.05)

    def reachable(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> str:
        """SIGTERM: a final checkpoint, the journal closed. Its log; `QemuError` unless it
        exited 0."""
        status = _stop_process(self.proc, signal.SIGTERM, STOP_TIMEOUT)
        self._close()
        if status != 0:
            raise self.fail(f"zcore nbd serve exited with {status}")
        return _tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL (zcore crashing under the mirror)."""
        _stop_process(self.proc, signal.SIGKILL, STOP_TIMEOUT)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()
