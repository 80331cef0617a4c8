"""The native kernels against their pure-Python references (zcore._native.reference).

CRC32C (every length and alignment, the three-stream path included), the record codec
(encoders and header parser, valid and invalid fields, random bytes) and the extent
index (newest-wins plans and verified reads over many overlapping extents, several
volumes, random checkpoint seqs, drop_before, enough extents to fill the unsorted tail
and merge sorted runs).
"""

from __future__ import annotations

import os
import random
import struct
import tempfile

import lz4.block
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from zcore import records
from zcore._native import record as _rec
from zcore._native import reference as ref
from zcore._native.index import ExtentIndex
from zcore.errors import STATUS_ERRORS, STATUS_TEXT, ZcoreError

KiB = 1 << 10


def assert_status(exc: ZcoreError, status: int) -> None:
    assert type(exc) is STATUS_ERRORS[status], (exc, status)
    assert str(exc).endswith(STATUS_TEXT[status]), (exc, status)


# ---- CRC32C ------------------------------------------------------------------------------


def test_crc32c_references_agree_on_the_check_value():
    assert ref.crc32c_bitwise(b"123456789") == ref.crc32c_table(b"123456789") == 0xE3069283
    assert ref.crc32c_table(b"") == 0 == _rec.crc32c(b"")


@given(data=st.binary(max_size=600), crc=st.integers(0, 2**32 - 1), skip=st.integers(0, 15))
def test_crc32c_matches_bitwise_reference(data, crc, skip):
    view = memoryview(data)[min(skip, len(data)) :]  # every start alignment
    expect = ref.crc32c_bitwise(view, crc)
    assert ref.crc32c_table(view, crc) == expect
    assert _rec.crc32c(view, crc) == expect


@given(seed=st.integers(0, 2**32), length=st.sampled_from(
    [3 * 8192 - 1, 3 * 8192, 3 * 8192 + 7, 6 * 8192 + 100, 100_000]),
    skip=st.integers(0, 7), crc=st.integers(0, 2**32 - 1))
def test_crc32c_three_stream_path_matches_reference(seed, length, skip, crc):
    data = random.Random(seed).randbytes(length + skip)
    view = memoryview(data)[skip:]
    assert _rec.crc32c(view, crc) == ref.crc32c_table(view, crc)
    # continuing a CRC over a split equals the CRC of the whole
    cut = length // 3
    assert _rec.crc32c(view[cut:], _rec.crc32c(view[:cut], crc)) == _rec.crc32c(view, crc)


# ---- record codec ---------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
SECTOR_MULTIPLE = st.integers(0, 2**20).map(lambda n: n * 512)


@given(volume=U32, seq=st.one_of(st.just(0), U64), offset=st.one_of(SECTOR_MULTIPLE, U64),
       sectors=st.integers(1, 40), odd=st.booleans(), time_ns=U64, seed=st.integers(0, 99),
       sync=st.booleans())
def test_encode_raw_matches_reference(volume, seq, offset, sectors, odd, time_ns, seed, sync):
    length = sectors * 512 - (100 if odd else 0)  # odd lengths must be refused
    data = random.Random(seed).randbytes(length)
    try:
        expect = ref.encode_raw(volume, seq, offset, data, time_ns, sync)
    except ref.RefError as err:
        with pytest.raises(ZcoreError) as info:
            _rec.encode_raw(volume, seq, offset, data, time_ns, sync)
        assert_status(info.value, err.status)
        return
    assert _rec.encode_raw(volume, seq, offset, data, time_ns, sync) == expect
    status, fields, _ = ref.parse_header(expect[:64])
    assert status == 0 and fields["length"] == length


STORED_TYPES = st.sampled_from([0, records.REC_WRITE, records.REC_ZERO, records.REC_CHECKPOINT,
                                records.REC_SYNC, 5, 0xFFFF])


STORED_FLAGS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x8001])


