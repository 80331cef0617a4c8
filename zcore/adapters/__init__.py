"""Hypervisor adapters: how recovery operations start and stop VMs on their NBD exports.

A library below the site service's operations and beside the NBD server: it takes NBD
URIs, a VM's name and a checkpoint, and knows nothing of journals or the service.

- `base`: the `Adapter` interface (`start`, `stop`, `status`; every call blocks, so the
  service calls them in worker threads), `VMState`, `StopMode`;
- `command`: the user's start/stop/status scripts, with the VM in their environment;
- `qemu`: qemu-system-x86_64 on the NBD exports (virtio-blk, serial console to a file,
  QMP for power-down, quit and status; KVM when usable, TCG otherwise);
- `settings`: a VPG's adapter settings (adapter, commands, boot order, scripts, qemu),
  checked, and the `Adapter` and `BootPlan` they make;
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
    NoneAdapter,
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
from zcore.adapters.settings import (
    ADAPTER_KEYS,
    ADAPTERS,
    boot_plan,
    boot_steps,
    check_adapter_settings,
    make_adapter,
    qemu_config,
    volume_var,
)
from zcore.errors import AdapterError, ScriptError

__all__ = [
    "ADAPTERS",
    "ADAPTER_KEYS",
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
    "NoneAdapter",
    "QemuAdapter",
    "QemuConfig",
    "Script",
    "ScriptError",
    "ScriptResult",
    "StepKind",
    "StepResult",
    "StopMode",
    "VMState",
    "boot_plan",
    "boot_steps",
    "check_adapter_settings",
    "check_vm_name",
    "checkpoint_env",
    "kvm_usable",
    "make_adapter",
    "qemu_config",
    "run_script",
    "vm_env",
    "volume_var",
]
