"""Shared helpers of the replication tests (no tests here): paired sites, a VPG over
scratch volumes, the model of the protected volumes (a log of every write with its seq,
replayed up to any checkpoint), journal verification against it, and short timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from zcore.errors import StateError
from zcore.replication import ProtectedSite, RecoverySite, Replication, timing
from zcore.vpg import VPG, VPGSettings

KiB = 1 << 10
MiB = 1 << 20

# Timeouts short enough for tests: a silent link is noticed after PEER_TIMEOUT, and a
# reconnect is tried at most RECONNECT_BACKOFF[1] after the previous attempt.
FAST_TIMEOUTS = {
    "HEARTBEAT_INTERVAL": 0.1,
    "PEER_TIMEOUT": 1.0,
    "STALL_TIMEOUT": 0.3,
    "HANDSHAKE_TIMEOUT": 2.0,
    "RECONNECT_BACKOFF": (0.02, 0.2),
}


@contextlib.contextmanager
def fast_timeouts() -> Iterator[None]:
    saved = {k: getattr(timing, k) for k in FAST_TIMEOUTS}
    for k, v in FAST_TIMEOUTS.items():
        setattr(timing, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(timing, k, v)


async def pair_sites(rs_root: Path, ps_root: Path, name: str = "protected") -> None:
    """Pair a protected site (at ps_root) with a recovery site (at rs_root) once."""
    rs = RecoverySite(rs_root)
    host, port = await rs.start()
    try:
        await ProtectedSite(ps_root, name=name).pair(host, port, rs.issue_pairing_token())
    finally:
        await rs.stop()


async def wait_until(cond, timeout: float = 20.0, what: str = "condition",
                     step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def vm_like(rng: random.Random, n: int) -> bytes:
    """`n` bytes (a multiple of 512) the way VM disks look: runs of zeros, text-like
    compressible data and incompressible data, mixed per 4 KiB block."""
    out = bytearray()
    while len(out) < n:
        k = min(4096, n - len(out))
        r = rng.random()
        if r < 0.3:
            out += bytes(k)
        elif r < 0.65:
            word = rng.randbytes(rng.randrange(4, 40))
            out += (word * (k // len(word) + 1))[:k]
        else:
            out += rng.randbytes(k)
    return bytes(out)


class Model:
    """The protected volumes as a plain model: their contents when the VPG started, and
    every write since with its seq, replayable up to any checkpoint seq."""

    def __init__(self, vpg: VPG, base: dict[int, bytes] | None = None) -> None:
        self.vpg = vpg
        self.base = {vid: bytearray(base[vid] if base else bytes(v.size))
                     for vid, v in vpg.volumes.items()}
        self.current = {vid: bytearray(img) for vid, img in self.base.items()}
        self.log: list[tuple[int, int, int, bytes]] = []  # (seq, volume, offset, data)
        self.bytes = 0

    def write(self, vid: int, offset: int, data: bytes) -> int:
        seq = self.vpg.volumes[vid].write(offset, data)
        assert not self.log or seq > self.log[-1][0], "seqs must grow"
        self.log.append((seq, vid, offset, data))
        self.current[vid][offset : offset + len(data)] = data
        self.bytes += len(data)
        return seq

    def random_write(self, rng: random.Random, max_bytes: int = 64 * KiB,
                     incompressible: bool = False) -> int:
        vid = rng.choice(list(self.vpg.volumes))
        size = self.vpg.volumes[vid].size
        n = rng.randrange(1, max_bytes // 512 + 1) * 512
        n = min(n, size)
        offset = rng.randrange(0, (size - n) // 512 + 1) * 512
        data = rng.randbytes(n) if incompressible else vm_like(rng, n)
        return self.write(vid, offset, data)

    def images_at(self, seqs: list[int]) -> Iterator[tuple[int, dict[int, bytearray]]]:
        """(seq, images before seq) for each seq, ascending (the images are live: copy
        them to keep them)."""
        images = {vid: bytearray(img) for vid, img in self.base.items()}
        at = 0
        for seq in sorted(set(seqs)):
            while at < len(self.log) and self.log[at][0] < seq:
                _, vid, off, data = self.log[at]
                images[vid][off : off + len(data)] = data
                at += 1
            yield seq, images

    def backing(self) -> dict[int, bytes]:
        """What the backing stores hold now."""
        return {vid: v.read(0, v.size) for vid, v in self.vpg.volumes.items()}


def verify_journals(rs: RecoverySite, model: Model) -> int:
    """Every crash-consistent checkpoint in every journal of the VPG reads back exactly
    the model's image at its seq; every journal holds the same consistent checkpoints.
    Returns how many checkpoints were checked."""
    vpg = model.vpg
    journals = rs.journals(vpg.name)
    per_journal = {vm: [c for c in j.checkpoints(consistent=True)] for vm, j in journals.items()}
    seqs = {vm: [c.seq for c in cs] for vm, cs in per_journal.items()}
    first = next(iter(seqs.values()))
    for vm, s in seqs.items():
        assert s == first, f"journals disagree on consistent checkpoints: {vm} {s} vs {first}"
    checked = 0
    for seq, images in model.images_at(first):
        for vm, journal in journals.items():
            with journal.view(seq) as view:
                for vol in vpg.vms[vm].volumes:
                    got = view.read(vol.id, 0, vol.size)
                    want = images[vol.id]
                    if got != want:
                        bad = next(i for i in range(len(got)) if got[i] != want[i])
                        raise AssertionError(
                            f"checkpoint {seq}: volume {vol.name} of {vm} differs from the "
                            f"model first at byte {bad} (sector {bad // 512})")
            checked += 1
    return checked


async def checkpoint(vpg: VPG, tag: str | None = None) -> int:
    """VPG.checkpoint in a thread: it blocks while the capture ring is full, and the
    event loop it would block is the one whose sender drains the ring."""
    return (await asyncio.to_thread(vpg.checkpoint, tag)).seq


async def catch_up(vpg: VPG, rep: Replication, rs: RecoverySite,
                   timeout: float = 30.0) -> int:
    """Once the link is healthy: wait for any sync to end, take a checkpoint, wait for
    its ack and for it to be crash-consistent in the journals; returns its seq."""
    deadline = time.monotonic() + timeout
    while True:
        await wait_until(lambda: vpg.mode == "streaming", deadline - time.monotonic(),
                         f"VPG {vpg.name} to stream again (mode {vpg.mode}, "
                         f"{rep.status()})")
        try:
            seq = await checkpoint(vpg, "caught-up")
        except StateError:
            continue
        await wait_until(lambda s=seq: vpg.acked_seq >= s, deadline - time.monotonic(),
                         f"ack of seq {seq} (acked {vpg.acked_seq}, {rep.status()})")
        journals = rs.journals(vpg.name)
        marks = [j.checkpoint_by_id(seq) for j in journals.values()]
        if all(c.consistent for c in marks):
            return seq
        if time.monotonic() > deadline:
            raise AssertionError(f"no consistent checkpoint within {timeout} s")


def make_vpg(directory: Path, name: str, layout: dict[str, list[int]],
             settings: VPGSettings | None = None,
             contents: dict[int, bytes] | None = None) -> VPG:
    """A VPG over fresh raw image files: layout {vm: [volume sizes]}; `contents` fills
    volumes (by id) before protection."""
    directory.mkdir(parents=True, exist_ok=True)
    vpg = VPG(name, directory / "state", settings or VPGSettings(checkpoint_interval=0.3))
    vid = 0
    for vm, sizes in layout.items():
        vpg.add_vm(vm)
        for i, size in enumerate(sizes):
            path = directory / f"{vm}-{i}.img"
            with open(path, "wb") as f:
                f.truncate(size)
                if contents and vid in contents:
                    f.write(contents[vid])
            vpg.add_volume(vm, f"disk{i}", path)
            vid += 1
    return vpg


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
