"""kill -9 cycles: a forked writer appends and commits with an fsynced ack log; the parent
SIGKILLs it at a random moment, reopens the journal and checks every acknowledged write
and checkpoint against a model.

Every operation is a function of its seq (`op_at`), so a write lost with the process and
redone under the same seq in the next cycle is the same write, and the parent can rebuild
the model from seqs alone.  Ack log lines: "I seq" (about to append up to seq, not synced:
the page cache survives a kill), "P target" (about to promote) and "A seq" (commit
returned seq; fsynced before the writer goes on).
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from reliability.workload import Expect
from zcore.journal import Journal, JournalSettings

VOLUMES = [(1, "a", 64 << 10), (2, "b", 128 << 10)]
SIZES = {vid: size for vid, _, size in VOLUMES}


def op_at(seq: int) -> tuple[int, int, bytes] | str:
    """The operation that takes `seq`: a write (volume, offset, data) or a checkpoint tag."""
    rng = random.Random(seq * 7919)
    if rng.random() < 0.12:
        return f"c{seq}"
    vid, _, size = VOLUMES[rng.randrange(2)]
    length = rng.randint(1, 16) * 512
    offset = rng.randrange(0, size - length + 1, 512)
    style = rng.random()
    if style < 0.1:
        data = bytes(length)
    elif style < 0.4:
        data = bytes([seq & 0xFF]) * length
    else:
        data = rng.randbytes(length)
    return vid, offset, data


def settings() -> JournalSettings:
    return JournalSettings(segment_bytes=1 << 20, group_commit_bytes=256 << 10)


def writer(path: Path, acklog: Path, seed: int) -> None:
    """The child: reopen, then append/checkpoint/commit/promote until killed."""
    rng = random.Random(seed)
    fd = os.open(acklog, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    journal = Journal.open(path)
    while True:
        seq = journal.last_seq + 1
        op = op_at(seq)
        r = rng.random()
        if isinstance(op, str):
            os.write(fd, f"I {seq}\n".encode())
            journal.checkpoint(op)
        else:
            batch = []
            while not isinstance(op, str) and len(batch) < rng.randint(1, 4):
                batch.append(op)
                op = op_at(seq + len(batch))
            os.write(fd, f"I {seq + len(batch) - 1}\n".encode())
            journal.append(batch)
        if r < 0.3:
            durable = journal.commit()
            os.write(fd, f"A {durable}\n".encode())
            os.fsync(fd)
        elif r < 0.36:
            listed = journal.checkpoints()
            if len(listed) > 3:
                target = listed[len(listed) // 2].seq
                os.write(fd, f"P {target}\n".encode())
                journal.promote_to(target)
                os.write(fd, f"A {journal.durable_seq}\n".encode())
                os.fsync(fd)


_ACKLOG_KINDS = {"I": "intent", "A": "ack", "P": "promote"}  # acklog letter -> mark kind


def read_acklog(acklog: Path) -> Expect:
    if not acklog.exists():
        return Expect()
    marks = []
    for line in acklog.read_text().splitlines():
        kind, _, value = line.partition(" ")
        if not value.isdigit():
            continue  # a line torn by the kill
        if kind in _ACKLOG_KINDS:
            marks.append((_ACKLOG_KINDS[kind], int(value)))
    return Expect.of(marks)


class Model:
    """The volumes as the seq-derived writes leave them, advanced lazily: every check asks
    for seqs at or above the journal's promotion watermark, which only grows."""

    def __init__(self) -> None:
        self.vols = {vid: bytearray(size) for vid, size in SIZES.items()}
        self.cursor = 1  # self.vols holds every write with seq < cursor

    def _advance(self, vols: dict[int, bytearray], cur: int, to: int) -> int:
        while cur < to:
            op = op_at(cur)
            if not isinstance(op, str):
                vid, offset, data = op
                vols[vid][offset : offset + len(data)] = data
            cur += 1
        return cur

    def images(self, seqs: list[int]) -> dict[int, dict[int, bytes]]:
        """Every volume after the writes with seq < s, for each s in `seqs`."""
        order = sorted(seqs)
        if order[0] < self.cursor:  # cannot go back: start over
            self.__init__()  # type: ignore[misc]
        self.cursor = self._advance(self.vols, self.cursor, order[0])
        vols = {vid: bytearray(v) for vid, v in self.vols.items()}
        cur = self.cursor
        out = {}
        for s in order:
            cur = self._advance(vols, cur, s)
            out[s] = {vid: bytes(v) for vid, v in vols.items()}
        return out


def check(path: Path, expect: Expect, model: Model) -> list[str]:
    """Reopen after a kill and compare with the model (the oracle of workload.py)."""
    try:
        journal = Journal.open(path)
    except Exception as exc:
        return [f"open failed: {type(exc).__name__}: {exc}"]
    bad = []
    try:
        last, promoted = journal.last_seq, journal.promoted_seq
        if last < expect.acked:
            bad.append(f"last_seq {last} below the acknowledged seq {expect.acked}")
        if last > max(expect.issued, expect.promote - 1):
            bad.append(f"last_seq {last} above anything appended ({expect.issued})")
        listed = {c.seq: c for c in journal.checkpoints()}
        low = max(promoted, expect.promote)
        for seq in range(low, expect.acked + 1):
            if isinstance(op_at(seq), str) and seq not in listed:
                bad.append(f"acknowledged checkpoint seq {seq} is missing")
        images = model.images([*listed, last + 1])
        for seq, c in listed.items():
            if op_at(seq) != c.tag:
                bad.append(f"checkpoint seq {seq} has tag {c.tag!r}")
                continue
            with journal.view(c) as view:
                got = {vid: view.read(vid, 0, size) for vid, size in SIZES.items()}
            if got != images[seq]:
                bad.append(f"checkpoint seq {seq} reads differently from the model")
    except Exception as exc:
        bad.append(f"check failed: {type(exc).__name__}: {exc}")
    finally:
        journal.close()
    return bad


@dataclass
class Cycles:
    cycles: int = 0
    killed_mid_run: int = 0
    violations: list[str] = field(default_factory=list)


def run_cycles(path: Path, acklog: Path, cycles: int, seed: int,
               max_delay: float = 0.06) -> Cycles:
    rng = random.Random(seed)
    out = Cycles()
    model = Model()
    for n in range(cycles):
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                writer(path, acklog, seed * 100_003 + n)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            out.killed_mid_run += 1
        out.cycles += 1
        bad = check(path, read_acklog(acklog), model)
        out.violations += [f"cycle {n}: {v}" for v in bad]
        if bad:
            break
    return out
