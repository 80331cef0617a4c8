"""A VPG's adapter settings: which adapter starts its VMs, how, in what order, with which
scripts, checked and turned into an `Adapter` and a `BootPlan`.

Sits between the site service's recovery operations (zcore.site.operations, failover_ops,
which keep these keys in the VPG's `recovery` settings document and call this module) and
the adapters of this package.  Plain mappings in, adapters and plans out: nothing here
knows the service, its database or NBD (URIs are strings).

The keys (every one optional; `check_adapter_settings` refuses wrong types and values):

  adapter                  none (serve the exports, start nothing; scripts still run),
                           command, qemu
  start_command, stop_command, status_command
                           the command adapter's commands; each is split like a shell
                           line (shlex) and run without a shell (`sh -c '...'` for one)
  command_timeout_seconds  the timeout of every adapter call and script of the VPG that
                           names none of its own (default: the site-wide default)
  boot_order               [vm | {"vm", "delay_seconds", "timeout_seconds"}]: the VMs
                           named start first, in this order, each after its delay; the
                           VPG's other VMs after them, in name order, with no delay
  pre_scripts, post_scripts
                           [command | {"command", "timeout_seconds"}], run before the
                           first VM starts and after the last one did
  qemu                     {"memory_mib", "cpus", "accel" (auto|kvm|tcg), "cpu",
                           "machine", "binary", "kernel", "initrd", "append" (direct
                           kernel boot), "extra_args": [str], "vms": {vm: {the same keys
                           but vms}}}: the qemu adapter's QemuConfig, per VM overrides

The command adapter's scripts get, beside what zcore.adapters.command gives them, the
variables the operations gave before this package existed: ZCORE_VPG, ZCORE_PURPOSE
("test", "failover", "recovered") and ZCORE_NBD_<VOLUME> (the volume's name upper-cased,
other characters as `_`); the stop script gets the same variables as the VM's start.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zcore.adapters.base import DEFAULT_TIMEOUT, Adapter, NoneAdapter, check_vm_name
from zcore.adapters.bootplan import BootPlan, BootStep, Script
from zcore.adapters.command import CommandAdapter
from zcore.adapters.qemu import Accel, QemuAdapter, QemuConfig
from zcore.errors import ConfigError
from zcore.records import Checkpoint

ADAPTERS = ("command", "none", "qemu")
_QEMU_SCALARS: dict[str, type] = {"memory_mib": int, "cpus": int, "accel": str, "cpu": str,
                                  "machine": str, "binary": str, "kernel": str,
                                  "initrd": str, "append": str}
_QEMU_PATHS = ("kernel", "initrd")
ADAPTER_KEYS = ("adapter", "start_command", "stop_command", "status_command",
                "command_timeout_seconds", "boot_order", "pre_scripts", "post_scripts", "qemu")


def _positive(key: str, value: Any, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"recovery setting {key} must be a number")
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"recovery setting {key} must be "
                          f"{'zero or more' if zero else 'positive'}")
    return float(value)


def _command(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"recovery setting {key} must be a non-empty command line")
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"recovery setting {key}: {value!r} does not split: {exc}") from None
    return value


def _boot_order(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError("recovery setting boot_order must be a list of VM names or "
                          "{vm, delay_seconds, timeout_seconds}")
    out: list[dict[str, Any]] = []
    for entry in value:
        doc = {"vm": entry} if isinstance(entry, str) else entry
        if not isinstance(doc, dict) or not isinstance(doc.get("vm"), str) or \
                set(doc) - {"vm", "delay_seconds", "timeout_seconds"}:
            raise ConfigError(f"boot_order entry {entry!r} is not a VM name or "
                              "{vm, delay_seconds, timeout_seconds}")
        step: dict[str, Any] = {"vm": check_vm_name(doc["vm"])}
        if doc.get("delay_seconds") is not None:
            step["delay_seconds"] = _positive("delay_seconds", doc["delay_seconds"], zero=True)
        if doc.get("timeout_seconds") is not None:
            step["timeout_seconds"] = _positive("timeout_seconds", doc["timeout_seconds"])
        out.append(step)
    names = [s["vm"] for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"boot_order names a VM twice: {names}")
    return out


def _scripts(key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(f"recovery setting {key} must be a list of commands or "
                          "{command, timeout_seconds}")
    out: list[dict[str, Any]] = []
    for entry in value:
        doc = {"command": entry} if isinstance(entry, str) else entry
        if not isinstance(doc, dict) or set(doc) - {"command", "timeout_seconds"}:
            raise ConfigError(f"{key} entry {entry!r} is not a command or "
                              "{command, timeout_seconds}")
        script: dict[str, Any] = {"command": _command(key, doc.get("command"))}
        if doc.get("timeout_seconds") is not None:
            script["timeout_seconds"] = _positive("timeout_seconds", doc["timeout_seconds"])
        out.append(script)
    return out


def _qemu_part(value: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "extra_args":
            if not isinstance(item, list) or not all(isinstance(a, str) for a in item):
                raise ConfigError(f"{where}.extra_args must be a list of strings")
            out[key] = list(item)
            continue
        kind = _QEMU_SCALARS.get(key)
        if kind is None:
            raise ConfigError(f"unknown setting {where}.{key}; known: "
                              f"{', '.join(sorted([*_QEMU_SCALARS, 'extra_args']))}")
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ConfigError(f"{where}.{key} must be a {kind.__name__}")
        if isinstance(item, int) and item <= 0:
            raise ConfigError(f"{where}.{key} must be positive")
        if key == "accel" and item not in set(Accel):
            raise ConfigError(f"{where}.accel must be one of {', '.join(Accel)}")
        if key in _QEMU_PATHS and not (isinstance(item, str) and Path(item).is_absolute()):
            raise ConfigError(f"{where}.{key} must be an absolute path")
        out[key] = item
    return out


def _qemu(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError("recovery setting qemu must be an object (memory_mib, kernel...)")
    vms = value.get("vms") or {}
    if not isinstance(vms, dict):
        raise ConfigError("qemu.vms must map VM names to their own qemu settings")
    out = _qemu_part({k: v for k, v in value.items() if k != "vms"}, "qemu")
    if vms:
        out["vms"] = {}
        for vm, part in vms.items():
            if not isinstance(part, dict):
                raise ConfigError(f"qemu.vms.{vm} must be an object")
            out["vms"][check_vm_name(vm)] = _qemu_part(part, f"qemu.vms.{vm}")
    return out


def check_adapter_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter keys of `settings` (others are ignored), checked and normalised:
    `ConfigError` saying which key is wrong and why."""
    out: dict[str, Any] = {}
    for key in ADAPTER_KEYS:
        value = settings.get(key)
        if value is None:
            continue
        if key == "adapter":
            if value not in ADAPTERS:
                raise ConfigError(f"unknown hypervisor adapter {value!r}; known: "
                                  f"{', '.join(ADAPTERS)}")
            out[key] = value
        elif key.endswith("_command"):
            out[key] = _command(key, value)
        elif key == "command_timeout_seconds":
            out[key] = _positive(key, value)
        elif key == "boot_order":
            out[key] = _boot_order(value)
        elif key in ("pre_scripts", "post_scripts"):
            out[key] = _scripts(key, value)
        else:
            out[key] = _qemu(value)
    if out.get("adapter") == "command" and not out.get("start_command"):
        raise ConfigError("the command adapter needs `start_command` in the VPG's recovery "
                          "settings")
    return out


