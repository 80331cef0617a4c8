"""nbd suite (issue: NBD front-end): real clients against zcore's NBD server, each beside
the same client against `qemu-nbd` serving a raw file in the same run.

  nbd.write_seq       MB/s of `nbdcopy` writing 1 GiB (random data) into a protected-volume
                      export: every write captured by a running VPG whose stream is drained
                      by an acknowledging link (a recovery site that keeps up)  vs  nbdcopy
                      into qemu-nbd serving a raw file
  nbd.read_pit_seq    MB/s of `nbdcopy` reading a point-in-time export of a 1 GiB volume
                      (replica + journal: a promoted full image, then 256 MiB of scattered
                      4-64 KiB writes journaled on top)  vs  qemu-nbd serving a raw copy of
                      the same image; both page-cache warm
  nbd.randwrite_4k    fio (nbd engine) 4 KiB random-write IOPS on a protected-volume export
                      vs  qemu-nbd on a raw file
  nbd.copy_sparse     MB/s (of the image's size) of `nbdcopy` from a point-in-time export of
                      a 4 GiB volume with 10 % allocated (1 MiB extents, half in the replica,
                      half journaled; block status lets nbdcopy skip the holes)  vs  nbdcopy
                      from qemu-nbd serving a sparse raw copy of the same image
  nbd.trim            bytes the replica holds allocated after a TRIM of half a protected
                      volume (every other 4 MiB, through qemu-io over NBD) is captured and
                      promoted  vs  before it (target: at most 0.55)

Both sides of a metric run alternately, several passes; the best of each side counts and
every pass is in the details.  The server runs in this process (a `ServerThread`), as
`zcore nbd serve` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from benchkit import MB, Context, GiB, KiB, Metric, MiB, read_through, sync_dirty

from zcore import nbd
from zcore.journal import Journal, VolumeSpec
from zcore.vpg import VPG, VPGSettings

DESCRIPTION = ("NBD server vs qemu-nbd: nbdcopy write/read, fio 4 KiB random writes, "
               "sparse copy; TRIM down to the replica")

# ---- nbd.write_seq ----------------------------------------------------------------------
WRITE_BYTES = 1 * GiB  # issue: nbdcopy writing 1 GiB
WRITE_PASSES = 3
WRITE_TARGET = ">= 1.0"  # issue 14 (the NBD front-end issue asked 0.8)

# ---- nbd.read_pit_seq -------------------------------------------------------------------
PIT_BYTES = 1 * GiB
PIT_OVERWRITE_BYTES = 256 * MiB  # scattered writes journaled over the promoted image
PIT_WRITE_MIN, PIT_WRITE_MAX = 4 * KiB, 64 * KiB
READ_PASSES = 3
READ_TARGET = ">= 1.0"  # issue 14 (the NBD front-end issue asked 0.5)

# ---- nbd.randwrite_4k -------------------------------------------------------------------
FIO_SIZE = 1 * GiB  # region the random writes fall in
FIO_SECONDS = 8  # per run
FIO_IODEPTH = 32
FIO_PASSES = 2
FIO_TARGET = ">= 1.0"  # issue 14 (the NBD front-end issue asked 0.7)

# ---- nbd.copy_sparse --------------------------------------------------------------------
SPARSE_BYTES = 4 * GiB  # issue: a 4 GiB image with 10 % allocated
SPARSE_FRACTION = 0.10
SPARSE_EXTENT = 1 * MiB
SPARSE_PASSES = 3
SPARSE_TARGET = ">= 1.0"

# ---- nbd.trim ---------------------------------------------------------------------------
TRIM_BYTES = 1 * GiB  # the protected volume, filled, then every other TRIM_STRIPE trimmed
TRIM_STRIPE = 4 * MiB
TRIM_TARGET = "<= 0.55"

TOOLS = ("nbdcopy", "qemu-nbd", "fio", "qemu-io")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuNbd:
    """qemu-nbd serving a raw file on loopback TCP (writeback cache, as zcore's page
    cache writes), shared by as many connections as nbdcopy opens."""

    def __init__(self, path: Path, name: str = "raw", *, readonly: bool = False) -> None:
        self.port = _free_port()
        args = ["qemu-nbd", "-f", "raw", "-t", "-x", name, "-b", "127.0.0.1",
                "-p", str(self.port), "--shared=16", "--cache=writeback", "--aio=threads"]
        if readonly:
            args.append("--read-only")
        self.proc = subprocess.Popen([*args, str(path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.uri = f"nbd://127.0.0.1:{self.port}/{name}"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("qemu-nbd did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class AckLink:
    """Drains a VPG's stream as a sender whose recovery site keeps up would: takes every
    sealed bundle and acknowledges it (nothing is written on this machine)."""

    def __init__(self, vpg: VPG) -> None:
        self.vpg = vpg
        self.sent = 0
        self.bundles = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for b in self.vpg.wait_bundles(self.sent, 0.05):
                self.sent = max(self.sent, b.last_seq)
                self.bundles += 1
            if self.sent:
                self.vpg.ack(self.sent)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ProtectedServer:
    """A VPG protecting one raw file, its volume served by zcore's NBD server."""

    def __init__(self, root: Path, image: Path) -> None:
        self.vpg = VPG("bench", root / "vpg", VPGSettings())
        self.vpg.add_vm("vm1")
        self.volume = self.vpg.add_volume("vm1", "disk0", image)
        self.vpg.start()
        self.link = AckLink(self.vpg)
        self.server = nbd.ServerThread(nbd.NBDServer([nbd.volume_export(self.volume)]),
                                       port=0).start()
        self.uri = self.server.uri("disk0")

    def status(self) -> dict:
        s = self.vpg.status()
        return {"vpg_mode": s.mode, "captured_writes": s.writes,
                "captured_bytes": s.bytes_written, "last_seq": s.last_seq,
                "acked_seq": s.acked_seq, "bundles": self.link.bundles}

    def close(self) -> None:
        self.server.stop()
        self.link.close()
        self.vpg.close()


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _nbdcopy(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", src, dst], check=True, capture_output=True)
    return time.perf_counter() - t0


def _copy_passes(ctx: Context, label: str, ours: str, qemu: str, raw: Path, root: Path,
                 size: int, count: int) -> tuple[bool, list[tuple[float, float]]]:
    """nbdcopy of `ours` (a zcore export of the image `raw`) and of `qemu` (qemu-nbd on
    it) to null, alternating which goes first, `count` passes (one when quick), after a
    warm-up that also checks ours serves the image: (equal, [(zcore MB/s, qemu MB/s)])."""
    check = root / "check.raw"
    _nbdcopy(ours, str(check))
    equal = _same(check, raw)
    check.unlink()
    _nbdcopy(qemu, "null:")
    passes = []
    for r in range(count if not ctx.quick else 1):
        order = ((ours, "zcore"), (qemu, "qemu"))
        result = {}
        for uri, side in (order if r % 2 == 0 else order[::-1]):
            result[side] = size / _nbdcopy(uri, "null:") / MB
        passes.append((result["zcore"], result["qemu"]))
        ctx.log(f"{label} pass {r}: zcore {result['zcore']:.0f} MB/s, qemu-nbd "
                f"{result['qemu']:.0f} MB/s")
    return equal, passes


def _best(passes: list[tuple[float, float]]) -> tuple[float, float]:
    """(ours, baseline): the best (largest) of each side over the passes."""
    return max(p[0] for p in passes), max(p[1] for p in passes)


def measure_write_seq(ctx: Context) -> Metric:
    size = ctx.scale(WRITE_BYTES, minimum=8 * MiB, align=MiB)
    src = ctx.workdir / "write-src.raw"
    with open(src, "wb") as f:
        for _ in range(size // (64 * MiB) or 1):
            f.write(os.urandom(min(size, 64 * MiB)))
    read_through(src)
    ours = ProtectedServer(ctx.subdir("write-zcore"), _sparse(ctx.workdir / "w-z.img", size))
    theirs = QemuNbd(_sparse(ctx.workdir / "w-q.img", size))
    passes = []
    try:
        for r in range(WRITE_PASSES if not ctx.quick else 1):
            order = ((ours.uri, "zcore"), (theirs.uri, "qemu"))
            result = {}
            for uri, side in (order if r % 2 == 0 else order[::-1]):
                sync_dirty()
                result[side] = size / _nbdcopy(str(src), uri) / MB
            passes.append((result["zcore"], result["qemu"]))
            ctx.log(f"write_seq pass {r}: zcore {result['zcore']:.0f} MB/s, qemu-nbd "
                    f"{result['qemu']:.0f} MB/s")
        details = {"bytes": size, "passes": passes, **ours.status()}
    finally:
        theirs.close()
        ours.close()
    if not ctx.quick:  # what the clients wrote is what each server holds
        details["images_equal"] = _same(ctx.workdir / "w-z.img", src) and _same(
            ctx.workdir / "w-q.img", src)
    value, baseline = _best(passes)
    return Metric("nbd.write_seq", value, "MB/s", baseline, WRITE_TARGET,
                  note="nbdcopy of 1 GiB of random data into a protected-volume export "
                       "(VPG capturing, stream acked) vs into qemu-nbd serving a raw file",
                  details=details)


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _build_pit(ctx: Context, root: Path, size: int) -> tuple[Journal, int, Path]:
    """A journal whose checkpoint image is a promoted full image plus scattered writes
    journaled on top; returns (journal, checkpoint id, raw copy of that image)."""
    journal = Journal.create(root / "j", [VolumeSpec(0, "disk0", size)], vm="vm1")
    rng = np.random.default_rng(ctx.seed)
    chunk = 16 * MiB if size >= 16 * MiB else size
    for off in range(0, size, chunk):
        journal.append([(0, off, os.urandom(chunk))], compress=False)
    journal.promote_to(journal.checkpoint("base").seq)
    pool = os.urandom(8 * MiB)
    written = 0
    total = ctx.scale(PIT_OVERWRITE_BYTES, minimum=MiB)
    while written < total:
        batch = []
        for _ in range(64):
            n = int(rng.integers(PIT_WRITE_MIN // 4096, PIT_WRITE_MAX // 4096 + 1)) * 4096
            off = int(rng.integers(0, (size - n) // 4096 + 1)) * 4096
            at = int(rng.integers(0, (len(pool) - n) // 4096 + 1)) * 4096
            batch.append((0, off, pool[at : at + n]))
            written += n
        journal.append(batch, compress=False)
    ckpt = journal.checkpoint("pit")
    journal.commit()
    raw = root / "pit.raw"
    with journal.view(ckpt) as view, open(raw, "wb") as f:
        for off in range(0, size, chunk):
            f.write(view.read(0, off, min(chunk, size - off)))
    return journal, ckpt.id, raw


def measure_read_pit_seq(ctx: Context) -> Metric:
    size = ctx.scale(PIT_BYTES, minimum=16 * MiB, align=MiB)
    root = ctx.subdir("pit")
    ctx.log(f"read_pit_seq: journaling a {size / MiB:.0f} MiB image and scattered writes")
    journal, ckpt, raw = _build_pit(ctx, root, size)
    server = nbd.ServerThread(nbd.NBDServer([nbd.view_export(journal, ckpt, "disk0", "pit")]),
                              port=0).start()
    theirs = QemuNbd(raw, readonly=True)
    try:
        equal, passes = _copy_passes(ctx, "read_pit_seq", server.uri("pit"), theirs.uri, raw,
                                     root, size, READ_PASSES)
        status = journal.status()
    finally:
        theirs.close()
        server.stop()
        journal.close()
    value, baseline = _best(passes)
    return Metric("nbd.read_pit_seq", value, "MB/s", baseline, READ_TARGET,
                  note="nbdcopy reading a point-in-time export (replica + journal) vs "
                       "qemu-nbd serving a raw copy of the same image; both warm",
                  details={"bytes": size, "passes": passes, "image_equal": equal,
                           "journal_records": status.records,
                           "journal_bytes": status.size_bytes})


def _fio(uri: str, seconds: int, size: int) -> dict:
    out = subprocess.run(
        ["fio", "--name=randwrite", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
         "--bs=4k", f"--size={size}", f"--iodepth={FIO_IODEPTH}", "--time_based",
         f"--runtime={seconds}", "--randrepeat=0", "--output-format=json"],
        check=True, capture_output=True, text=True)
    text = out.stdout[out.stdout.index("{"):]  # the nbd engine prints a line first
    job = json.loads(text)["jobs"][0]["write"]
    return {"iops": job["iops"], "lat_us_mean": job["lat_ns"]["mean"] / 1000}


def measure_randwrite_4k(ctx: Context) -> Metric:
    size = ctx.scale(FIO_SIZE, minimum=16 * MiB, align=MiB)
    seconds = FIO_SECONDS if not ctx.quick else 1
    ours = ProtectedServer(ctx.subdir("fio-zcore"), _sparse(ctx.workdir / "f-z.img", size))
    theirs = QemuNbd(_sparse(ctx.workdir / "f-q.img", size))
    passes, runs = [], []
    try:
        for r in range(FIO_PASSES if not ctx.quick else 1):
            order = ((ours.uri, "zcore"), (theirs.uri, "qemu"))
            result = {}
            for uri, side in (order if r % 2 == 0 else order[::-1]):
                sync_dirty()
                result[side] = _fio(uri, seconds, size)
            passes.append((result["zcore"]["iops"], result["qemu"]["iops"]))
            runs.append(result)
            ctx.log(f"randwrite_4k pass {r}: zcore {result['zcore']['iops']:.0f} IOPS, "
                    f"qemu-nbd {result['qemu']['iops']:.0f} IOPS")
        details = {"region_bytes": size, "seconds": seconds, "iodepth": FIO_IODEPTH,
                   "passes": runs, **ours.status()}
    finally:
        theirs.close()
        ours.close()
    value, baseline = _best(passes)
    return Metric("nbd.randwrite_4k", value, "IOPS", baseline, FIO_TARGET,
                  note="fio nbd engine, 4 KiB random writes, iodepth 32, one job, on a "
                       "protected-volume export (VPG capturing, stream acked) vs qemu-nbd "
                       "on a raw file",
                  details=details)


def _build_sparse(ctx: Context, root: Path, size: int) -> tuple[Journal, int, Path, int]:
    """A journal of one `size`-byte volume with SPARSE_FRACTION of it written in
    SPARSE_EXTENT pieces at random places, the first half promoted into the replica and
    the rest journaled; returns (journal, checkpoint id, sparse raw copy, bytes written)."""
    journal = Journal.create(root / "j", [VolumeSpec(0, "disk0", size)], vm="vm1")
    rng = np.random.default_rng(ctx.seed)
    extent = min(SPARSE_EXTENT, size // 64)
    slots = size // extent
    chosen = np.sort(rng.choice(slots, size=max(2, int(slots * SPARSE_FRACTION)),
                                replace=False))
    half = len(chosen) // 2
    raw = root / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i, slot in enumerate(chosen.tolist()):
            data = os.urandom(extent)
            journal.append([(0, slot * extent, data)], compress=False)
            f.seek(slot * extent)
            f.write(data)
            if i == half - 1:
                journal.promote_to(journal.checkpoint("half").seq)
    ckpt = journal.checkpoint("sparse")
    journal.commit()
    return journal, ckpt.id, raw, len(chosen) * extent


def measure_copy_sparse(ctx: Context) -> Metric:
    size = ctx.scale(SPARSE_BYTES, minimum=64 * MiB, align=MiB)
    root = ctx.subdir("sparse")
    ctx.log(f"copy_sparse: a {size / MiB:.0f} MiB volume, {SPARSE_FRACTION:.0%} allocated")
    journal, ckpt, raw, allocated = _build_sparse(ctx, root, size)
    server = nbd.ServerThread(nbd.NBDServer([nbd.view_export(journal, ckpt, "disk0", "pit")]),
                              port=0).start()
    theirs = QemuNbd(raw, readonly=True)
    try:
        equal, passes = _copy_passes(ctx, "copy_sparse", server.uri("pit"), theirs.uri, raw,
                                     root, size, SPARSE_PASSES)
        # what block status saves: the same copy reading every block
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--no-extents", server.uri("pit"), "null:"], check=True,
                       capture_output=True)
        dense = size / (time.perf_counter() - t0) / MB
    finally:
        theirs.close()
        server.stop()
        journal.close()
    value, baseline = _best(passes)
    return Metric("nbd.copy_sparse", value, "MB/s", baseline, SPARSE_TARGET,
                  note=f"nbdcopy of a point-in-time export of a {size / GiB:.2g} GiB volume, "
                       f"{SPARSE_FRACTION:.0%} allocated (block status skips holes) vs "
                       "qemu-nbd serving a sparse raw copy",
                  details={"bytes": size, "allocated_bytes": allocated, "passes": passes,
                           "image_equal": equal, "zcore_no_extents_mb_s": dense})


def measure_trim(ctx: Context) -> Metric:
    from zcore.vpg import LocalLink

    size = ctx.scale(TRIM_BYTES, minimum=32 * MiB, align=2 * TRIM_STRIPE)
    root = ctx.subdir("trim")
    vpg = VPG("bench", root / "vpg", VPGSettings(checkpoint_interval=3600))
    vpg.add_vm("vm1")
    volume = vpg.add_volume("vm1", "disk0", _sparse(root / "disk0.img", size))
    journals = LocalLink.create_journals(vpg, root / "journals")
    journal = journals["vm1"]
    link = LocalLink(vpg, journals)
    vpg.start()
    link.start()
    server = nbd.ServerThread(nbd.NBDServer([nbd.volume_export(volume)]), port=0).start()

    def settle() -> None:
        link.stop()
        link.drain()
        link.start()

    def delivered(tag: str) -> int:
        seq = vpg.checkpoint(tag).seq
        settle()
        return seq

    try:
        chunk = os.urandom(16 * MiB)
        for off in range(0, size, len(chunk)):
            volume.write(off, memoryview(chunk)[: min(len(chunk), size - off)])
            if (off // len(chunk)) % 4 == 3:
                settle()  # delivered every 64 MiB: the capture buffer never overflows
        journal.promote_to(delivered("filled"))
        replica = journal.path / "replica-0000.img"
        before = os.stat(replica).st_blocks * 512
        backing_before = os.stat(volume.path).st_blocks * 512
        commands = []
        for off in range(0, size, 2 * TRIM_STRIPE):
            commands += ["-c", f"discard {off} {TRIM_STRIPE}"]
        t0 = time.perf_counter()
        subprocess.run(["qemu-io", "-f", "raw", *commands, server.uri("disk0")], check=True,
                       capture_output=True)
        trim_seconds = time.perf_counter() - t0
        backing_after = os.stat(volume.path).st_blocks * 512
        t0 = time.perf_counter()
        journal.promote_to(delivered("trimmed"))
        promote_seconds = time.perf_counter() - t0
        after = os.stat(replica).st_blocks * 512
        status = vpg.status()
    finally:
        server.stop()
        link.stop()
        vpg.close()
        for j in journals.values():
            j.close()
    return Metric("nbd.trim", after, "bytes", before, TRIM_TARGET,
                  note=f"replica bytes allocated after TRIM of half a {size / GiB:.2g} GiB "
                       "protected volume (every other 4 MiB, qemu-io discard over NBD) is "
                       "captured and promoted vs before",
                  details={"volume_bytes": size, "trimmed_bytes": size // 2,
                           "backing_allocated_before": backing_before,
                           "backing_allocated_after": backing_after,
                           "trim_seconds": trim_seconds, "promote_seconds": promote_seconds,
                           "captured_writes": status.writes})


def run(ctx: Context):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"nbd suite needs {', '.join(missing)} (apt-get install "
                           "libnbd-bin qemu-utils fio)")
    yield measure_write_seq(ctx)
    yield measure_read_pit_seq(ctx)
    yield measure_randwrite_4k(ctx)
    yield measure_copy_sparse(ctx)
    yield measure_trim(ctx)