@given(type_=STORED_TYPES, flags=STORED_FLAGS, volume=st.sampled_from(
    [0, 1, 2**32 - 1]), seq=st.sampled_from([0, 1, 2**64 - 1]), offset=st.sampled_from(
    [0, 512, 100, 2**64 - 512]), length=st.sampled_from([0, 4, 5, 512, 1028, 1029, 2**32 - 512,
                                                        ref.MAX_WRITE, ref.MAX_WRITE + 512]),
    payload=st.binary(max_size=1100), time_ns=U64)
def test_encode_stored_matches_reference(type_, flags, volume, seq, offset, length, payload,
                                         time_ns):
    try:
        expect = ref.encode_stored(type_, flags, volume, seq, offset, length, time_ns, payload)
    except ref.RefError as err:
        with pytest.raises(ZcoreError) as info:
            _rec.encode_stored(type_, flags, volume, seq, offset, length, time_ns, payload)
        assert_status(info.value, err.status)
        return
    assert _rec.encode_stored(type_, flags, volume, seq, offset, length, time_ns,
                              payload) == expect


def test_encode_stored_accepts_each_valid_kind():
    """The sampled fields above mostly make invalid records: pin the valid ones."""
    cases = [
        (records.REC_ZERO, 0, 3, 1, 512, 1024, b""),
        (records.REC_CHECKPOINT, 0, 0, 2, 0, 7, b"\x02\x01\x03\x00abc"),
        (records.REC_WRITE, records.FLAG_LZ4, 1, 3, 4096, 8192, lz4.block.compress(
            bytes(8192), store_size=False)),
        (records.REC_SYNC, records.FLAG_LZ4, 1, 4, 0, 512, b"x"),
        (records.REC_WRITE, records.FLAG_ZSTD, 1, 5, 8192, 8192,
         records.zstd_compress(bytes(8192), 3)),
        (records.REC_SYNC, records.FLAG_ZSTD, 2, 6, 512, 1024, b"z" * 17),
    ]
    for type_, flags, volume, seq, offset, length, payload in cases:
        got = _rec.encode_stored(type_, flags, volume, seq, offset, length, 9, payload)
        assert got == ref.encode_stored(type_, flags, volume, seq, offset, length, 9, payload)


FIELD_NAMES = ["type", "flags", "volume", "seq", "offset", "length", "stored"]


@st.composite
def headers(draw):
    """64-byte headers: valid ones with one or two fields changed (and the header CRC
    recomputed, so the field rules are what fails), reserved bytes set, or raw noise."""
    how = draw(st.sampled_from(["valid", "fields", "reserved", "noise", "bit flip"]))
    if how == "noise":
        return draw(st.binary(min_size=64, max_size=64))
    base = draw(st.sampled_from([
        ref.encode_raw(2, 9, 4096, bytes(5120), 77)[:64],
        ref.encode_stored(records.REC_ZERO, 0, 1, 3, 0, 4096, 5),
        ref.encode_stored(records.REC_CHECKPOINT, 0, 0, 4, 0, 5, 6, b"\x01\x00\x01\x00a")[:64],
        ref.encode_stored(records.REC_WRITE, records.FLAG_LZ4, 0, 5, 512, 2048, 7, b"q" * 40)[:64],
        ref.encode_stored(records.REC_SYNC, records.FLAG_ZSTD, 0, 6, 0, 4096, 8, b"z" * 30)[:64],
    ]))
    if how == "valid":
        return base
    if how == "bit flip":
        buf = bytearray(base)
        bit = draw(st.integers(0, 511))
        buf[bit // 8] ^= 1 << (bit % 8)
        return bytes(buf)
    status, fields, pcrc = ref.parse_header(base)
    assert status == 0
    if how == "reserved":
        buf = bytearray(base)
        buf[draw(st.integers(44, 59))] = draw(st.integers(1, 255))
        buf[60:64] = struct.pack("<I", ref.crc32c_table(bytes(buf[:60])))
        return bytes(buf)
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=2)):
        fields[name] = draw(st.sampled_from({
            "type": [0, 1, 2, 3, 4, 5],
            "flags": [0, 1, 2, 3, 4, 5, 6, 8],
            "volume": [0, 1, 2**32 - 1],
            "seq": [0, 1, 2**64 - 1],
            "offset": [0, 100, 512, 2**64 - 512],
            "length": [0, 3, 4, 512, 5120, 1029, ref.MAX_WRITE, ref.MAX_WRITE + 512],
            "stored": [0, 1, 4, 5, 64 + 5120, ref.MAX_PAYLOAD, ref.MAX_PAYLOAD + 1],
        }[name]))
    return ref.encode_header(fields["type"], fields["flags"], fields["volume"], fields["seq"],
                             fields["offset"], fields["length"], fields["stored"],
                             fields["time_ns"], pcrc)