def qemu_config(settings: Mapping[str, Any]) -> tuple[QemuConfig, dict[str, QemuConfig]]:
    """The qemu adapter's config and per-VM configs from checked settings' `qemu`."""
    doc = dict(settings.get("qemu") or {})
    vms = doc.pop("vms", {})

    def build(base: QemuConfig, part: Mapping[str, Any]) -> QemuConfig:
        kw: dict[str, Any] = {}
        for key, value in part.items():
            if key in _QEMU_PATHS:
                kw[key] = Path(value)
            elif key == "extra_args":
                kw[key] = tuple(value)
            elif key == "accel":
                kw[key] = Accel(value)
            else:
                kw[key] = value
        return dataclasses.replace(base, **kw)

    config = build(QemuConfig(), doc)
    return config, {vm: build(config, part) for vm, part in vms.items()}


def volume_var(volume: str) -> str:
    """ZCORE_NBD_<VOLUME>: a volume's variable in a command adapter's environment."""
    return "ZCORE_NBD_" + re.sub(r"[^A-Z0-9]", "_", volume.upper())


def make_adapter(settings: Mapping[str, Any], *, run_dir: Path, vpg: str = "",
                 purpose: str = "",
                 volumes: Mapping[str, Mapping[str, str]] | None = None) -> Adapter:
    """The adapter checked `settings` name (default `none`).  `run_dir` holds the qemu
    adapter's VM directories; `vpg`, `purpose` and `volumes` (vm -> volume -> URI) go into
    a command adapter's environment."""
    name = settings.get("adapter") or "none"
    if name == "none":
        return NoneAdapter()
    if name == "qemu":
        config, vms = qemu_config(settings)
        return QemuAdapter(run_dir, config, vms)
    if name != "command":
        raise ConfigError(f"unknown hypervisor adapter {name!r}; known: {', '.join(ADAPTERS)}")

    def split(key: str) -> list[str] | None:
        value = settings.get(key)
        return shlex.split(value) if value else None

    start = split("start_command")
    if start is None:
        raise ConfigError("the command adapter needs `start_command` in the VPG's recovery "
                          "settings")
    per_vm = {vm: {volume_var(v): uri for v, uri in vols.items()}
              for vm, vols in (volumes or {}).items()}
    return CommandAdapter(start, split("stop_command"), split("status_command"),
                          env={"ZCORE_VPG": vpg, "ZCORE_PURPOSE": purpose}, vm_env=per_vm)


