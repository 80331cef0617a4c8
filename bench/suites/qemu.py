"""qemu suite (issue 15): guest writes through qemu-storage-daemon while its mirror job
forwards each of them to zcore, beside the same writes without a mirror, same run:

  qemu.mirror_write_4k    fio (nbd engine) 4 KiB random-write IOPS through the daemon's
                          NBD export of a raw image whose node is mirrored (blockdev-mirror
                          sync=none, copy-mode=write-blocking, on-target-error=report) into
                          `zcore nbd serve --protect` (every write captured into the VPG
                          stream and the local journal)  vs  the same fio through a second
                          daemon on a second raw image, no mirror
  qemu.mirror_write_seq   fio sequential writes (1 MiB, MB/s), same pair
  qemu.resync_bytes       not measured yet: it needs zcore's bitmap sync from QEMU's dirty
                          bitmap (issue 15).  `run` says so on stderr; `measure_resync_bytes`
                          measures it once that sync exists (see its docstring)

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

The fixture is the tests' (tests/helpers/qsd.py).  ZCORE_DEEP=1 runs longer passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchkit import MB, Context, Metric, MiB

from zcore.journal import Journal

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers.qsd import CaptureTarget, QemuStorageDaemon  # noqa: E402 (the tests' fixture)

from suites.nbd import QemuNbd  # noqa: E402

DESCRIPTION = ("guest writes through qemu-storage-daemon mirrored into zcore nbd serve "
               "(write-blocking) vs unmirrored: 4 KiB random IOPS, sequential MB/s")

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
# issue 15: bytes read from QEMU for the bitmap sync after a 30 s zcore outage
OUTAGE_SECONDS = 30
RESYNC_TARGET = "<= 1.05"

TOOLS = ("qemu-storage-daemon", "qemu-nbd", "fio")
NOT_MEASURABLE = ("qemu.resync_bytes: not yet measurable: zcore has no bitmap sync from "
                  "QEMU's dirty bitmap yet (issue 15); bench/suites/qemu.py "
                  "measure_resync_bytes(ctx, sync) measures it once one exists")


def _zeros(path: Path, size: int) -> Path:
    """A raw image of `size` zero bytes, written (allocated) and on disk."""
    block = bytes(16 * MiB)
    with open(path, "xb") as f:
        for off in range(0, size, len(block)):
            f.write(block[: min(len(block), size - off)])
        os.fsync(f.fileno())
    return path


def _fio(uri: str, rw: str, bs: str, iodepth: int, seconds: int, size: int) -> dict[str, Any]:
    done = subprocess.run(
        ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
         f"--bs={bs}", f"--size={size}", f"--iodepth={iodepth}", "--time_based",
         f"--runtime={seconds}", "--randrepeat=0", "--output-format=json"],
        capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode:
        raise RuntimeError(f"fio {rw} on {uri} failed ({done.returncode}): {done.stderr}")
    text = done.stdout[done.stdout.index("{"):]  # the nbd engine prints a line first
    job = json.loads(text)["jobs"][0]["write"]
    return {"iops": job["iops"], "mb_s": job["bw_bytes"] / MB,
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
        daemon.stop_mirror()
        daemon.close()
        log = zcore.stop()  # on failure, close() still kills what is left of both
        del self.daemons["mirrored"], self.targets["mirrored"]
        image = self.root / "mirrored.raw"
        equal_copy = _same(zcore.image, image)
        with Journal.open(self.journal) as j, j.view(j.latest_checkpoint()) as view:
            equal_journal = _same_view(view, image, self.size)
            status = j.status()
        stopped = [line for line in log.splitlines() if "stopped" in line]
        return {"captured_equal": equal_copy and equal_journal,
                "zcore_copy_equal": equal_copy, "journal_checkpoint_equal": equal_journal,
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


def _same_view(view: Any, image: Path, size: int) -> bool:
    chunk = 16 * MiB
    with open(image, "rb") as f:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if view.read("disk0", off, n) != f.read(n):
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


def measure_resync_bytes(ctx: Context,
                         bitmap_sync: Callable[[QemuStorageDaemon, str], int]) -> Metric:
    """qemu.resync_bytes once zcore can sync from QEMU's dirty bitmap: a mirrored daemon
    with a 4 KiB dirty bitmap "zcore" on its node; zcore killed; OUTAGE_SECONDS of fio
    random writes (the first one the mirror cannot forward ends its job); then
    `bitmap_sync(daemon, "zcore")`, zcore's bitmap sync (the code of issue 15 supplies
    it), returns the bytes it read from QEMU.  Value: those bytes; baseline: the bytes
    the bitmap marked before the sync."""
    size = ctx.scale(IMAGE_BYTES, minimum=16 * MiB, align=MiB)
    seconds = 1 if ctx.quick else OUTAGE_SECONDS
    rig = MirrorRig(ctx, size, diagnostics=False)
    try:
        daemon = rig.daemons["mirrored"]
        daemon.qmp("block-dirty-bitmap-add", node=daemon.node, name="zcore",
                   granularity=4096)
        rig.targets["mirrored"].kill()
        _fio(daemon.nbd_uri, "randwrite", RAND_BS, RAND_IODEPTH, seconds, size)
        daemon.wait_mirror_end()
        marked = bitmap_count(daemon, "zcore")
        read = bitmap_sync(daemon, "zcore")
    finally:
        rig.close()
    return Metric("qemu.resync_bytes", read, "bytes", marked, RESYNC_TARGET,
                  note=f"bytes zcore read from QEMU for the bitmap sync after a {seconds} s "
                       "outage vs bytes QEMU's dirty bitmap marked",
                  details={"outage_seconds": seconds, "image_bytes": size,
                           "bitmap_granularity": 4096})


def bitmap_count(daemon: QemuStorageDaemon, name: str) -> int:
    """Bytes the dirty bitmap `name` on the daemon's node marks."""
    for node in daemon.qmp("query-named-block-nodes"):
        if node.get("node-name") != daemon.node:
            continue
        for bitmap in node.get("dirty-bitmaps", []):
            if bitmap["name"] == name:
                return int(bitmap["count"])
    raise RuntimeError(f"no dirty bitmap {name} on node {daemon.node}")


def run(ctx: Context) -> Iterator[Metric]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"qemu suite needs {', '.join(missing)} (apt-get install "
                           "qemu-system-common qemu-utils fio)")
    yield from measure_mirror_writes(ctx)
    print(f"  {NOT_MEASURABLE}", file=sys.stderr, flush=True)
