#!/usr/bin/env python3
"""One site of the two-site fault program (tests/reliability/test_two_sites.py), run as
its own process by tests/reliability/two_sites.py (no tests here).

    two_sites_peer.py recovery ROOT HOST PORT
    two_sites_peer.py protected ROOT HOST PORT SEED GEN [TOKEN]

The recovery site listens on HOST:PORT (fixed, so a restart after kill -9 listens where
the protected site reconnects) and prints one JSON line {"token", "pid"}.

The protected site pairs with TOKEN once (generation 0), builds the VPG over image files
under ROOT, starts it and replicates it, and runs a seeded workload (writes of
`two_sites.data` and tagged checkpoints) until told to finish.  Everything it does goes to
the write log `ROOT/write.log` (two_sites.WriteLog): an intent before each write, the
write with its seq after it returns, each checkpoint it took, the VPG's events and a
status sample every SAMPLE_INTERVAL.  A write whose intent was logged but not its
completion (a kill -9 between the two) is redone first at the next start, through the
VPG, so the model built from the log stays exact.  Commands on stdin, one per line:
`finish` (stop the workload, take consistent checkpoints until one is acknowledged;
answers {"final": seq}) and `quit` (clean stop).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import two_sites as ts

from zcore.errors import StateError, ZcoreError
from zcore.replication import ProtectedSite, RecoverySite, Replication, timing
from zcore.vpg import VPG


def _fast_timeouts() -> None:
    for k, v in ts.TIMEOUTS.items():
        setattr(timing, k, v)


async def _commands() -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "quit")

    threading.Thread(target=read, daemon=True).start()
    return queue


async def recovery(root: str, host: str, port: int) -> None:
    _fast_timeouts()
    site = RecoverySite(Path(root) / "rs")
    await site.start(host, port)
    print(json.dumps({"token": site.issue_pairing_token(), "pid": os.getpid()}), flush=True)
    commands = await _commands()
    try:
        while await commands.get() != "quit":
            pass
    finally:
        await site.stop()


def make_vpg(root: Path) -> VPG:
    vpg = VPG(ts.VPG_NAME, root / "state", ts.vpg_settings())
    for vm, sizes in ts.LAYOUT.items():
        vpg.add_vm(vm)
        for i, size in enumerate(sizes):
            path = root / f"{vm}-{i}.img"
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(size)
            vpg.add_volume(vm, f"disk{i}", path)
    return vpg


class Workload:
    """The seeded writer: a thread writing and checkpointing until stopped."""

    def __init__(self, vpg: VPG, log: ts.WriteLog, seed: int, gen: int) -> None:
        self.vpg = vpg
        self.log = log
        self.gen = gen
        self.rng = random.Random(f"{seed}/{gen}")
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.tags = 0
        self.thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def write(self, intent: dict[str, int]) -> None:
        vol = self.vpg.volumes[intent["vid"]]
        seq = vol.write(intent["off"], ts.data(intent["dseed"], intent["len"]))
        self.log.append({"k": "W", "i": intent["i"], "seq": seq, "t": time.time_ns()},
                        sync=True)

    def next_intent(self) -> dict[str, int]:
        rng = self.rng
        vid = rng.choice(sorted(self.vpg.volumes))
        size = self.vpg.volumes[vid].size
        n = min(size, rng.randrange(1, ts.MAX_WRITE // 512 + 1) * 512)
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        return {"k": "I", "i": self.log.next_intent(), "vid": vid, "off": off, "len": n,
                "dseed": rng.getrandbits(32), "gen": self.gen}

    def checkpoint(self) -> None:
        self.tags += 1
        tag = f"t{self.gen}-{self.tags}"
        try:
            c = self.vpg.checkpoint(tag)
        except StateError as exc:  # bitmap mode: no promise was made
            self.log.append({"k": "X", "tag": tag, "why": str(exc), "t": time.time_ns()})
            return
        self.log.append({"k": "C", "seq": c.seq, "tag": tag, "consistent": c.consistent,
                         "t": c.time_ns, "gen": self.gen}, sync=True)

    def _run(self) -> None:
        try:
            next_tag = time.monotonic() + ts.TAG_INTERVAL
            while not self.stop.is_set():
                intent = self.next_intent()
                self.log.append(intent, sync=True)
                self.write(intent)
                if time.monotonic() >= next_tag:
                    self.checkpoint()
                    next_tag = time.monotonic() + ts.TAG_INTERVAL
                self.stop.wait(self.rng.uniform(0, 2 * ts.WRITE_PAUSE))
        except BaseException as exc:  # reported by `finish`
            self.error = exc


async def sample(rep: Replication, vpg: VPG, log: ts.WriteLog, gen: int) -> None:
    """Log a status sample and the VPG's new events every SAMPLE_INTERVAL."""
    seen: tuple[str, ...] = ()
    while True:
        t0 = time.time_ns()
        st = rep.status()
        t1 = time.time_ns()
        log.append({"k": "S", "t0": t0, "t1": t1, "rpo": st.rpo_seconds, "state": st.state,
                    "acked": st.acked_seq, "connected": st.connected, "mode": vpg.mode,
                    "gen": gen})
        events = vpg.events
        for text in ts.new_events(seen, events):
            log.append({"k": "E", "text": text, "t": t1, "gen": gen})
        seen = events
        await asyncio.sleep(ts.SAMPLE_INTERVAL)


