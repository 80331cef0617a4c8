"""Reverse protection's delta sync end to end over loopback TLS: the recovery site adopts
older copies of the volumes as its replicas (RecoverySite.adopt), the protected VPG
starts with `delta_sync=True`, and only the blocks that differ cross the link; writes
made meanwhile, restarts of the VPG mid-sync and refusals are covered."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from pathlib import Path

import pytest
from helpers.replication import (
    KiB,
    MiB,
    catch_up,
    fast_timeouts,
    make_vpg,
    pair_sites,
    wait_until,
)

from zcore.errors import ConfigError, StateError
from zcore.fsutil import move_file
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.replication import ProtectedSite, RecoverySite
from zcore.vpg import VPG, VPGMode, VPGSettings

_names = itertools.count()
LAYOUT = {"vm1": [8 * MiB, 3 * MiB], "vm2": [5 * MiB]}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("rev")
    asyncio.run(pair_sites(root / "rs", root / "ps"))
    return root


def run(coro):
    async def main():
        with fast_timeouts():
            return await coro
    return asyncio.run(main())


def _random_volumes(rng: random.Random, sizes: list[int]) -> list[bytes]:
    return [rng.randbytes(size) for size in sizes]


def _differ(rng: random.Random, data: bytes, fraction: float) -> tuple[bytes, int]:
    """`data` changed in random 4 KiB-1 MiB blocks at 4 KiB offsets covering about
    `fraction` of it; returns it and the bytes that differ."""
    out = bytearray(data)
    changed = set()
    while len(changed) * 4 * KiB < fraction * len(data):
        length = rng.randrange(1, 257) * 4 * KiB
        offset = rng.randrange(0, (len(data) - length) // (4 * KiB) + 1) * 4 * KiB
        out[offset:offset + length] = rng.randbytes(length)
        changed.update(range(offset // (4 * KiB), (offset + length) // (4 * KiB)))
    return bytes(out), len(changed) * 4 * KiB


def _prepare(sites: Path, rs: RecoverySite, seed: int, fraction: float = 0.05
             ) -> tuple[VPG, list[bytes], int]:
    """A protected VPG over random volumes and the recovery site's VPG adopting copies
    that differ in random blocks; returns the VPG, its volumes' bytes and how many
    bytes differ."""
    rng = random.Random(seed)
    name = f"rev{next(_names)}"
    sizes = [s for vm in LAYOUT.values() for s in vm]
    protected = _random_volumes(rng, sizes)
    vpg = make_vpg(sites / name, name, LAYOUT, VPGSettings(checkpoint_interval=0.3),
                   contents=dict(enumerate(protected)))
    old_dir = sites / f"{name}-old"
    old_dir.mkdir()
    files, differing = {}, 0
    for vol in vpg.volumes.values():
        old, n = _differ(rng, protected[vol.id], fraction)
        differing += n
        path = old_dir / f"{vol.vm}-{vol.name}.img"
        path.write_bytes(old)
        files[(vol.vm, vol.name)] = path
    owner = ProtectedSite(sites / "ps").identity.site_id
    rs.adopt(name, owner, [(vm, vpg.journal_volumes(vm)) for vm in vpg.vms],
             vpg.settings.journal, files)
    return vpg, protected, differing


def _assert_latest_equals(rs: RecoverySite, vpg: VPG) -> None:
    for vm, journal in rs.journals(vpg.name).items():
        ckpt = journal.checkpoints()[-1]
        assert ckpt.consistent
        with journal.view(ckpt) as view:
            for vol in vpg.vms[vm].volumes:
                want = Path(vol.path).read_bytes()
                got = view.read(vol.id, 0, vol.size)
                assert got == want, f"{vm}/{vol.name} differs from the protected volume"


def test_delta_sync_sends_only_the_differing_blocks_and_the_view_matches(sites):
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        vpg, _, differing = await asyncio.to_thread(_prepare, sites, rs, 1)
        vpg.start(delta_sync=True)
        assert vpg.mode == VPGMode.DELTA_SYNC
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        try:
            await catch_up(vpg, rep, rs)
            report = rep.delta_report
            assert report is not None and report.differing_bytes == differing
            # bytes sent ~ the differing bytes: random data does not compress
            assert differing <= report.bytes_sent <= differing * 1.05 + 256 * KiB
            assert any("delta sync of 3 volumes" in e for e in vpg.events)
            assert vpg.status().delta_sync == report
            await asyncio.to_thread(_assert_latest_equals, rs, vpg)
            for j in rs.journals(vpg.name).values():
                assert not (await asyncio.to_thread(j.scrub)).damage
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())
