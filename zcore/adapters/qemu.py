"""The `qemu` adapter: recovered and test VMs run by `qemu-system-x86_64` on NBD exports.

Each VM gets a directory under the adapter's `run_dir` (named after the VM):

  console.log   the guest's serial console (ttyS0): give the kernel `console=ttyS0`
  qemu.log      QEMU's own standard output and error (why it refused to start)
  qemu.pid      its process id (QEMU writes it), so an adapter made after a restart of the
                site service still finds, queries and stops VMs started before it
  qmp.sock      its QMP socket: `system_powerdown` for a graceful stop, `quit` for a forced
                one, `query-status` for status

Volumes are virtio-blk drives in boot order (/dev/vda is the first; bootindex 1, since a
direct kernel boot takes index 0) whose files are the NBD URIs, so QEMU itself is the NBD
client: the guest's flushes reach the export as NBD FLUSH.  The machine has no network and
no display (-nodefaults -display none) and `-no-reboot`: a guest that reboots exits, like
one that powers off.  KVM is used when `kvm_usable()` (hardware virtualization and a
/dev/kvm that creates VMs), with TCG as QEMU's own fallback (`-accel kvm -accel tcg`); TCG
otherwise.  Direct kernel boot takes `kernel`, `initrd` and `append` from `QemuConfig`.

Every method blocks (process start, QMP round trips, waits for exit): call them from worker
threads.  Calls for the same VM are serialised by a per-VM lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from zcore.adapters.base import DEFAULT_TIMEOUT, Adapter, StopMode, VMState, check_vm_name
from zcore.adapters.qmp import QMPClient
from zcore.errors import AdapterError
from zcore.records import Checkpoint

QEMU_BINARY = "qemu-system-x86_64"
# how often a wait polls the process and the QMP socket (s): QEMU opens its socket within
# ~50-150 ms of exec on these machines; 20 ms keeps a start's latency close to that
_POLL = 0.02
# a forced stop's QMP `quit` gets this long before the process is SIGKILLed (s)
_QUIT_GRACE = 3.0
# how much of qemu.log an error quotes
_LOG_TAIL = 2000

_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01) from linux/kvm.h


class Accel(StrEnum):
    """Which accelerator to use: AUTO picks KVM when /dev/kvm can create a VM."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class QemuConfig:
    """How the adapter builds a VM's QEMU command line."""

    binary: str = QEMU_BINARY
    memory_mib: int = 512
    cpus: int = 1
    accel: Accel = Accel.AUTO
    cpu: str = "max"  # valid under both KVM and TCG, so the TCG fallback cannot fail on it
    machine: str | None = None  # QEMU's default (pc) when None
    kernel: Path | None = None  # direct kernel boot (else the BIOS boots the first disk)
    initrd: Path | None = None
    append: str | None = None  # the kernel's command line
    cache: str = "writeback"  # -drive cache=: guest flushes still reach the export
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def _cpu_has_virtualization() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"vmx", "svm"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def kvm_usable() -> bool:
    """Whether KVM can run an ordinary guest: /dev/kvm opens, creates a VM, and the CPU has
    hardware virtualization (vmx or svm).  The device alone is not enough: these machines
    run under kvm_pvm, whose /dev/kvm creates VMs but runs only PVM-aware guest kernels (a
    stock Debian kernel hangs before its first console line), and their CPUs show neither
    flag; with QEMU's `-accel kvm -accel tcg` such a KVM would never fall back to TCG."""
    if not _cpu_has_virtualization():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
    except OSError:
        return False
    else:
        os.close(vm)
        return True
    finally:
        os.close(fd)


def _opt(value: str | os.PathLike[str]) -> str:
    """`value` escaped for a QEMU -drive/-chardev option list (a comma is doubled)."""
    return os.fspath(value).replace(",", ",,")