async def finish(vpg: VPG, work: Workload) -> int:
    """Stop the workload; take checkpoints until a consistent one is acknowledged."""
    work.stop.set()
    await asyncio.to_thread(work.thread.join)
    if work.error is not None:
        raise work.error
    deadline = time.monotonic() + ts.CATCH_UP
    n = 0
    while time.monotonic() < deadline:
        if vpg.mode != "streaming":
            await asyncio.sleep(0.05)
            continue
        n += 1
        tag = f"final{work.gen}-{n}"
        try:
            c = await asyncio.to_thread(vpg.checkpoint, tag)
        except StateError:
            continue
        work.log.append({"k": "C", "seq": c.seq, "tag": tag, "consistent": c.consistent,
                         "t": c.time_ns, "gen": work.gen}, sync=True)
        while vpg.acked_seq < c.seq and time.monotonic() < deadline and vpg.mode == "streaming":
            await asyncio.sleep(0.02)
        if vpg.acked_seq >= c.seq and c.consistent:
            return int(c.seq)
    raise StateError(f"no consistent checkpoint acknowledged in {ts.CATCH_UP} s")


async def protected(root: str, host: str, port: int, seed: int, gen: int,
                    token: str | None) -> None:
    _fast_timeouts()
    base = Path(root)
    ps = ProtectedSite(base / "ps")
    if token and not ps.peers.all():
        await ps.pair(host, port, token)
    log = ts.WriteLog(base / "write.log")
    vpg = make_vpg(base)
    vpg.start()
    log.append({"k": "G", "gen": gen, "t": time.time_ns(), "pid": os.getpid()}, sync=True)
    work = Workload(vpg, log, seed, gen)
    for intent in log.unfinished():
        work.write(intent)  # redone through the VPG: the model stays exact
    rep = ps.protect(vpg, host, port)
    sampler = asyncio.create_task(sample(rep, vpg, log, gen))
    work.thread.start()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    commands = await _commands()
    try:
        while (cmd := await commands.get()) != "quit":
            if cmd == "finish":
                try:
                    reply: dict[str, object] = {"final": await finish(vpg, work)}
                except (ZcoreError, OSError) as exc:
                    reply = {"error": repr(exc), "status": repr(rep.status())}
                print(json.dumps(reply), flush=True)
    finally:
        work.stop.set()
        sampler.cancel()
        await ps.stop()
        vpg.close()
        log.close()


def main(argv: list[str]) -> None:
    if len(argv) >= 4 and argv[0] == "recovery":
        asyncio.run(recovery(argv[1], argv[2], int(argv[3])))
    elif len(argv) >= 6 and argv[0] == "protected":
        asyncio.run(protected(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]),
                              argv[6] if len(argv) > 6 else None))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
