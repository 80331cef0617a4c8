"""What the real-VM scenarios through two site services share (no tests here): the
scenario's time budget, waits for a task and for a tag to reach the recovery site, and a
wait for a marker on a guest's serial console.  Used by tests/vm/; the guest kit itself
is tests/helpers/vm.py, the site processes tests/helpers/site.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from helpers.site import ok, wait_for
from zcore.adapters import QemuAdapter, VMState

BOOT_S = 120.0  # one boot, generous for TCG on a loaded 2-core machine


class Budget:
    """The scenario's deadline: each wait gets what is left, at most its own timeout."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self, at_most: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the real-VM scenario ran past its {self.seconds:g} s "
                                 "budget")
        return min(left, at_most)


def wait_task(client: httpx.Client, task: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The task once it ended; it must have succeeded."""
    def done() -> dict[str, Any] | None:
        t: dict[str, Any] = ok(client.get(f"/tasks/{task['id']}"))
        return t if t["state"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for("the task", done, timeout=budget.left(120))
    assert result["state"] == "succeeded", result
    return result


def tag(ca: httpx.Client, cb: httpx.Client, name: str, budget: Budget,
        vpg: str = "g1") -> int:
    """Tag a checkpoint of `vpg` at A and wait until B holds it (replicated into B's
    journal); its id."""
    t = ok(ca.post(f"/vpgs/{vpg}/checkpoints", json={"tag": name}), 201)
    wait_for(f"{name} at B", lambda: ok(cb.get(f"/vpgs/{vpg}/checkpoints",
                                               params={"tag": name}))["items"],
             timeout=budget.left(120))
    return int(t["id"])


def console_until(path: Path, marker: str, budget: Budget,
                  adapter: QemuAdapter | None = None, vm: str = "vm1") -> str:
    """The console log once it shows `marker` (fails early when the VM is gone without)."""
    deadline = time.monotonic() + budget.left(BOOT_S)
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text:
            return text
        gone = adapter is not None and adapter.status(vm) is VMState.STOPPED
        if gone or time.monotonic() > deadline:
            raise AssertionError(f"{marker!r} not on the console {path}:\n{text[-3000:]}")
        time.sleep(0.1)
