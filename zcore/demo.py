"""`zcore demo`: the whole product in one command, on loopback, in a temporary directory.

A recovery site and a protected site pair with a one-time token; a VPG of two VMs is
protected over mutual TLS; a write workload runs while RPO and throughput are shown; a
tagged checkpoint is taken; "ransomware" then overwrites both VMs' disks; the VPG is
recovered at the tagged checkpoint from the recovery site's journals and compared byte
for byte with the disks as they were at that checkpoint.
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

from zcore.capture import ProtectedVolume
from zcore.errors import StateError
from zcore.journal import Journal
from zcore.replication import ProtectedSite, RecoverySite, Replication
from zcore.vpg import VPG, CheckpointState, VPGSettings

CHUNK = 1 << 20


@dataclass
class DemoReport:
    written_bytes: int
    workload_seconds: float
    rpo_max_seconds: float
    throughput_bytes: float
    checkpoint_seq: int
    checkpoint_tag: str
    recovered_bytes: int
    mismatched_chunks: int
    journal_bytes: int

    @property
    def ok(self) -> bool:
        return self.mismatched_chunks == 0


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


def _digest_chunks(path: Path, size: int) -> list[bytes]:
    with open(path, "rb") as f:
        return [hashlib.sha256(f.read(CHUNK)).digest() for _ in range(0, size, CHUNK)]


async def _run(base: Path, volume_bytes: int, seconds: float, rate_bytes: float,
               say: Callable[[str], None]) -> DemoReport:
    recovery = RecoverySite(base / "recovery-site", name="recovery")
    host, port = await recovery.start()
    protected = ProtectedSite(base / "protected-site", name="protected")
    token = recovery.issue_pairing_token()
    peer = await protected.pair(host, port, token)
    say(f"paired protected site with recovery site {peer.name!r} at {host}:{port} "
        f"(certificate {peer.fingerprint[:16]}...)")

    disks = base / "disks"
    disks.mkdir()
    vpg = VPG("demo-vpg", base / "vpg-state", VPGSettings(checkpoint_interval=1.0))
    volumes = []
    for vm in ("web", "db"):
        vpg.add_vm(vm)
        path = disks / f"{vm}.img"
        with open(path, "wb") as f:
            f.truncate(volume_bytes)
        volumes.append(vpg.add_volume(vm, "disk0", path))
    vpg.start()
    replication = protected.protect(vpg, host, port)
    say(f"protecting VPG {vpg.name!r}: VMs web and db, {volume_bytes >> 20} MiB each")

    written, elapsed, rpo_max, steady = await _replicate(replication, volumes, seconds,
                                                         rate_bytes, say)
    tag = "before-ransomware"
    seq, expected = await _tag_durably(vpg, replication, volumes, tag)
    say(f"tagged checkpoint {tag!r} (seq {seq}) is durable at the recovery site")
    await _ransomware(vpg, replication, volumes)
    say("ransomware overwrote both disks; the damage is replicated too")

    journals = recovery.journals(vpg.name)
    recovered_bytes, mismatches = _recover(journals, volumes, seq, expected,
                                           base / "recovered")
    journal_bytes = sum(j.status().size_bytes for j in journals.values())
    await protected.stop()
    vpg.close()
    await recovery.stop()
    return DemoReport(written, elapsed, rpo_max, steady, seq, tag, recovered_bytes,
                      mismatches, journal_bytes)


async def _replicate(replication: Replication, volumes: list[ProtectedVolume],
                     seconds: float, rate_bytes: float,
                     say: Callable[[str], None]) -> tuple[int, float, float, float]:
    """VM-like writes paced at `rate_bytes` for `seconds`, showing RPO and throughput;
    returns (bytes written, seconds, worst RPO, median throughput)."""
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
    while time.monotonic() - start < seconds:
        await asyncio.sleep(0.5)
        st = replication.status()
        rpo_max = max(rpo_max, st.rpo_seconds)
        rates.append(st.throughput_bytes)
        say(f"  t={time.monotonic() - start:4.1f}s  state={st.state:<12} "
            f"RPO={st.rpo_seconds * 1000:6.0f} ms  "
            f"throughput={st.throughput_bytes / 1e6:7.1f} MB/s  "
            f"buffer={st.buffer_used >> 20} MiB")
    stop.set()
    worker.join()
    steady = sorted(rates)[len(rates) // 2] if rates else 0.0
    return written[0], time.monotonic() - start, rpo_max, steady


async def _tag_durably(vpg: VPG, replication: Replication, volumes: list[ProtectedVolume],
                       tag: str) -> tuple[int, dict[str, list[bytes]]]:
    """Tag a crash-consistent checkpoint and wait until it is in the recovery journals;
    returns its journal seq and the digests of every MiB of the disks at that point."""
    while vpg.mode != "streaming":  # a checkpoint during a sync is not crash-consistent
        await asyncio.sleep(0.05)
    ckpt = await replication.checkpoint(tag)  # blocks: run off the loop
    expected = {v.vm: _digest_chunks(Path(v.path), v.size) for v in volumes}
    while (report := vpg.checkpoint_state(ckpt)) and report.state == CheckpointState.PENDING:
        await asyncio.sleep(0.01)  # durable means in the journals, not acked_seq >= seq
    if report is None or report.state != CheckpointState.DURABLE or report.journal_seq is None:
        raise StateError(f"tagged checkpoint {tag!r} did not reach the recovery site: "
                         f"{report}")
    return report.journal_seq, expected


async def _ransomware(vpg: VPG, replication: Replication,
                      volumes: list[ProtectedVolume]) -> None:
    """Rewrite every MiB of both disks and wait until the damage is replicated too."""
    def ransomware() -> None:  # blocking writes: off the loop
        rng = random.Random(99)
        for vol in volumes:
            for offset in range(0, vol.size, CHUNK):
                vol.write(offset, rng.randbytes(CHUNK))
    await asyncio.to_thread(ransomware)
    last = (await replication.checkpoint()).seq
    while vpg.acked_seq < last:
        await asyncio.sleep(0.01)


def _recover(journals: dict[str, Journal], volumes: list[ProtectedVolume], seq: int,
             expected: dict[str, list[bytes]], out_dir: Path) -> tuple[int, int]:
    """Read every volume at checkpoint `seq` from its journal into `out_dir`, comparing
    each MiB with `expected`; returns (bytes recovered, mismatched MiB)."""
    out_dir.mkdir()
    mismatches = recovered_bytes = 0
    for vol in volumes:
        journal = journals[vol.vm]
        with journal.view(journal.checkpoint_by_id(seq)) as view, \
                open(out_dir / f"{vol.vm}.img", "wb") as out:
            for i, offset in enumerate(range(0, vol.size, CHUNK)):
                data = view.read(vol.id, offset, min(CHUNK, vol.size - offset))
                out.write(data)
                recovered_bytes += len(data)
                if hashlib.sha256(data).digest() != expected[vol.vm][i]:
                    mismatches += 1
    return recovered_bytes, mismatches


def run_demo(base: str | os.PathLike[str], *, volume_bytes: int = 64 << 20,
             seconds: float = 4.0, rate_bytes: float = 40e6,
             say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo under `base` (an empty directory) and return its report."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(base, volume_bytes, seconds, rate_bytes, say))
