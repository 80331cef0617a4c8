"""`zcore demo --ui`: two real site services left running for a look in the browser.

Sits beside the UI (zcore.site.ui) and over the site service's command line: two site
directories ("protected" and "recovery") are initialised under the demo's directory, each
served by its own `zcore site serve` process on free loopback ports; through the REST API
they are paired both ways (so reverse protection and failback work too), a VM `web` with a
64 MiB disk is protected as VPG `demo-vpg`, and a checkpoint is tagged.  The UI's URL and
a token of each site are printed; the sites run until Ctrl-C (or SIGTERM), then stop
cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from zcore.errors import ZcoreError
from zcore.site.config import init_site

START_TIMEOUT = 60.0
TASK_TIMEOUT = 120.0
DISK_BYTES = 64 << 20
VPG = "demo-vpg"


@dataclass
class DemoSite:
    name: str
    root: Path
    token: str
    proc: subprocess.Popen[str]
    api_url: str = ""
    replication: str = ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.api_url}/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})


def _zcore() -> list[str]:
    """The installed console script beside this interpreter, else `-m zcore.cli`."""
    script = Path(sys.executable).parent / "zcore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "zcore.cli"]


def _serve(root: Path, log: Path) -> subprocess.Popen[str]:
    with open(log, "a") as logf:
        return subprocess.Popen(
            [*_zcore(), "site", "serve", str(root), "--api-port", "0",
             "--replication-port", "0", "--nbd-port", "0"],
            stdout=subprocess.PIPE, stderr=logf, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _listeners(site: DemoSite, log: Path) -> None:
    """Wait for the service's listener lines (API first, then replication)."""
    lines: list[str] = []

    def read() -> None:
        assert site.proc.stdout is not None
        for line in site.proc.stdout:
            lines.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while len(lines) < 3:
        if site.proc.poll() is not None or time.monotonic() > deadline:
            raise ZcoreError(f"the {site.name} site did not start; its log: {log}")
        time.sleep(0.05)
    site.api_url = lines[0].removeprefix("API: ")
    site.replication = lines[1].removeprefix("replication: ")


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise ZcoreError(f"{response.request.method} {response.request.url.path}: "
                         f"{response.status_code} {response.text}")
    return response.json() if response.content else None


def _wait_task(client: httpx.Client, task: dict[str, Any]) -> None:
    deadline = time.monotonic() + TASK_TIMEOUT
    while task["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise ZcoreError(f"task {task['kind']} did not end in {TASK_TIMEOUT:.0f} s")
        time.sleep(0.2)
        task = _ok(client.get(f"/tasks/{task['id']}"))
    if task["state"] != "succeeded":
        raise ZcoreError(f"task {task['kind']} {task['state']}: {task['error']}")


def _pair(a: DemoSite, b: DemoSite) -> dict[str, Any]:
    """`a` pairs with `b`: b's peer record at a."""
    with a.client() as ca, b.client() as cb:
        token = _ok(cb.post("/pairing/tokens"))["token"]
        peer: dict[str, Any] = _ok(ca.post("/pairing", json={"address": b.replication,
                                                             "token": token}))
        return peer


def _protect(prot: DemoSite, rec: DemoSite, base: Path, say: Callable[[str], None]) -> None:
    peer = _pair(prot, rec)
    _pair(rec, prot)  # for reverse protection and failback from the UI
    disk = base / "web-disk0.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    with prot.client() as c:
        _ok(c.post("/vms", json={"name": "web", "volumes": [
            {"name": "disk0", "size": DISK_BYTES, "path": str(disk)}]}))
        say(f"protecting VM web (64 MiB) as VPG {VPG!r} from {prot.name} to {rec.name}")
        _wait_task(c, _ok(c.post("/vpgs", json={"name": VPG, "vms": ["web"],
                                               "peer": peer["site_id"]})))
        _ok(c.post(f"/vpgs/{VPG}/checkpoints", json={"tag": "demo-start"}))


@contextlib.contextmanager
def demo_sites(base: Path, say: Callable[[str], None]) -> Iterator[list[DemoSite]]:
    """Both sites started, paired and protecting; stopped (SIGTERM, then kill) on exit."""
    base.mkdir(parents=True, exist_ok=True)
    sites: list[DemoSite] = []
    try:
        for name in ("protected", "recovery"):
            root = base / f"{name}-site"
            result = init_site(root, name, api_port=0)
            log = base / f"{name}-site.log"
            sites.append(DemoSite(name, root, result.token, _serve(root, log)))
            _listeners(sites[-1], log)
        _protect(sites[0], sites[1], base, say)
        yield sites
    finally:
        for site in sites:
            if site.proc.poll() is None:
                site.proc.send_signal(signal.SIGTERM)
        for site in sites:
            try:
                site.proc.wait(30)
            except subprocess.TimeoutExpired:
                site.proc.kill()
                site.proc.wait(10)


def run_ui_demo(base: Path, say: Callable[[str], None]) -> None:
    """Start the two sites, print their UIs and tokens, serve until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    # both signals explicitly: a process started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with demo_sites(base, say) as sites:
            say("")
            say("the browser UI of both demo sites (Ctrl-C stops them):")
            for site in sites:
                say(f"  {site.name:<10} UI: {site.api_url}/   token: {site.token}")
            say(f"  checkpoints, failover tests and failovers of {VPG!r}: the recovery "
                "site's UI")
            while not stop.wait(0.5):
                pass
            say("stopping the demo sites")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
