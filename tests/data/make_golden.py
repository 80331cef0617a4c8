"""Write the golden fixtures of format version 1 into tests/data/golden-v1/.

    python tests/data/make_golden.py [OUTDIR]

The fixtures freeze format v1 (docs/format.md 2): once committed they are never
regenerated; a change that breaks them is a format change.  This script documents how
they were made and makes them reproducible: every input comes from a seeded generator,
the clock is a fake that ticks 1 ms per reading, and the journal id is fixed.

Files:
- records.bin: records of every type and encoding, back to back (a valid bundle);
- records.json: for each record its fields, where it starts and the sha256 of its data;
- journal/: a journal directory (sealed segments with .zci files, an active segment, a
  promotion watermark with data in the replicas);
- journal.json: its checkpoints and the sha256 of every volume at each of them.

LZ4 output depends on the LZ4 library version, so tests compare LZ4 records by what
they decode to and re-encode them from their frozen compressed payloads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

from zcore import records
from zcore.journal import Journal, JournalSettings, VolumeSpec

KiB = 1 << 10
T0 = 1_750_000_000_000_000_000  # fake clock start, ns
JOURNAL_ID = uuid.UUID("20261125-0000-4000-8000-00000000c0de")
VOLUMES = [VolumeSpec(0, "disk0", 32 * KiB), VolumeSpec(3, "disk3", 16 * KiB)]
# The journal's segments are made tiny (the settings refuse less than 1 MiB, which would
# make the fixture large) so that it holds several sealed segments with index files.
SEGMENT_LIMIT = 6 * KiB


def data(kind: str, length: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(length)
    if kind == "zero":
        return bytes(length)
    if kind == "text":
        words = [b"zcore ", b"journal ", b"golden ", b"fixture ", b"v1 "]
        out = bytearray()
        while len(out) < length:
            out += rng.choice(words)
        return bytes(out[:length])
    raise ValueError(kind)


# (name, kind of record, volume, seq, offset, (data kind, length, seed) or checkpoint args)
RECORDS = [
    ("raw write, one block", "write", 0, 1, 0, ("random", 4096, 1)),
    ("raw write, short last block", "write", 3, 2, 8192, ("random", 10240, 2)),
    ("raw write, one sector, far offset", "write", 65535, 3, 1 << 40, ("random", 512, 3)),
    ("raw sync", "sync", 1, 4, 512, ("random", 1536, 4)),
    ("lz4 write", "write", 0, 5, 4096, ("text", 8192, 5)),
    ("lz4 sync", "sync", 2, 6, 0, ("text", 2560, 6)),
    ("zero write", "write", 2, 7, 1 << 20, ("zero", 65536, 7)),
    ("auto checkpoint", "checkpoint", 0, 8, 0, (records.CKPT_AUTO, True, None)),
    ("tagged inconsistent checkpoint", "checkpoint", 0, 9, 0,
     (records.CKPT_TAGGED, False, "golden \u2713 v1")),
    ("raw write after checkpoints, gap in seqs", "write", 0, 20, 0, ("random", 512, 8)),
]


def record_inputs():
    """Each record of RECORDS with its time and its data (None for checkpoints)."""
    for i, (name, kind, volume, seq, offset, args) in enumerate(RECORDS):
        time_ns = T0 + i * 1_000_000
        if kind == "checkpoint":
            yield dict(name=name, kind=kind, volume=volume, seq=seq, offset=offset,
                       time_ns=time_ns, checkpoint=args, data=None)
        else:
            yield dict(name=name, kind=kind, volume=volume, seq=seq, offset=offset,
                       time_ns=time_ns, checkpoint=None, data=data(*args))


def encode(spec: dict) -> bytes:
    if spec["kind"] == "checkpoint":
        kind, consistent, tag = spec["checkpoint"]
        return records.encode_checkpoint(spec["seq"], spec["time_ns"], kind, consistent, tag)
    return records.encode_write(spec["volume"], spec["seq"], spec["offset"], spec["data"],
                                spec["time_ns"], sync=spec["kind"] == "sync")


def make_records(out: Path) -> None:
    from zcore._native import record as _rec

    blob = bytearray()
    manifest = []
    for spec in record_inputs():
        rec = encode(spec)
        header, _ = _rec.parse_header(rec[:64])
        manifest.append(dict(
            name=spec["name"], pos=len(blob), size=len(rec), **header,
            time_ns=spec["time_ns"],
            data_sha256=hashlib.sha256(spec["data"]).hexdigest() if spec["data"] else None,
        ))
        blob += rec
    (out / "records.bin").write_bytes(blob)
    (out / "records.json").write_text(json.dumps(manifest, indent=1) + "\n")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_journal(out: Path) -> None:
    clock = itertools.count(T0, 1_000_000)
    real_time_ns, real_uuid4, real_limit = time.time_ns, uuid.uuid4, Journal._segment_limit
    time.time_ns = lambda: next(clock)
    uuid.uuid4 = lambda: JOURNAL_ID
    Journal._segment_limit = lambda self: SEGMENT_LIMIT
    try:
        _make_journal(out)
    finally:
        time.time_ns, uuid.uuid4, Journal._segment_limit = real_time_ns, real_uuid4, real_limit


def _make_journal(out: Path) -> None:
    path = out / "journal"
    journal = Journal.create(path, VOLUMES, vm="golden-vm",
                             settings=JournalSettings(group_commit_bytes=0))
    rng = random.Random(2026)
    model = {v.id: bytearray(v.size) for v in VOLUMES}
    snapshots = {}
    for step in range(24):
        vol = VOLUMES[step % 2]
        sectors = rng.choice([1, 2, 4, 8])
        offset = rng.randrange(vol.size // 512 - sectors + 1) * 512
        kind = ["random", "text", "zero", "random"][step % 4]
        payload = data(kind, sectors * 512, 100 + step)
        journal.append([(vol.id, offset, payload)])
        model[vol.id][offset : offset + len(payload)] = payload
        if step % 3 == 2:
            c = journal.checkpoint(f"step {step}" if step % 2 else None,
                                   consistent=step != 14)
            snapshots[c.seq] = dict(
                time_ns=c.time_ns, kind=c.kind, tag=c.tag, consistent=c.consistent,
                sha256={str(v): sha(bytes(m)) for v, m in model.items()},
            )
    first = sorted(snapshots)[2]
    journal.promote_to(first)  # replicas hold data; the oldest segments are gone
    for seq in list(snapshots):
        if seq < first:
            del snapshots[seq]
    for seq, snap in snapshots.items():  # the script checks what it freezes
        with journal.view(seq) as view:
            for v in VOLUMES:
                assert sha(view.read(v.id, 0, v.size)) == snap["sha256"][str(v.id)]
    manifest = dict(last_seq=journal.last_seq, promoted_seq=journal.promoted_seq,
                    volumes=[dict(id=v.id, name=v.name, size=v.size) for v in VOLUMES],
                    checkpoints={str(k): v for k, v in sorted(snapshots.items())})
    journal.close()
    assert len(list(path.glob("seg-*.zci"))) >= 2 and not (path / "seg-00000001.zcj").exists()
    assert not list(path.glob("*.tmp"))
    (out / "journal.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "golden-v1"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    make_records(out)
    make_journal(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main(sys.argv)
