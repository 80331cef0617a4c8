"""The recovery suite's delta-sync part (issue 11; bench/suites/recovery/__init__.py runs
it): the delta sync of reverse protection, over loopback TCP to a target in a subprocess,
each metric beside a baseline measured in the same run:

  recovery.delta_sync        bytes on the wire (frames both ways, headers included) of
                             the delta sync of a 2 GiB volume made different by random
                             4 KiB-1 MiB writes at 4 KiB-aligned offsets covering 5 % of it
                             vs  the bytes of the differing 4 KiB blocks
  recovery.delta_sync_time   wall time of that delta sync, until the target has made the
                             volume durable  vs  a full resend of the volume over the same
                             link (the same records, frames and durability, every block)

Both volumes start as the same VM-like data (zero, text-like and random 4 KiB blocks), in
the page cache on both sides, as a site's hot replicas are.  The target runs in its own
process, as the other site would: its hashing does not contend for the source's GIL.
Run as a script (`delta.py --target MODE PATH`) it is that target: it imports nothing of
bench/ at its top for that reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lz4.block
import numpy as np

from zcore import records, wire
from zcore._native import record as _rec
from zcore.deltasync import (
    DeltaSource,
    DeltaTarget,
    FileVolume,
    FrameStream,
    run_source,
    run_target,
)
from zcore.deltasync.messages import MAX_DATA, data_frame, parse_data
from zcore.fsutil import pwrite_all

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# the volume: 2 GiB, 5 % of it rewritten by 4 KiB-1 MiB writes, 4 KiB aligned
VOLUME_BYTES = 2 * GiB
DIFFER_FRACTION = 0.05
WRITE_MIN, WRITE_MAX, WRITE_ALIGN = 4 * KiB, 1 * MiB, 4 * KiB
# VM-like base data (benchkit.vm_like_pool), as in the replication suite
POOL_BYTES = 64 * MiB
FULL_CHUNK = 1 * MiB  # records of the full resend: as large as the delta sync's largest
DEADLINE_SECONDS = 600.0
VOLUME_ID = 1


def build_volumes(ctx, size: int) -> tuple[Path, Path, int, int]:
    """Source and target images, equal but for random writes on the source covering
    DIFFER_FRACTION of it; returns their paths, the differing bytes and the writes."""
    from benchkit import vm_like_pool  # here: run as the target script, bench/ is not on the path

    pool = vm_like_pool(min(ctx.scale(POOL_BYTES, align=4096), size), ctx.seed)
    src, dst = ctx.workdir / "source.img", ctx.workdir / "target.img"
    for path in (src, dst):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for at in range(0, size, len(pool)):
                pwrite_all(fd, memoryview(pool)[: min(len(pool), size - at)], at)
            os.fsync(fd)
        finally:
            os.close(fd)
    rng = np.random.default_rng(ctx.seed + 1)
    dirty = np.zeros(size // 4096, dtype=bool)
    noise = rng.bytes(WRITE_MAX * 4)
    writes = 0
    max_min = min(WRITE_MAX, size // 8) // WRITE_ALIGN
    fd = os.open(src, os.O_WRONLY)
    try:
        while dirty.sum() < DIFFER_FRACTION * len(dirty):
            n = int(rng.integers(WRITE_MIN // WRITE_ALIGN, max_min + 1))
            block = int(rng.integers(0, len(dirty) - n + 1))
            at = int(rng.integers(0, len(noise) - n * 4096 + 1))
            pwrite_all(fd, memoryview(noise)[at : at + n * 4096], block * 4096)
            dirty[block : block + n] = True
            writes += 1
        os.fsync(fd)  # clean before the runs: a run's final fdatasync is its own work only
    finally:
        os.close(fd)
    return src, dst, int(dirty.sum()) * 4096, writes


# ---- the target process -------------------------------------------------------------------

async def _serve(mode: str, path: str) -> None:
    done = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with FileVolume(path, writable=True) as volume:
                if mode == "delta":
                    stats = await run_target(reader, writer, DeltaTarget({VOLUME_ID: volume}))
                    result = {"target_bytes_received": stats.bytes_received,
                              "target_bytes_sent": stats.bytes_sent}
                else:
                    result = await _full_target(reader, writer, volume)
            done.set_result(result)
        except Exception as exc:
            done.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    result = await done
    server.close()
    print(json.dumps(result), flush=True)


async def _full_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       volume: FileVolume) -> dict[str, int]:
    """The full resend's receiving end: validate each frame's records, write them, and
    answer DONE once the volume is durable."""
    stream = FrameStream(reader, writer)
    sizes = np.zeros(VOLUME_ID + 1, dtype=np.uint64)
    sizes[VOLUME_ID] = volume.size
    last_seq = 0
    t0 = time.perf_counter()
    while True:
        f = await stream.read()
        if f.type == wire.DSYNC_DONE:
            break
        _, _, recs = parse_data(f)
        batch = _rec.scan(recs, 0, 0, last_seq, sizes)
        assert batch.status == 0, batch.status
        last_seq = batch.last_seq
        await asyncio.to_thread(_apply, volume, recs, batch.array())
    received = time.perf_counter()
    await asyncio.to_thread(volume.flush)
    flushed = time.perf_counter()
    await stream.send([wire.control(wire.DSYNC_DONE, 0, volumes=[])])
    return {"target_bytes_received": stream.stats.bytes_received,
            "target_bytes_sent": stream.stats.bytes_sent,
            "target_receive_seconds": received - t0, "target_flush_seconds": flushed - received}


def _apply(volume: FileVolume, recs: memoryview, arr: np.ndarray) -> None:
    for kind, flags, offset, length, pos, stored in zip(
            arr["type"].tolist(), arr["flags"].tolist(), arr["offset"].tolist(),
            arr["length"].tolist(), arr["pos"].tolist(), arr["stored"].tolist(), strict=True):
        payload = recs[pos + 64 : pos + 64 + stored]
        if kind == records.REC_ZERO:
            data: bytes | memoryview = bytes(length)
        elif flags & records.FLAG_LZ4:
            data = lz4.block.decompress(payload, uncompressed_size=length)
        else:
            data = payload[_rec.blockcrc_table_size(length) :]
        volume.pwrite(offset, data)


# ---- the source side ----------------------------------------------------------------------

class Target:
    """The target process for one run."""

    def __init__(self, mode: str, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--target", mode, str(path)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = json.loads(self.proc.stdout.readline())["port"]

    def result(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=DEADLINE_SECONDS)
        if self.proc.returncode:
            raise RuntimeError(f"target process failed ({self.proc.returncode})")
        return json.loads(line)  # type: ignore[no-any-return]


async def _delta_source(port: int, path: Path) -> tuple[float, dict[str, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    with FileVolume(path) as volume:
        source = DeltaSource({VOLUME_ID: volume})
        stats = await asyncio.wait_for(run_source(reader, writer, source), DEADLINE_SECONDS)
    seconds = time.perf_counter() - t0
    writer.close()
    return seconds, {"bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
                     "data_bytes": source.data_bytes,
                     "differing_blocks": source.differing_blocks}


async def _full_source(port: int, path: Path) -> tuple[float, dict[str, int]]:
    """Every block of the volume as records (the encoding a resend uses), DONE, and wait
    for the target's DONE (its volume durable)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    stream = FrameStream(reader, writer)
    t0 = time.perf_counter()
    with FileVolume(path) as volume:
        seq = 0
        for at in range(0, volume.size, MAX_DATA):
            frame, seq = await asyncio.to_thread(_full_frame, volume, at, seq)
            await stream.send([frame])
        await stream.send([wire.control(wire.DSYNC_DONE, 0, volumes=[])])
        await stream.read()
    seconds = time.perf_counter() - t0
    writer.close()
    return seconds, {"bytes_sent": stream.stats.bytes_sent}


