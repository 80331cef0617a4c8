"""Site services as separate processes, for tests: `init_site_dir` runs `zcore site init`,
`SiteProcess` runs `zcore site serve` on free ports, parses the listener lines it prints
and talks to its REST API with httpx (the admin token from the site's client record)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from helpers.cli import zcore_cmd
from zcore.site.config import SiteDir, read_client

START_TIMEOUT = 30.0


def init_site_dir(path: Path, name: str) -> str:
    """`zcore site init PATH --name NAME`; returns its output."""
    done = subprocess.run(zcore_cmd("site", "init", str(path), "--name", name),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextlib.contextmanager
def two_sites(tmp_path: Path, *b_args: str) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    """Sites "alpha" (in tmp_path/a) and "beta" (tmp_path/b, serve options `b_args`),
    started together; both killed at the end."""
    init_site_dir(tmp_path / "a", "alpha")
    init_site_dir(tmp_path / "b", "beta")
    a, b = SiteProcess(tmp_path / "a"), SiteProcess(tmp_path / "b", *b_args)
    try:
        a.spawn(), b.spawn()  # both start at once
        yield a.wait_ready(), b.wait_ready()
    finally:
        a.close()
        b.close()


class SiteProcess:
    """One `zcore site serve` process; `start()` waits for its three listener lines."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.api_url = ""
        self.replication = ""
        self.nbd = ""
        self.log = root.parent / f"{root.name}.log"

    def start(self) -> SiteProcess:
        """Start and wait until it listens (see `spawn`)."""
        return self.spawn().wait_ready()

    def spawn(self) -> SiteProcess:
        """Start on free ports; a restart keeps the ports of the first start (its peers
        know its replication address).  `wait_ready` waits for its listeners."""
        def port(address: str) -> str:
            return address.rpartition(":")[2] if address else "0"

        args = zcore_cmd("site", "serve", str(self.root), "--api-port", port(self.api_url),
                         "--replication-port", port(self.replication),
                         "--nbd-port", port(self.nbd), *self.extra)
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=logf, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        logf.close()
        return self

    def wait_ready(self) -> SiteProcess:
        lines = self._read_lines(3)
        assert lines[0].startswith("API: "), lines
        self.api_url = lines[0].removeprefix("API: ")
        self.replication = lines[1].removeprefix("replication: ")
        self.nbd = lines[2].removeprefix("NBD: ")
        return self

    def _read_lines(self, n: int) -> list[str]:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.strip())
            lines.put("")  # EOF

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        out: list[str] = []
        while len(out) < n:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"site did not start in {START_TIMEOUT} s: "
                                     f"{self.log.read_text()[-3000:]}") from None
            if not line:
                raise AssertionError(f"site exited ({proc.wait()}): "
                                     f"{self.log.read_text()[-3000:]}")
            out.append(line)
        return out

    @property
    def token(self) -> str:
        return read_client(SiteDir(self.root)).token

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url + "/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})

    def kill(self) -> None:
        """kill -9, as a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def ok(response: httpx.Response, status: int | tuple[int, ...] = (200, 201, 202)) -> Any:
    """The JSON body of a successful response (a clear failure otherwise)."""
    want = (status,) if isinstance(status, int) else status
    assert response.status_code in want, (response.status_code, response.text)
    return response.json() if response.content else None


def wait_for(what: str, fn: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Call `fn` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {json.dumps(last, default=str)})")
