"""atheris target: bundles of records through Journal.append_encoded and the native scan.

Modes (first byte): raw input as a bundle; or records encoded from the input (writes of
every kind, checkpoints) whose header fields are then overwritten from the input with the
header CRC recomputed, so the field checks behind the CRC run.  A bundle the journal
takes must read back through a view without anything but zcore.errors; a refusal must be
a zcore.errors class.  The journal is recreated every few hundred inputs."""

import os
import shutil
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import numpy as np

    from zcore import records
    from zcore._native import record as _rec
    from zcore.errors import ZcoreError
    from zcore.journal import Journal, JournalSettings

VOLUMES = [(1, "a", 1 << 20), (2, "b", 1 << 20)]
SIZES = np.zeros(3, dtype=np.uint64)
SIZES[1] = SIZES[2] = 1 << 20
_state = {"journal": None, "root": None, "n": 0}


def journal() -> Journal:
    if _state["journal"] is None or _state["n"] >= 300:
        if _state["journal"] is not None:
            _state["journal"].close()
            shutil.rmtree(_state["root"], ignore_errors=True)
        root = tempfile.mkdtemp(prefix="zc-fuzz-", dir=os.environ.get("ZC_FUZZ_TMP"))
        _state["root"] = root
        _state["journal"] = Journal.create(os.path.join(root, "j"), VOLUMES,
                                           settings=JournalSettings(group_commit_bytes=0))
        _state["n"] = 0
    _state["n"] += 1
    return _state["journal"]


def build(fdp: "atheris.FuzzedDataProvider", first_seq: int) -> bytes:
    out = bytearray()
    seq = first_seq
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        kind = fdp.ConsumeIntInRange(0, 4)  # 4: a zstd record (segment v3, wire v2)
        vol = fdp.ConsumeIntInRange(1, 2)
        offset = fdp.ConsumeIntInRange(0, 2040) * 512
        if kind == 3:
            rec = records.encode_checkpoint(seq, 1, records.CKPT_TAGGED, True,
                                            fdp.ConsumeUnicodeNoSurrogates(8) or None)
        else:
            length = fdp.ConsumeIntInRange(1, 16) * 512
            data = bytes(length) if kind == 0 else (
                bytes([fdp.ConsumeInt(1) & 0xFF]) * length if kind in (1, 4)
                else fdp.ConsumeBytes(length).ljust(length, b"\1"))
            rec = records.encode_write(vol, seq, offset, data, 1, compress=kind in (1, 4),
                                       zstd_level=3 if kind == 4 else 0)
        rec = bytearray(rec)
        # overwrite some header fields below the header CRC, then fix the CRC
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            at = fdp.ConsumeIntInRange(0, 59)
            rec[at] = fdp.ConsumeInt(1) & 0xFF
        rec[60:64] = struct.pack("<I", _rec.crc32c(bytes(rec[:60])))
        out += rec
        seq += 1
    return bytes(out)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    j = journal()
    bundle = fdp.ConsumeBytes(fdp.remaining_bytes()) if mode == 0 else build(fdp, j.last_seq + 1)
    batch = _rec.scan(bundle, 64, 1, 0, SIZES)
    assert 0 <= batch.consumed <= len(bundle)
    try:
        j.append_encoded(bundle)
    except ZcoreError:
        return
    j.commit()
    c = j.checkpoint()
    with j.view(c) as view:
        for vid, _, size in VOLUMES:
            try:
                view.read(vid, 0, size)
            except ZcoreError:
                pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
