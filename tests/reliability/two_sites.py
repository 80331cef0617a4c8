"""The two-site fault program's harness (no tests here; tests/reliability/test_two_sites.py
runs it): the link between the sites, the two site processes, the fault campaign and
the checks of what the recovery site holds against the protected site's write log.

The sites run as separate processes (tests/reliability/two_sites_peer.py).  The link:

- `NetnsLink`: each site in its own network namespace, joined by a veth pair on a private
  /30 that exists only inside the two namespaces.  A cut is a prohibit route on each side
  (connections are refused, sent segments fail), a stall is `tc qdisc ... pfifo limit 0`
  on both ends (every packet dropped, the connection stays open), a reset is `ss -K`
  (both ends get an RST).
- `RelayLink`: where namespaces cannot be made (not root), a loopback relay in this
  process (tests/helpers/faultproxy.py) with the same three faults.

The campaign (`run_campaign`) cycles through link cuts, stalls longer than the peer
timeout, resets and kill -9 of either site, in a seeded order, while the protected site
writes.  The checks (`check`) read the write log (`WriteLog`, fsynced by the protected
process) and the recovery journals once both processes have stopped:

- every crash-consistent checkpoint in every recovery journal equals, byte for byte, the
  model: the volumes as the logged writes with seqs below the checkpoint's leave them;
- every tagged checkpoint the protected site took is in the recovery journals, or the
  VPG's events say it was lost (or the protected process died before any ack passed it);
- no status sample reports an RPO below the true one (see `Checked.rpo_violations`);
- a link outage folds the VPG into bitmap mode at most once.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20

VPG_NAME = "g2s"
# Two VMs, three small volumes: every consistent checkpoint can be compared whole.
LAYOUT = {"vm1": [1 * MiB, 512 * KiB], "vm2": [1 * MiB]}
MAX_WRITE = 64 * KiB
WRITE_PAUSE = 0.006  # mean pause between writes (seconds): a few MiB/s, a 4 MiB buffer
TAG_INTERVAL = 0.4  # a tagged checkpoint this often
CHECKPOINT_INTERVAL = 0.5  # automatic checkpoints
SAMPLE_INTERVAL = 0.1  # status samples
CATCH_UP = 60.0  # `finish` waits this long for a consistent, acknowledged checkpoint
# Short timeouts (zcore.replication.timing) in both site processes.
TIMEOUTS: dict[str, Any] = {
    "HEARTBEAT_INTERVAL": 0.1,
    "PEER_TIMEOUT": 1.0,
    "HANDSHAKE_TIMEOUT": 2.0,
    "RECONNECT_BACKOFF": (0.02, 0.2),
}
PEER_TIMEOUT = float(TIMEOUTS["PEER_TIMEOUT"])
# The true RPO is measured against consistent checkpoints (taken every
# CHECKPOINT_INTERVAL, plus tagged ones) while the VPG counts a streamed write as safe
# once acknowledged: a write just after a checkpoint is "unrecovered" here up to one
# interval longer than the VPG can know.  Reports below the true RPO by more are wrong.
RPO_SLACK = CHECKPOINT_INTERVAL + 0.5
FAULTS = ("cut", "stall", "reset", "kill_protected", "kill_recovery")
PEER = Path(__file__).with_name("two_sites_peer.py")


def vpg_settings() -> Any:
    from zcore.vpg import VPGSettings
    return VPGSettings(checkpoint_interval=CHECKPOINT_INTERVAL, buffer_bytes=4 * MiB,
                       bundle_bytes=256 * KiB, bundle_age=0.005)


def data(seed: int, n: int) -> bytes:
    """The `n` bytes a write with data seed `seed` carries: zeros, repetitive text-like
    runs or random bytes per 4 KiB block, as VM disks look."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        k = min(4096, n - len(out))
        r = rng.random()
        if r < 0.25:
            out += bytes(k)
        elif r < 0.6:
            word = rng.randbytes(rng.randrange(4, 40))
            out += (word * (k // len(word) + 1))[:k]
        else:
            out += rng.randbytes(k)
    return bytes(out)


def new_events(seen: tuple[str, ...], now: tuple[str, ...]) -> tuple[str, ...]:
    """The events of snapshot `now` not in the previous snapshot `seen` (both a window
    of the same append-only list)."""
    for k in range(min(len(seen), len(now)), 0, -1):
        if seen[-k:] == now[:k]:
            return now[k:]
    return now


class WriteLog:
    """The protected site's log: JSON lines, appended; `sync=True` fsyncs the line.
    Kinds: G (a generation of the process started), I (write intent: i, vid, off, len,
    dseed), W (intent i returned with seq, at t), C (checkpoint seq, tag, consistent, t),
    X (checkpoint refused), S (status sample), E (VPG event)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        entries = read_log(path) if path.exists() else []
        if path.exists():  # a kill -9 may have torn the last line: cut it off
            raw = path.read_bytes()
            keep = raw.rfind(b"\n") + 1
            if keep != len(raw):
                os.truncate(path, keep)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        intents = {e["i"]: e for e in entries if e["k"] == "I"}
        for e in entries:
            if e["k"] == "W":
                intents.pop(e["i"], None)
        self._pending = sorted(intents.values(), key=lambda e: e["i"])
        self._next = 1 + max((e["i"] for e in entries if e["k"] == "I"), default=0)

    def next_intent(self) -> int:
        with self._lock:
            self._next += 1
            return self._next - 1

    def unfinished(self) -> list[dict[str, Any]]:
        """Intents logged whose write was never logged as returned (at most one)."""
        return list(self._pending)

    def append(self, entry: dict[str, Any], sync: bool = False) -> None:
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            os.write(self._fd, line)
            if sync:
                os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:  # the torn last line of a killed process
            continue
    return out


# ---- the link --------------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=20)


class NetnsLink:
    """Two network namespaces joined by a veth pair (names unique per run)."""

    kind = "netns"

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = {"p": f"zc2s-{tag}-p", "r": f"zc2s-{tag}-r"}
        self.dev = {"p": f"zc{tag}p", "r": f"zc{tag}r"}
        net = 4 * random.randrange(1, 1 << 14)  # a /30 inside 10.213.0.0/16
        self.addr = {"p": f"10.213.{net >> 8}.{(net & 255) + 1}",
                     "r": f"10.213.{net >> 8}.{(net & 255) + 2}"}
        self.recovery_host = self.connect_host = self.addr["r"]
        self.port = self.connect_port = 7070
        self._made: list[str] = []
        try:
            for side in "pr":
                _run("ip", "netns", "add", self.ns[side])
                self._made.append(self.ns[side])
            _run("ip", "link", "add", self.dev["p"], "type", "veth", "peer", "name",
                 self.dev["r"])
            for side in "pr":
                _run("ip", "link", "set", self.dev[side], "netns", self.ns[side])
                _run("ip", "-n", self.ns[side], "addr", "add", f"{self.addr[side]}/30",
                     "dev", self.dev[side])
                _run("ip", "-n", self.ns[side], "link", "set", self.dev[side], "up")
                _run("ip", "-n", self.ns[side], "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self._cut = self._stalled = False

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def cut(self) -> None:
        for side, other in (("p", "r"), ("r", "p")):
            _run("ip", "-n", self.ns[side], "route", "add", "prohibit", f"{self.addr[other]}/32")
        self._cut = True

    def uncut(self) -> None:
        for side, other in (("p", "r"), ("r", "p")):
            _run("ip", "-n", self.ns[side], "route", "del", "prohibit", f"{self.addr[other]}/32",
                 check=False)
        self._cut = False

    def stall(self) -> None:
        for side in "pr":
            _run(*self.prefix(side), "tc", "qdisc", "add", "dev", self.dev[side], "root",
                 "pfifo", "limit", "0")
        self._stalled = True

    def unstall(self) -> None:
        for side in "pr":
            _run(*self.prefix(side), "tc", "qdisc", "del", "dev", self.dev[side], "root",
                 check=False)
        self._stalled = False

    def reset(self) -> None:
        # SOCK_DESTROY on the protected side's sockets: it sends the peer an RST
        _run(*self.prefix("p"), "ss", "-K", "dst", self.addr["r"], check=False)

    def close(self) -> None:
        for ns in self._made:  # the veth pair goes with its namespaces
            _run("ip", "netns", "del", ns, check=False)
        self._made = []


class RelayLink:
    """A loopback relay in this process (tests/helpers/faultproxy.py)."""

    kind = "relay"

    def __init__(self) -> None:
        from helpers.faultproxy import FaultProxy
        from helpers.replication import free_port
        self.recovery_host = self.connect_host = "127.0.0.1"
        self.port = free_port()
        self.proxy = FaultProxy(("127.0.0.1", self.port))
        self.connect_port = self.proxy.port

    def prefix(self, side: str) -> list[str]:
        return []

    def cut(self) -> None:
        self.proxy.refuse(True)
        self.proxy.cut_all()

    def uncut(self) -> None:
        self.proxy.refuse(False)

    def stall(self) -> None:
        self.proxy.stall()

    def unstall(self) -> None:
        self.proxy.unstall()

    def reset(self) -> None:
        self.proxy.reset_all()

    def close(self) -> None:
        self.proxy.close()


def in_ci() -> bool:
    """As tests/conftest.py reads CI."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def make_link() -> NetnsLink | RelayLink:
    """Namespaces where they can be made (required in CI: CI=true), else the relay
    (or where ZCORE_TWO_SITES_LINK=relay asks for it, outside CI)."""
    ci = in_ci()
    relay = os.environ.get("ZCORE_TWO_SITES_LINK") == "relay"
    if (os.geteuid() != 0 or relay) and not ci:
        return RelayLink()
    try:
        return NetnsLink()
    except (OSError, subprocess.SubprocessError) as exc:
        if ci:
            raise RuntimeError(f"CI requires network namespaces and making them failed: "
                               f"{exc!r} {getattr(exc, 'stderr', '')}") from exc
        return RelayLink()


# ---- the site processes ----------------------------------------------------------------


class Site:
    """One site process: JSON lines on stdout, commands on stdin."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        self.name = f"{argv[argv.index(str(PEER)) + 1]} site"
        self.stderr = stderr
        self._err = open(stderr, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err)
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the {self.name} did not answer in {timeout} s "
                                 f"(stderr: {self.stderr})") from None
        if not line:
            raise AssertionError(f"the {self.name} exited ({self.proc.wait()}; stderr: "
                                 f"{self.stderr})")
        return dict(json.loads(line))

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._err.close()

    def quit(self, timeout: float = 30.0) -> int:
        with contextlib.suppress(OSError):
            self.send("quit")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9
        self._err.close()
        return rc


@dataclass
class Campaign:
    root: Path
    link: NetnsLink | RelayLink
    seed: int
    faults: list[dict[str, Any]] = field(default_factory=list)
    final_seq: int = 0
    gen: int = 0
    sites: dict[str, Site] = field(default_factory=dict)

    def _python(self, side: str, *args: str) -> list[str]:
        return [*self.link.prefix(side), sys.executable, str(PEER), *args]

    def start_recovery(self) -> str:
        argv = self._python("r", "recovery", str(self.root), self.link.recovery_host,
                            str(self.link.port))
        site = self.sites["r"] = Site(argv, self.root / "recovery.stderr")
        return str(site.reply(30)["token"])

    def start_protected(self, token: str | None = None) -> None:
        argv = self._python("p", "protected", str(self.root), self.link.connect_host,
                            str(self.link.connect_port), str(self.seed), str(self.gen),
                            *([token] if token else []))
        site = self.sites["p"] = Site(argv, self.root / "protected.stderr")
        site.reply(60)

    def stop(self) -> None:
        """Stop whatever runs (the fixture's finalizer calls this too)."""
        for side in ("p", "r"):
            site = self.sites.pop(side, None)
            if site is not None and site.proc.poll() is None:
                site.quit()
        with contextlib.suppress(Exception):
            self.link.uncut()
            self.link.unstall()

    def fault(self, kind: str, rng: random.Random) -> None:
        t0 = time.time_ns()
        hold = 0.0
        if kind == "cut":
            hold = rng.uniform(0.5, 3.5)
            self.link.cut()
            time.sleep(hold)
            self.link.uncut()
        elif kind == "stall":
            hold = rng.uniform(PEER_TIMEOUT + 0.3, PEER_TIMEOUT + 2.5)
            self.link.stall()
            time.sleep(hold)
            self.link.unstall()
        elif kind == "reset":
            self.link.reset()
        elif kind == "kill_recovery":
            self.sites.pop("r").kill9()
            time.sleep(rng.uniform(0.1, 1.5))
            self.start_recovery()
        elif kind == "kill_protected":
            self.sites.pop("p").kill9()
            self.gen += 1
            time.sleep(rng.uniform(0.1, 1.0))
            self.start_protected()
        self.faults.append({"kind": kind, "t0": t0, "t1": time.time_ns(), "hold": hold,
                            "gen": self.gen})

    def run(self, cycles: int) -> None:
        rng = random.Random(self.seed)
        token = self.start_recovery()
        self.start_protected(token)
        time.sleep(1.5)
        order: list[str] = []
        for _ in range(cycles):
            if not order:
                order = list(FAULTS)
                rng.shuffle(order)
            self.fault(order.pop(), rng)
            time.sleep(rng.uniform(0.8, 2.0))
        self.sites["p"].send("finish")
        reply = self.sites["p"].reply(CATCH_UP + 30)
        if "final" not in reply:
            raise AssertionError(f"the protected site never caught up: {reply}")
        self.final_seq = int(reply["final"])
        self.stop()


# ---- the checks ------------------------------------------------------------------------


@dataclass
class Checked:
    """What `check` found.  Lists of problems are empty when all is well."""

    consistent_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    tagged: int = 0
    tagged_present: int = 0
    tagged_reported_lost: int = 0
    tagged_lost_in_crash: int = 0
    tagged_unaccounted: list[str] = field(default_factory=list)
    samples: int = 0
    max_rpo_gap: float = 0.0  # the most a sample fell below the true RPO (seconds)
    rpo_violations: list[str] = field(default_factory=list)  # below by more than RPO_SLACK
    folds: list[int] = field(default_factory=list)  # per link outage
    outage_refolds: list[str] = field(default_factory=list)
    connected_in_outage: list[str] = field(default_factory=list)
    writes: int = 0
    generations: int = 0

    def summary(self) -> str:
        return (f"{self.writes} writes in {self.generations} protected generations; "
                f"{self.consistent_checked} consistent checkpoints compared, "
                f"{len(self.mismatches)} mismatches; {self.tagged} tagged checkpoints: "
                f"{self.tagged_present} present, {self.tagged_reported_lost} reported lost, "
                f"{self.tagged_lost_in_crash} lost with a killed protected process, "
                f"{len(self.tagged_unaccounted)} unaccounted; {self.samples} status samples, "
                f"{len(self.rpo_violations)} below the true RPO (worst by "
                f"{self.max_rpo_gap:.2f} s); folds per outage {self.folds}")


@dataclass(frozen=True)
class Write:
    seq: int
    vid: int
    off: int
    length: int
    dseed: int
    t: int
    gen: int


def log_writes(entries: list[dict[str, Any]]) -> list[Write]:
    intents = {e["i"]: e for e in entries if e["k"] == "I"}
    out = []
    for e in entries:
        if e["k"] == "W":
            i = intents[e["i"]]
            out.append(Write(e["seq"], i["vid"], i["off"], i["len"], i["dseed"], e["t"],
                             i["gen"]))
    out.sort(key=lambda w: w.seq)
    return out


def images_at(writes: list[Write], seqs: list[int]) -> Iterator[tuple[int, dict[int, bytearray]]]:
    """(seq, the volumes as every write below seq leaves them), ascending; live images."""
    sizes = [s for sizes in LAYOUT.values() for s in sizes]
    images = {vid: bytearray(size) for vid, size in enumerate(sizes)}
    at = 0
    for seq in sorted(set(seqs)):
        while at < len(writes) and writes[at].seq < seq:
            w = writes[at]
            images[w.vid][w.off : w.off + w.length] = data(w.dseed, w.length)
            at += 1
        yield seq, images


def open_journals(root: Path) -> dict[str, Any]:
    from zcore.journal import Journal
    base = root / "rs" / "vpgs" / VPG_NAME
    return {vm: Journal.open(base / vm) for vm in LAYOUT}


def check(root: Path, faults: list[dict[str, Any]]) -> Checked:
    entries = read_log(root / "write.log")
    writes = log_writes(entries)
    out = Checked(writes=len(writes), generations=sum(e["k"] == "G" for e in entries))
    journals = open_journals(root)
    try:
        consistent = _check_images(journals, writes, out)
        _check_tags(journals, entries, faults, out)
    finally:
        for j in journals.values():
            j.close()
    _check_rpo(entries, writes, consistent, out)
    _check_folds(entries, faults, out)
    return out


def _check_images(journals: dict[str, Any], writes: list[Write],
                  out: Checked) -> list[tuple[int, int]]:
    """Every consistent checkpoint of every journal against the model; returns the
    (time_ns, seq) of the consistent checkpoints all journals hold."""
    per_vm = {vm: {c.seq: c for c in j.checkpoints(consistent=True)}
              for vm, j in journals.items()}
    seqs = sorted(set.intersection(*(set(cs) for cs in per_vm.values())))
    for vm, cs in per_vm.items():
        if set(cs) != set(seqs):
            out.mismatches.append(f"journal {vm} holds other consistent checkpoints: "
                                  f"{sorted(set(cs) ^ set(seqs))[:10]}")
    vids: dict[str, list[int]] = {}
    vid = 0
    for vm, sizes in LAYOUT.items():
        vids[vm] = list(range(vid, vid + len(sizes)))
        vid += len(sizes)
    for seq, images in images_at(writes, seqs):
        for vm, journal in journals.items():
            with journal.view(per_vm[vm][seq]) as view:
                for v in vids[vm]:
                    got = view.read(v, 0, len(images[v]))
                    if got != images[v]:
                        bad = next(i for i in range(len(got)) if got[i] != images[v][i])
                        out.mismatches.append(f"checkpoint {seq}: volume {v} of {vm} differs "
                                              f"from the model first at byte {bad}")
        out.consistent_checked += 1
    first = next(iter(per_vm.values()))
    return sorted((first[s].time_ns, s) for s in seqs)


def _check_tags(journals: dict[str, Any], entries: list[dict[str, Any]],
                faults: list[dict[str, Any]], out: Checked) -> None:
    # by tag (unique per run): a fix may carry a checkpoint through a fold at a new seq
    held = [{c.tag for c in j.checkpoints(kind="tagged")} for j in journals.values()]
    lost_events = [(e["gen"], e["text"]) for e in entries if e["k"] == "E"]
    killed = {f["gen"] - 1 for f in faults if f["kind"] == "kill_protected"}
    acked: dict[int, int] = {}  # generation -> highest acked seq sampled
    for e in entries:
        if e["k"] == "S":
            acked[e["gen"]] = max(acked.get(e["gen"], 0), e["acked"])
    for e in entries:
        if e["k"] != "C":
            continue
        out.tagged += 1
        key = e["tag"]
        if all(key in h for h in held):
            out.tagged_present += 1
        elif any(g == e["gen"] and f"{e['tag']!r}" in text and "lost" in text
                 for g, text in lost_events):
            out.tagged_reported_lost += 1
        elif e["gen"] in killed and acked.get(e["gen"], 0) < e["seq"]:
            out.tagged_lost_in_crash += 1  # the process died before it was acknowledged
        else:
            where = [key in h for h in held]
            out.tagged_unaccounted.append(
                f"tagged checkpoint {e['tag']!r} (seq {e['seq']}, generation {e['gen']}) is "
                f"in journals {where}, no event says it was lost, and acked_seq reached "
                f"{acked.get(e['gen'], 0)}")


def _check_rpo(entries: list[dict[str, Any]], writes: list[Write],
               consistent: list[tuple[int, int]], out: Checked) -> None:
    """True RPO at a sample's time t: the age of the oldest write of the same generation
    (the VPG of a restarted process cannot know older ones) logged by t whose seq no
    consistent checkpoint taken by t covers.  Checkpoint times are when they were taken,
    not when they became durable: the true RPO computed is never above the real one."""
    times = [t for t, _ in consistent]
    best: list[int] = []  # highest consistent seq taken by each checkpoint time
    for _, s in consistent:
        best.append(max(s, best[-1] if best else 0))
    by_gen: dict[int, list[Write]] = {}
    for w in writes:
        by_gen.setdefault(w.gen, []).append(w)
    seqs = {g: [w.seq for w in ws] for g, ws in by_gen.items()}
    for e in entries:
        if e["k"] != "S":
            continue
        out.samples += 1
        t = e["t0"]
        k = bisect_right(times, t)
        covered = best[k - 1] if k else 0
        gen_writes = by_gen.get(e["gen"], [])
        # one writer thread per generation: seq order is time order
        i = bisect_left(seqs.get(e["gen"], []), covered + 1)
        oldest = gen_writes[i].t if i < len(gen_writes) else t
        true_rpo = max(0.0, (t - oldest) / 1e9)
        gap = true_rpo - e["rpo"]
        out.max_rpo_gap = max(out.max_rpo_gap, gap)
        if gap > RPO_SLACK:
            out.rpo_violations.append(
                f"at {t} (generation {e['gen']}, mode {e['mode']}, state {e['state']}) "
                f"status said RPO {e['rpo']:.2f} s, true RPO {true_rpo:.2f} s")


def _check_folds(entries: list[dict[str, Any]], faults: list[dict[str, Any]],
                 out: Checked) -> None:
    folds = [e["t"] for e in entries if e["k"] == "E" and "bitmap mode:" in e["text"]]
    samples = [e for e in entries if e["k"] == "S"]
    for f in faults:
        if f["kind"] not in ("cut", "stall"):
            continue
        # the session in use dies PEER_TIMEOUT after its last frame and no new one can
        # be made: later samples must say disconnected
        late = f["t0"] + int((PEER_TIMEOUT + 0.5) * 1e9)
        for e in samples:
            if late <= e["t0"] and e["t1"] <= f["t1"] and e["connected"]:
                out.connected_in_outage.append(
                    f"{(e['t0'] - f['t0']) / 1e9:.2f} s into a {f['kind']} of "
                    f"{f['hold']:.1f} s the status said connected ({e['state']})")
        n = sum(f["t0"] <= t <= f["t1"] for t in folds)
        out.folds.append(n)
        if n > 1:
            out.outage_refolds.append(f"{f['kind']} of {f['hold']:.1f} s folded the VPG "
                                      f"{n} times")
