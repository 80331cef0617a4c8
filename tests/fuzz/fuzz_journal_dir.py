"""atheris target: journal directories mutated below their checksums, checksums recomputed.

A journal with sealed segments (and their .zci index files), promoted history and an
active segment is built once; each input copies it and mutates one file, then fixes the
CRCs that would otherwise catch the mutation:

  index    bytes of a .zci body or header fields; body and header CRC recomputed
  segment  fields of a segment header; header CRC recomputed
  record   bytes inside the active segment's records (no CRC fixed: plain damage)
  meta     one value of journal.meta replaced by a JSON value from the input; CRC
           recomputed.  Off unless ZC_FUZZ_META=1: issue 9 finding 6 (crafted meta raises
           TypeError/ValueError) falls out within seconds; its reproducer is kept in
           crashes/journal_dir/ and replayed by test_fuzz.py.

Journal.open and reading every checkpoint may refuse with a zcore.errors class; any other
exception is a crash.  Set ZC_FUZZ_MODES=index,segment,... to choose the mutations."""

import json
import os
import random
import shutil
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from zcore._native.record import crc32c
    from zcore.errors import ZcoreError
    from zcore.journal import Journal, JournalSettings

VOLUMES = [(1, "a", 512 << 10), (2, "b", 512 << 10)]
MODES = os.environ.get("ZC_FUZZ_MODES") or (
    "index,segment,record,meta" if os.environ.get("ZC_FUZZ_META") == "1"
    else "index,segment,record")
MODES = MODES.split(",")
SCRATCH = os.environ.get("ZC_FUZZ_TMP")  # test_fuzz.py points it at a directory it removes
ROOT = tempfile.mkdtemp(prefix="zc-fuzzdir-", dir=SCRATCH)
GOLDEN = os.path.join(ROOT, "golden")


def build() -> None:
    rng = random.Random(3)
    with Journal.create(GOLDEN, VOLUMES, settings=JournalSettings(
            segment_bytes=1 << 20, group_commit_bytes=0)) as j:
        for i in range(60):
            j.append([(1 + i % 2, rng.randrange(0, 116) * 4096, rng.randbytes(48 << 10))],
                     compress=False)
            if i % 5 == 0:
                j.checkpoint(f"t{i}" if i % 10 == 0 else None)
            if i == 20:
                j.promote_to(j.checkpoints()[1].seq)
        j.append([(1, 0, bytes(8192)), (2, 4096, b"\7" * 8192)])
        j.checkpoint("last")


def _json_value(fdp: "atheris.FuzzedDataProvider"):
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return fdp.ConsumeInt(8)
    if kind == 1:
        return fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return [fdp.ConsumeInt(4) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {}


def mutate_meta(path: str, fdp: "atheris.FuzzedDataProvider") -> None:
    with open(path) as f:
        doc = json.load(f)
    meta = doc["meta"]
    holders = [meta, meta["settings"], *meta["volumes"]]
    holder = holders[fdp.ConsumeIntInRange(0, len(holders) - 1)]
    keys = sorted(holder)
    holder[keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]] = _json_value(fdp)
    crc = crc32c(json.dumps(meta, sort_keys=True).encode())
    with open(path, "w") as f:
        json.dump({"meta": meta, "crc32c": crc}, f)


def mutate_bytes(buf: bytearray, lo: int, hi: int, fdp: "atheris.FuzzedDataProvider") -> None:
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        if hi <= lo:
            return
        at = fdp.ConsumeIntInRange(lo, hi - 1)
        if fdp.ConsumeBool():
            buf[at] = fdp.ConsumeInt(1) & 0xFF
        else:
            width = min(8, hi - at)
            buf[at : at + width] = fdp.ConsumeBytes(width).ljust(width, b"\0")


def mutate(work: str, fdp: "atheris.FuzzedDataProvider") -> None:
    mode = MODES[fdp.ConsumeIntInRange(0, len(MODES) - 1)]
    names = sorted(os.listdir(work))
    if mode == "meta":
        mutate_meta(os.path.join(work, "journal.meta"), fdp)
        return
    if mode == "index":
        pick = [n for n in names if n.endswith(".zci")]
    else:
        pick = [n for n in names if n.endswith(".zcj")]
    if not pick:
        return
    name = pick[-1] if mode == "record" else pick[fdp.ConsumeIntInRange(0, len(pick) - 1)]
    path = os.path.join(work, name)
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    if mode == "index":
        if fdp.ConsumeBool():
            mutate_bytes(buf, 64, len(buf), fdp)
        else:
            mutate_bytes(buf, 8, 56, fdp)
        buf[56:60] = struct.pack("<I", crc32c(bytes(buf[64:])))
        buf[60:64] = struct.pack("<I", crc32c(bytes(buf[:60])))
    elif mode == "segment":
        mutate_bytes(buf, 8, 60, fdp)
        buf[60:64] = struct.pack("<I", crc32c(bytes(buf[:60])))
    else:
        mutate_bytes(buf, 64, len(buf), fdp)
    with open(path, "wb") as f:
        f.write(buf)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    work = os.path.join(ROOT, "work")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(GOLDEN, work)
    mutate(work, fdp)
    try:
        journal = Journal.open(work)
    except ZcoreError:
        return
    try:
        journal.wait_loaded()
        for c in journal.checkpoints():
            with journal.view(c) as view:
                for vid, _, size in VOLUMES:
                    view.read(vid, 0, size)
        journal.status()
    except ZcoreError:
        pass
    finally:
        try:
            journal.close()
        except ZcoreError:
            pass


if __name__ == "__main__":
    build()
    try:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
