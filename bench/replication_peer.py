#!/usr/bin/env python3
"""A recovery site in its own process, for the replication benchmarks
(bench/suites/replication.py): `python bench/replication_peer.py ROOT`.

Starts `RecoverySite(ROOT)` on 127.0.0.1 (an ephemeral port), issues a pairing token and
prints one JSON line {"host", "port", "token", "pid"} on stdout.  Then it reads commands,
one per line, on stdin, answering each with one JSON line:

    stats   {"cpu": seconds of CPU used so far, "threads": {thread name: CPU seconds},
             "vpgs": {name: {"bytes", "bundles", "acked_seq", "journal_bytes"}}}
    quit    stops the site (closing every journal) and exits; so does end of input.

Running the recovery site in a separate process keeps its journal appends, fsyncs and TLS
decryption off the protected side's GIL, as two real sites would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path

# zcore comes from the installed package (the source tree holds no compiled modules)
from zcore.replication import RecoverySite


def _journal_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("seg-*.zcj") if f.is_file()) if path.exists() \
        else 0


def thread_cpu() -> dict[str, float]:
    """CPU seconds used by each live thread of this process, by thread name (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        name = "executor" if t.name.startswith("asyncio_") else t.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _stats(site: RecoverySite) -> dict:
    t = os.times()
    return {
        "cpu": t.user + t.system,
        "threads": thread_cpu(),
        "vpgs": {name: {"bytes": r.stats.bytes, "bundles": r.stats.bundles,
                        "acked_seq": r.stats.acked_seq,
                        "journal_bytes": _journal_bytes(site.vpgs_dir / name)}
                 for name, r in site.receivers.items()},
    }


async def main(root: str) -> None:
    site = RecoverySite(root)
    host, port = await site.start("127.0.0.1", 0)
    print(json.dumps({"host": host, "port": port, "token": site.issue_pairing_token(),
                      "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd = line.strip()
            if not line or cmd == "quit":
                break
            if cmd == "stats":
                print(json.dumps(_stats(site)), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
    finally:
        await site.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1]))
