"""capture suite (issue 3): protected writes, bundle encoding, dirty-bitmap marking and
persistence.  Each metric beside a baseline measured in the same run:

  capture.write_64k   MB/s of 64 KiB writes through ProtectedVolume.write  vs  os.pwrite of
                      the same writes (offsets, data) to an unprotected file
  capture.write_4k    4 KiB writes/s, same comparison
  capture.write_hot   4 KiB writes/s rewriting the same 64 blocks over and over (a
                      filesystem journal's pattern), same comparison: a capture that made
                      overlapping writers wait for the sealer would stall here
  capture.encode      MB/s of CaptureRing.seal (records, LZ4, CRC32C, per-VM bundles) over
                      a ring of VM-like writes  vs  lz4.block.compress of the same bytes in
                      1 MiB chunks
  bitmap.mark         dirty extents/s marked by DirtyBitmap.mark_many from 1 M random
                      4-64 KiB writes over a 1 TiB volume  vs  pyroaring add_range per
                      extent in a Python loop (issue target: >= 2 M extents/s)
  bitmap.persist      ms of DirtyBitmap.persist (serialize, temp file, fsync, rename,
                      directory fsync) of a 1 TiB volume with 1 % of its blocks dirty in
                      64 KiB clusters  vs  the same durable replacement of as many plain
                      bytes; its size on disk in the details

VM-like data: a sample of the files under /usr (binaries, libraries, text, compressed
archives, in sorted order), which LZ4 compresses about as much as guest disks.

Write benchmarks: a VPG with one volume, its stream thread sealing (LZ4, CRC32C)
concurrently, and a null link that acknowledges each bundle as soon as it is sealed.
Protected and plain writes alternate in chunks (so both meet the same disturbances: the
disk and the CPUs are shared); the ring is drained between chunks (untimed) and is
sized to hold a whole chunk, so it cannot overflow whatever the stream thread does: the
details report the mode and the ring's fill at the end of each chunk.

Where the time goes: every metric's details carry `cpu_seconds_per_mb`, CPU seconds per
MB of written data of each stage (thread CPU clocks, user + system): the writer thread
(checks, ordering, pwrite, copy into the ring), the VPG's sealer (stream thread, plus the
drain's sealing between chunks), the null link, and the bare ring and plain pwrite
beside them; for capture.encode the seal itself, the same seal with one
lz4.block.compress call per record (the path used where the `lz4` package's compressor
cannot be reached natively) and the LZ4 baseline.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import lz4.block
import numpy as np
from benchkit import MB, Context, KiB, Metric, MiB, fsync_path, gc_paused
from pyroaring import BitMap

from zcore import records
from zcore._native import record as _rec
from zcore._native.capture import CaptureRing
from zcore.bitmap import BLOCK, DirtyBitmap
from zcore.fsutil import atomic_write
from zcore.vpg import VPG, VPGSettings

DESCRIPTION = "protected writes, bundle encoding, bitmap marking and persistence (issue 3)"

TiB = 1 << 40

# ---- VM-like data -----------------------------------------------------------------------
# Sample of /usr: at most SAMPLE_FILE_BYTES from each regular file, in sorted walk order,
# until SAMPLE_BYTES.  64 MiB is far larger than any cache and takes ~0.3 s to read.
SAMPLE_DIRS = ("/usr/bin", "/usr/lib", "/usr/share", "/usr/libexec", "/usr/sbin")
SAMPLE_BYTES = 64 * MiB
SAMPLE_FILE_BYTES = 256 * KiB

# ---- capture.write_64k / capture.write_4k ----------------------------------------------
# The protected volume and the plain file: 1 GiB each, preallocated, written at random
# aligned offsets (a guest's random I/O; the page cache takes it, both sides alike).
WRITE_VOLUME_BYTES = 1 << 30
# Bytes of writes per chunk; a chunk is timed as one piece, protected and plain chunks
# alternate (which goes first alternates too).  64 MiB is ~30-60 ms of 64 KiB writes.
WRITE_CHUNK_BYTES = 64 * MiB
# Chunks per side and pass, and passes; the least disturbed pass (smallest protected +
# plain time) counts, every pass's ratio is in the details.
WRITE_CHUNKS = 8
WRITE_PASSES = 3
# VPG buffer: the ring is half of it and must hold a whole chunk of ring entries (data +
# a 64-byte header each: 66.5 MiB for 4 KiB writes) even if the stream sealed nothing.
WRITE_BUFFER_BYTES = 256 * MiB
WRITE_64K_TARGET = ">= 0.9"  # issue 14
WRITE_4K_TARGET = ">= 0.7"
# capture.write_hot: 4 KiB rewrites cycling over this many blocks (issue 14)
HOT_BLOCKS = 64
WRITE_HOT_TARGET = ">= 0.7"

# ---- capture.encode ---------------------------------------------------------------------
# Writes captured into a ring, then sealed into 1 MiB bundles (the VPG's default bundle
# size).  Lengths are random 4-64 KiB in 4 KiB steps, as a guest's page cache issues them.
ENCODE_RING_BYTES = 192 * MiB
ENCODE_DATA_BYTES = 128 * MiB
ENCODE_BUNDLE_BYTES = 1 * MiB
ENCODE_BASELINE_CHUNK = 1 * MiB
ENCODE_PASSES = 3
ENCODE_TARGET = ">= 0.9"  # issue 14

# ---- bitmap.mark ------------------------------------------------------------------------
MARK_VOLUME_BYTES = 1 * TiB
MARK_WRITES = 1_000_000
# The VPG marks the dirty log it takes each round; 64 Ki writes is ~50 ms of a busy
# guest.  Marking the whole million at once is in the details.
MARK_BATCH = 1 << 16
MARK_PASSES = 3
MARK_ABSOLUTE_TARGET = 2e6  # extents/s (issue 3)
MARK_TARGET = ">= 1"  # and bulk marking must beat the per-extent loop it replaces

# ---- bitmap.persist ---------------------------------------------------------------------
PERSIST_VOLUME_BYTES = 1 * TiB
PERSIST_DIRTY_FRACTION = 0.01
PERSIST_CLUSTER = 64 * KiB
PERSIST_REPEATS = 7  # persist and baseline alternate; the fastest of each counts


# ---- helpers ----------------------------------------------------------------------------

def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user + system) `thread` has used so far."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def vm_like_sample(ctx: Context, nbytes: int) -> mmap.mmap:
    """`nbytes` of /usr file contents (sorted walk, at most SAMPLE_FILE_BYTES a file), in
    page-aligned memory: writes are cut from it at 512-byte multiples, so their sources
    are 64-byte aligned like a guest's page-cache buffers (misaligned copies run many
    times slower on these machines: DESIGN.md, Performance)."""
    return vm_aligned(_usr_bytes(nbytes))


def _usr_bytes(nbytes: int) -> bytes:
    out = bytearray()
    for top in SAMPLE_DIRS:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    with open(path, "rb") as f:
                        out += f.read(min(SAMPLE_FILE_BYTES, nbytes - len(out)))
                except OSError:
                    continue
                if len(out) >= nbytes:
                    return bytes(out)
    if not out:
        raise RuntimeError("no readable file under /usr to build VM-like data from")
    while len(out) < nbytes:  # a small /usr: repeat it
        out += out[: nbytes - len(out)]
    return bytes(out)


def vm_aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def lz4_ratio(data) -> float:
    mv = memoryview(data)
    packed = sum(len(lz4.block.compress(mv[i:i + MiB], store_size=False))
                 for i in range(0, len(data), MiB))
    return len(data) / packed


def preallocated(path: Path, size: int) -> int:
    """A file of `size` bytes of preallocated (unwritten) blocks.  Not written whole first:
    on these VMs random 4 KiB overwrites of a written, page-cached 1 GiB file cost ~35 us
    of kernel time each (vs ~4 us here), which would hide what capture costs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, size)
    os.fsync(fd)
    return fd