def boot_steps(settings: Mapping[str, Any],
               vms: Mapping[str, Sequence[str]]) -> list[BootStep]:
    """The boot order of `vms` (vm -> its NBD URIs, boot disk first) under checked
    `settings`: `boot_order`'s VMs first (ones the VPG lacks are skipped), then the rest
    in name order."""
    steps: list[BootStep] = []
    for entry in settings.get("boot_order") or []:
        vm = entry["vm"]
        if vm in vms:
            steps.append(BootStep(vm, tuple(vms[vm]), float(entry.get("delay_seconds", 0.0)),
                                  entry.get("timeout_seconds")))
    named = {s.vm for s in steps}
    steps += [BootStep(vm, tuple(vms[vm])) for vm in sorted(vms) if vm not in named]
    return steps


def boot_plan(adapter: Adapter, settings: Mapping[str, Any],
              vms: Mapping[str, Sequence[str]], *, checkpoint: Checkpoint | str | None,
              vpg: str, operation: str, default_timeout: float = DEFAULT_TIMEOUT,
              cancel: threading.Event | None = None) -> BootPlan:
    """The BootPlan of one operation on `vms` (vm -> NBD URIs) under checked `settings`:
    its boot order, pre and post scripts, and `command_timeout_seconds` (else
    `default_timeout`, the site-wide default) for every step naming no timeout."""
    def scripts(key: str) -> list[Script]:
        return [Script(shlex.split(s["command"]), s.get("timeout_seconds"))
                for s in settings.get(key) or []]

    timeout = float(settings.get("command_timeout_seconds") or default_timeout)
    return BootPlan(adapter, boot_steps(settings, vms), checkpoint=checkpoint, vpg=vpg,
                    operation=operation, pre=scripts("pre_scripts"),
                    post=scripts("post_scripts"), default_timeout=timeout, cancel=cancel)
