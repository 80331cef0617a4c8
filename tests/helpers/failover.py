"""Two real site services for the recovery-operation tests: protect a VM from site A to
site B through the REST API, tag checkpoints, wait for tasks, and read or write the
served volumes with qemu-io."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from helpers.site import SiteProcess, ok, wait_for

MiB = 1 << 20
DISK = 16 * MiB


def qemu_io(uri: str, *commands: str, readonly: bool = False) -> str:
    args = ["qemu-io", "-f", "raw", *(["-r"] if readonly else [])]
    for c in commands:
        args += ["-c", c]
    done = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, (
        done.stdout + done.stderr)
    return done.stdout


def wait_task(client: httpx.Client, task: dict[str, Any], timeout: float = 60,
              state: str = "succeeded") -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        t: dict[str, Any] = ok(client.get(f"/tasks/{task['id']}"))
        return t if t["state"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for("the task", done, timeout=timeout)
    assert result["state"] == state, result
    return result


def tag(ca: httpx.Client, cb: httpx.Client, name: str, vpg: str = "g1") -> int:
    """Tag a checkpoint at the protected site; its id once the recovery site lists it."""
    t = ok(ca.post(f"/vpgs/{vpg}/checkpoints", json={"tag": name}), 201)
    wait_for(f"{name} at the recovery site", lambda: ok(cb.get(
        f"/vpgs/{vpg}/checkpoints", params={"tag": name}))["items"])
    return int(t["id"])


def pair(a: SiteProcess, b: SiteProcess, address: str | None = None) -> dict[str, Any]:
    """A pairs with B (A learns B's replication address, or `address`: a proxy in front
    of it); returns B's peer record."""
    ca, cb = a.client(), b.client()
    token = ok(cb.post("/pairing/tokens"))["token"]
    peer: dict[str, Any] = ok(ca.post("/pairing", json={"address": address or b.replication,
                                                        "token": token}))
    return peer


def protect(a: SiteProcess, b: SiteProcess, disk: Path, size: int = DISK,
            settings: dict[str, Any] | None = None,
            address: str | None = None) -> tuple[httpx.Client, httpx.Client]:
    """Pair A with B (at `address`, if given) and protect VM vm1 (one volume, disk0 on
    `disk`) as VPG g1."""
    ca, cb = a.client(), b.client()
    beta = pair(a, b, address)
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(size)
    ok(ca.post("/vms", json={"name": "vm1", "volumes": [
        {"name": "disk0", "size": size, "path": str(disk)}]}), 201)
    wait_task(ca, ok(ca.post("/vpgs", json={
        "name": "g1", "vms": ["vm1"], "peer": beta["site_id"],
        "settings": settings or {"checkpoint_interval_seconds": 1}}), 202))
    return ca, cb
