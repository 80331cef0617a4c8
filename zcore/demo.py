"""`zcore demo`: the whole product in one command, on loopback, in a temporary directory.

Two site services (zcore.site.service: `prod` and `dr`, each with its database, REST API,
replication listener and NBD server) run in this process and are driven through their
REST APIs, as a user's scripts would: they pair both ways; a VPG of two VMs is protected
from prod to dr over mutual TLS; a write workload runs while RPO and throughput are
shown; a tagged checkpoint is taken; "ransomware" then overwrites both VMs' disks.  The
VPG fails over at dr to the tagged checkpoint, whose recovered volumes are compared byte
for byte with the disks as they were at that checkpoint; the failover is committed with
reverse protection (dr protects the VPG back to prod, a delta sync against prod's disks),
and a failback moves it home: prod protects it again, on its own disk files, which must
then hold the recovered image byte for byte.

The VMs' writes go straight to the protected volumes in this process (the library's
`ProtectedVolume`, as the NBD export `VPG/VM/VOLUME` would pass them on).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from zcore.capture import ProtectedVolume
from zcore.errors import StateError
from zcore.site.config import init_site
from zcore.site.service import ServeOptions, SiteService
from zcore.vpg import CheckpointState

CHUNK = 1 << 20
VPG_NAME = "demo-vpg"
TASK_TIMEOUT = 300.0


@dataclass
class DemoReport:
    written_bytes: int
    workload_seconds: float
    rpo_max_seconds: float
    throughput_bytes: float
    checkpoint_id: int
    checkpoint_tag: str
    recovered_bytes: int
    mismatched_chunks: int  # at dr, in the failed-over volumes
    failback_mismatched_chunks: int  # at prod, in its disks after the failback
    delta_sync: str  # what reverse protection's delta sync said

    @property
    def ok(self) -> bool:
        return self.mismatched_chunks == 0 and self.failback_mismatched_chunks == 0


class Site:
    """One in-process site service and a client of its REST API."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.token = init_site(root, name).token
        self.service = SiteService(root, ServeOptions(api_port=0, replication_port=0,
                                                      nbd_port=0), out=self._listener)
        self.api = ""
        self.replication = ""
        self._serving: asyncio.Task[None] | None = None
        self.client: httpx.AsyncClient | None = None

    def _listener(self, line: str) -> None:
        what, _, address = line.partition(": ")
        if what == "API":
            self.api = address
        elif what == "replication":
            self.replication = address

    async def start(self) -> None:
        self._serving = await self.service.start()
        self.client = httpx.AsyncClient(base_url=f"{self.api}/api/v1", timeout=60,
                                        headers={"Authorization": f"Bearer {self.token}"})

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        assert self.client is not None
        response = await self.client.request(method, path, json=body)
        if response.status_code >= 400:
            raise StateError(f"{self.name}: {method} {path}: {response.status_code} "
                             f"{response.text}")
        return response.json() if response.content else None

    async def task(self, path: str, body: Any = None) -> dict[str, Any]:
        """POST a task and wait until it ends; its record (StateError if it failed)."""
        task = await self.call("POST", path, body)
        deadline = time.monotonic() + TASK_TIMEOUT
        while task["state"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise StateError(f"{self.name}: task {task['kind']} did not end")
            await asyncio.sleep(0.1)
            task = await self.call("GET", f"/tasks/{task['id']}")
        if task["state"] != "succeeded":
            raise StateError(f"{self.name}: task {task['kind']} {task['state']}: "
                             f"{task.get('error')}")
        result: dict[str, Any] = task
        return result

    async def vpg(self) -> dict[str, Any]:
        found: dict[str, Any] = await self.call("GET", f"/vpgs/{VPG_NAME}")
        return found

    async def wait_protecting(self) -> None:
        deadline = time.monotonic() + TASK_TIMEOUT
        while True:
            v = await self.vpg()
            if v["role"] == "protected" and v["state"] == "protecting":
                return
            if time.monotonic() > deadline:
                raise StateError(f"{self.name} did not protect {VPG_NAME}: {v}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        service = self.service
        if service.api is not None:
            service.api.should_exit = True
        if self._serving is not None:
            await self._serving
        await service.close()


def _vm_like_pool(rng: random.Random, count: int = 64, length: int = 64 << 10) -> list[bytes]:
    """Buffers that compress like a VM disk: text-like runs, random runs, zeros."""
    words = [b"block", b"inode", b"journal", b"kernel", b"page", b"cache ", b"0x7f"]
    pool = []
    for i in range(count):
        if i % 5 == 0:
            pool.append(bytes(length))
        elif i % 5 < 3:
            out = bytearray()
            while len(out) < length:
                out += rng.choice(words) + b" %d\n" % rng.randrange(1 << 20)
            pool.append(bytes(out[:length]))
        else:
            pool.append(rng.randbytes(length))
    return pool


def _digests(read: Callable[[int, int], bytes], size: int) -> list[bytes]:
    return [hashlib.sha256(read(off, min(CHUNK, size - off))).digest()
            for off in range(0, size, CHUNK)]


def _backing(volume: ProtectedVolume) -> Path:
    """The demo's volumes are files."""
    if volume.path is None:
        raise StateError(f"volume {volume.name} has no backing file")
    return Path(volume.path)


def _file_reader(path: Path) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return read


async def _run(base: Path, volume_bytes: int, seconds: float, rate_bytes: float,
               say: Callable[[str], None]) -> DemoReport:
    prod, dr = Site(base / "prod", "prod"), Site(base / "dr", "dr")
    await prod.start()
    await dr.start()
    try:
        return await _demo(base, prod, dr, volume_bytes, seconds, rate_bytes, say)
    finally:
        await prod.stop()
        await dr.stop()


async def _demo(base: Path, prod: Site, dr: Site, volume_bytes: int, seconds: float,
                rate_bytes: float, say: Callable[[str], None]) -> DemoReport:
    peers = {}
    for a, b in ((prod, dr), (dr, prod)):  # both ways: dr protects back to prod later
        token = (await b.call("POST", "/pairing/tokens"))["token"]
        peers[b.name] = await a.call("POST", "/pairing", {"address": b.replication,
                                                          "token": token})
    say(f"site services prod ({prod.api}) and dr ({dr.api}) paired both ways "
        f"(dr's certificate {peers['dr']['fingerprint'][:16]}...)")

    disks = base / "disks"
    disks.mkdir()
    for vm in ("web", "db"):
        path = disks / f"{vm}.img"
        with open(path, "wb") as f:
            f.truncate(volume_bytes)
        await prod.call("POST", "/vms", {"name": vm, "volumes": [
            {"name": "disk0", "size": volume_bytes, "path": str(path)}]})
    await prod.task("/vpgs", {"name": VPG_NAME, "vms": ["web", "db"],
                              "peer": peers["dr"]["site_id"],
                              "settings": {"checkpoint_interval_seconds": 1}})
    say(f"protecting VPG {VPG_NAME!r} from prod to dr: VMs web and db, "
        f"{volume_bytes >> 20} MiB each (initial sync done)")
    assert prod.service.runtime is not None
    entry = prod.service.runtime.entry(VPG_NAME)
    volumes = sorted(entry.vpg.volumes.values(), key=lambda v: v.vm)

    written, elapsed, rpo_max, steady = await _replicate(prod, volumes, seconds,
                                                         rate_bytes, say)
    tag = "before-ransomware"
    cid, expected = await _tag_durably(prod, volumes, tag)
    say(f"tagged checkpoint {tag!r} (id {cid}) is durable at dr")
    await _ransomware(prod, volumes)
    say("ransomware overwrote both disks; the damage is replicated too")

    await dr.task(f"/vpgs/{VPG_NAME}/failover", {"checkpoint": cid, "reverse": True})
    say(f"failed over at dr to checkpoint {cid}: the recovered volumes are served at once "
        f"as failover/{VPG_NAME}/VM/disk0")
    recovered, mismatches = _verify_failover(dr, volumes, expected)
    say(f"verified {recovered >> 20} MiB of recovered volumes at dr: "
        f"{'identical' if not mismatches else f'{mismatches} MiB differ'}")

    await dr.task(f"/vpgs/{VPG_NAME}/failover/commit")
    await dr.wait_protecting()
    delta = _delta_sync_said(dr)
    say(f"committed: dr protects {VPG_NAME} back to prod ({delta})")

    await dr.task(f"/vpgs/{VPG_NAME}/failback")
    await prod.wait_protecting()
    say(f"failed back: prod protects {VPG_NAME} again, on its own disks")
    back = sum(a != b for v in volumes
               for a, b in zip(_digests(_file_reader(_backing(v)), v.size),
                               expected[v.vm], strict=True))
    return DemoReport(written, elapsed, rpo_max, steady, cid, tag, recovered, mismatches,
                      back, delta)


async def _replicate(prod: Site, volumes: list[ProtectedVolume], seconds: float,
                     rate_bytes: float,
                     say: Callable[[str], None]) -> tuple[int, float, float, float]:
    """VM-like writes paced at `rate_bytes` for `seconds`, showing prod's RPO and
    throughput; returns (bytes written, seconds, worst RPO, median throughput)."""
    stop = threading.Event()
    written = [0]

    def workload() -> None:
        rng = random.Random(7)
        pool = _vm_like_pool(rng)
        began = time.monotonic()
        while not stop.is_set():
            ahead = written[0] / rate_bytes - (time.monotonic() - began)
            if ahead > 0:  # pace the VMs like a busy database, not a memory copy
                time.sleep(ahead)
            vol = rng.choice(volumes)
            length = rng.randrange(1, 17) * 4096
            offset = rng.randrange(0, (vol.size - length) // 4096) * 4096
            vol.write(offset, memoryview(rng.choice(pool))[:length])
            written[0] += length

    worker = threading.Thread(target=workload, name="demo-workload")
    start = time.monotonic()
    worker.start()
    rpo_max = 0.0
    rates = []
    try:
        while time.monotonic() - start < seconds:
            await asyncio.sleep(0.5)
            st = await prod.call("GET", f"/vpgs/{VPG_NAME}/status")
            rpo, rate = st["rpo_seconds"] or 0.0, st["throughput_bytes_per_s"] or 0.0
            rpo_max = max(rpo_max, rpo)
            rates.append(rate)
            say(f"  t={time.monotonic() - start:4.1f}s  RPO={rpo * 1000:6.0f} ms  "
                f"throughput={rate / 1e6:7.1f} MB/s")
    finally:
        stop.set()
        worker.join()
    steady = sorted(rates)[len(rates) // 2] if rates else 0.0
    return written[0], time.monotonic() - start, rpo_max, steady


async def _tag_durably(prod: Site, volumes: list[ProtectedVolume],
                       tag: str) -> tuple[int, dict[str, list[bytes]]]:
    """Tag a checkpoint through prod's API and wait until it is in dr's journals; returns
    its id and the digests of every MiB of the disks at that point."""
    assert prod.service.runtime is not None
    vpg = prod.service.runtime.entry(VPG_NAME).vpg
    while vpg.mode != "streaming":  # a checkpoint during a sync is not crash-consistent
        await asyncio.sleep(0.05)
    cid = int((await prod.call("POST", f"/vpgs/{VPG_NAME}/checkpoints", {"tag": tag}))["id"])
    expected = {v.vm: _digests(_file_reader(_backing(v)), v.size) for v in volumes}
    while (report := vpg.checkpoint_state(cid)) and report.state == CheckpointState.PENDING:
        await asyncio.sleep(0.01)  # durable means in the journals, not acked_seq >= seq
    if report is None or report.state != CheckpointState.DURABLE:
        raise StateError(f"tagged checkpoint {tag!r} did not reach dr: {report}")
    return cid, expected


async def _ransomware(prod: Site, volumes: list[ProtectedVolume]) -> None:
    """Rewrite every MiB of both disks and wait until the damage is replicated too."""
    def ransomware() -> None:  # blocking writes: off the loop
        rng = random.Random(99)
        for vol in volumes:
            for offset in range(0, vol.size, CHUNK):
                vol.write(offset, rng.randbytes(CHUNK))
    await asyncio.to_thread(ransomware)
    assert prod.service.runtime is not None
    vpg = prod.service.runtime.entry(VPG_NAME).vpg
    while vpg.mode != "streaming":  # so much at once overflows into a bitmap sync
        await asyncio.sleep(0.05)
    last = (await vpg.checkpoint_async()).seq
    while vpg.acked_seq < last:
        await asyncio.sleep(0.01)


def _verify_failover(dr: Site, volumes: list[ProtectedVolume],
                     expected: dict[str, list[bytes]]) -> tuple[int, int]:
    """Read every failed-over volume at dr (what its NBD export serves) and compare each
    MiB with the disks at the checkpoint; returns (bytes read, mismatched MiB)."""
    assert dr.service.backend is not None
    fo = dr.service.backend.failovers.active[VPG_NAME]
    read = mismatches = 0
    for vol in volumes:
        overlay = fo.overlays[(vol.vm, vol.name)]
        got = _digests(overlay.read, vol.size)
        mismatches += sum(a != b for a, b in zip(got, expected[vol.vm], strict=True))
        read += vol.size
    return read, mismatches


def _delta_sync_said(site: Site) -> str:
    """What the reversed VPG's delta sync reported (its VPG event)."""
    assert site.service.runtime is not None
    events = site.service.runtime.entry(VPG_NAME).vpg.events
    said = [e.partition(" ")[2] for e in events if "delta sync" in e]  # "HH:MM:SS text"
    return said[-1] if said else "delta sync"


def run_demo(base: str | os.PathLike[str], *, volume_bytes: int = 64 << 20,
             seconds: float = 4.0, rate_bytes: float = 40e6,
             say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo under `base` (an empty directory) and return its report."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(base, volume_bytes, seconds, rate_bytes, say))