@given(header=headers())
def test_parse_header_matches_reference(header):
    status, fields, pcrc = ref.parse_header(header)
    if status:
        with pytest.raises(ZcoreError) as info:
            _rec.parse_header(header)
        assert_status(info.value, status)
        return
    got, got_crc = _rec.parse_header(header)
    assert got_crc == pcrc
    assert got == {k: v for k, v in fields.items() if k != "time_ns"}


# ---- the extent index ---------------------------------------------------------------------


def to_array(extents: list[ref.Extent]) -> np.ndarray:
    arr = np.zeros(len(extents), dtype=records.EXTENT_DTYPE)
    for i, e in enumerate(extents):
        arr[i]["seq"], arr[i]["volume"], arr[i]["offset"] = e.seq, e.volume, e.offset
        arr[i]["length"], arr[i]["type"] = e.length, e.type
        arr[i]["flags"] = records.FLAG_BLOCKCRC if e.type != records.REC_ZERO else 0
        arr[i]["segment"], arr[i]["pos"] = 1, 64 * i
    return arr


ANY_VOLUME_SIZE = np.full(65536, 4 << 20, dtype=np.uint64)


def sorted_extents(extents: list[ref.Extent]) -> np.ndarray:
    """Extents as a sealed segment's v2 index file holds them: by (volume, offset, seq),
    each at a distinct position of segment 1."""
    arr = to_array(extents)
    arr = arr[np.lexsort((arr["seq"], arr["offset"], arr["volume"]))]
    arr["pos"] = 64 * (1 + np.arange(len(arr)))
    return arr