class NullLink:
    """Acknowledges every bundle as soon as the VPG seals it (an infinitely fast link)."""

    def __init__(self, vpg: VPG) -> None:
        self.vpg = vpg
        self.acked = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="null-link", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            found = self.vpg.wait_bundles(self.acked, 0.05)
            if found:
                self.acked = found[-1].last_seq
                self.vpg.ack(self.acked)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# ---- capture.write_64k / capture.write_4k ----------------------------------------------

def measure_writes(ctx: Context, sample: bytes, size: int, name: str, target: str,
                   hot: int = 0) -> Metric:
    """`size`-byte writes at random offsets, or (`hot` > 0) cycling over `hot` blocks."""
    volume = ctx.scale(WRITE_VOLUME_BYTES, minimum=16 * MiB, align=size)
    chunk_bytes = ctx.scale(WRITE_CHUNK_BYTES, minimum=1 * MiB, align=size)
    per_chunk = chunk_bytes // size
    chunks = WRITE_CHUNKS if not ctx.quick else 2
    passes = WRITE_PASSES if not ctx.quick else 1
    rng = np.random.default_rng(ctx.seed + size)
    mv = memoryview(sample)
    work = ctx.subdir(f"write-{size // KiB}k" + ("-hot" if hot else ""))
    plain_fd = preallocated(work / "plain.img", volume)
    os.close(preallocated(work / "protected.img", volume))
    # where the time goes: the same writes through a bare CaptureRing (copy into the ring,
    # no stream thread sealing beside it), drained untimed
    bare_fd = preallocated(work / "bare.img", volume)
    need = 2 * (chunk_bytes + per_chunk * 64) + 2 * MiB  # the ring is half the buffer
    settings = VPGSettings(buffer_bytes=-(-max(ctx.scale(WRITE_BUFFER_BYTES, minimum=4 * MiB),
                                               need) // 128) * 128)
    vpg = VPG("bench", work / "state", settings)
    vpg.add_vm("vm")
    vol = vpg.add_volume("vm", "disk0", work / "protected.img")
    vpg.start()
    link = NullLink(vpg)
    ring_bytes = settings.buffer_bytes // 2 // 64 * 64
    bare = CaptureRing(ring_bytes)
    ring_fill: list[int] = []
    results: list[tuple[float, float]] = []
    bare_seconds: list[float] = []
    cpu = dict.fromkeys(("protected_writer", "sealer", "link", "bare_writer", "plain_writer"),
                        0.0)
    stream = vpg._thread  # the VPG's stream thread: the sealer
    assert stream is not None
    hot_base = int(rng.integers(0, volume // size - hot)) * size if hot else 0

    def offsets() -> list[int]:
        if hot:
            return (hot_base + np.arange(per_chunk) % hot * size).tolist()
        return (rng.integers(0, volume // size, per_chunk) * size).tolist()

    try:
        # warm-up (untimed): every page of both rings touched once, as in a running VPG
        for _ in range(-(-ring_bytes // (chunk_bytes + per_chunk * 64)) + 1):
            for off in offsets():
                data = mv[off % (len(mv) - size) // 512 * 512:][:size]
                vol.write(off, data)
                bare.write(bare_fd, 0, volume, off, data)
            bare.discard()
            vpg.flush(60)
            while vpg.status().pending_bundles:
                time.sleep(0.001)
        for p in range(passes):
            seconds = {"protected": 0.0, "plain": 0.0, "bare": 0.0}
            for k in range(chunks):
                offs = offsets()
                srcs = (rng.integers(0, (len(sample) - size) // 512, per_chunk) * 512).tolist()
                views = [mv[s:s + size] for s in srcs]
                ops = list(zip(offs, views, strict=True))
                order = ("plain", "protected", "bare") if k % 2 == 0 else (
                    "bare", "protected", "plain")
                for side in order:
                    if side == "protected":
                        write = vol.write
                        c_seal, c_link = thread_cpu(stream), thread_cpu(link.thread)
                        with gc_paused():
                            c0 = time.thread_time()
                            t0 = time.perf_counter()
                            for off, data in ops:
                                write(off, data)
                            seconds[side] += time.perf_counter() - t0
                            c1 = time.thread_time()
                        ring_fill.append(vpg.status().buffer_used)
                        # drain (untimed): the next chunk starts with an empty buffer
                        vpg.flush(60)
                        while vpg.status().pending_bundles:
                            time.sleep(0.001)
                        cpu["protected_writer"] += c1 - c0
                        # the drain seals what the stream thread had not: sealer work too
                        cpu["sealer"] += (thread_cpu(stream) - c_seal
                                          + time.thread_time() - c1)
                        cpu["link"] += thread_cpu(link.thread) - c_link
                    elif side == "bare":
                        write = bare.write
                        with gc_paused():
                            c0 = time.thread_time()
                            t0 = time.perf_counter()
                            for off, data in ops:
                                write(bare_fd, 0, volume, off, data)
                            seconds[side] += time.perf_counter() - t0
                            cpu["bare_writer"] += time.thread_time() - c0
                        bare.discard()
                    else:
                        pwrite = os.pwrite
                        with gc_paused():
                            c0 = time.thread_time()
                            t0 = time.perf_counter()
                            for off, data in ops:
                                pwrite(plain_fd, data, off)
                            seconds[side] += time.perf_counter() - t0
                            cpu["plain_writer"] += time.thread_time() - c0
            results.append((seconds["protected"], seconds["plain"]))
            bare_seconds.append(seconds["bare"])
            n = chunks * per_chunk
            ctx.log(f"write {size // KiB} KiB pass {p}: plain {n / seconds['plain']:,.0f}/s, "
                    f"protected {n / seconds['protected']:,.0f}/s, "
                    f"ratio {seconds['plain'] / seconds['protected']:.3f}")
        st = vpg.status()
        overflowed = any("overflow" in e for e in st.events)
        mode = st.mode
    finally:
        link.close()
        vpg.close()
        os.close(plain_fd)
        os.close(bare_fd)
        del bare
    if overflowed or mode != "streaming":
        raise RuntimeError(f"the capture buffer overflowed during {name} (mode {mode})")
    best = min(range(len(results)), key=lambda i: sum(results[i]))
    prot, plain = results[best]
    n = chunks * per_chunk
    written_mb = n * size * len(results) / MB
    where = "random offsets" if not hot else f"rewrites cycling over {hot} blocks"
    if size >= 64 * KiB:
        value, base, unit = n * size / prot / MB, n * size / plain / MB, "MB/s"
    else:
        value, base, unit = n / prot, n / plain, "writes/s"
    return Metric(
        name, value, unit, base, target,
        note=f"{size // KiB} KiB writes ({where}) of VM-like data through ProtectedVolume.write "
             "(VPG stream thread sealing concurrently, bundles acknowledged on sealing by a "
             "null link; buffer holds a whole chunk: never overflows; ring warmed) vs "
             "os.pwrite of the same writes to an unprotected preallocated file; alternating "
             f"{chunk_bytes // MiB} MiB chunks, least disturbed of {passes} passes",
        details={
            "write_bytes": size, "writes_per_pass": n, "volume_bytes": volume,
            "hot_blocks": hot,
            "cpu_seconds_per_mb": {k: v / written_mb for k, v in cpu.items()},
            # plain / protected writer CPU: the ratio with a core of its own for the sealer
            # (on a shared machine the sealer's CPU competes with the writer's: the
            # measured ratio is lower by what the scheduler gives the sealer)
            "writer_cpu_ratio": cpu["plain_writer"] / cpu["protected_writer"]
            if cpu["protected_writer"] else None,
            "buffer_bytes": settings.buffer_bytes, "mode_at_end": mode,
            "overflowed": overflowed, "buffer_used_after_chunk_max": max(ring_fill),
            "passes_protected_seconds": [r[0] for r in results],
            "passes_plain_seconds": [r[1] for r in results],
            "passes_ratio": [r[1] / r[0] for r in results],
            # the capture alone (bare CaptureRing.write: checks, ordering, pwrite, copy into
            # the ring) against the same baseline: what the stream thread beside it costs
            # is the difference to passes_ratio
            "passes_bare_ring_seconds": bare_seconds,
            "passes_bare_ring_ratio": [r[1] / b for r, b in zip(results, bare_seconds,
                                                                 strict=True)],
            "bare_ring_ratio": plain / bare_seconds[best],
        },
    )


# ---- capture.encode ---------------------------------------------------------------------

def measure_encode(ctx: Context, sample) -> Metric:
    total = ctx.scale(ENCODE_DATA_BYTES, minimum=2 * MiB)
    ring_bytes = ctx.scale(ENCODE_RING_BYTES, minimum=4 * MiB, align=64)
    rng = np.random.default_rng(ctx.seed + 7)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(1, 17)) * 4 * KiB)
    srcs = (rng.integers(0, (len(sample) - 64 * KiB) // 4096, len(lengths)) * 4096).tolist()
    volume = 4 * total
    offs = (rng.integers(0, (volume - 64 * KiB) // 4096, len(lengths)) * 4096).tolist()
    mv = memoryview(sample)
    views = [mv[s:s + n] for s, n in zip(srcs, lengths, strict=True)]
    data_bytes = sum(lengths)
    joined = vm_aligned(b"".join(views))  # the same bytes, for the baseline
    work = ctx.subdir("encode")
    fd = os.open(work / "disk.img", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, volume)
    vm_of_volume = np.zeros(1, dtype=np.uint32)
    bundle = ctx.scale(ENCODE_BUNDLE_BYTES, minimum=64 * KiB, align=64)

    def filled_ring() -> CaptureRing:
        ring = CaptureRing(ring_bytes)
        for off, data in zip(offs, views, strict=True):
            ring.write(fd, 0, volume, off, data)
        if ring.stats()["overflowed"]:
            raise RuntimeError("the encode ring overflowed while filling")
        return ring

    def seal_all(ring: CaptureRing, out: list, keep: bool = False) -> None:
        """Seal the whole ring; `out` gets each bundle's encoded size, or (`keep`) the
        bundle.  Timed seals drop each bundle once sealed, as the baseline drops its
        output (and a VPG a bundle once acknowledged, which the write benchmarks' null
        link does at once): kept, every bundle was fresh memory to fault in (~6 % of the
        seal), while the baseline's memory was reused."""
        seal = ring.seal
        while (b := seal(bundle, vm_of_volume, 1, True, records.LZ4_MIN_SAVING)):
            out.append(b if keep else b.encoded_bytes)

    def baseline() -> None:
        compress, jm = lz4.block.compress, memoryview(joined)
        for i in range(0, len(joined), ENCODE_BASELINE_CHUNK):
            compress(jm[i:i + ENCODE_BASELINE_CHUNK], store_size=False)

    results: list[tuple[float, float]] = []
    sealed_sizes: list = []
    cpu = {"seal": 0.0, "lz4_baseline": 0.0}
    try:
        for p in range(ENCODE_PASSES if not ctx.quick else 1):
            ring = filled_ring()
            sealed_sizes = []
            t = {}
            for step in (("lz4", "seal") if p % 2 == 0 else ("seal", "lz4")):
                with gc_paused():
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    if step == "seal":
                        seal_all(ring, sealed_sizes)
                    else:
                        baseline()
                    t[step] = time.perf_counter() - t0
                    cpu["seal" if step == "seal" else "lz4_baseline"] += time.thread_time() - c0
            results.append((t["seal"], t["lz4"]))
            del ring
            ctx.log(f"encode pass {p}: lz4 {data_bytes / t['lz4'] / MB:.0f} MB/s, "
                    f"seal {data_bytes / t['seal'] / MB:.0f} MB/s")
        # the per-record path (lz4.block.compress per write), for comparison: same bytes
        ring = filled_ring()
        previous = _rec.set_native_lz4(False)
        try:
            with gc_paused():
                c0 = time.thread_time()
                t0 = time.perf_counter()
                per_record: list = []
                seal_all(ring, per_record)
                per_record_seconds = time.perf_counter() - t0
                per_record_cpu = time.thread_time() - c0
        finally:
            _rec.set_native_lz4(previous)
        del ring
        # the rings' time stamps differ, so compare sizes (the bytes: tests/test_records_batch)
        if sum(per_record) != sum(sealed_sizes):
            raise RuntimeError("the per-record path encoded the same writes to other sizes")
        # the records' flags, from one more (untimed) native seal, its bundles kept
        ring = filled_ring()
        kept: list = []
        seal_all(ring, kept, keep=True)
        del ring
    finally:
        os.close(fd)
    sizes = np.array([volume], dtype=np.uint64)
    flags = np.concatenate([_rec.scan(part, 0, 0, 0, sizes).array()["flags"]
                            for b in kept for part in b.parts if part])
    encoded = sum(sealed_sizes)
    sealt, baset = min(results, key=sum)
    return Metric(
        "capture.encode", data_bytes / sealt / MB, "MB/s", data_bytes / baset / MB,
        ENCODE_TARGET,
        note="CaptureRing.seal into 1 MiB bundles (record headers, LZ4 per write when it "
             "saves 1/16, else raw with block CRC32C) of random 4-64 KiB writes of /usr "
             "data vs lz4.block.compress of the same bytes in 1 MiB chunks; one thread; "
             f"least disturbed of {len(results)} passes",
        details={
            "data_bytes": data_bytes, "writes": len(lengths), "bundle_bytes": bundle,
            "sample_lz4_ratio": lz4_ratio(joined), "encoded_bytes": encoded,
            "encoded_ratio": data_bytes / encoded, "bundles": len(sealed_sizes),
            "lz4_records": int(np.count_nonzero(flags & records.FLAG_LZ4)),
            "records": int(flags.size),
            "passes_seal_seconds": [r[0] for r in results],
            "passes_lz4_seconds": [r[1] for r in results],
            "passes_ratio": [r[1] / r[0] for r in results],
            "native_lz4": _rec.native_lz4(),
            "per_record_lz4_seal_mb_per_s": data_bytes / per_record_seconds / MB,
            "cpu_seconds_per_mb": {
                "seal": cpu["seal"] / (data_bytes * len(results) / MB),
                "seal_per_record_lz4": per_record_cpu / (data_bytes / MB),
                "lz4_baseline": cpu["lz4_baseline"] / (data_bytes * len(results) / MB),
            },
        },
    )


# ---- bitmap.mark ------------------------------------------------------------------------

def mark_workload(ctx: Context, volume: int) -> tuple[np.ndarray, np.ndarray]:
    n = ctx.scale(MARK_WRITES, minimum=10_000)
    rng = np.random.default_rng(ctx.seed + 3)
    lengths = rng.integers(1, 17, n, dtype=np.uint64) * np.uint64(4 * KiB)
    offsets = rng.integers(0, (volume - 64 * KiB) // 4096, n, dtype=np.uint64) * np.uint64(4096)
    return offsets, lengths


def measure_mark(ctx: Context) -> Metric:
    volume = MARK_VOLUME_BYTES
    offsets, lengths = mark_workload(ctx, volume)
    n = offsets.size
    batch = ctx.scale(MARK_BATCH, minimum=1000)
    offs_l, lens_l = offsets.tolist(), lengths.tolist()

    def bulk() -> DirtyBitmap:
        bm = DirtyBitmap(volume)
        for i in range(0, n, batch):
            bm.mark_many(offsets[i:i + batch], lengths[i:i + batch])
        return bm

    def loop() -> BitMap:
        bm = BitMap()
        add = bm.add_range
        for o, ln in zip(offs_l, lens_l, strict=True):
            add(o >> 12, (o + ln + BLOCK - 1) >> 12)
        return bm

    def whole() -> DirtyBitmap:
        bm = DirtyBitmap(volume)
        bm.mark_many(offsets, lengths)
        return bm

    times: dict = {bulk: [], loop: [], whole: []}
    results: dict = {}
    for p in range(MARK_PASSES if not ctx.quick else 1):
        for fn in ((loop, bulk, whole) if p % 2 == 0 else (whole, bulk, loop)):
            with gc_paused():
                t0 = time.perf_counter()
                results[fn] = fn()
                times[fn].append(time.perf_counter() - t0)
    # the three agree
    loop_ids = np.frombuffer(results[loop].to_array(), dtype=np.uint32)
    assert np.array_equal(results[bulk].block_ids(), loop_ids)
    assert np.array_equal(results[whole].block_ids(), loop_ids)
    value, base = n / min(times[bulk]), n / min(times[loop])
    ctx.log(f"mark: bulk {value:,.0f}/s, whole {n / min(times[whole]):,.0f}/s, "
            f"add_range loop {base:,.0f}/s")
    return Metric(
        "bitmap.mark", value, "extents/s", base, MARK_TARGET,
        note=f"DirtyBitmap.mark_many of {n:,} random 4-64 KiB writes over a 1 TiB volume in "
             f"batches of {batch:,} (the dirty log of a VPG round) vs pyroaring add_range "
             "per write in a Python loop; issue target >= 2 M extents/s (details)",
        details={
            "writes": n, "batch": batch, "volume_bytes": volume,
            "absolute_target_per_s": MARK_ABSOLUTE_TARGET,
            "absolute_met": value >= MARK_ABSOLUTE_TARGET,
            "one_batch_per_s": n / min(times[whole]),
            "dirty_blocks": len(results[bulk]),
            "memory_bytes": results[bulk].memory_bytes,
            "seconds_bulk": times[bulk], "seconds_loop": times[loop],
            "seconds_one_batch": times[whole],
        },
    )


# ---- bitmap.persist ---------------------------------------------------------------------

def measure_persist(ctx: Context) -> Metric:
    volume = PERSIST_VOLUME_BYTES if not ctx.quick else PERSIST_VOLUME_BYTES // 100
    blocks = volume // BLOCK
    per_cluster = PERSIST_CLUSTER // BLOCK
    nclusters = int(blocks * PERSIST_DIRTY_FRACTION) // per_cluster
    rng = np.random.default_rng(ctx.seed + 5)
    clusters = rng.choice(blocks // per_cluster, nclusters, replace=False).astype(np.uint64)
    bm = DirtyBitmap(volume)
    bm.mark_many(clusters * np.uint64(PERSIST_CLUSTER),
                 np.full(nclusters, PERSIST_CLUSTER, dtype=np.uint64))
    work = ctx.subdir("persist")
    path, plain = work / "bitmap-0000.zcb", work / "plain.bin"
    size = bm.persist(path)
    filler = os.urandom(size)
    t_persist, t_plain, t_serialize, t_load = [], [], [], []
    for k in range(PERSIST_REPEATS if not ctx.quick else 2):
        steps = (("persist", lambda: bm.persist(path)), ("plain", lambda: atomic_write(plain,
                                                                                      filler)))
        for label, fn in (steps if k % 2 == 0 else steps[::-1]):
            with gc_paused():
                t0 = time.perf_counter()
                fn()
                (t_persist if label == "persist" else t_plain).append(time.perf_counter() - t0)
        with gc_paused():
            t0 = time.perf_counter()
            bm.serialize()
            t_serialize.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = DirtyBitmap.load(path, volume_size=volume)
            t_load.append(time.perf_counter() - t0)
    assert np.array_equal(back.block_ids(), bm.block_ids())
    fsync_path(work)
    ctx.log(f"persist: {min(t_persist) * 1e3:.2f} ms for {size:,} bytes "
            f"(plain durable replace {min(t_plain) * 1e3:.2f} ms)")
    return Metric(
        "bitmap.persist", min(t_persist) * 1e3, "ms", min(t_plain) * 1e3, None,
        note=f"DirtyBitmap.persist of a {volume / TiB:g} TiB volume with "
             f"{PERSIST_DIRTY_FRACTION:.0%} of its 4 KiB blocks dirty in 64 KiB clusters "
             f"({size:,} bytes on disk) vs the same durable replacement (temp, fsync, "
             "rename, directory fsync) of as many plain bytes; fastest of "
             f"{len(t_persist)}, alternating",
        details={
            "size_on_disk_bytes": size, "volume_bytes": volume,
            "dirty_blocks": len(bm), "clusters": nclusters, "block": bm.block,
            "memory_bytes": bm.memory_bytes,
            "serialize_ms": min(t_serialize) * 1e3, "load_ms": min(t_load) * 1e3,
            "persist_ms_all": [t * 1e3 for t in t_persist],
            "plain_ms_all": [t * 1e3 for t in t_plain],
        },
    )


def run(ctx: Context):
    sample_bytes = ctx.scale(SAMPLE_BYTES, minimum=4 * MiB)
    t0 = time.perf_counter()
    sample = vm_like_sample(ctx, sample_bytes)
    ctx.log(f"VM-like sample: {len(sample) / MiB:.0f} MiB from /usr in "
            f"{time.perf_counter() - t0:.1f} s, LZ4 ratio {lz4_ratio(sample):.2f}")
    yield measure_writes(ctx, sample, 64 * KiB, "capture.write_64k", WRITE_64K_TARGET)
    yield measure_writes(ctx, sample, 4 * KiB, "capture.write_4k", WRITE_4K_TARGET)
    yield measure_writes(ctx, sample, 4 * KiB, "capture.write_hot", WRITE_HOT_TARGET,
                         hot=HOT_BLOCKS)
    yield measure_encode(ctx, sample)
    yield measure_mark(ctx)
    yield measure_persist(ctx)
