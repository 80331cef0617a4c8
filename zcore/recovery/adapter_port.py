"""How a recovery operation starts and stops VMs: the small hypervisor-adapter interface
the operations call, and the two adapters they need until the full adapters
(zcore.adapters: `command` with boot order and scripts, `qemu`) are wired in.

Sits under the operations (zcore.recovery.test_op, failover) and over the hypervisor.
An operation hands the adapter one `VmBoot` per VM: the VM's name, its VPG, the
checkpoint, why (test, failover) and the NBD URI of each of its volumes.  Calls block
(a worker thread runs them).  A VPG names its adapter in its recovery settings
(`adapter`): `none` serves the exports and starts nothing (the user attaches VMs
themselves), `command` runs the user's start and stop commands with the VM in their
environment.

Environment of a `command` adapter's commands: ZCORE_VPG, ZCORE_VM, ZCORE_PURPOSE,
ZCORE_CHECKPOINT (id), ZCORE_CHECKPOINT_TAG, ZCORE_NBD_URIS (space-separated, volumes
in name order) and ZCORE_NBD_<VOLUME> (the volume's name upper-cased, non-alphanumerics
as `_`).  A command that fails or passes its timeout raises AdapterError.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from zcore.errors import ConfigError, ZcoreError
from zcore.records import Checkpoint

# Default seconds a `command` adapter's command may run (the site-wide default
# timeout for scripts belongs to zcore.adapters; this is its stand-in).
DEFAULT_COMMAND_TIMEOUT = 300.0


class AdapterError(ZcoreError, RuntimeError):
    """A VM could not be started or stopped by its adapter."""


@dataclass(frozen=True)
class VmBoot:
    """One VM an operation starts: where its volumes are served."""

    vpg: str
    vm: str
    checkpoint: Checkpoint
    purpose: str  # "test", "failover"
    exports: Mapping[str, str] = field(default_factory=dict)  # volume -> NBD URI


class HypervisorAdapter(Protocol):
    name: str

    def start(self, vm: VmBoot) -> None: ...

    def stop(self, vm: VmBoot) -> None: ...


class NoneAdapter:
    """Starts nothing: the operation's exports are served and the user attaches to them."""

    name = "none"

    def start(self, vm: VmBoot) -> None:
        return None

    def stop(self, vm: VmBoot) -> None:
        return None


def vm_environment(vm: VmBoot) -> dict[str, str]:
    env = {"ZCORE_VPG": vm.vpg, "ZCORE_VM": vm.vm, "ZCORE_PURPOSE": vm.purpose,
           "ZCORE_CHECKPOINT": str(vm.checkpoint.id),
           "ZCORE_CHECKPOINT_TAG": vm.checkpoint.tag or "",
           "ZCORE_NBD_URIS": " ".join(vm.exports[v] for v in sorted(vm.exports))}
    for volume, uri in vm.exports.items():
        env["ZCORE_NBD_" + re.sub(r"[^A-Z0-9]", "_", volume.upper())] = uri
    return env


class CommandAdapter:
    """Runs `start_command` / `stop_command` (shell-split, no shell) per VM."""

    name = "command"

    def __init__(self, start_command: str | None, stop_command: str | None = None,
                 timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self.start_command = start_command
        self.stop_command = stop_command
        self.timeout = timeout

    def _run(self, command: str | None, vm: VmBoot, what: str) -> None:
        if not command:
            return
        try:
            done = subprocess.run(shlex.split(command), env={**os.environ, **vm_environment(vm)},
                                  capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise AdapterError(f"{what} of VM {vm.vm}: {command!r} ran past its "
                               f"{self.timeout:g} s timeout") from None
        except OSError as exc:
            raise AdapterError(f"{what} of VM {vm.vm}: cannot run {command!r}: "
                               f"{exc.strerror or exc}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-500:]
            raise AdapterError(f"{what} of VM {vm.vm}: {command!r} exited with "
                               f"{done.returncode}: {tail or 'no output'}")

    def start(self, vm: VmBoot) -> None:
        self._run(self.start_command, vm, "start")

    def stop(self, vm: VmBoot) -> None:
        self._run(self.stop_command, vm, "stop")


AdapterFactory = Callable[[Mapping[str, Any]], HypervisorAdapter]


def _command(settings: Mapping[str, Any]) -> HypervisorAdapter:
    start = settings.get("start_command")
    if not start:
        raise ConfigError("the command adapter needs `start_command` in the VPG's recovery "
                          "settings")
    return CommandAdapter(start, settings.get("stop_command"),
                          float(settings.get("command_timeout_seconds",
                                             DEFAULT_COMMAND_TIMEOUT)))


# adapter name -> factory over the VPG's recovery settings; zcore.adapters registers its
# own here when it lands (`register_adapter`)
ADAPTERS: dict[str, AdapterFactory] = {"none": lambda _s: NoneAdapter(), "command": _command}


def register_adapter(name: str, factory: AdapterFactory) -> None:
    ADAPTERS[name] = factory


def make_adapter(settings: Mapping[str, Any]) -> HypervisorAdapter:
    """The adapter a VPG's recovery settings name (`adapter`, default `none`)."""
    name = str(settings.get("adapter") or "none")
    factory = ADAPTERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown hypervisor adapter {name!r}; known: "
                          f"{', '.join(sorted(ADAPTERS))}")
    return factory(settings)
