"""A journal workload with a model of what it wrote, and the oracle every harness checks.

`Workload(seed)` is a deterministic list of operations (writes, checkpoints, commits,
promotions) over two small volumes, with enough data to rotate segments.  `run(journal,
mark)` performs them through the public API; before each one it calls `mark` with an
"intent" (what the operation may put on disk) and after each commit/promotion with what was
acknowledged.  `Expect` folds such marks into what a reopened journal must show, and
`check_journal` opens a directory and compares it with the model.

The oracle (a reopened journal must):
* open without error, with last_seq L between the acknowledged durable seq D and the
  highest seq ever appended;
* list every acknowledged checkpoint (seq <= D) not promoted away, and read every
  checkpoint it lists exactly as the model at that seq (no unchecked bytes);
* read a new checkpoint appended after L exactly as the model after every write <= L.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zcore.journal import Journal, JournalSettings

VOLUMES = [(1, "boot", 64 << 10), (2, "data", 256 << 10)]
SEGMENT_BYTES = 1 << 20


@dataclass
class Op:
    kind: str  # "write", "checkpoint", "commit", "promote"
    seq: int = 0  # first seq the operation takes (write, checkpoint); target (promote)
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)
    tag: str | None = None


def _payload(rng: random.Random, length: int) -> bytes:
    style = rng.random()
    if style < 0.15:
        return bytes(length)  # a ZERO record
    if style < 0.45:
        return bytes([rng.randrange(256)]) * length  # compresses (LZ4)
    return rng.randbytes(length)


class Workload:
    """Deterministic operations; `model_at(seq)` is every volume after the writes < seq."""

    def __init__(self, seed: int, ops: int = 60, big: bool = True) -> None:
        rng = random.Random(seed)
        self.ops: list[Op] = []
        self.writes: dict[int, tuple[int, int, bytes]] = {}  # seq -> (volume, offset, data)
        self.checkpoints: dict[int, str | None] = {}
        seq = 0
        for _ in range(ops):
            r = rng.random()
            if r < 0.55:
                n = rng.randint(1, 3)
                batch = []
                for _ in range(n):
                    vid, _, size = VOLUMES[rng.randrange(len(VOLUMES))]
                    top = min(size // 1024, 256) if big and rng.random() < 0.5 else 8
                    length = rng.randint(1, top) * 512
                    offset = rng.randrange(0, size - length + 1, 512)
                    batch.append((vid, offset, _payload(rng, length)))
                self.ops.append(Op("write", seq + 1, batch))
                for w in batch:
                    seq += 1
                    self.writes[seq] = w
            elif r < 0.75:
                seq += 1
                tag = f"t{seq}" if rng.random() < 0.5 else None
                self.ops.append(Op("checkpoint", seq, tag=tag))
                self.checkpoints[seq] = tag
            elif r < 0.93:
                self.ops.append(Op("commit"))
            else:
                ckpts = [s for s in self.checkpoints if s <= seq]
                if ckpts:
                    self.ops.append(Op("promote", rng.choice(ckpts)))
        self.ops.append(Op("commit"))
        self.last_seq = seq
        self._images: dict[int, dict[int, bytes]] = {}

    def model_at(self, seq: int) -> dict[int, bytes]:
        """Every volume's bytes after the writes with seq < `seq`."""
        image = self._images.get(seq)
        if image is None:
            vols = {vid: bytearray(size) for vid, _, size in VOLUMES}
            for s in sorted(self.writes):
                if s >= seq:
                    break
                vid, offset, data = self.writes[s]
                vols[vid][offset : offset + len(data)] = data
            image = {vid: bytes(v) for vid, v in vols.items()}
            self._images[seq] = image
        return image

    def run(self, journal: Journal, mark: Callable[[Any], None],
            stop: Callable[[], bool] | None = None) -> None:
        for op in self.ops:
            if stop is not None and stop():
                return
            if op.kind == "write":
                mark(("intent", op.seq + len(op.writes) - 1))
                journal.append(op.writes)
            elif op.kind == "checkpoint":
                mark(("intent", op.seq))
                c = journal.checkpoint(op.tag)
                assert c.seq == op.seq, (c.seq, op.seq)
            elif op.kind == "commit":
                durable = journal.commit()
                mark(("ack", durable))
            else:
                mark(("promote", op.seq))
                journal.promote_to(op.seq)
                mark(("ack", journal.durable_seq))  # promotion commits first


def settings(hard_limit: int | None = None) -> JournalSettings:
    return JournalSettings(segment_bytes=SEGMENT_BYTES, group_commit_bytes=0,
                           hard_limit_bytes=hard_limit)


def create(path: Path, hard_limit: int | None = None) -> Journal:
    return Journal.create(path, VOLUMES, settings=settings(hard_limit))


@dataclass
class Expect:
    """What the marks seen before a crash promise: acked durable seq, highest seq
    appended, highest promotion target asked for."""

    acked: int = 0
    issued: int = 0
    promote: int = 0

    @classmethod
    def of(cls, marks: list[Any]) -> Expect:
        e = cls()
        for kind, value in marks:
            if kind == "intent":
                e.issued = max(e.issued, value)
            elif kind == "ack":
                e.acked = max(e.acked, value)
            elif kind == "promote":
                e.promote = max(e.promote, value)
        return e


def check_journal(path: Path, work: Workload, expect: Expect, *,
                  append_after: bool = True) -> list[str]:
    """Open the journal at `path` and compare it with the model; returns the violations
    (empty when the journal keeps every promise)."""
    try:
        journal = Journal.open(path)
    except Exception as exc:
        return [f"open failed: {type(exc).__name__}: {exc}"]
    try:
        return _check_open(journal, work, expect, append_after)
    except Exception as exc:
        return [f"check failed: {type(exc).__name__}: {exc}"]
    finally:
        try:
            journal.close()
        except Exception:
            pass


def _read_all(journal: Journal, at: Any) -> dict[int, bytes]:
    with journal.view(at) as view:
        return {vid: view.read(vid, 0, size) for vid, _, size in VOLUMES}


def _check_open(journal: Journal, work: Workload, expect: Expect,
                append_after: bool) -> list[str]:
    bad = []
    last = journal.last_seq
    if last < expect.acked:
        bad.append(f"last_seq {last} below the acknowledged seq {expect.acked}")
    if last > max(expect.issued, expect.promote - 1):
        bad.append(f"last_seq {last} above anything appended ({expect.issued})")
    promoted = journal.promoted_seq
    if promoted > expect.promote:
        bad.append(f"promoted_seq {promoted} beyond any promotion asked ({expect.promote})")
    listed = {c.seq: c for c in journal.checkpoints()}
    for seq in work.checkpoints:
        # a promotion asked for may take the checkpoints below its target with it
        if max(promoted, expect.promote) <= seq <= expect.acked and seq not in listed:
            bad.append(f"acknowledged checkpoint seq {seq} is missing")
    for seq, c in sorted(listed.items()):
        if seq not in work.checkpoints:
            bad.append(f"checkpoint seq {seq} was never written")
            continue
        if c.tag != work.checkpoints[seq]:
            bad.append(f"checkpoint seq {seq} has tag {c.tag!r}")
        if _read_all(journal, c) != work.model_at(seq):
            bad.append(f"checkpoint seq {seq} reads differently from the model")
    if append_after and not bad:
        c = journal.checkpoint()
        if _read_all(journal, c) != work.model_at(last + 1):
            bad.append(f"the newest state (seq {last}) reads differently from the model")
    return bad


def copy_journal(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
