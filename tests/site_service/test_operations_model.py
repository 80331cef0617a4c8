"""A hypothesis state machine over the recovery operations of two real site services,
against a plain model of the protected volume: writes, tagged checkpoints, failover test
start/stop, failover, writes into the failed-over volume, rollback, commit, reverse
protection, move, failback, a kill -9 and restart of either site, and a cut or stall of
the link between them (the sites reach each other through fault proxies), between any two
steps.  After every step each checkpoint the model says exists reads back exactly at the
recovery site, the protected volume reads back as the model says, and after a move or a
commit nothing acknowledged is missing.

Bounded for CI (a few runs of a few steps: every step drives real processes); ZCORE_DEEP=1
runs more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import require_tool
from helpers.failover import pair, protect, qemu_io, wait_task
from helpers.faultproxy import FaultProxy
from helpers.site import SiteProcess, init_site_dir, ok, wait_for
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

KiB = 1 << 10
MiB = 1 << 20
DISK = 8 * MiB
DEEP = os.environ.get("ZCORE_DEEP") == "1"
STEP_TIMEOUT = 180.0


def compare(uri: str, expect: bytes, scratch: Path) -> None:
    """The image at `uri` equals `expect` byte for byte (qemu-img compare over NBD)."""
    path = scratch / "expect.img"
    path.write_bytes(expect)
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{uri}: {done.stdout}{done.stderr}"


class Operations(RuleBasedStateMachine):
    """Site "a" protects VPG g1 (one VM, one disk) to "b" at the start; roles follow the
    operations.  `ckpts` holds the tagged checkpoints the recovery site must still serve,
    with the image each was taken at."""

    def __init__(self) -> None:
        super().__init__()
        require_tool("qemu-io")
        require_tool("qemu-img")
        self.tmp = Path(tempfile.mkdtemp(prefix="zcore-ops-model-"))
        init_site_dir(self.tmp / "a", "alpha")
        init_site_dir(self.tmp / "b", "beta")
        self.sites = {"a": SiteProcess(self.tmp / "a"), "b": SiteProcess(self.tmp / "b")}
        for s in self.sites.values():
            s.spawn()
        for s in self.sites.values():
            s.wait_ready()
        # each site's replication listener behind a proxy the peer reaches it through
        self.proxies = {
            name: FaultProxy(("127.0.0.1", int(s.replication.rpartition(":")[2])))
            for name, s in self.sites.items()}
        protect(self.sites["a"], self.sites["b"], self.tmp / "disk0.img", DISK,
                address=self._via("b"))
        pair(self.sites["b"], self.sites["a"], self._via("a"))
        self.protected = "a"
        self.image = bytearray(DISK)
        self.ckpts: dict[str, bytes] = {}
        self.op: str | None = None  # None, "test", "failover", "committed"
        self.op_tag: str | None = None
        self.overlay = bytearray()  # the failed-over volume, as written
        self.swapped = False  # a move or reverse happened: failback is allowed
        self.tags = 0

    # ---- helpers -------------------------------------------------------------------------

    def _via(self, site: str) -> str:
        proxy = self.proxies[site]
        return f"{proxy.host}:{proxy.port}"

    @property
    def recovery(self) -> str:
        return "b" if self.protected == "a" else "a"

    def client(self, site: str) -> httpx.Client:
        return self.sites[site].client()

    def nbd(self, site: str, export: str) -> str:
        return f"{self.sites[site].nbd}/{export}"

    def task(self, site: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        c = self.client(site)
        return wait_task(c, ok(c.post(path, json=body or {}), 202), timeout=STEP_TIMEOUT)

    def vpg(self, site: str) -> dict[str, Any]:
        found: dict[str, Any] = ok(self.client(site).get("/vpgs/g1"))
        return found

    def settle(self) -> None:
        """Until the protected site protects g1 again, the recovery site holds it, and the
        link works (a probe checkpoint, not in the model, reaches the recovery site)."""
        wait_for("g1 protecting", lambda: self.vpg(self.protected)["role"] == "protected"
                 and self.vpg(self.protected)["state"] == "protecting"
                 and self.vpg(self.recovery)["role"] == "recovery", timeout=STEP_TIMEOUT)
        self.tags += 1
        probe = f"probe{self.tags}"
        wait_for("a probe checkpoint taken (none while the VPG syncs)", lambda: self.client(
            self.protected).post("/vpgs/g1/checkpoints", json={"tag": probe}).status_code
            == 201, timeout=STEP_TIMEOUT)
        wait_for(f"{probe} at the recovery site", lambda: ok(self.client(
            self.recovery).get("/vpgs/g1/checkpoints", params={"tag": probe}))["items"],
            timeout=STEP_TIMEOUT)

    def swap(self, image: bytes) -> None:
        self.protected = self.recovery
        self.image = bytearray(image)
        self.ckpts.clear()  # the new recovery site's journals start empty
        self.op = self.op_tag = None
        self.swapped = True
        self.settle()

    # ---- rules ---------------------------------------------------------------------------

    @precondition(lambda self: self.op in (None, "test"))
    @rule(block=st.integers(0, DISK // (4 * KiB) - 64), blocks=st.integers(1, 64),
          pattern=st.integers(1, 255))
    def write(self, block: int, blocks: int, pattern: int) -> None:
        off, n = block * 4 * KiB, blocks * 4 * KiB
        qemu_io(self.nbd(self.protected, "g1/vm1/disk0"), f"write -P {pattern} {off} {n}")
        self.image[off : off + n] = bytes([pattern]) * n

    @precondition(lambda self: self.op in (None, "test"))
    @rule()
    def tag(self) -> None:
        self.tags += 1
        name = f"c{self.tags}"
        ok(self.client(self.protected).post("/vpgs/g1/checkpoints", json={"tag": name}), 201)
        wait_for(f"{name} at the recovery site", lambda: ok(self.client(self.recovery).get(
            "/vpgs/g1/checkpoints", params={"tag": name}))["items"], timeout=STEP_TIMEOUT)
        self.ckpts[name] = bytes(self.image)

    @precondition(lambda self: self.op is None and self.ckpts)
    @rule(data=st.data())
    def test_start(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.ckpts)))
        self.task(self.recovery, "/vpgs/g1/test", {"checkpoint": f"tag:{name}"})
        compare(self.nbd(self.recovery, "test/g1/vm1/disk0"), self.ckpts[name], self.tmp)
        self.op, self.op_tag = "test", name

    @precondition(lambda self: self.op == "test")
    @rule()
    def test_stop(self) -> None:
        self.task(self.recovery, "/vpgs/g1/test/stop", {"result": "passed"})
        self.op = self.op_tag = None

    @precondition(lambda self: self.op is None and self.ckpts)
    @rule(data=st.data())
    def failover(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.ckpts)))
        cid = ok(self.client(self.recovery).get("/vpgs/g1/checkpoints", params={
            "tag": name}))["items"][0]["id"]
        self.task(self.recovery, "/vpgs/g1/failover", {"checkpoint": cid})
        self.op, self.op_tag = "failover", name
        self.overlay = bytearray(self.ckpts[name])
        # the history before the checkpoint is promoted into the replicas (rollback keeps
        # the checkpoint and every later one): the older tags are gone
        names = list(self.ckpts)
        for older in names[: names.index(name)]:
            del self.ckpts[older]

    @precondition(lambda self: self.op == "failover")
    @rule(block=st.integers(0, DISK // (4 * KiB) - 16), pattern=st.integers(1, 255))
    def write_failed_over(self, block: int, pattern: int) -> None:
        off, n = block * 4 * KiB, 64 * KiB
        qemu_io(self.nbd(self.recovery, "failover/g1/vm1/disk0"),
                f"write -P {pattern} {off} {n}", "flush")
        self.overlay[off : off + n] = bytes([pattern]) * n

    @precondition(lambda self: self.op == "failover")
    @rule()
    def rollback(self) -> None:
        self.task(self.recovery, "/vpgs/g1/failover/rollback")
        self.op = self.op_tag = None
        self.settle()  # the protected site attaches again

    @precondition(lambda self: self.op == "failover")
    @rule()
    def commit(self) -> None:
        self.task(self.recovery, "/vpgs/g1/failover/commit")
        compare(self.nbd(self.recovery, "recovered/g1/vm1/disk0"), bytes(self.overlay),
                self.tmp)
        self.op = "committed"
        self.ckpts.clear()  # history up to the checkpoint promoted, after it dropped

    @precondition(lambda self: self.op == "committed")
    @rule()
    def reverse(self) -> None:
        self.task(self.recovery, "/vpgs/g1/reverse")
        self.swap(bytes(self.overlay))

    @precondition(lambda self: self.op is None)
    @rule()
    def move(self) -> None:
        result = self.task(self.protected, "/vpgs/g1/move")["result"]
        assert result["reversed"], result
        self.swap(bytes(self.image))

    @precondition(lambda self: self.op is None and self.swapped)
    @rule()
    def failback(self) -> None:
        result = self.task(self.protected, "/vpgs/g1/failback")["result"]
        assert result["reversed"], result
        self.swap(bytes(self.image))

    @precondition(lambda self: self.op in (None, "failover", "committed"))
    @rule(which=st.sampled_from(["protected", "recovery"]))
    def crash_and_restart(self, which: str) -> None:
        site = self.sites[self.protected if which == "protected" else self.recovery]
        site.kill()
        site.start()
        if self.op is None:
            self.settle()

    @precondition(lambda self: self.op in (None, "test"))
    @rule(seconds=st.sampled_from([0.5, 2.0, 12.0] if DEEP else [0.5, 2.0]),
          stall=st.booleans())
    def cut_link(self, seconds: float, stall: bool) -> None:
        """The link into the recovery site goes down: connections reset and refused, or
        held (a stall; past the peer timeout at 12 s, in the deep profile); writes go on
        meanwhile."""
        proxy = self.proxies[self.recovery]
        if stall:
            proxy.stall()
        else:
            proxy.refuse(True)
            proxy.reset_all()
        self.write(block=7, blocks=16, pattern=0x5C)  # acknowledged while the link is down
        time.sleep(seconds)
        proxy.heal()
        self.settle()

    # ---- what must hold after every step --------------------------------------------------

    @invariant()
    def checkpoints_read_back_exactly(self) -> None:
        for name in list(self.ckpts)[-2:]:  # the newest two: every step pays for these
            compare(self.nbd(self.recovery, f"g1/vm1/disk0@tag:{name}"), self.ckpts[name],
                    self.tmp)

    @invariant()
    def volumes_hold_what_was_acknowledged(self) -> None:
        if self.op in (None, "test"):
            compare(self.nbd(self.protected, "g1/vm1/disk0"), bytes(self.image), self.tmp)
        elif self.op == "failover":
            compare(self.nbd(self.recovery, "failover/g1/vm1/disk0"), bytes(self.overlay),
                    self.tmp)

    def teardown(self) -> None:
        for s in self.sites.values():
            s.close()
        for p in self.proxies.values():
            p.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


Operations.TestCase.settings = settings(
    max_examples=10 if DEEP else 2, stateful_step_count=16 if DEEP else 7, deadline=None)
test_operations_keep_every_checkpoint_and_every_acknowledged_write = Operations.TestCase
