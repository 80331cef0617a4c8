"""Batch encoding (zc_encode_batch, the capture ring's seal) against per-record encoding.

The sealer encodes a whole batch in one native call with the GIL released, compressing
through the `lz4` package's own LZ4_compress_default.  Its bytes must equal what one call
per record of the Python path gives (`records.encode_write`: zero record, LZ4 when it
saves 1/16, raw with block CRCs; checkpoints through `encode_stored`), and what the
pure-Python reference encoders give with lz4.block.compress deciding: random batches of
zero blocks, incompressible and compressible data, LZ4 sizes at the keep/raw boundary,
tiny and large writes, several outputs with checkpoints in each.  The per-record fallback
(used where the native compressor is not found) must give the same bytes too.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lz4.block
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zcore import records
from zcore._native import record as _rec
from zcore._native import reference as ref
from zcore._native.capture import CaptureRing
from zcore.errors import AlignmentError, ConfigError, CorruptRecordError

KiB = 1 << 10
MiB = 1 << 20
KEEP = 1 - records.LZ4_MIN_SAVING
CKPT = b"\x02\x01\x03\x00tag"  # a tagged, consistent checkpoint payload ("tag")


@contextmanager
def native_lz4(enabled: bool) -> Iterator[None]:
    previous = _rec.set_native_lz4(enabled)
    try:
        yield
    finally:
        _rec.set_native_lz4(previous)


def make_data(kind: str, length: int, seed: int) -> bytes:
    """`length` bytes of one of the shapes the sealer meets in guest writes."""
    rnd = random.Random(seed)
    if kind == "zero":
        return bytes(length)
    if kind == "noise":  # incompressible: raw record
        return rnd.randbytes(length)
    if kind == "text":  # compressible: LZ4 record
        words = [rnd.randbytes(rnd.randint(2, 9)) for _ in range(40)]
        out = bytearray()
        while len(out) < length:
            out += rnd.choice(words)
        return bytes(out[:length])
    if kind == "edge":  # mostly noise, a zero tail: LZ4 output near the 15/16 boundary
        noise = int(length * rnd.uniform(0.90, 0.97)) // 8 * 8
        return rnd.randbytes(noise) + bytes(length - noise)
    if kind == "last-byte":  # zero but for one byte at the end: not a zero record
        return bytes(length - 1) + b"\x01"
    raise AssertionError(kind)


def python_record(item: tuple, compress: bool, min_saving: float) -> bytes:
    """One item through the per-record Python path (records.encode_write)."""
    _out, type_, volume, seq, offset, time_ns, data = item
    if type_ == records.REC_CHECKPOINT:
        return _rec.encode_stored(type_, 0, 0, seq, 0, len(data), time_ns, data)
    if type_ == records.REC_ZERO:
        return _rec.encode_stored(type_, 0, volume, seq, offset, len(data), time_ns)
    if min_saving == records.LZ4_MIN_SAVING:
        return records.encode_write(volume, seq, offset, data, time_ns, compress=compress,
                                    sync=type_ == records.REC_SYNC)
    return reference_record(item, compress, min_saving)


def reference_record(item: tuple, compress: bool, min_saving: float) -> bytes:
    """One item through the pure-Python reference encoders, lz4.block.compress deciding."""
    _out, type_, volume, seq, offset, time_ns, data = item
    if type_ == records.REC_CHECKPOINT:
        return ref.encode_stored(type_, 0, 0, seq, 0, len(data), time_ns, data)
    if type_ == records.REC_ZERO or not any(data):
        return ref.encode_stored(records.REC_ZERO, 0, volume, seq, offset, len(data), time_ns)
    if compress:
        packed = lz4.block.compress(data, store_size=False)
        if len(packed) <= len(data) * (1.0 - min_saving):
            return ref.encode_stored(type_, records.FLAG_LZ4, volume, seq, offset, len(data),
                                     time_ns, packed)
    return ref.encode_raw(volume, seq, offset, data, time_ns, type_ == records.REC_SYNC)


def expected_parts(items: list[tuple], nouts: int, compress: bool, min_saving: float,
                   encode=python_record) -> list[bytes]:
    parts = [b""] * nouts
    for item in items:
        record = encode(item, compress, min_saving)
        targets = range(nouts) if item[0] == -1 else [item[0]]
        for k in targets:
            parts[k] += record
    return parts


DATA_KINDS = st.sampled_from(["zero", "noise", "text", "edge", "last-byte"])


@st.composite
def batches(draw, max_sectors: int = 128, max_items: int = 12):
    """(nouts, items): writes, syncs, zero writes and checkpoints over a few outputs."""
    nouts = draw(st.integers(1, 3))
    items = []
    seq = draw(st.integers(1, 2**40))
    for _ in range(draw(st.integers(0, max_items))):
        what = draw(st.sampled_from(["write", "write", "write", "sync", "zero", "checkpoint"]))
        time_ns = draw(st.integers(0, 2**64 - 1))
        if what == "checkpoint":
            items.append((-1, records.REC_CHECKPOINT, 0, seq, 0, time_ns, CKPT))
        else:
            length = draw(st.one_of(st.just(1), st.integers(1, max_sectors))) * 512
            data = make_data(draw(DATA_KINDS), length, draw(st.integers(0, 2**32)))
            type_ = {"write": records.REC_WRITE, "sync": records.REC_SYNC,
                     "zero": records.REC_ZERO}[what]
            items.append((draw(st.integers(0, nouts - 1)), type_, draw(st.integers(0, 7)), seq,
                          draw(st.integers(0, 2**30)) * 512, time_ns,
                          bytes(length) if type_ == records.REC_ZERO else data))
        seq += draw(st.integers(1, 3))
    return nouts, items


@pytest.mark.parametrize("native", [True, False], ids=["native-lz4", "per-record-lz4"])
@given(batch=batches(), compress=st.booleans())
def test_batch_encoding_equals_per_record_encoding(native, batch, compress):
    nouts, items = batch
    with native_lz4(native):
        got = _rec.encode_batch(items, nouts, compress, records.LZ4_MIN_SAVING)
    assert got == expected_parts(items, nouts, compress, records.LZ4_MIN_SAVING)


@given(batch=batches(max_sectors=24, max_items=6), compress=st.booleans(),
       min_saving=st.sampled_from([0.0, 1 / 16, 0.25, 0.5]))
def test_batch_encoding_equals_the_reference_encoders(batch, compress, min_saving):
    nouts, items = batch
    got = _rec.encode_batch(items, nouts, compress, min_saving)
    assert got == expected_parts(items, nouts, compress, min_saving, reference_record)


def test_the_native_compressor_is_found_in_the_lz4_package():
    """zcore compresses with the `lz4` package's own LZ4 (no copy in the tree): if this
    fails, sealing silently falls back to one lz4.block.compress call per record."""
    assert _rec.native_lz4()


@pytest.mark.parametrize("length", [4 * KiB, 64 * KiB])
def test_the_keep_or_raw_decision_agrees_at_the_boundary(length):
    """LZ4 sizes around length * 15/16: the native compressor runs with a bounded output,
    which must never turn a block that saves enough into a raw record."""
    rnd = random.Random(length)
    seen = set()
    for noise in range(int(length * 0.90) // 8 * 8, int(length * 0.97), 8):
        data = rnd.randbytes(noise) + bytes(length - noise)
        packed = len(lz4.block.compress(data, store_size=False))
        seen.add(packed <= length * KEEP)
        item = (0, records.REC_WRITE, 1, 7, 4096, 5, data)
        assert _rec.encode_batch([item])[0] == records.encode_write(1, 7, 4096, data, 5)
    assert seen == {True, False}  # the sweep crossed the boundary


@pytest.mark.parametrize("kind", ["noise", "text", "edge", "zero"])
def test_large_writes_encode_alike(kind):
    for length in (1 * MiB, 4 * MiB + 512):
        data = make_data(kind, length, length)
        item = (0, records.REC_WRITE, 0, 3, 0, 11, data)
        with native_lz4(True):
            native = _rec.encode_batch([item])[0]
        with native_lz4(False):
            fallback = _rec.encode_batch([item])[0]
        assert native == fallback == records.encode_write(0, 3, 0, data, 11)


def test_a_bad_item_is_refused_with_the_status_of_its_encoder():
    good = (0, records.REC_WRITE, 0, 1, 0, 1, b"x" * 512)
    with pytest.raises(AlignmentError):
        _rec.encode_batch([good, (0, records.REC_WRITE, 0, 2, 100, 1, b"y" * 512)])
    with pytest.raises(CorruptRecordError):
        _rec.encode_batch([(0, records.REC_WRITE, 0, 0, 0, 1, b"y" * 512)])  # seq 0
    with pytest.raises(ConfigError):
        _rec.encode_batch([(1, records.REC_WRITE, 0, 1, 0, 1, b"y" * 512)], 1)  # no output 1
    with pytest.raises(ConfigError):
        _rec.encode_batch([(-1, records.REC_WRITE, 0, 1, 0, 1, b"y" * 512)], 1)
    with pytest.raises(ConfigError):
        _rec.encode_batch([(0, 9, 0, 1, 0, 1, b"y" * 512)], 1)


# ---- the capture ring's seal -------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native-lz4", "per-record-lz4"])
@given(batch=batches(max_sectors=64, max_items=10), compress=st.booleans(),
       max_bytes=st.sampled_from([64 * KiB, 1 * MiB]))
def test_sealed_ring_bundles_equal_per_record_encoding(tmp_path_factory, native, batch,
                                                       compress, max_bytes):
    """Writes and markers captured in a ring, sealed in bites: each part is what encoding
    each record alone gives (time_ns as the ring stamped it), in seq order."""
    nouts, items = batch
    path = tmp_path_factory.mktemp("seal") / "disk.img"
    volumes = 8
    size = (2**30 + 256) * 512
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        ring = CaptureRing(32 * MiB)
        vm_of_volume = np.array([v % nouts for v in range(volumes)], dtype=np.uint32)
        captured = []
        for _out, type_, volume, _, offset, _, data in items:
            if type_ == records.REC_CHECKPOINT:
                seq = ring.marker(data)
                captured.append((-1, type_, 0, seq, 0, data))
                continue
            seq = ring.write(fd, volume, size, offset, data)
            kind = records.REC_ZERO if not any(data) else records.REC_WRITE
            captured.append((int(vm_of_volume[volume]), kind, volume, seq, offset, data))
        parts = [b""] * nouts
        with native_lz4(native):
            while (b := ring.seal(max_bytes, vm_of_volume, nouts, compress,
                                  records.LZ4_MIN_SAVING)) is not None:
                for k in range(nouts):
                    parts[k] += bytes(b.parts[k])
    finally:
        os.close(fd)
    # the ring's time stamps, read back from the sealed headers (one per record, in order)
    times: dict[int, int] = {}
    for part in parts:
        at = 0
        while at < len(part):
            h = records.read_header(part, at)
            times[h.seq] = h.time_ns
            at += _rec.record_size(h.stored)
    expect_items = [(out, type_, volume, seq, offset, times[seq], data)
                    for out, type_, volume, seq, offset, data in captured]
    assert parts == expected_parts(expect_items, nouts, compress, records.LZ4_MIN_SAVING)


def test_sealing_an_entry_of_an_unknown_volume_or_vm_refuses_and_keeps_it(tmp_path):
    from zcore.errors import OutOfRangeError

    fd = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 1 * MiB)
        ring = CaptureRing(1 * MiB)
        seq = ring.write(fd, 3, 1 * MiB, 0, b"x" * 512)
    finally:
        os.close(fd)
    with pytest.raises(OutOfRangeError):  # no volume 3 in the map
        ring.seal(1 * MiB, np.zeros(2, np.uint32), 1, True, records.LZ4_MIN_SAVING)
    with pytest.raises(OutOfRangeError):  # volume 3 maps to VM 5 of 2
        ring.seal(1 * MiB, np.array([0, 0, 0, 5], np.uint32), 2, True, records.LZ4_MIN_SAVING)
    batch = ring.seal(1 * MiB, np.zeros(4, np.uint32), 1, True, records.LZ4_MIN_SAVING)
    assert batch is not None and (batch.first_seq, batch.entries) == (seq, 1)


def _usr_like_sample(nbytes: int) -> bytes:
    """Real file bytes (the interpreter's standard library and its binary), as a guest's
    writes carry them: deterministic for one environment."""
    root = Path(os.__file__).parent
    out = bytearray(Path(sys.executable).resolve().read_bytes()[: nbytes // 4])
    for path in sorted(root.glob("*.py")):
        if len(out) >= nbytes:
            break
        out += path.read_bytes()
    return bytes(out[:nbytes])


def test_a_long_batch_of_real_data_encodes_as_lz4_block_compress_does():
    """Hundreds of 4-64 KiB writes of real file bytes in one batch, through one LZ4 stream
    reset between records: every record as lz4.block.compress gives it (a stream reset
    that keeps state across records would show here; the small hypothesis batches above
    did not show one)."""
    sample = _usr_like_sample(8 * MiB)
    rnd = random.Random(4)
    items = []
    for seq in range(1, 400):
        length = rnd.randint(1, 16) * 4 * KiB
        start = rnd.randrange(0, len(sample) - length) // 512 * 512
        data = sample[start:start + length]
        items.append((0, records.REC_WRITE, 0, seq, seq * 64 * KiB, seq, data))
    with native_lz4(True):
        native = _rec.encode_batch(items, 1, True, records.LZ4_MIN_SAVING)
    assert native == expected_parts(items, 1, True, records.LZ4_MIN_SAVING)