def _tail(path: Path, limit: int = _LOG_TAIL) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class QemuAdapter(Adapter):
    """Runs VMs with qemu-system-x86_64.  `config` is used for every VM not named in
    `vms`, which gives some VMs their own (memory, kernel...)."""

    name = "qemu"

    def __init__(self, run_dir: str | os.PathLike[str], config: QemuConfig | None = None,
                 vms: Mapping[str, QemuConfig] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config = config or QemuConfig()
        self.vms = dict(vms or {})
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # ---- paths -------------------------------------------------------------------------

    def vm_dir(self, vm: str) -> Path:
        return self.run_dir / check_vm_name(vm)

    def console_path(self, vm: str) -> Path:
        """The guest's serial console log (rewritten at each start)."""
        return self.vm_dir(vm) / "console.log"

    def log_path(self, vm: str) -> Path:
        """QEMU's own output (rewritten at each start)."""
        return self.vm_dir(vm) / "qemu.log"

    def _qmp_path(self, vm: str) -> Path:
        return self.vm_dir(vm) / "qmp.sock"

    def _pid_path(self, vm: str) -> Path:
        return self.vm_dir(vm) / "qemu.pid"

    def _lock(self, vm: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(vm, threading.Lock())

    # ---- the command line --------------------------------------------------------------

    def command_line(self, vm: str, nbd_uris: Sequence[str], qmp: str) -> list[str]:
        """QEMU's argv for `vm` on `nbd_uris` with its QMP socket at `qmp` (no side effect)."""
        cfg = self.vms.get(vm, self.config)
        d = self.vm_dir(vm)
        accel = cfg.accel
        if accel is Accel.AUTO:
            accel = Accel.KVM if kvm_usable() else Accel.TCG
        args = [cfg.binary, "-name", f"{_opt(vm)},process=zcore-{vm}", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot",
                "-m", str(cfg.memory_mib), "-smp", str(cfg.cpus), "-cpu", cfg.cpu]
        args += ["-accel", "kvm", "-accel", "tcg"] if accel is Accel.KVM else ["-accel", "tcg"]
        if cfg.machine:
            args += ["-machine", cfg.machine]
        args += ["-chardev", f"file,id=console,path={_opt(d / 'console.log')}",
                 "-serial", "chardev:console",
                 "-qmp", f"unix:{_opt(qmp)},server=on,wait=off",
                 "-pidfile", os.fspath(d / "qemu.pid")]
        for i, uri in enumerate(nbd_uris):
            args += ["-drive", f"file={_opt(uri)},format=raw,if=none,id=disk{i},"
                               f"cache={cfg.cache}",
                     "-device", f"virtio-blk-pci,drive=disk{i},bootindex={i + 1}"]
        if cfg.kernel is not None:
            args += ["-kernel", os.fspath(cfg.kernel)]
        if cfg.initrd is not None:
            args += ["-initrd", os.fspath(cfg.initrd)]
        if cfg.append is not None:
            args += ["-append", cfg.append]
        return args + list(cfg.extra_args)

    # ---- the process -------------------------------------------------------------------

    def _pid(self, vm: str) -> int | None:
        """The pid of `vm`'s live QEMU, or None."""
        proc = self._procs.get(vm)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            del self._procs[vm]
            return None
        # a VM this adapter did not start (the service restarted): trust the pid file only
        # while that pid is a QEMU of this VM directory (pids are reused)
        try:
            pid = int(self._pid_path(vm).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if os.fsencode(self._pid_path(vm)) not in cmdline.split(b"\0"):
            return None
        return pid

    def _wait_exit(self, vm: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._pid(vm) is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
        return True

    def _kill(self, vm: str, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc = self._procs.get(vm)
        if proc is not None:
            proc.wait()
        self._wait_exit(vm, 10.0)

    # ---- Adapter -----------------------------------------------------------------------

    def start(self, vm: str, nbd_uris: Sequence[str], checkpoint: Checkpoint | str | None,
              timeout: float = DEFAULT_TIMEOUT) -> None:
        """Launch QEMU for `vm` and block until its QMP socket answers and the VM runs
        (at most `timeout` s).  `AdapterError` when qemu-system-x86_64 is missing, the VM
        already runs, or QEMU exits or does not come up in time (QEMU's log quoted).
        `checkpoint` only names the start in QEMU's log: the URIs already show it."""
        cfg = self.vms.get(vm, self.config)
        if shutil.which(cfg.binary) is None:
            raise AdapterError(f"cannot start VM {vm}: {cfg.binary} is not installed "
                               "(Debian: apt-get install qemu-system-x86)")
        with self._lock(vm):
            if self._pid(vm) is not None:
                raise AdapterError(f"cannot start VM {vm}: it already runs")
            d = self.vm_dir(vm)
            d.mkdir(parents=True, exist_ok=True)
            for stale in (self._qmp_path(vm), self._pid_path(vm)):
                stale.unlink(missing_ok=True)
            self.console_path(vm).write_bytes(b"")
            self._launch(vm, nbd_uris, checkpoint, timeout)

    def _launch(self, vm: str, nbd_uris: Sequence[str], checkpoint: Checkpoint | str | None,
                timeout: float) -> None:
        qmp_path = self._qmp_path(vm)
        long_path = len(os.fsencode(qmp_path)) > 100
        # a socket path past sun_path's limit is bound through a directory descriptor that
        # QEMU inherits under the same number (see zcore.adapters.qmp)
        dir_fd = os.open(self.vm_dir(vm), os.O_PATH | os.O_DIRECTORY) if long_path else -1
        qmp = f"/proc/self/fd/{dir_fd}/qmp.sock" if long_path else os.fspath(qmp_path)
        argv = self.command_line(vm, nbd_uris, qmp)
        where = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        try:
            with open(self.log_path(vm), "wb") as log:
                log.write(f"zcore: starting {vm} at checkpoint {where}: {shlex.join(argv)}\n"
                          .encode())
                log.flush()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        pass_fds=(dir_fd,) if long_path else ())
        except OSError as exc:
            raise AdapterError(f"cannot start VM {vm}: {argv[0]}: {exc}") from exc
        finally:
            if long_path:
                os.close(dir_fd)
        self._procs[vm] = proc
        self._wait_running(vm, proc, timeout)

    def _wait_running(self, vm: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = proc.poll()
            if status is not None:
                self._procs.pop(vm, None)
                raise AdapterError(f"QEMU of VM {vm} exited with status {status} while "
                                   f"starting; {self.log_path(vm)} ends with:\n"
                                   f"{_tail(self.log_path(vm))}")
            if self._qmp_path(vm).exists():
                try:
                    with QMPClient(self._qmp_path(vm), timeout=5.0) as qmp:
                        if qmp.execute("query-status").get("status") == "running":
                            return
                except (OSError, EOFError, AdapterError):
                    pass  # not listening yet, or still setting up
            if time.monotonic() >= deadline:
                self._kill(vm, proc.pid)
                raise AdapterError(f"QEMU of VM {vm} did not run within {timeout:g} s and "
                                   f"was killed; {self.log_path(vm)} ends with:\n"
                                   f"{_tail(self.log_path(vm))}")
            time.sleep(_POLL)

    def _qmp(self, vm: str, command: str, timeout: float) -> object:
        """Run one QMP command; EOF (QEMU exiting) is None."""
        try:
            with QMPClient(self._qmp_path(vm), timeout=max(0.1, min(timeout, 5.0))) as qmp:
                return qmp.execute(command)
        except EOFError:
            return None
        except OSError as exc:
            # QEMU removes its socket as it exits, a moment before the process ends
            if self._wait_exit(vm, min(timeout, 2.0)):
                return None
            raise AdapterError(f"QMP of VM {vm} did not answer {command}: {exc}") from exc

    def stop(self, vm: str, mode: StopMode = StopMode.GRACEFUL,
             timeout: float = DEFAULT_TIMEOUT) -> None:
        """GRACEFUL: `system_powerdown` (the guest sees an ACPI power button) and wait up to
        `timeout` s for QEMU to exit, else `AdapterError` with the VM left running.
        FORCE: `quit`, and SIGKILL when QEMU has not exited within a few seconds."""
        mode = StopMode(mode)
        with self._lock(vm):
            pid = self._pid(vm)
            if pid is None:
                return
            if mode is StopMode.GRACEFUL:
                self._qmp(vm, "system_powerdown", timeout)
                if not self._wait_exit(vm, timeout):
                    raise AdapterError(f"VM {vm} did not power off within {timeout:g} s of "
                                       "an ACPI power-down request; it still runs (stop it "
                                       "by force, or give its guest longer)")
                return
            grace = min(timeout, _QUIT_GRACE)
            with contextlib.suppress(AdapterError):
                self._qmp(vm, "quit", grace)
            if not self._wait_exit(vm, grace):
                self._kill(vm, pid)

    def status(self, vm: str, timeout: float = DEFAULT_TIMEOUT) -> VMState:
        """STOPPED when no QEMU of `vm` lives, else RUNNING or PAUSED from `query-status`."""
        with self._lock(vm):
            if self._pid(vm) is None:
                return VMState.STOPPED
            reply = self._qmp(vm, "query-status", timeout)
        if reply is None:
            return VMState.STOPPED
        running = isinstance(reply, dict) and reply.get("status") == "running"
        return VMState.RUNNING if running else VMState.PAUSED