def _full_frame(volume: FileVolume, at: int, seq: int) -> tuple[bytes, int]:
    recs = []
    end = min(at + MAX_DATA, volume.size)
    buf = bytearray(end - at)
    volume.read_into(at, buf)
    for off in range(at, end, FULL_CHUNK):
        seq += 1
        chunk = memoryview(buf)[off - at : min(off + FULL_CHUNK, end) - at]
        recs.append(records.encode_write(VOLUME_ID, seq, off, chunk, time.time_ns()))
    return data_frame(VOLUME_ID, 0, recs), seq


def _run_pass(mode: str, src: Path, dst: Path) -> tuple[float, dict[str, int]]:
    target = Target(mode, dst)
    try:
        fn = _delta_source if mode == "delta" else _full_source
        seconds, stats = asyncio.run(fn(target.port, src))
        stats.update(target.result())
    finally:
        if target.proc.poll() is None:
            target.proc.kill()
            target.proc.wait()
    return seconds, stats


def measure_delta_sync(ctx):
    """recovery.delta_sync and recovery.delta_sync_time, from one delta sync and one full
    resend of the same volumes."""
    from benchkit import Metric

    size = ctx.scale(VOLUME_BYTES, minimum=16 * MiB, align=MiB)
    ctx.log(f"building two {size / MiB:.0f} MiB volumes, {DIFFER_FRACTION:.0%} different")
    src, dst, differing, writes = build_volumes(ctx, size)
    ctx.log("delta sync")
    delta_s, delta = _run_pass("delta", src, dst)
    if src.read_bytes() != dst.read_bytes():
        raise AssertionError("after the delta sync the target differs from the source")
    ctx.log("full resend")
    full_s, full = _run_pass("full", src, dst)
    wire_bytes = delta["bytes_sent"] + delta["bytes_received"]
    details = {"volume_bytes": size, "writes": writes, "differing_bytes": differing,
               "delta": delta, "delta_seconds": delta_s, "full": full, "full_seconds": full_s}
    yield Metric("recovery.delta_sync", wire_bytes, "bytes", differing, target="<= 1.05",
                 note="bytes on the wire of the delta sync (both ways) vs differing 4 KiB blocks",
                 details=details)
    yield Metric("recovery.delta_sync_time", delta_s, "s", full_s, target="<= 0.35",
                 note="delta sync wall time (target durable) vs a full resend on the same link",
                 details=details)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--target":
        asyncio.run(_serve(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
