"""qemu suite (issue 15): guest writes through qemu-storage-daemon while its mirror job
forwards each of them to zcore, beside the same writes without a mirror, same run:

  qemu.mirror_write_4k    fio (nbd engine) 4 KiB random-write IOPS through the daemon's
                          NBD export of a raw image whose node is mirrored (blockdev-mirror
                          sync=none, copy-mode=write-blocking, on-target-error=report) into
                          `zcore nbd serve --protect` (every write captured into the VPG
                          stream and the local journal)  vs  the same fio through a second
                          daemon on a second raw image, no mirror
  qemu.mirror_write_seq   fio sequential writes (1 MiB, MB/s), same pair
  qemu.resync_bytes       bytes zcore read from QEMU (its NBD export) for the bitmap sync
                          after zcore was down for 30 s while the guest wrote  vs  the bytes
                          zcore's dirty bitmap on QEMU's node marked when zcore came back
                          (lower is better: 1 reads exactly what was marked)

Both daemons open their images with O_DIRECT and native AIO (`cache=none`, what a
production VM disk uses), so neither side's numbers are page-cache writes; zcore writes its
copy and journal through the page cache, as it does in production.  The images are filled
with zeros first, so no side pays for block allocation.  fio's nbd engine speaks to the
daemon's Unix-socket export (libaio cannot reach an NBD export without the kernel nbd
module); the mirror reaches zcore over loopback TCP.  The two sides run alternately, the
best pass of each counts, every pass is in the details with the CPU seconds of the
processes serving it.  After the runs the mirror and zcore stop and the suite checks that
zcore's journal's latest checkpoint and its copy hold exactly the mirrored image
(`details.captured_equal`).

Two more sides run in full mode, in the details only, to say where the cost lies:
`into_qemu_nbd`, a third daemon mirroring the same way into qemu-nbd on a raw file (the
mirror's own cost with QEMU's NBD server as the target), and `zcore_direct`, fio straight
into a second `zcore nbd serve --protect` without QEMU (zcore's own ceiling).

What bounds the ratios: QEMU 7.2's write-blocking mode is serial per guest write
(block/mirror.c, bdrv_mirror_top_do_write: the source write completes, then the target
write, then the guest's completion), and its NBD client keeps at most 16 requests in
flight, so a mirrored write costs the source's latency plus the target's plus QEMU's own.
Where the source disk answers faster than a loopback NBD round trip, the ratio stays far
below 1 whatever the target; `into_qemu_nbd` shows it for QEMU's own NBD server.

qemu.resync_bytes runs zcore as the site service runs a QEMU-hosted VPG, in this process:
a VPG whose capture-only volume's source is a `QemuDisk` on the daemon's qcow2 node,
counted (`CountingDisk`: every byte a sync or compare reads from QEMU), its capture export
on zcore's NBD server, the site's `MirrorKeeper` (mirror, bitmap generations, clear-on-ack)
and a `LocalLink` into a journal for the recovery site.  After the initial sync, once one
empty bitmap generation is left, zcore crashes (link, export and VPG gone without a stop);
fio writes random 4 KiB blocks at a guest's pace through the daemon for the outage (its
first write ends the mirror; QEMU's bitmap records them all); zcore restarts over the same
state and the keeper restarts the mirror and marks what the bitmap recorded.  The value
counts every read until the VPG streams again.  The journal's image at a checkpoint after
the sync must be exactly QEMU's disk, or the suite fails: reading nothing cannot pass.
$ZCORE_QEMU_OUTAGE=SECONDS sets the outage (quick: 2 s); the details say which was used.

The fixture is the tests' (tests/helpers/qsd.py).  ZCORE_DEEP=1 runs longer passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchkit import MB, Context, Metric, MiB

from zcore import nbd
from zcore.errors import ConfigError
from zcore.hypervisor import QemuAddress, QemuDisk, QemuTarget
from zcore.journal import Journal
from zcore.nbd.client import NBDClient
from zcore.site.mirrors import MirrorKeeper
from zcore.vpg import VPG, LocalLink, VPGSettings
from zcore.vpg.settings import VPGMode

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers.qsd import CaptureTarget, QemuStorageDaemon  # noqa: E402 (the tests' fixture)

from suites.nbd import QemuNbd  # noqa: E402

DESCRIPTION = ("guest writes through qemu-storage-daemon mirrored into zcore nbd serve "
               "(write-blocking) vs unmirrored: 4 KiB random IOPS, sequential MB/s; "
               "bytes read from QEMU by the bitmap sync after an outage vs bytes marked")

DEEP = os.environ.get("ZCORE_DEEP") == "1"

# The image both daemons serve: larger than the disk's write cache matters less than
# that fio's random offsets rarely repeat within a pass (256 MiB = 64 Ki blocks of 4 KiB,
# ~20 k writes a pass); small enough that filling the six images with zeros takes seconds.
IMAGE_BYTES = 256 * MiB
# Seconds of fio per pass and side; passes alternate which side runs first.  Two 4 s
# passes of each side keep the suite near a minute; ZCORE_DEEP=1 runs 3 passes of 15 s.
SECONDS = 15 if DEEP else 4
PASSES = 3 if DEEP else 2
# Random writes: 4 KiB at iodepth 32 (a guest's queue of a virtio disk); sequential: 1 MiB
# requests at iodepth 4, what a guest's streaming write issues through virtio-blk.
RAND_BS, RAND_IODEPTH = "4k", 32
SEQ_BS, SEQ_IODEPTH = "1M", 4
RAND_TARGET = ">= 0.7"
SEQ_TARGET = ">= 0.8"
# qemu.resync_bytes: zcore is down OUTAGE_SECONDS (issue 15; quick: QUICK_OUTAGE_SECONDS;
# $ZCORE_QEMU_OUTAGE sets it in whole seconds either way) while the guest writes
# RESYNC_IOPS random 4 KiB blocks a second: about 1,900 writes in 30 s, which leave about
# a third of the 256 MiB disk's 64 KiB bitmap granules marked, so a sync that read the
# whole disk, or everything twice, shows
OUTAGE_SECONDS = 30
QUICK_OUTAGE_SECONDS = 2
OUTAGE_ENV = "ZCORE_QEMU_OUTAGE"
RESYNC_IOPS = 64
RESYNC_TARGET = "<= 1.05"  # a ratio of bytes read to bytes marked: lower is better
# the keeper's bitmap rotation (the site service's default is 10 s): the bench waits for
# the older generations to be released before the outage, so this only saves time
ROTATE_SECONDS = 1.0
SETTLE_TIMEOUT = 120.0  # seconds for an initial or bitmap sync, or a release, to finish
VPG_NAME, VM, VOLUME = "g", "vm1", "disk0"
EXPORT = f"{VPG_NAME}/{VM}/{VOLUME}"  # the volume's capture export: the mirror's target
PREFIX = QemuAddress.prefix_for(VPG_NAME, VM, VOLUME)  # zcore's names on QEMU

TOOLS = ("qemu-storage-daemon", "qemu-nbd", "qemu-img", "qemu-io", "fio")


def _zeros(path: Path, size: int) -> Path:
    """A raw image of `size` zero bytes, written (allocated) and on disk."""
    block = bytes(16 * MiB)
    with open(path, "xb") as f:
        for off in range(0, size, len(block)):
            f.write(block[: min(len(block), size - off)])
        os.fsync(f.fileno())
    return path


def _fio(uri: str, rw: str, bs: str, iodepth: int, seconds: int, size: int,
         extra: Sequence[str] = ()) -> dict[str, Any]:
    done = subprocess.run(
        ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
         f"--bs={bs}", f"--size={size}", f"--iodepth={iodepth}", "--time_based",
         f"--runtime={seconds}", "--randrepeat=0", "--output-format=json", *extra],
        capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode:
        raise RuntimeError(f"fio {rw} on {uri} failed ({done.returncode}): {done.stderr}")
    text = done.stdout[done.stdout.index("{"):]  # the nbd engine prints a line first
    job = json.loads(text)["jobs"][0]["write"]
    return {"iops": job["iops"], "mb_s": job["bw_bytes"] / MB, "bytes": job["io_bytes"],
            "lat_us_mean": job["lat_ns"]["mean"] / 1000,
            "lat_us_p99": job["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000}


class MirrorRig:
    """qemu-storage-daemons on zeroed raw images of one size: `plain` unmirrored,
    `mirrored` mirroring into `zcore nbd serve --protect` of a zeroed copy; with
    `diagnostics`, also `into_qemu_nbd` mirroring into qemu-nbd on a raw file (the mirror's
    own cost, whatever the target) and a second zcore, `zcore_direct`, that fio writes to
    without QEMU (zcore's own ceiling)."""

    def __init__(self, ctx: Context, size: int, *, diagnostics: bool) -> None:
        self.root = root = ctx.subdir("qemu")
        self.size = size
        self.daemons: dict[str, QemuStorageDaemon] = {}
        self.targets: dict[str, CaptureTarget] = {}
        self.qemu_nbd: QemuNbd | None = None
        self.journal = root / "journals" / "vm1"
        try:
            for side in ("plain", "mirrored", *(("into_qemu_nbd",) if diagnostics else ())):
                self.daemons[side] = QemuStorageDaemon(
                    root / side, _zeros(root / f"{side}.raw", size), direct=True)
            self.targets["mirrored"] = CaptureTarget(
                root / "zcore", _zeros(root / "capture.raw", size), self.journal)
            self.daemons["mirrored"].start_mirror("127.0.0.1", self.targets["mirrored"].port,
                                                  "disk0")
            if diagnostics:
                self.qemu_nbd = QemuNbd(_zeros(root / "qemu-nbd.raw", size), "disk0")
                self.daemons["into_qemu_nbd"].start_mirror("127.0.0.1", self.qemu_nbd.port,
                                                           "disk0")
                self.targets["zcore_direct"] = CaptureTarget(
                    root / "zcore-direct", _zeros(root / "direct.raw", size),
                    root / "journals-direct" / "vm1")
        except BaseException:
            self.close()
            raise

    def uris(self) -> dict[str, str]:
        """fio's URI of every side."""
        out = {side: d.nbd_uri for side, d in self.daemons.items()}
        if "zcore_direct" in self.targets:
            out["zcore_direct"] = f"nbd://127.0.0.1:{self.targets['zcore_direct'].port}/disk0"
        return out

    def processes(self, side: str) -> dict[str, int]:
        """The pids serving `side`: its daemon and its mirror's target."""
        out = {}
        if side in self.daemons:
            out["qemu-storage-daemon"] = self.daemons[side].proc.pid
        if side in self.targets:
            out["zcore"] = self.targets[side].proc.pid
        elif side == "into_qemu_nbd" and self.qemu_nbd is not None:
            out["qemu-nbd"] = self.qemu_nbd.proc.pid
        return out

    def finish(self) -> dict[str, Any]:
        """Stop the mirror and zcore; compare what zcore captured with the mirrored image."""
        daemon, zcore = self.daemons["mirrored"], self.targets["mirrored"]
        assert daemon.mirror_job is not None
        job = daemon.block_job(daemon.mirror_job)  # None: it ended early, on a target error
        mirror_at_end = job["status"] if job else "ended before the stop (a target error)"
        daemon.stop_mirror()
        daemon.close()
        log = zcore.stop()  # on failure, close() still kills what is left of both
        del self.daemons["mirrored"], self.targets["mirrored"]
        image = self.root / "mirrored.raw"
        equal_copy = _same(zcore.image, image)
        with Journal.open(self.journal) as j, j.view(j.latest_checkpoint()) as view, \
                open(image, "rb") as f:
            equal_journal = _same_view(view, lambda off, n: os.pread(f.fileno(), n, off),
                                       self.size)
            status = j.status()
        stopped = [line for line in log.splitlines() if "stopped" in line]
        # zcore fell behind the guest: writes marked its bitmap until a sync caught up
        overflows = zcore.log_path.read_text().count("bitmap mode: buffer overflow")
        return {"captured_equal": equal_copy and equal_journal,
                "zcore_copy_equal": equal_copy, "journal_checkpoint_equal": equal_journal,
                "mirror_at_end": mirror_at_end, "zcore_overflows": overflows,
                "journal_records": status.records, "journal_bytes": status.size_bytes,
                "zcore_stop": stopped[-1] if stopped else log[-300:]}

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.kill()
            daemon.close()
        for target in self.targets.values():
            target.kill()
        if self.qemu_nbd is not None:
            self.qemu_nbd.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (/proc/PID/stat), all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _same_view(view: Any, image: Callable[[int, int], bytes], size: int) -> bool:
    """Does volume disk0 of a journal view read like `image(offset, length)`?"""
    chunk = 16 * MiB
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        if view.read("disk0", off, n) != image(off, n):
            return False
    return True


def _passes(ctx: Context, rig: MirrorRig, label: str, rw: str, bs: str, iodepth: int,
            key: str) -> tuple[float, float, list[dict[str, Any]]]:
    """fio on each side, the order reversed every other pass: (best mirrored, best
    plain, every run)."""
    seconds = 1 if ctx.quick else SECONDS
    sides = list(rig.uris().items())
    runs = []
    for r in range(1 if ctx.quick else PASSES):
        result = {}
        for side, uri in (sides if r % 2 == 0 else sides[::-1]):
            procs = rig.processes(side)
            before = {name: _cpu_seconds(pid) for name, pid in procs.items()}
            result[side] = _fio(uri, rw, bs, iodepth, seconds, rig.size)
            result[side]["cpu_s"] = {name: round(_cpu_seconds(pid) - before[name], 3)
                                     for name, pid in procs.items()}
        runs.append(result)
        unit = "IOPS" if key == "iops" else "MB/s"
        ctx.log(f"{label} pass {r}: " + ", ".join(f"{side} {v[key]:.0f}"
                                                  for side, v in result.items()) + f" {unit}")
    return (max(x["mirrored"][key] for x in runs), max(x["plain"][key] for x in runs), runs)


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """The best `key` of every side over the runs."""
    return {side: max(x[side][key] for x in runs) for side in runs[0]}


def measure_mirror_writes(ctx: Context) -> Iterator[Metric]:
    """Both mirror metrics on one MirrorRig (zcore captures everything of both)."""
    size = ctx.scale(IMAGE_BYTES, minimum=16 * MiB, align=MiB)
    ctx.log(f"mirror: two {size / MiB:.0f} MiB raw images under qemu-storage-daemon "
            "(O_DIRECT), one mirrored into zcore nbd serve --protect")
    rig = MirrorRig(ctx, size, diagnostics=not ctx.quick)
    try:
        rand = _passes(ctx, rig, "mirror_write_4k", "randwrite", RAND_BS, RAND_IODEPTH,
                       "iops")
        seq = _passes(ctx, rig, "mirror_write_seq", "write", SEQ_BS, SEQ_IODEPTH, "mb_s")
        checked = rig.finish()
    finally:
        rig.close()
    common = {"image_bytes": size, "image_format": "raw", "cache": "none (O_DIRECT, aio=native)",
              "seconds": 1 if ctx.quick else SECONDS, "client": "fio --ioengine=nbd",
              **checked}
    yield Metric("qemu.mirror_write_4k", rand[0], "IOPS", rand[1], RAND_TARGET,
                 note="fio 4 KiB random writes (iodepth 32) through qemu-storage-daemon's "
                      "NBD export, node mirrored write-blocking into zcore nbd serve "
                      "--protect vs the same without a mirror",
                 details={**common, "bs": RAND_BS, "iodepth": RAND_IODEPTH,
                          "best": _best(rand[2], "iops"), "passes": rand[2]})
    yield Metric("qemu.mirror_write_seq", seq[0], "MB/s", seq[1], SEQ_TARGET,
                 note="fio sequential 1 MiB writes (iodepth 4), same pair",
                 details={**common, "bs": SEQ_BS, "iodepth": SEQ_IODEPTH,
                          "best": _best(seq[2], "mb_s"), "passes": seq[2]})


class CountingDisk(QemuDisk):
    """A `QemuDisk` that counts what zcore asks of QEMU: the bytes its syncs and compares
    read (`read_into`, attempts included: a failed read is traffic too) and, for each
    `changed_extents` answer, the bytes it named and the bytes read before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()  # the VPG's thread and the export's workers
        self.read_bytes = 0
        self.reads = 0
        self.changed: list[dict[str, int | None]] = []  # "named" None: it could not tell

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        try:
            super().read_into(offset, buf)
        finally:
            with self._count_lock:
                self.read_bytes += memoryview(buf).nbytes
                self.reads += 1

    def changed_extents(self) -> list[tuple[int, int]] | None:
        extents = super().changed_extents()
        with self._count_lock:
            self.changed.append({"named": None if extents is None else
                                 sum(n for _, n in extents), "read_before": self.read_bytes})
        return extents


class ProtectedSite:
    """zcore's protected site in this process, started the way the site service starts a
    QEMU-hosted VPG (zcore.site.runtime, start_protected): the VPG over one capture-only
    volume whose source is the daemon's node (a `CountingDisk`), the volume's capture
    export on zcore's NBD server, the site's `MirrorKeeper` starting the mirror into it
    (on a restart, then marking what QEMU's bitmaps recorded), and a `LocalLink` into the
    VM's journal standing for the recovery site.  `crash()` is zcore dying."""

    def __init__(self, root: Path, daemon: QemuStorageDaemon, *, first: bool) -> None:
        self.disk = CountingDisk(daemon.qmp_path, daemon.node, PREFIX,
                                 nbd_socket=str(daemon.nbd_path))
        self.vpg = VPG(VPG_NAME, root / "vpg", VPGSettings())
        self.vpg.add_vm(VM)
        self.volume = self.vpg.add_volume(VM, VOLUME, None, source=self.disk)
        self.journals = LocalLink.create_journals(self.vpg, root / "journals")
        self.server: nbd.ServerThread | None = None
        self.link: LocalLink | None = None
        try:
            # a restart: the state file decides; the sync waits for the keeper's mirrors
            self.vpg.start(initial_sync=True, hold_sync=True)
            self.server = nbd.ServerThread(nbd.NBDServer(
                [nbd.volume_export(self.volume, EXPORT)])).start()
            assert self.server.address is not None
            target = QemuTarget(self.server.address[0], self.server.address[1], EXPORT)
            self.keeper = MirrorKeeper(self.vpg, lambda _volume: target,
                                       rotate_every=ROTATE_SECONDS)
            self.keeper.start_all(resync=not first)
            self.link = LocalLink(self.vpg, self.journals)
            self.link.start()
        except BaseException:
            self.crash()
            raise
        self._stepped = time.monotonic()

    def _step(self) -> None:
        """The keeper's watch, every `interval` (its asyncio task in the site service)."""
        if time.monotonic() - self._stepped >= self.keeper.interval:
            self.keeper.step()
            self._stepped = time.monotonic()

    def wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        """Run the keeper's watch until `done()`; a bounded wait."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.link is not None and self.link.error is not None:
                raise RuntimeError(f"the local link failed: {self.link.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not within {timeout:.0f} s: {self.vpg.status()}; "
                                   f"events: {self.vpg.events[-5:]}")
            self._step()
            time.sleep(0.05)

    def streaming(self) -> bool:
        return self.vpg.status().mode == VPGMode.STREAMING

    def journal_matches(self, image: Callable[[int, int], bytes]) -> bool:
        """A tagged checkpoint now, delivered: does the journal's image at it read like
        `image(offset, length)`?"""
        assert self.link is not None
        seq = self.vpg.checkpoint("resynced").seq
        self.link.stop()
        self.link.drain()
        self.link.start()
        with self.journals[VM].view(seq) as view:
            return _same_view(view, image, self.volume.size)

    def crash(self) -> None:
        """zcore dies: the link, the capture export and the VPG go without a clean stop
        (the mirror's next write fails: QEMU's bitmap goes on recording)."""
        if self.link is not None:
            self.link.stop()
        if self.server is not None:
            self.server.stop()
        self.vpg.abandon()
        for journal in self.journals.values():
            journal.close()
        self.disk.close()

    def stop(self) -> None:
        """A clean stop: everything delivered, the mirror ended, the VPG stopped."""
        assert self.link is not None and self.server is not None
        self.link.stop()
        self.link.drain()
        self.keeper.stop_all()
        self.server.stop()
        self.vpg.close()
        for journal in self.journals.values():
            journal.close()


def outage_seconds(ctx: Context) -> tuple[int, str]:
    """The outage's length and where it came from: $ZCORE_QEMU_OUTAGE, else the issue's
    30 s (quick: 2 s)."""
    text = os.environ.get(OUTAGE_ENV, "").strip()
    if not text:
        return (QUICK_OUTAGE_SECONDS, "quick") if ctx.quick else (OUTAGE_SECONDS, "issue 15")
    if not text.isdigit() or not 1 <= int(text) <= 3600:
        raise ConfigError(f"{OUTAGE_ENV}={text!r}: give the outage in whole seconds, 1 to "
                          "3600")
    return int(text), OUTAGE_ENV


def zcore_generations(daemon: QemuStorageDaemon) -> dict[str, dict[str, Any]]:
    """zcore's dirty bitmap generations on the daemon's node (PREFIX.N), as
    query-named-block-nodes describes them ("count": the bytes one marks)."""
    generation = re.compile(re.escape(PREFIX) + r"\.\d+")
    for node in daemon.qmp("query-named-block-nodes", flat=True):
        if node.get("node-name") == daemon.node:
            return {bm["name"]: bm for bm in node.get("dirty-bitmaps") or ()
                    if generation.fullmatch(bm.get("name", ""))}  # a job's has no name
    raise RuntimeError(f"qemu-storage-daemon has no node {daemon.node}")


def _qemu_io(daemon: QemuStorageDaemon, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", command, daemon.nbd_uri], check=True,
                   capture_output=True, timeout=120)


def measure_resync_bytes(ctx: Context) -> Metric:
    """qemu.resync_bytes: a qcow2 disk under qemu-storage-daemon, half of it written,
    protected by zcore (initial sync, mirror, the keeper's bitmap generations) until the
    VPG streams and one empty generation is left; zcore crashes; for the outage a guest
    writes RESYNC_IOPS random 4 KiB blocks a second (the first one ends the mirror);
    zcore restarts.  Value: the bytes zcore read from QEMU until the VPG streams again;
    baseline: the bytes zcore's bitmap generation marked when zcore came back.  The
    journal's image at a checkpoint after the sync must read exactly like QEMU's disk."""
    size = ctx.scale(IMAGE_BYTES, minimum=16 * MiB, align=MiB)
    seconds, profile = outage_seconds(ctx)
    root = ctx.subdir("resync")
    ctx.log(f"resync: a {size / MiB:.0f} MiB qcow2 disk under qemu-storage-daemon, "
            f"protected by zcore; a {seconds} s outage ({profile})")
    daemon = QemuStorageDaemon(root / "qsd", root / "disk.qcow2", fmt="qcow2", size=size,
                               direct=True)
    try:
        _qemu_io(daemon, f"write -P 0x5a 0 {size // 2}")
        site = ProtectedSite(root, daemon, first=True)
        try:
            site.wait(site.streaming, "the initial sync", SETTLE_TIMEOUT)
            initial_read = site.disk.read_bytes
            site.wait(lambda: [g["count"] for g in zcore_generations(daemon).values()] == [0],
                      "one empty bitmap generation", SETTLE_TIMEOUT)
        except BaseException:
            site.crash()
            raise
        site.crash()
        guest = _fio(daemon.nbd_uri, "randwrite", RAND_BS, 1, seconds, size,
                     extra=(f"--rate_iops={RESYNC_IOPS}", "--refill_buffers"))
        job = daemon.block_job(f"{PREFIX}-mirror")
        if job is None or job.get("status") in ("running", "ready"):
            raise RuntimeError(f"the outage did not end the mirror: {job}")
        generations = zcore_generations(daemon)
        if len(generations) != 1:
            raise RuntimeError(f"expected one bitmap generation after the outage: "
                               f"{generations}")
        (generation,) = generations.values()
        marked = int(generation["count"])
        t0 = time.perf_counter()
        site = ProtectedSite(root, daemon, first=False)
        try:
            site.wait(site.streaming, "the bitmap sync", SETTLE_TIMEOUT)
            resync_seconds = time.perf_counter() - t0
            read, reads = site.disk.read_bytes, site.disk.reads
            with NBDClient.connect_unix(daemon.nbd_path, daemon.export) as client:
                equal = site.journal_matches(client.read)
            events = list(site.vpg.events)
        except BaseException:
            site.crash()
            raise
        site.stop()
    finally:
        daemon.kill()
        daemon.close()
    if not equal:
        raise RuntimeError("qemu.resync_bytes: after the bitmap sync, the journal's image "
                           "differs from QEMU's disk")
    return Metric(
        "qemu.resync_bytes", read, "bytes", marked, RESYNC_TARGET,
        note=f"bytes zcore read from QEMU for the bitmap sync after a {seconds} s outage "
             "(zcore crashed, restarted) vs bytes its QEMU dirty bitmap marked; lower is "
             "better",
        details={"outage_seconds": seconds, "outage_profile": profile,
                 "image_bytes": size, "image_format": "qcow2",
                 "cache": "none (O_DIRECT, aio=native)", "prefilled_bytes": size // 2,
                 "guest": {"client": "fio --ioengine=nbd", "rw": "randwrite", "bs": RAND_BS,
                           "rate_iops": RESYNC_IOPS, "written_bytes": guest["bytes"]},
                 "bitmap_granularity": generation.get("granularity"),
                 "mirror_after_outage": {"status": job.get("status"),
                                         "error": job.get("error")},
                 "generation_at_restart": generation,
                 "changed_extents": site.disk.changed,
                 "initial_sync_read_bytes": initial_read,
                 "resync_reads": reads, "resync_seconds": round(resync_seconds, 3),
                 "resynced_equal": equal, "events": events})


def run(ctx: Context) -> Iterator[Metric]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"qemu suite needs {', '.join(missing)} (apt-get install "
                           "qemu-system-common qemu-utils fio)")
    yield from measure_mirror_writes(ctx)
    yield measure_resync_bytes(ctx)
