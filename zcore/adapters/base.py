"""The hypervisor adapter interface: how recovery operations start, stop and query a VM.

Sits below the recovery operations of the site service and above the hypervisor: an
operation hands an adapter a VM's name, the NBD URIs of its volumes (in boot order) and the
checkpoint they show; the adapter makes a VM run on them.  Nothing here knows the site
service, journals or NBD: URIs are opaque strings.

Every method of an `Adapter` blocks (it runs processes, waits on sockets, sleeps); the site
service calls them in worker threads, never on its event loop.  An adapter may be called
from several threads at once for different VMs.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from enum import StrEnum

from zcore.errors import ConfigError
from zcore.records import Checkpoint

# The timeout a step gets when neither it nor its plan names one: the site-wide default
# of pre-/post-operation scripts and adapter calls (seconds).
DEFAULT_TIMEOUT = 300.0

_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class VMState(StrEnum):
    """What an adapter reports of a VM."""

    RUNNING = "running"
    PAUSED = "paused"  # the hypervisor holds the VM but its CPUs do not run (QEMU: not "running")
    STOPPED = "stopped"  # no process / the status script says it does not run


class StopMode(StrEnum):
    """How to stop a VM: ask the guest to power off (ACPI), or end it at once."""

    GRACEFUL = "graceful"
    FORCE = "force"


class Adapter(abc.ABC):
    """Starts and stops the VMs of recovery operations on one hypervisor.

    All methods block; call them from worker threads."""

    name: str = "adapter"

    @abc.abstractmethod
    def start(self, vm: str, nbd_uris: Sequence[str], checkpoint: Checkpoint | str | None,
              timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start `vm` on the volumes `nbd_uris` (first = boot disk), which show
        `checkpoint` (None: plain volumes, no checkpoint).  Blocks until the hypervisor
        runs the VM (not until the guest has booted) or `timeout` seconds passed; raises
        `AdapterError` (`ScriptError` for a user's script) when it did not start."""

    @abc.abstractmethod
    def stop(self, vm: str, mode: StopMode = StopMode.GRACEFUL,
             timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop `vm` and block until it no longer runs or `timeout` seconds passed.
        GRACEFUL asks the guest to power off and raises `AdapterError` when it has not
        within `timeout` (the VM is left running: the caller may stop it by FORCE).
        Stopping a VM that does not run is not an error."""

    @abc.abstractmethod
    def status(self, vm: str, timeout: float = DEFAULT_TIMEOUT) -> VMState:
        """Whether `vm` runs (blocks up to `timeout` seconds)."""


class NoneAdapter(Adapter):
    """Starts nothing: an operation's exports are served and the user attaches VMs to them
    (or its pre-/post-operation scripts do).  Every VM reads as STOPPED."""

    name = "none"

    def start(self, vm: str, nbd_uris: Sequence[str], checkpoint: Checkpoint | str | None,
              timeout: float = DEFAULT_TIMEOUT) -> None:
        check_vm_name(vm)

    def stop(self, vm: str, mode: StopMode = StopMode.GRACEFUL,
             timeout: float = DEFAULT_TIMEOUT) -> None:
        check_vm_name(vm)

    def status(self, vm: str, timeout: float = DEFAULT_TIMEOUT) -> VMState:
        check_vm_name(vm)
        return VMState.STOPPED


def check_vm_name(vm: str) -> str:
    """`vm` when it can name a VM's files and processes (letters, digits, '.', '_', '-',
    at most 128, not starting with a punctuation mark); else `ConfigError`."""
    if not _VM_NAME.fullmatch(vm):
        raise ConfigError(f"VM name {vm!r} is not usable: letters, digits, '.', '_' and '-' "
                          "only, at most 128, starting with a letter or digit")
    return vm


def checkpoint_env(checkpoint: Checkpoint | str | None) -> dict[str, str]:
    """The environment variables that describe `checkpoint` to a user's script:
    ZCORE_CHECKPOINT (its id; empty for None) and, for a `Checkpoint`,
    ZCORE_CHECKPOINT_TIME_NS, ZCORE_CHECKPOINT_KIND and ZCORE_CHECKPOINT_TAG."""
    if checkpoint is None:
        return {"ZCORE_CHECKPOINT": ""}
    if isinstance(checkpoint, str):
        return {"ZCORE_CHECKPOINT": checkpoint}
    return {
        "ZCORE_CHECKPOINT": str(checkpoint.id),
        "ZCORE_CHECKPOINT_TIME_NS": str(checkpoint.time_ns),
        "ZCORE_CHECKPOINT_KIND": str(checkpoint.kind),
        "ZCORE_CHECKPOINT_TAG": checkpoint.tag or "",
    }


def vm_env(vm: str, nbd_uris: Sequence[str],
           checkpoint: Checkpoint | str | None) -> dict[str, str]:
    """The environment of a VM's start script: ZCORE_VM, the checkpoint's variables,
    ZCORE_NBD_URIS (the URIs separated by spaces, in boot order; NBD URIs hold no spaces),
    ZCORE_NBD_COUNT and ZCORE_NBD_URI_0, ZCORE_NBD_URI_1..."""
    env = {"ZCORE_VM": vm, **checkpoint_env(checkpoint)}
    env["ZCORE_NBD_URIS"] = " ".join(nbd_uris)
    env["ZCORE_NBD_COUNT"] = str(len(nbd_uris))
    for i, uri in enumerate(nbd_uris):
        env[f"ZCORE_NBD_URI_{i}"] = uri
    return env
