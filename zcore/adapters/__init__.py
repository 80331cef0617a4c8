"""Hypervisor adapters: how recovery operations start and stop VMs on their NBD exports.

A library below the site service's operations and beside the NBD server: it takes NBD
URIs, a VM's name and a checkpoint, and knows nothing of journals or the service.

- `base`: the `Adapter` interface (`start`, `stop`, `status`; every call blocks, so the
  service calls them in worker threads), `VMState`, `StopMode`;
- `command`: the user's start/stop/status scripts, with the VM in their environment;
- `qemu`: qemu-system-x86_64 on the NBD exports (virtio-blk, serial console to a file,
  QMP for power-down, quit and status; KVM when usable, TCG otherwise);
- `bootplan`: a VPG's boot order with delays and its pre-/post-operation scripts;
- `scripts`: running one user script with a timeout (the one way this package does it);
- `qmp`: the small QMP client the qemu adapter uses.

Failures are `zcore.errors.AdapterError`; a user's script that fails or times out is a
`zcore.errors.ScriptError` naming it, with its exit status and the tail of its output.
"""

from __future__ import annotations

from zcore.adapters.base import (
    DEFAULT_TIMEOUT,
    Adapter,
    StopMode,
    VMState,
    check_vm_name,
    checkpoint_env,
    vm_env,
)
from zcore.adapters.bootplan import (
    BootPlan,
    BootPlanError,
    BootReport,
    BootStep,
    Script,
    StepKind,
    StepResult,
)
from zcore.adapters.command import CommandAdapter
from zcore.adapters.qemu import QEMU_BINARY, Accel, QemuAdapter, QemuConfig, kvm_usable
from zcore.adapters.scripts import Command, ScriptResult, run_script
from zcore.errors import AdapterError, ScriptError

__all__ = [
    "DEFAULT_TIMEOUT",
    "QEMU_BINARY",
    "Accel",
    "Adapter",
    "AdapterError",
    "BootPlan",
    "BootPlanError",
    "BootReport",
    "BootStep",
    "Command",
    "CommandAdapter",
    "QemuAdapter",
    "QemuConfig",
    "Script",
    "ScriptError",
    "ScriptResult",
    "StepKind",
    "StepResult",
    "StopMode",
    "VMState",
    "check_vm_name",
    "checkpoint_env",
    "kvm_usable",
    "run_script",
    "vm_env",
]
