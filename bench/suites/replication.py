"""replication suite (issue 4): end-to-end throughput, RPO under load, bitmap resync
overhead and initial sync, over loopback TLS to a recovery site in a subprocess
(bench/replication_peer.py), each beside a baseline measured in the same run:

  replication.e2e            MB/s from ProtectedVolume.write to durable in the recovery
                             journal (the ack of the last write), VM-like data  vs  the
                             minimum work of any CDP on one machine, single-threaded:
                             os.pwrite of the same writes to a plain file + lz4.block
                             .compress of each appended to a second file, fsync every
                             8 MiB appended
  replication.rpo_p99        p99 of the VPG's RPO (ms), sampled every 10 ms at a steady
                             load of half the measured e2e throughput  vs  the 100 ms budget
  replication.resync_bytes   bytes on the wire (TCP, TLS included) during the bitmap sync
                             after an outage  vs  bytes of the dirty blocks
  replication.initial_sync   MB/s of the initial sync (until durable at the recovery site)
                             of a 2 GiB volume that is 50 % zero  vs  os.pread of it
                             (page cache warm on both sides), reported only
  replication.wan_20mb       effective protected MB/s (ProtectedVolume.write to the ack
                             of the last write) of disk-like writes over a link throttled
                             to 20 MB/s with adaptive compression  vs  the same with LZ4
                             only (issue 14), passes alternated in the same run

The recovery site runs in its own process, as a real one would: its TLS decryption,
journal appends and fsyncs do not contend for the protected side's GIL.  The protected
side runs the guest's writes in a thread (ProtectedVolume.write releases the GIL) and the
sender in the asyncio loop of the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lz4.block
import numpy as np
from benchkit import MB, Context, GiB, KiB, Metric, MiB, gc_paused, sync_dirty, vm_like_pool
from replication_peer import thread_cpu

from zcore.replication import ProtectedSite
from zcore.vpg import VPG, VPGSettings

DESCRIPTION = ("replication end to end, RPO under load, bitmap resync bytes, initial sync "
               "(issue 4); adaptive compression over a 20 MB/s link (issue 14)")

PEER_SCRIPT = Path(__file__).resolve().parent.parent / "replication_peer.py"

# ---- workload ---------------------------------------------------------------------------
# VM-like data (benchkit.vm_like_pool: zero, text-like and random 4 KiB blocks, which LZ4
# compresses about 1.7x).  64 MiB is far larger than any CPU cache.
POOL_BYTES = 64 * MiB
# Writes: 4 KiB-aligned offsets and lengths of 4-64 KiB, as a guest's page cache issues
# them, at random offsets over the volume.
WRITE_ALIGN = 4 * KiB
WRITE_MIN = 4 * KiB
WRITE_MAX = 64 * KiB

# ---- replication.e2e --------------------------------------------------------------------
E2E_VOLUME_BYTES = 1 * GiB
# Bytes written per pass: at ~200 MB/s a pass takes 2-3 s, long enough that the seal age
# (20 ms) and the connection set-up do not count.
E2E_BYTES = 512 * MiB
# Passes of each kind, alternating baseline and replication; the best of each counts
# (the machines are shared: back-to-back runs vary).  Both sides write the same files in
# every pass, so the first pass of each pays for first-touch page allocation and the
# later ones measure the warm path, as a running VM's volume is.
E2E_PASSES = 3
# The baseline's fsync cadence (issue 4: every 8 MiB appended).
BASELINE_FSYNC_BYTES = 8 * MiB
# The guest waits while more than this fraction of the VPG buffer is in use, so the
# measurement is of the sustained path, never of bitmap mode after an overflow.
BACKPRESSURE_FRACTION = 0.5
BACKPRESSURE_CHECK_BYTES = 4 * MiB  # how often the guest looks at the buffer
E2E_TARGET = ">= 0.85"  # issue 14 (issue 4 asked 0.7)

# ---- replication.rpo_p99 ----------------------------------------------------------------
RPO_SECONDS = 10.0  # steady load this long (quick: 1 s)
RPO_SAMPLE_SECONDS = 0.01  # RPO sampled every 10 ms
RPO_LOAD_FRACTION = 0.5  # of the measured e2e throughput (issue 4)
RPO_BUDGET_MS = 100.0  # issue 14: p99 <= 100 ms at half the e2e load (issue 4: 250 ms)
RPO_PACE_SECONDS = 0.002  # the paced guest catches up on its schedule this often
RPO_TARGET = "<= 1"

# ---- replication.resync_bytes -----------------------------------------------------------
RESYNC_VOLUME_BYTES = 256 * MiB
# Written during the outage, incompressible (so the ratio shows the protocol's overhead,
# not LZ4's gain); random offsets overlap, so the dirty blocks are fewer bytes.
RESYNC_BYTES = 96 * MiB
RESYNC_TARGET = "<= 1.05"

# ---- replication.initial_sync -----------------------------------------------------------
INITIAL_VOLUME_BYTES = 2 * GiB  # issue 4: a 2 GiB volume...
INITIAL_RUN_BYTES = 1 * MiB  # ...50 % zero: data and zero runs of this size alternate
READ_CHUNK = 1 * MiB  # the os.pread baseline reads this much at a time

# ---- replication.wan_20mb ---------------------------------------------------------------
WAN_RATE = 20e6  # issue 14: a link throttled to 20 MB/s (replication/throttle.py)
WAN_VOLUME_BYTES = 1 * GiB
# Bytes per pass: ~40 MB/s of data through the link, so ~13 s a pass; the controller
# needs one or two 0.5 s windows to turn zstd on (measured: 256 MiB passes lost ~3 % of
# the steady-state ratio to them), which this pass length keeps small.
WAN_BYTES = 512 * MiB
WAN_PASSES = 2  # of each kind, alternated; the best of each counts
WAN_TARGET = ">= 1.2"
# Disk-like data (what a guest's disk holds, per 4 KiB block): zero, incompressible
# (media, encrypted, already compressed), text (words of a Zipf-distributed vocabulary:
# logs, source, documents) and structured binary (tables of small integers and ids).
WAN_MIX = {"zero": 0.25, "random": 0.20, "text": 0.35, "binary": 0.20}
WAN_VOCABULARY = 4096

# how long to wait for anything before calling the run broken
DEADLINE_SECONDS = 600.0


# ---- helpers ------------------------------------------------------------------------------

def write_ops(rng: np.random.Generator, total: int, volume_bytes: int,
              pool_bytes: int) -> np.ndarray:
    """Rows of (volume offset, pool offset, length) adding up to at least `total`."""
    mean = (WRITE_MIN + WRITE_MAX) // 2
    n = total // mean + 16
    lengths = rng.integers(WRITE_MIN // WRITE_ALIGN, WRITE_MAX // WRITE_ALIGN + 1,
                           size=n) * WRITE_ALIGN
    offsets = rng.integers(0, (volume_bytes - lengths) // WRITE_ALIGN + 1) * WRITE_ALIGN
    pooloffs = rng.integers(0, (pool_bytes - lengths) // WRITE_ALIGN + 1) * WRITE_ALIGN
    ops = np.stack([offsets, pooloffs, lengths], axis=1)
    k = int(np.searchsorted(np.cumsum(lengths), total)) + 1
    return ops[:k]


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Peer:
    """The recovery site subprocess (bench/replication_peer.py)."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), str(root)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = json.loads(self.proc.stdout.readline())
        self.host, self.port, self.token = hello["host"], hello["port"], hello["token"]

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CountingRelay:
    """A TCP relay on loopback that counts the bytes sent towards the recovery site and
    can take the link down (reset every connection, refuse new ones) and up again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.up_bytes = 0
        self.refusing = False
        self.closed = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        buf = bytearray(1 << 20)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(memoryview(buf)[:n])
                if up:
                    with self.lock:
                        self.up_bytes += n
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self.refusing = True
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def up(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.closed = True
        self.down()
        self.listener.close()


async def wait_for(cond, what: str, timeout: float = DEADLINE_SECONDS,
                   step: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()
            if v - before.get(k, 0.0) > 0}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _make_vpg(ctx: Context, name: str, volume: Path, **settings) -> VPG:
    vpg = VPG(name, ctx.workdir / f"state-{name}", VPGSettings(**settings))
    vpg.add_vm("vm1")
    vpg.add_volume("vm1", "disk0", volume)
    return vpg


# ---- replication.e2e --------------------------------------------------------------------

def _baseline_pass(ctx: Context, pool: bytes, ops: np.ndarray, data_path: Path,
                   tag: str) -> float:
    """Seconds for the minimum CDP work, single-threaded: pwrite the writes to a plain
    file (the same one every pass, as the protected volume is), LZ4 each and append it
    to a fresh second file with an fsync every 8 MiB."""
    log_path = ctx.workdir / f"baseline-{tag}.log"
    dfd = os.open(data_path, os.O_RDWR)
    lfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    mv = memoryview(pool)
    pwrite, write, fsync, compress = os.pwrite, os.write, os.fsync, lz4.block.compress
    sync_dirty()
    try:
        with gc_paused():
            t0 = time.perf_counter()
            unsynced = 0
            for off, poff, n in ops.tolist():
                data = mv[poff : poff + n]
                pwrite(dfd, data, off)
                c = compress(data)
                write(lfd, c)
                unsynced += len(c)
                if unsynced >= BASELINE_FSYNC_BYTES:
                    fsync(lfd)
                    unsynced = 0
            fsync(lfd)
            return time.perf_counter() - t0
    finally:
        os.close(dfd)
        os.close(lfd)
        log_path.unlink()


class Guest(threading.Thread):
    """The protected VM: issues `ops` on a ProtectedVolume as fast as it can, waiting
    while the VPG buffer is more than BACKPRESSURE_FRACTION full."""

    def __init__(self, vpg: VPG, pool: bytes, ops: np.ndarray) -> None:
        super().__init__(daemon=True, name="guest")
        self.vpg, self.pool, self.ops = vpg, pool, ops
        self.vol = next(iter(vpg.volumes.values()))
        self.last_seq = 0
        self.start_time = self.end_time = 0.0
        self.in_write = 0.0
        self.backpressure = 0.0
        self.cpu = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        cpu0 = time.thread_time()
        try:
            mv = memoryview(self.pool)
            write, clock = self.vol.write, time.perf_counter
            limit = self.vpg.settings.buffer_bytes * BACKPRESSURE_FRACTION
            since = 0
            self.start_time = clock()
            for off, poff, n in self.ops.tolist():
                t = clock()
                self.last_seq = write(off, mv[poff : poff + n])
                self.in_write += clock() - t
                since += n
                if since >= BACKPRESSURE_CHECK_BYTES:
                    since = 0
                    t = clock()
                    while self.vpg.status().buffer_used > limit:
                        time.sleep(0.0005)
                    self.backpressure += clock() - t
            self.end_time = clock()
        except BaseException as exc:
            self.error = exc
        finally:
            self.cpu = time.thread_time() - cpu0


async def _e2e_pass(vpg: VPG, pool: bytes, ops: np.ndarray, peer: Peer) -> dict:
    peer0 = peer.stats()
    before = peer0["vpgs"].get(vpg.name, {})
    cpu0 = _cpu()
    threads0 = thread_cpu()
    codecs0 = vpg.status().compression
    sync_dirty()
    guest = Guest(vpg, pool, ops)
    guest.start()
    await wait_for(lambda: not guest.is_alive() or guest.last_seq, "the guest's first write")
    # joined off the loop: a 1 ms poll would wake the sender's own loop ~1000 times a
    # second while it is measured
    await asyncio.get_running_loop().run_in_executor(None, guest.join, DEADLINE_SECONDS)
    if guest.is_alive():
        raise RuntimeError(f"timed out after {DEADLINE_SECONDS} s waiting for the guest")
    if guest.error:
        raise guest.error
    target = guest.last_seq
    await wait_for(lambda: vpg.acked_seq >= target, f"the ack of seq {target}")
    done = time.perf_counter()
    cpu = _cpu() - cpu0
    threads = _delta(thread_cpu(), threads0)
    threads["guest"] = guest.cpu
    after = peer.stats()
    mine = after["vpgs"][vpg.name]
    codecs = {k: {"bundles": u.bundles - (codecs0[k].bundles if k in codecs0 else 0),
                  "data_bytes": u.data_bytes - (codecs0[k].data_bytes if k in codecs0 else 0),
                  "encoded_bytes": u.encoded_bytes - (codecs0[k].encoded_bytes
                                                      if k in codecs0 else 0)}
              for k, u in vpg.status().compression.items()}
    return {
        "seconds": done - guest.start_time,
        "guest_seconds": guest.end_time - guest.start_time,
        "guest_in_write_seconds": guest.in_write,
        "guest_backpressure_seconds": guest.backpressure,
        "protected_cpu_seconds": cpu,
        "protected_thread_cpu_seconds": threads,
        "recovery_cpu_seconds": after["cpu"] - peer0["cpu"],
        "recovery_thread_cpu_seconds": _delta(after["threads"], peer0["threads"]),
        "wire_payload_bytes": mine["bytes"] - before.get("bytes", 0),
        "bundles": mine["bundles"] - before.get("bundles", 0),
        "mode_after": vpg.mode,
        "overflowed": any("overflow" in e for e in vpg.events),
        "codecs": {k: c for k, c in codecs.items() if c["bundles"]},
    }


async def measure_e2e(ctx: Context, peer: Peer, pool: bytes) -> Metric:
    rng = np.random.default_rng(ctx.seed)
    total = ctx.scale(E2E_BYTES, minimum=4 * MiB)
    ops = write_ops(rng, total, E2E_VOLUME_BYTES, len(pool))
    size = int(ops[:, 2].sum())
    volume = sparse_file(ctx.workdir / "e2e.img", E2E_VOLUME_BYTES)
    plain = sparse_file(ctx.workdir / "baseline.img", E2E_VOLUME_BYTES)
    vpg = _make_vpg(ctx, "e2e", volume)
    vpg.start()
    site = ProtectedSite(ctx.workdir / "protected")
    rep = site.protect(vpg, peer.host, peer.port)
    baselines, passes = [], []
    try:
        await wait_for(lambda: rep.connected, "the connection")
        for r in range(E2E_PASSES if not ctx.quick else 1):
            base = _baseline_pass(ctx, pool, ops, plain, str(r))
            baselines.append(base)
            ctx.log(f"e2e pass {r}: baseline {size / base / MB:.0f} MB/s")
            p = await _e2e_pass(vpg, pool, ops, peer)
            passes.append(p)
            ctx.log(f"e2e pass {r}: replication {size / p['seconds'] / MB:.0f} MB/s "
                    f"(guest {p['guest_seconds']:.2f} s, backpressure "
                    f"{p['guest_backpressure_seconds']:.2f} s, protected cpu "
                    f"{p['protected_cpu_seconds']:.2f} s, recovery cpu "
                    f"{p['recovery_cpu_seconds']:.2f} s, codecs "
                    f"{ {k: v['bundles'] for k, v in p['codecs'].items()} })")
        peer_cpu = peer.stats()["cpu"]
    finally:
        await site.stop()
        vpg.close()
    best = min(passes, key=lambda p: p["seconds"])
    base = min(baselines)
    ratio = len(lz4.block.compress(pool[: 8 * MiB])) / (8 * MiB)
    return Metric(
        "replication.e2e", size / best["seconds"] / MB, "MB/s", size / base / MB, E2E_TARGET,
        note="ProtectedVolume.write (guest thread) to the ack of the last write (durable "
             "in the recovery journal, recovery site in a subprocess) vs single-threaded "
             "os.pwrite + lz4.block.compress appended with fsync every 8 MiB",
        details={
            "bytes": size, "writes": len(ops), "lz4_ratio_of_pool": 1 / ratio,
            "baseline_seconds": baselines, "passes": passes,
            "recovery_cpu_seconds_all_passes": peer_cpu,
        "where_time_goes": "see passes[*].*_thread_cpu_seconds: the guest thread (capture "
                           "writes), vpg-e2e (sealing: LZ4, CRC32C), MainThread (sender: "
                           "TLS, frames), executor (waiting for bundles); recovery "
                           "MainThread (TLS, frame CRC) and journal-e2e (scan, pwrite, "
                           "fsync)",
            "recovery_site": "subprocess (bench/replication_peer.py)",
        },
    )


# ---- replication.rpo_p99 ----------------------------------------------------------------

class PacedGuest(threading.Thread):
    """Writes at a steady `rate` (bytes/s) for `seconds`, logging (seq, time) of each."""

    def __init__(self, vpg: VPG, pool: bytes, ops: np.ndarray, rate: float,
                 seconds: float) -> None:
        super().__init__(daemon=True, name="paced-guest")
        self.vpg, self.pool, self.ops, self.rate, self.seconds = vpg, pool, ops, rate, seconds
        self.vol = next(iter(vpg.volumes.values()))
        self.log: list[tuple[int, float]] = []
        self.bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            mv = memoryview(self.pool)
            write, clock = self.vol.write, time.perf_counter
            t0 = clock()
            i = 0
            while True:
                now = clock() - t0
                if now >= self.seconds:
                    return
                due = self.bytes / self.rate
                if due > now + RPO_PACE_SECONDS:
                    time.sleep(due - now)
                    continue
                off, poff, n = self.ops[i % len(self.ops)].tolist()
                i += 1
                seq = write(off, mv[poff : poff + n])
                self.log.append((seq, clock()))
                self.bytes += n
        except BaseException as exc:
            self.error = exc


async def measure_rpo(ctx: Context, peer: Peer, pool: bytes, e2e_bytes_per_s: float) -> Metric:
    rate = e2e_bytes_per_s * RPO_LOAD_FRACTION
    seconds = RPO_SECONDS if not ctx.quick else 1.0
    rng = np.random.default_rng(ctx.seed + 1)
    ops = write_ops(rng, int(rate * seconds) + WRITE_MAX, E2E_VOLUME_BYTES, len(pool))
    volume = sparse_file(ctx.workdir / "rpo.img", E2E_VOLUME_BYTES)
    vpg = _make_vpg(ctx, "rpo", volume)
    vpg.start()
    site = ProtectedSite(ctx.workdir / "protected")
    rep = site.protect(vpg, peer.host, peer.port)
    samples: list[float] = []
    latencies: list[float] = []
    try:
        await wait_for(lambda: rep.connected, "the connection")
        sync_dirty()  # the e2e passes' dirty pages go to disk now, not under the paced load
        guest = PacedGuest(vpg, pool, ops, rate, seconds)
        guest.start()
        k = 0
        while guest.is_alive() or k < len(guest.log):
            samples.append(vpg.rpo_seconds())
            acked, now = vpg.acked_seq, time.perf_counter()
            log = guest.log
            while k < len(log) and log[k][0] <= acked:
                latencies.append(now - log[k][1])
                k += 1
            if not guest.is_alive() and k < len(log):
                await wait_for(lambda last=log[-1][0]: vpg.acked_seq >= last, "the last ack", 60)
                continue
            await asyncio.sleep(RPO_SAMPLE_SECONDS)
        if guest.error:
            raise guest.error
        achieved = guest.bytes / seconds
        state = rep.status()
    finally:
        await site.stop()
        vpg.close()
    s = np.array(samples) * 1000
    lat = np.array(latencies) * 1000
    p99 = float(np.percentile(s, 99))
    return Metric(
        "replication.rpo_p99", p99, "ms", RPO_BUDGET_MS, RPO_TARGET,
        note=f"p99 of VPG.rpo_seconds() sampled every {RPO_SAMPLE_SECONDS * 1000:.0f} ms at a "
             "steady load of half the e2e throughput vs the 100 ms budget",
        details={
            "load_MBps": rate / MB, "achieved_MBps": achieved / MB, "seconds": seconds,
            "samples": len(s), "rpo_p50_ms": float(np.percentile(s, 50)),
            "rpo_max_ms": float(s.max()),
            "write_to_durable_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "write_to_durable_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "state_at_end": state.state,
        },
    )


# ---- replication.resync_bytes -----------------------------------------------------------

async def measure_resync(ctx: Context, peer: Peer) -> Metric:
    volume_bytes = ctx.scale(RESYNC_VOLUME_BYTES, minimum=8 * MiB, align=WRITE_ALIGN)
    volume = sparse_file(ctx.workdir / "resync.img", volume_bytes)
    vpg = _make_vpg(ctx, "resync", volume)
    vpg.start()
    relay = CountingRelay((peer.host, peer.port))
    site = ProtectedSite(ctx.workdir / "protected")
    rep = site.protect(vpg, "127.0.0.1", relay.port)
    pool = os.urandom(ctx.scale(POOL_BYTES, minimum=2 * WRITE_MAX))
    rng = np.random.default_rng(ctx.seed + 2)
    vol = vpg.volumes[0]
    try:
        await wait_for(lambda: rep.connected, "the connection")
        # the outage: the link goes down and the VPG is declared in bitmap mode
        relay.down()
        await wait_for(lambda: not rep.connected, "the disconnect")
        vpg.link_down("benchmark outage")
        ops = write_ops(rng, ctx.scale(RESYNC_BYTES, minimum=4 * MiB), volume_bytes, len(pool))
        mv = memoryview(pool)
        for off, poff, n in ops.tolist():
            vol.write(off, mv[poff : poff + n])
        written = int(ops[:, 2].sum())
        dirty = vpg.status().dirty_bytes
        with relay.lock:
            relay.up_bytes = 0
        t0 = time.perf_counter()
        relay.up()
        await wait_for(lambda: any("bitmap syncing complete" in e for e in vpg.events),
                       "the bitmap sync")
        last = await asyncio.to_thread(vpg.flush, DEADLINE_SECONDS)  # blocks: not in the loop
        await wait_for(lambda: vpg.acked_seq >= last, "the sync's acks")
        seconds = time.perf_counter() - t0
        sent = relay.up_bytes
        total = vpg.status().sync_total_bytes
    finally:
        await site.stop()
        vpg.close()
        relay.close()
    return Metric(
        "replication.resync_bytes", sent, "bytes", dirty, RESYNC_TARGET,
        note="bytes sent towards the recovery site (TCP payload: TLS, frames, records) "
             "from reconnect to the ack of the sync vs the bytes of the dirty 4 KiB blocks",
        details={"written_during_outage": written, "dirty_bytes": dirty,
                 "sync_total_bytes": total, "seconds": seconds,
                 "MBps": dirty / seconds / MB, "data": "incompressible"},
    )


# ---- replication.initial_sync -----------------------------------------------------------

def _half_zero_volume(path: Path, size: int, pool: bytes) -> int:
    """Alternate runs of pool data and zeros (holes); returns the data bytes."""
    sparse_file(path, size)
    fd = os.open(path, os.O_WRONLY)
    data = 0
    try:
        at = 0
        for k, off in enumerate(range(0, size, 2 * INITIAL_RUN_BYTES)):
            at = (k * INITIAL_RUN_BYTES) % (len(pool) - INITIAL_RUN_BYTES) // 4096 * 4096
            os.pwrite(fd, memoryview(pool)[at : at + INITIAL_RUN_BYTES], off)
            data += INITIAL_RUN_BYTES
    finally:
        os.close(fd)
    return data


def _pread_all(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        pos = 0
        while chunk := os.pread(fd, READ_CHUNK, pos):
            pos += len(chunk)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


async def measure_initial_sync(ctx: Context, peer: Peer, pool: bytes) -> Metric:
    size = ctx.scale(INITIAL_VOLUME_BYTES, minimum=16 * MiB, align=2 * INITIAL_RUN_BYTES)
    path = ctx.workdir / "initial.img"
    data = _half_zero_volume(path, size, pool)
    _pread_all(path)  # warm the page cache for both sides
    base = min(_pread_all(path) for _ in range(2))
    vpg = _make_vpg(ctx, "initial", path)
    site = ProtectedSite(ctx.workdir / "protected")
    try:
        t0 = time.perf_counter()
        vpg.start(initial_sync=True)
        rep = site.protect(vpg, peer.host, peer.port)
        progress = []
        while not any("initial sync complete" in e for e in vpg.events):
            st = rep.status()
            progress.append((time.perf_counter() - t0, st.sync_done_bytes, st.state))
            await asyncio.sleep(0.05)
        last = await asyncio.to_thread(vpg.flush, DEADLINE_SECONDS)  # blocks: not in the loop
        await wait_for(lambda: vpg.acked_seq >= last, "the initial sync's acks")
        seconds = time.perf_counter() - t0
        received = peer.stats()["vpgs"]["initial"]
    finally:
        await site.stop()
        vpg.close()
    states = sorted({s for _, _, s in progress})
    return Metric(
        "replication.initial_sync", size / seconds / MB, "MB/s", size / base / MB, None,
        note="initial sync of a half-zero volume until durable at the recovery site vs "
             "os.pread of the volume in 1 MiB reads (page cache warm)",
        details={"volume_bytes": size, "data_bytes": data, "seconds": seconds,
                 "wire_payload_bytes": received["bytes"], "states_seen": states,
                 "progress_samples": len(progress)},
    )


# ---- replication.wan_20mb ---------------------------------------------------------------

def disk_like_pool(nbytes: int, seed: int) -> bytes:
    """`nbytes` of disk-like data (WAN_MIX per 4 KiB block), the same for the same seed."""
    rng = np.random.default_rng(seed)
    blocks = nbytes // 4096
    lens = rng.integers(2, 11, size=WAN_VOCABULARY)
    letters = rng.integers(97, 123, size=int(lens.sum()), dtype=np.uint8).tobytes()
    cuts = np.concatenate([[0], np.cumsum(lens)]).tolist()
    words = [letters[a:b] for a, b in itertools.pairwise(cuts)]
    zipf = 1.0 / np.arange(1, WAN_VOCABULARY + 1)
    picks = rng.choice(WAN_VOCABULARY, size=(4 << 20) // 6, p=zipf / zipf.sum())
    seps = rng.choice([b" ", b" ", b" ", b" ", b" ", b" ", b" ", b" ", b", ", b".\n"],
                      size=len(picks))
    corpus = np.frombuffer(b"".join(words[i] + seps[k] for k, i in enumerate(picks.tolist())),
                           dtype=np.uint8)
    out = np.frombuffer(rng.bytes(blocks * 4096), dtype=np.uint8).reshape(blocks, 4096).copy()
    kind = rng.random(blocks)
    edges = np.cumsum([WAN_MIX[k] for k in ("zero", "random", "text", "binary")])
    out[kind < edges[0]] = 0
    text = np.flatnonzero((kind >= edges[1]) & (kind < edges[2]))
    starts = rng.integers(0, len(corpus) - 4096, size=len(text))
    out[text] = corpus[starts[:, None] + np.arange(4096)]
    binary = np.flatnonzero(kind >= edges[2])
    rec = np.zeros((len(binary), 256, 4), dtype=np.uint32)
    rec[:, :, 0] = np.arange(256) + rng.integers(0, 1 << 20, size=(len(binary), 1))
    rec[:, :, 1] = rng.integers(0, 1000, size=(len(binary), 256))
    rec[:, :, 2] = rng.integers(0, 16, size=(len(binary), 256))
    rec[:, :, 3] = rng.choice(np.array([0, 1, 7, 0xFFFFFFFF], dtype=np.uint32),
                              size=(len(binary), 256))
    out[binary] = rec.view(np.uint8).reshape(len(binary), 4096)
    return out.tobytes()


def _per_mb(cpu: dict[str, float], size: int) -> dict[str, float]:
    return {k: round(v / (size / MB), 5) for k, v in cpu.items()}


async def measure_wan(ctx: Context, peer: Peer) -> Metric:
    pool = disk_like_pool(ctx.scale(POOL_BYTES, minimum=2 * WRITE_MAX, align=4096),
                          ctx.seed + 14)
    rng = np.random.default_rng(ctx.seed + 14)
    ops = write_ops(rng, ctx.scale(WAN_BYTES, minimum=8 * MiB), WAN_VOLUME_BYTES, len(pool))
    size = int(ops[:, 2].sum())
    volume = sparse_file(ctx.workdir / "wan.img", WAN_VOLUME_BYTES)
    vpg = _make_vpg(ctx, "wan", volume)
    vpg.start()
    site = ProtectedSite(ctx.workdir / "protected", rate_limit_bytes=WAN_RATE)
    rep = site.protect(vpg, peer.host, peer.port)
    runs: dict[str, list[dict]] = {"lz4": [], "adaptive": []}
    try:
        await wait_for(lambda: rep.connected, "the connection")
        for r in range(WAN_PASSES if not ctx.quick else 1):
            for kind in ("lz4", "adaptive"):
                ctl = rep.compression
                ctl.enabled = kind == "adaptive"  # off: LZ4 from the pass's first write
                # a fresh window (the link-bound windows of the pass before stay the
                # reference a step up is judged against, as across a new session)
                ctl.reset(ctl.zstd_allowed)
                p = await _e2e_pass(vpg, pool, ops, peer)
                p["cpu_seconds_per_mb"] = {
                    "protected": _per_mb(p["protected_thread_cpu_seconds"], size),
                    "recovery": _per_mb(p["recovery_thread_cpu_seconds"], size)}
                runs[kind].append(p)
                ctx.log(f"wan pass {r} {kind}: {size / p['seconds'] / MB:.1f} MB/s "
                        f"(wire {p['wire_payload_bytes'] / MB:.0f} MB, codecs "
                        f"{ {k: v['bundles'] for k, v in p['codecs'].items()} })")
    finally:
        await site.stop()
        vpg.close()
    best = {k: min(v, key=lambda p: p["seconds"]) for k, v in runs.items()}
    value, base = (size / best[k]["seconds"] / MB for k in ("adaptive", "lz4"))
    sample = pool[: 8 * MiB]
    return Metric(
        "replication.wan_20mb", value, "MB/s", base, WAN_TARGET,
        note="disk-like writes (ProtectedVolume.write to the ack of the last write) over a "
             "link throttled to 20 MB/s: adaptive compression (zstd chosen when the link "
             "is the bottleneck) vs LZ4 only, passes alternated in the same run",
        details={
            "bytes": size, "writes": len(ops), "rate_bytes": WAN_RATE, "mix": WAN_MIX,
            "lz4_ratio_of_pool": len(sample) / len(lz4.block.compress(sample)),
            "passes": runs,
            "where_time_goes": "passes[*].cpu_seconds_per_mb: CPU seconds per MB written, "
                               "by thread: guest (capture), vpg-wan (sealing: LZ4 or "
                               "zstd, CRC32C), MainThread (sender: TLS, frames), executor; "
                               "recovery MainThread (TLS, frame CRC), journal-wan (scan, "
                               "pwrite, fsync)",
        },
    )


# ---- the suite ------------------------------------------------------------------------------

async def _pair(ctx: Context, peer: Peer) -> None:
    await ProtectedSite(ctx.workdir / "protected").pair(peer.host, peer.port, peer.token)


def run(ctx: Context):
    ctx.log(f"building a {ctx.scale(POOL_BYTES) / MiB:.0f} MiB pool of VM-like data")
    pool = vm_like_pool(ctx.scale(POOL_BYTES, minimum=2 * WRITE_MAX, align=4096), ctx.seed)
    peer = Peer(ctx.subdir("recovery"))
    try:
        asyncio.run(_pair(ctx, peer))
        e2e = asyncio.run(measure_e2e(ctx, peer, pool))
        yield e2e
        yield asyncio.run(measure_rpo(ctx, peer, pool, e2e.value * MB))
        yield asyncio.run(measure_resync(ctx, peer))
        yield asyncio.run(measure_initial_sync(ctx, peer, pool))
        yield asyncio.run(measure_wan(ctx, peer))
    finally:
        peer.close()