@st.composite
def index_scripts(draw):
    """A sequence of add / drop_before / plan steps over a few volumes."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    volumes = draw(st.lists(st.sampled_from([0, 1, 2, 7, 65535]), min_size=1, max_size=3,
                            unique=True))
    span = draw(st.sampled_from([4 * KiB, 64 * KiB, 1 << 20]))
    max_len = draw(st.sampled_from([512, 8 * KiB, 64 * KiB, 300 * KiB]))
    granule = draw(st.sampled_from([1, 512]))  # the index itself is byte-granular
    # mostly short with a few long ones: runs of very different longest extents merge
    long_share = draw(st.sampled_from([1.0, 0.03]))
    total = draw(st.sampled_from([5, 60, 400, 1200]))  # > 256 a volume: sorted runs
    seq = 0
    steps = []
    extents: list[ref.Extent] = []
    while len(extents) < total:
        batch = []
        for _ in range(rng.randrange(1, 150)):
            seq += rng.choice([1, 1, 1, 2, 17])
            longest = max_len if rng.random() < long_share else min(max_len, 2 * KiB)
            length = max(granule, rng.randrange(1, longest + 1) // granule * granule)
            offset = rng.randrange(0, span) // granule * granule
            kind = rng.choice([records.REC_WRITE, records.REC_WRITE, records.REC_ZERO,
                               records.REC_SYNC, records.REC_CHECKPOINT])
            batch.append(ref.Extent(seq, rng.choice(volumes), offset, length, kind))
        # a sealed segment's sorted extents are adopted whole (add_sorted: sector-aligned)
        sorted_ok = granule == 512 and rng.random() < 0.5
        steps.append(("add sorted" if sorted_ok else "add", batch))
        extents += batch
        if rng.random() < 0.3:  # often exactly at a held seq: the off-by-one boundary
            steps.append(("drop", rng.choice(extents).seq + rng.choice([0, 0, 1])
                          if rng.random() < 0.8 else rng.randrange(0, seq + 2)))
        steps.append(("plan", rng.randrange(2**32)))
    return volumes, span, steps, seq


def index_queries(rng: random.Random, held: list[ref.Extent], volumes: list[int], span: int,
                  last_seq: int, n: int = 12):
    """(volume, offset, length, at): random ones, and ones aimed at a held extent's edges
    and seq, where an off-by-one in the planner shows."""
    for _ in range(n):
        if held and rng.random() < 0.75:
            e = rng.choice(held)
            edge = rng.choice([e.offset, e.offset + e.length, e.offset + e.length // 2,
                               e.offset + rng.randrange(e.length)])
            offset = max(0, edge - rng.choice([0, 1, 512, rng.randrange(1, 8192)]))
            length = rng.choice([1, 512, rng.randrange(1, 16384), e.length])
            at = rng.choice([e.seq, e.seq + 1, e.seq + 2, last_seq + 1])
            yield e.volume, offset, length, at
        else:
            volume = rng.choice([*volumes, 3])  # 3 is never written
            offset = rng.randrange(0, span + 64 * KiB)
            yield volume, offset, rng.randrange(1, span + 64 * KiB), rng.randrange(last_seq + 3)


@given(script=index_scripts())
def test_index_plan_matches_reference(script):
    volumes, span, steps, last_seq = script
    index = ExtentIndex()
    held: list[ref.Extent] = []
    for op, arg in steps:
        if op == "add":
            index.add_array(to_array(arg).view(np.uint8))
            held += [e for e in arg if e.type in ref.DATA_TYPES]
        elif op == "add sorted":
            data = [e for e in arg if e.type in ref.DATA_TYPES]
            arr = sorted_extents(data)
            index.add_sorted(arr.view(np.uint8), 1, 64 * (len(arr) + 1), ANY_VOLUME_SIZE)
            held += data
        elif op == "drop":
            index.drop_before(arg)
            held = [e for e in held if e.seq >= arg]
        assert index.count == len(held)
        if op != "plan":
            continue
        for volume, offset, length, at in index_queries(random.Random(arg), held, volumes,
                                                        span, last_seq):
            got = index.plan(volume, offset, length, at)
            assert got == ref.plan(held, volume, offset, length, at), (volume, offset,
                                                                       length, at)
            assert sum(f[1] for f in got) == length


def test_index_refuses_descending_seqs_per_volume():
    index = ExtentIndex()
    index.add_array(to_array([ref.Extent(5, 0, 0, 512), ref.Extent(6, 1, 0, 512)])
                    .view(np.uint8))
    index.add_array(to_array([ref.Extent(4, 1, 0, 512)])[:0].view(np.uint8))  # empty: fine
    with pytest.raises(ZcoreError):
        index.add_array(to_array([ref.Extent(5, 0, 512, 512)]).view(np.uint8))
    index.add_array(to_array([ref.Extent(5, 2, 0, 512)]).view(np.uint8))  # other volume
    assert index.count == 3


@st.composite
def journaled_writes(draw):
    rng = random.Random(draw(st.integers(0, 2**32)))
    sizes = {0: draw(st.sampled_from([16 * KiB, 64 * KiB])), 5: 32 * KiB}
    writes = []
    seq = 0
    for _ in range(draw(st.integers(1, 80))):
        seq += rng.choice([1, 1, 3])
        vol = rng.choice(sorted(sizes))
        sectors = rng.choice([1, 3, 8, 9, 16, 40])
        sectors = min(sectors, sizes[vol] // 512)
        offset = rng.randrange(sizes[vol] // 512 - sectors + 1) * 512
        kind = rng.choice(["random", "zero", "text"])
        if kind == "random":
            data = rng.randbytes(sectors * 512)
        elif kind == "zero":
            data = bytes(sectors * 512)
        else:
            data = (rng.randbytes(7) * (sectors * 80))[: sectors * 512]
        writes.append((seq, vol, offset, data))
    replicas = {v: rng.randbytes(n) if rng.random() < 0.5 else bytes(n)
                for v, n in sizes.items()}
    return sizes, writes, replicas, seq


@given(case=journaled_writes(), qseed=st.integers(0, 2**32))
def test_index_read_matches_reference(case, qseed):
    """Verified reads through the index (raw records block by block, zero records, LZ4
    and zstd records through the loader, replica images) against painting the writes in
    order."""
    sizes, writes, replicas, last_seq = case
    with tempfile.TemporaryDirectory() as tmp:
        seg_path = os.path.join(tmp, "seg")
        blob = b"".join(records.encode_write(v, s, o, d, 1, zstd_level=3 if s % 2 else 0)
                        for s, v, o, d in writes)
        with open(seg_path, "wb") as f:
            f.write(bytes(64) + blob)
        vol_sizes = np.zeros(6, dtype=np.uint64)
        for v, n in sizes.items():
            vol_sizes[v] = n
        batch = _rec.scan(blob, 64, 1, 0, vol_sizes)
        assert batch.status == 0
        fds = [os.open(seg_path, os.O_RDONLY)]
        try:
            index = ExtentIndex()
            index.add(batch)
            index.set_segment_fd(1, fds[0])
            for v, image in replicas.items():
                path = os.path.join(tmp, f"replica-{v}")
                with open(path, "wb") as f:
                    f.write(image)
                fds.append(os.open(path, os.O_RDONLY))
                index.set_replica_fd(v, fds[-1])

            def loader(segment, pos, stored, length):
                raw = os.pread(fds[0], 64 + stored, pos)
                _rec.verify_payload(raw[:64], raw[64:])
                head, _crc = _rec.parse_header(raw[:64])
                return records.decode_payload(head["flags"], raw[64:], length, "test")

            rng = random.Random(qseed)
            for _ in range(10):
                seq, vol, off, data = rng.choice(writes)
                size = sizes[vol]
                if rng.random() < 0.3:
                    start = rng.randrange(size // 512)
                else:  # around an edge of a write
                    edge = (off + rng.choice([0, len(data), len(data) // 2])) // 512
                    start = max(0, min(size // 512 - 1, edge - rng.choice([0, 1, 7, 8, 9])))
                count = rng.randint(1, size // 512 - start)
                offset, length = start * 512, count * 512
                at = rng.choice([seq, seq + 1, last_seq + 1, rng.randrange(last_seq + 2)])
                expect = ref.read(writes, replicas[vol], vol, offset, length, at)
                assert index.read(vol, offset, length, at, loader) == expect
                buf = bytearray(length)
                index.read_into(vol, offset, buf, at, loader)
                assert buf == expect
        finally:
            for fd in fds:
                os.close(fd)


@given(seed=st.integers(0, 2**32), which=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_index_read_never_returns_a_flipped_byte(seed, which, bit):
    """One bit flipped in a raw record's table or data: the reads that touch its block
    raise ChecksumError, every other read still matches the reference."""
    rng = random.Random(seed)
    data = rng.randbytes(9 * 4096 + 1024)
    rec = records.encode_write(0, 1, 4096, data, 1, compress=False)
    table = _rec.blockcrc_table_size(len(data))
    pos = 64 + which % (table + len(data))
    assume(pos < 64 + 10 * 4 or pos >= 64 + table)  # not in the table's zero padding
    damaged = bytearray(rec)
    damaged[pos] ^= 1 << bit
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "seg")
        with open(path, "wb") as f:
            f.write(bytes(64) + damaged)
        batch = _rec.scan(rec, 64, 1, 0, np.array([1 << 20], dtype=np.uint64))
        fd = os.open(path, os.O_RDONLY)
        try:
            index = ExtentIndex()
            index.add(batch)
            index.set_segment_fd(1, fd)
            bad_block = (pos - 64) // 4 if pos < 64 + table else (pos - 64 - table) // 4096
            for start in range(0, len(data), 1536):
                for n in (512, 4096, 9000 // 512 * 512):
                    n = min(n, len(data) - start)
                    touched = range(start // 4096, (start + n - 1) // 4096 + 1)
                    if bad_block in touched:
                        with pytest.raises(ZcoreError) as info:
                            index.read(0, 4096 + start, n, 2, None)
                        assert_status(info.value, -3)
                    else:
                        assert index.read(0, 4096 + start, n, 2, None) == data[start : start + n]
        finally:
            os.close(fd)


def test_index_add_sorted_refuses_bad_extents_whole():
    good = [ref.Extent(10 + i, i % 2, (i * 4096) % 65536, 4096) for i in range(40)]
    index = ExtentIndex()
    index.add_sorted(sorted_extents(good[:20]).view(np.uint8), 1, 64 * 21, ANY_VOLUME_SIZE)
    before = [index.plan(v, 0, 65536, 1000) for v in (0, 1)]
    rest = sorted_extents(good[20:])

    def damaged(change):
        arr = rest.copy()
        change(arr)
        return arr

    def swap(a):
        a[[0, 1]] = a[[1, 0]]

    def field(name, value, i=3):
        def change(a):
            a[i][name] = value
        return change

    def volume_first(a):
        a[:] = np.concatenate([a[-1:], a[:-1]])  # a volume 1 extent before volume 0's

    cases = {
        "not sorted": swap,
        "volumes out of order": volume_first,
        "checkpoint": field("type", records.REC_CHECKPOINT),
        "misaligned": field("offset", 100),
        "past the volume": field("offset", (4 << 20) - 512),
        "other segment": field("segment", 2),
        "inside the header": field("pos", 0),
        "past the segment": field("pos", 64 * 40),
        "seq not above": field("seq", 5, i=0),
        "empty extent": field("length", 0),
    }
    for name, change in cases.items():
        with pytest.raises(ZcoreError):
            index.add_sorted(damaged(change).view(np.uint8), 1, 64 * 21, ANY_VOLUME_SIZE)
        assert index.count == 20, name
        assert [index.plan(v, 0, 65536, 1000) for v in (0, 1)] == before, name
    index.add_sorted(rest.view(np.uint8), 1, 64 * 21, ANY_VOLUME_SIZE)
    assert index.count == 40
    assert index.plan(0, 0, 65536, 1000) == ref.plan(good, 0, 0, 65536, 1000)


@given(script=index_scripts(), qseed=st.integers(0, 2**32))
def test_index_plan_is_independent_of_add_order(script, qseed):
    """Reopening indexes the tail segment first and the older sealed segments afterwards
    (unordered adds, as the background loader does): plans must not depend on it."""
    volumes, span, steps, last_seq = script
    batches = [(op == "add sorted", arg) for op, arg in steps if op.startswith("add")]
    index = ExtentIndex()
    rng = random.Random(qseed)
    newest_first = [batches[-1], *batches[:-1]]
    held: list[ref.Extent] = []
    for i, (sorted_ok, batch) in enumerate(newest_first):
        data = [e for e in batch if e.type in ref.DATA_TYPES]
        ordered = i == 0
        if sorted_ok:
            arr = sorted_extents(data)
            index.add_sorted(arr.view(np.uint8), 1, 64 * (len(arr) + 1), ANY_VOLUME_SIZE,
                             ordered)
        else:
            index.add_array(to_array(batch).view(np.uint8), ordered)
        held += data
    assert index.count == len(held)
    for volume, offset, length, at in index_queries(rng, held, volumes, span, last_seq, 20):
        assert index.plan(volume, offset, length, at) == ref.plan(held, volume, offset,
                                                                  length, at)
    before = rng.choice(held).seq if held else 1
    index.drop_before(before)
    held = [e for e in held if e.seq >= before]
    assert index.count == len(held)
    later = [ref.Extent(last_seq + 1 + i, e.volume, e.offset, e.length) for i, e in
             enumerate(held[:50])]
    index.add_array(to_array(later).view(np.uint8))  # ordered adds go on above them all
    held += later
    for volume, offset, length, at in index_queries(rng, held, volumes, span, last_seq + 60,
                                                    20):
        assert index.plan(volume, offset, length, at) == ref.plan(held, volume, offset,
                                                                  length, at)
