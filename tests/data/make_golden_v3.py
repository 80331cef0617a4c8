"""Write the golden fixture of segment version 3 and wire protocol v2 into
tests/data/golden-v3/.

    python tests/data/make_golden_v3.py [OUTDIR]

Segment v3 (docs/format.md 2, 4.5a, 7.3) adds one record flag, ZSTD (0x0004): a WRITE or
SYNC payload that is one zstd frame.  The bytes of the v2 layout are otherwise unchanged.
Frozen here:
- records.bin / records.json: a bundle of the records of make_golden.py followed by zstd
  WRITE and SYNC records (and a raw record that zstd would not shrink), with the header
  fields of each and the sha256 of its data;
- journal/: a journal (journal.meta v2, v3 segments) whose writes were journaled as zstd
  records where zstd saves space, with sealed segments and .zci files, promotion done;
- journal.json: its checkpoints and the sha256 of every volume at each of them.
Once committed it is never regenerated: a change that breaks it is a format change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

from zcore import records
from zcore._native import record as _rec
from zcore.journal import Journal, JournalSettings

HERE = Path(__file__).parent
ZSTD_LEVEL = 3


def _maker():
    spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


g = _maker()

# (name, kind, volume, seq, offset, (data kind, length, seed)), after make_golden.RECORDS
ZSTD_RECORDS = [
    ("zstd write", "write", 0, 21, 8192, ("text", 8192, 21)),
    ("zstd sync", "sync", 3, 22, 1024, ("text", 3072, 22)),
    ("zstd write, one sector", "write", 1, 23, 512, ("text", 512, 23)),
    ("raw write zstd does not shrink", "write", 0, 24, 0, ("random", 4096, 24)),
]


def record_inputs():
    yield from g.record_inputs()
    base = len(g.RECORDS)
    for i, (name, kind, volume, seq, offset, args) in enumerate(ZSTD_RECORDS):
        yield dict(name=name, kind=kind, volume=volume, seq=seq, offset=offset,
                   time_ns=g.T0 + (base + i) * 1_000_000, checkpoint=None,
                   data=g.data(*args), zstd=True)


def encode(spec: dict) -> bytes:
    if not spec.get("zstd"):
        return g.encode(spec)
    return records.encode_write(spec["volume"], spec["seq"], spec["offset"], spec["data"],
                                spec["time_ns"], sync=spec["kind"] == "sync",
                                zstd_level=ZSTD_LEVEL)


def make_records(out: Path) -> None:
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


def make_journal(out: Path) -> None:
    clock = itertools.count(g.T0, 1_000_000)
    real_time_ns, real_uuid4, real_limit = time.time_ns, uuid.uuid4, Journal._segment_limit
    time.time_ns = lambda: next(clock)
    uuid.uuid4 = lambda: g.JOURNAL_ID
    Journal._segment_limit = lambda self: g.SEGMENT_LIMIT
    try:
        _make_journal(out)
    finally:
        time.time_ns, uuid.uuid4, Journal._segment_limit = real_time_ns, real_uuid4, real_limit


def _make_journal(out: Path) -> None:
    path = out / "journal"
    vols = g.VOLUMES
    journal = Journal.create(path, vols, vm="golden-vm",
                             settings=JournalSettings(group_commit_bytes=0))
    rng = random.Random(2027)
    model = {v.id: bytearray(v.size) for v in vols}
    snapshots = {}
    for step in range(36):
        vol = vols[step % 2]
        sectors = rng.choice([2, 4, 8, 16])
        offset = rng.randrange(vol.size // 512 - sectors + 1) * 512
        kind = ["text", "random", "text", "zero"][step % 4]
        payload = g.data(kind, sectors * 512, 300 + step)
        rec = records.encode_write(vol.id, journal.last_seq + 1, offset, payload,
                                   time.time_ns(), zstd_level=ZSTD_LEVEL)
        journal.append_encoded(rec)
        model[vol.id][offset : offset + len(payload)] = payload
        if step % 3 == 2:
            c = journal.checkpoint(f"step {step}" if step % 2 else None,
                                   consistent=step != 14)
            snapshots[c.seq] = dict(
                time_ns=c.time_ns, kind=c.kind, tag=c.tag, consistent=c.consistent,
                sha256={str(v): g.sha(bytes(m)) for v, m in model.items()},
            )
    first = sorted(snapshots)[2]
    journal.promote_to(first)
    for seq in list(snapshots):
        if seq < first:
            del snapshots[seq]
    for seq, snap in snapshots.items():  # the script checks what it freezes
        with journal.view(seq) as view:
            for v in vols:
                assert g.sha(view.read(v.id, 0, v.size)) == snap["sha256"][str(v.id)]
    manifest = dict(last_seq=journal.last_seq, promoted_seq=journal.promoted_seq,
                    volumes=[dict(id=v.id, name=v.name, size=v.size) for v in vols],
                    checkpoints={str(k): v for k, v in sorted(snapshots.items())})
    journal.close()
    assert len(list(path.glob("seg-*.zci"))) >= 2 and not (path / "seg-00000001.zcj").exists()
    (out / "journal.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else HERE / "golden-v3"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    make_records(out)
    make_journal(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main(sys.argv)
