"""The recovery suite's unclean-restart part (bench/suites/recovery/__init__.py runs it):
the resync of a protected VPG after a crash, two sites in this process over loopback TLS:

  recovery.unclean_resync    bytes the protected site sent after an unclean restart of a
                             1 GiB volume with 1 % of it rewritten by writes that never
                             reached the recovery site (the compare's frames both ways
                             and the bundles of the bitmap sync)  vs  the volume's size
                             (what the whole-volume resend before compares sent)

The volume is VM-like data (benchkit.vm_like_pool), replicated by an initial sync and
caught up; the replication then stops, the writes are captured but never delivered, and
the VPG dies (`VPG.abandon`).  Started again, it compares its volume with the journal's
head view and sends what differs; the metric is counted once the first consistent
checkpoint after it is durable.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

from benchkit import Context, Metric, vm_like_pool

from zcore.errors import StateError
from zcore.replication import ProtectedSite, RecoverySite
from zcore.replication.sender import Replication
from zcore.vpg import VPG, VPGSettings

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
VOLUME_BYTES = 1 * GiB  # the issue's volume
CHANGED_FRACTION = 0.01  # rewritten after the last acknowledgement
WRITE_MAX = 64 * KiB  # writes of 4-64 KiB at 4 KiB offsets
POOL_BYTES = 64 * MiB
DEADLINE = 600.0


async def _caught_up(vpg: VPG, rep: Replication, rs: RecoverySite) -> int:
    """Wait for streaming, take a checkpoint, wait until it is consistent and durable."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if vpg.mode != "streaming":
            await asyncio.sleep(0.02)
            continue
        try:
            seq = (await vpg.checkpoint_async("bench")).seq
        except StateError:
            continue
        while vpg.acked_seq < seq and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if all(j.checkpoint_by_id(seq).consistent for j in rs.journals(vpg.name).values()):
            return seq
    raise AssertionError(f"VPG {vpg.name} did not catch up in {DEADLINE} s ({rep.status()})")


def _make_vpg(root: Path, size: int, pool: bytes) -> VPG:
    path = root / "vm-disk0.img"
    with open(path, "wb") as f:
        for at in range(0, size, len(pool)):
            f.write(pool[: min(len(pool), size - at)])
    vpg = VPG("bench", root / "state", VPGSettings(checkpoint_interval=1.0,
                                                     buffer_bytes=64 * MiB))
    vpg.add_vm("vm")
    vpg.add_volume("vm", "disk0", path, size)
    return vpg


def _rewrite(vpg: VPG, size: int, seed: int) -> int:
    """Random writes through the VPG until CHANGED_FRACTION of the volume is rewritten;
    the bytes of the distinct 4 KiB blocks they cover."""
    rng = random.Random(seed)
    vol = vpg.volumes[0]
    blocks: set[int] = set()
    noise = rng.randbytes(WRITE_MAX * 4)
    while len(blocks) * 4 * KiB < CHANGED_FRACTION * size:
        n = rng.randrange(1, WRITE_MAX // (4 * KiB) + 1)
        at = rng.randrange(0, size // (4 * KiB) - n + 1)
        start = rng.randrange(0, len(noise) - n * 4 * KiB)
        vol.write(at * 4 * KiB, noise[start : start + n * 4 * KiB])
        blocks.update(range(at, at + n))
    return len(blocks) * 4 * KiB


async def _measure(ctx: Context, size: int) -> dict[str, float]:
    root = ctx.workdir
    rs = RecoverySite(root / "rs")
    host, port = await rs.start()
    try:
        await ProtectedSite(root / "ps").pair(host, port, rs.issue_pairing_token())
        pool = vm_like_pool(min(ctx.scale(POOL_BYTES, align=4096), size), ctx.seed)
        vpg = _make_vpg(root, size, pool)
        vpg.start(initial_sync=True)
        ps = ProtectedSite(root / "ps")
        rep = ps.protect(vpg, host, port)
        ctx.log(f"initial sync of {size / MiB:.0f} MiB")
        try:
            await _caught_up(vpg, rep, rs)
        finally:
            await ps.stop()
        changed = await asyncio.to_thread(_rewrite, vpg, size, ctx.seed)
        vpg.abandon()  # the crash: the writes were captured, never delivered
        again = VPG(vpg.name, vpg.state_dir, vpg.settings)
        again.add_vm("vm")
        again.add_volume("vm", "disk0", vpg.volumes[0].path, size)
        again.start()
        before = rs.receivers[vpg.name].stats.bytes
        ps = ProtectedSite(root / "ps")
        rep = ps.protect(again, host, port)
        ctx.log("restart after the crash: compare and resync")
        t0 = time.perf_counter()
        try:
            await _caught_up(again, rep, rs)
        finally:
            await ps.stop()
            again.close()
        seconds = time.perf_counter() - t0
        report = rep.resync_report
        if report is None:
            raise AssertionError("the restarted VPG ran no compare")
        bundles = rs.receivers[vpg.name].stats.bytes - before
        return {"volume_bytes": size, "changed_bytes": changed,
                "differing_bytes": report.differing_bytes,
                "compare_sent": report.bytes_sent, "compare_received": report.bytes_received,
                "compare_seconds": report.seconds, "bundle_bytes": bundles,
                "resync_seconds": seconds,
                "wire_bytes": report.bytes_sent + report.bytes_received + bundles}
    finally:
        await rs.stop()


def measure_unclean_resync(ctx: Context) -> Iterator[Metric]:
    size = ctx.scale(VOLUME_BYTES, minimum=16 * MiB, align=MiB)
    details = asyncio.run(_measure(ctx, size))
    yield Metric("recovery.unclean_resync", details["wire_bytes"], "bytes", size,
                 target="<= 0.05",
                 note="bytes sent after an unclean restart (compare + resync, 1 % changed) "
                      "vs the volume's size", details=details)
