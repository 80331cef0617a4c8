"""The `command` adapter: the user's own start, stop and status scripts.

For hypervisors zcore does not drive itself (libvirt, Proxmox, a cloud's CLI...): the user
gives three commands and zcore runs them (`zcore.adapters.scripts.run_script`) with the VM
described in their environment:

  ZCORE_VM            the VM's name
  ZCORE_CHECKPOINT    the checkpoint's id (empty when the VM runs on plain volumes);
                      with a zcore Checkpoint also ZCORE_CHECKPOINT_TIME_NS, _KIND and _TAG
  ZCORE_NBD_URIS      its volumes' NBD URIs, space-separated, boot disk first
  ZCORE_NBD_COUNT, ZCORE_NBD_URI_0, ZCORE_NBD_URI_1...   the same one by one
  ZCORE_STOP_MODE     (stop script) "graceful" or "force"
  ZCORE_TIMEOUT       the seconds the script is given before it is killed

A VM's stop script gets the variables its start script got (the adapter keeps them while
it lives), plus ZCORE_STOP_MODE; a VM the adapter did not start gets ZCORE_VM and its
`vm_env`.  A
stop or status command may be None: stopping runs nothing, a status query is an error.

The start script must return once the VM runs (a VM process it launches may stay behind).
The status script's exit status says whether the VM runs, as LSB init scripts do: 0 runs,
1, 2 or 3 does not run (3 is LSB's "not running"); any other status is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from zcore.adapters.base import DEFAULT_TIMEOUT, Adapter, StopMode, VMState, check_vm_name, vm_env
from zcore.adapters.scripts import Command, run_script
from zcore.errors import AdapterError
from zcore.records import Checkpoint

# exit statuses of a status script that mean "does not run" (LSB: 1 dead with a pid file,
# 2 dead with a lock file, 3 not running)
NOT_RUNNING_STATUS = (1, 2, 3)


class CommandAdapter(Adapter):
    """Runs the user's `start`, `stop` and `status` commands (each a shell command line or
    an argv list; stop and status may be None).  `env` adds fixed variables to every call,
    `vm_env` variables to the calls of one VM; `cwd` is their directory."""

    name = "command"

    def __init__(self, start: Command, stop: Command | None, status: Command | None, *,
                 env: Mapping[str, str] | None = None,
                 vm_env: Mapping[str, Mapping[str, str]] | None = None,
                 cwd: str | None = None) -> None:
        self.start_command = start
        self.stop_command = stop
        self.status_command = status
        self.env = dict(env or {})
        self.vm_env = {vm: dict(e) for vm, e in (vm_env or {}).items()}
        self.cwd = cwd
        self._started: dict[str, dict[str, str]] = {}  # vm -> its start script's variables

    def _env(self, extra: Mapping[str, str], timeout: float) -> dict[str, str]:
        return {**self.env, **extra, "ZCORE_TIMEOUT": f"{timeout:g}"}

    def start(self, vm: str, nbd_uris: Sequence[str], checkpoint: Checkpoint | str | None,
              timeout: float = DEFAULT_TIMEOUT) -> None:
        """Run the start script (blocking, at most `timeout` s); `ScriptError` when it
        fails or times out."""
        check_vm_name(vm)
        described = {**self.vm_env.get(vm, {}), **vm_env(vm, nbd_uris, checkpoint)}
        run_script(self.start_command, self._env(described, timeout), timeout,
                   what=f"start script of VM {vm}", cwd=self.cwd)
        self._started[vm] = described

    def stop(self, vm: str, mode: StopMode = StopMode.GRACEFUL,
             timeout: float = DEFAULT_TIMEOUT) -> None:
        """Run the stop script with ZCORE_STOP_MODE (blocking, at most `timeout` s)."""
        check_vm_name(vm)
        if self.stop_command is None:
            self._started.pop(vm, None)
            return
        described = self._started.get(vm) or {**self.vm_env.get(vm, {}), "ZCORE_VM": vm}
        env = self._env({**described, "ZCORE_STOP_MODE": str(StopMode(mode))}, timeout)
        run_script(self.stop_command, env, timeout, what=f"stop script of VM {vm}",
                   cwd=self.cwd)
        self._started.pop(vm, None)

    def status(self, vm: str, timeout: float = DEFAULT_TIMEOUT) -> VMState:
        """Run the status script (blocking): exit 0 RUNNING, 1-3 STOPPED, else ScriptError."""
        check_vm_name(vm)
        if self.status_command is None:
            raise AdapterError(f"cannot tell whether VM {vm} runs: its VPG's command adapter "
                               "has no status command")
        env = self._env({**self.vm_env.get(vm, {}), "ZCORE_VM": vm}, timeout)
        result = run_script(self.status_command, env, timeout,
                            what=f"status script of VM {vm}",
                            ok_status=(0, *NOT_RUNNING_STATUS), cwd=self.cwd)
        return VMState.RUNNING if result.status == 0 else VMState.STOPPED
