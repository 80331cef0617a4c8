"""Dirty bitmaps (zcore.bitmap) against plain models.

The model of a bitmap is a set of block numbers (or, for ranges too large for a set, a
pyroaring BitMap built one `add_range` at a time, the slow obvious way).  The rule every
test comes back to: a bitmap may resend more than was written, never less.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap

from zcore._native.record import crc32c
from zcore.bitmap import BLOCK, HEADER, DirtyBitmap, id_runs, runs_to_bitmap
from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError, OutOfRangeError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def blocks_of(offset: int, length: int, block: int) -> set[int]:
    """Blocks a byte range touches."""
    return set(range(offset // block, -(-(offset + length) // block)))


def dirty_set(bm: DirtyBitmap) -> set[int]:
    return set(bm.block_ids().tolist())


def covered_bytes(bm: DirtyBitmap) -> set[int]:
    """Every 512-byte sector the bitmap's extents cover."""
    out: set[int] = set()
    for offset, length in bm.extents():
        out.update(range(offset // 512, (offset + length) // 512))
    return out


# ---- runs_to_bitmap: the numpy-built run containers ------------------------------------

# Ranges anywhere in the 32-bit block space, biased towards container (2**16) boundaries,
# the top of the space and lengths that span several containers.
_starts = st.one_of(
    st.integers(0, (1 << 32) - 1),
    st.integers(0, (1 << 16) - 1).map(lambda k: k << 16),
    st.integers(-70, 70).map(lambda d: max(0, (5 << 16) + d)),
    st.integers(1, 1 << 17).map(lambda d: (1 << 32) - d),
)
_lengths = st.one_of(st.integers(0, 70), st.integers(0, 3 << 16), st.integers(0, 1 << 20))


@given(st.lists(st.tuples(_starts, _lengths), max_size=40))
def test_bulk_runs_equal_the_union_of_add_range_calls(ranges):
    starts = [s for s, _ in ranges]
    ends = [min(s + n, 1 << 32) for s, n in ranges]
    expected = BitMap()
    for s, e in zip(starts, ends, strict=True):
        if e > s:
            expected.add_range(s, e)
    got = runs_to_bitmap(np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64))
    assert got == expected
    # what the bulk path builds must serialize like any bitmap (it is loaded, not trusted)
    assert BitMap.deserialize(got.serialize()) == expected


@given(st.sets(st.integers(0, 1 << 40), max_size=60))
def test_id_runs_split_ids_exactly_where_they_stop_being_consecutive(ids):
    """The one run extraction (dirty-bitmap extents, scratch-overlay reads): a run that
    swallowed a gap would resend or read too much, one that split early too little."""
    starts, ends = id_runs(np.array(sorted(ids), dtype=np.uint64))
    covered = set()
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        assert a < b and a - 1 not in ids and b not in ids
        covered.update(range(a, b))
    assert covered == ids
    assert list(starts) == sorted(starts)


def test_bulk_runs_refuse_blocks_beyond_32_bits():
    with pytest.raises(OutOfRangeError):
        runs_to_bitmap(np.array([0], dtype=np.uint64), np.array([(1 << 32) + 1], dtype=np.uint64))


def test_bulk_runs_of_nothing_are_empty():
    empty = np.array([], dtype=np.uint64)
    five = np.array([5], dtype=np.uint64)
    assert runs_to_bitmap(empty, empty) == BitMap()
    assert runs_to_bitmap(five, five) == BitMap()


# ---- marking, clearing, extents against a set of blocks --------------------------------

_volume_sizes = st.one_of(
    st.integers(1, 64 * 128).map(lambda n: n * 512),  # up to 4 MiB, any sector count
    st.sampled_from([BLOCK, 64 * KiB, 1 * MiB + 512, 256 * MiB]),
)


@st.composite
def _ops(draw):
    size = draw(_volume_sizes)
    ranges = st.tuples(st.integers(0, size - 1), st.integers(1, min(size, 3 * MiB))).map(
        lambda r: (r[0], min(r[1], size - r[0]))
    )
    ops = draw(st.lists(
        st.one_of(
            st.tuples(st.just("mark"), ranges),
            st.tuples(st.just("many"), st.lists(ranges, max_size=20)),
            st.tuples(st.just("clear"), ranges),
        ),
        max_size=12,
    ))
    return size, ops


@given(_ops())
def test_marks_and_clears_match_a_set_of_blocks(case):
    size, ops = case
    bm = DirtyBitmap(size)
    model: set[int] = set()
    nblocks = -(-size // BLOCK)
    for op, arg in ops:
        if op == "mark":
            bm.mark(*arg)
            model |= blocks_of(*arg, BLOCK)
        elif op == "many":
            offs = np.array([o for o, _ in arg], dtype=np.uint64)
            lens = np.array([n for _, n in arg], dtype=np.uint64)
            bm.mark_many(offs, lens)
            for r in arg:
                model |= blocks_of(*r, BLOCK)
        else:
            offset, length = arg
            bm.clear(offset, length)
            # whole blocks only; the last block counts as whole when the range reaches
            # the volume's end
            lo = -(-offset // BLOCK)
            end = offset + length
            hi = nblocks if end >= size else end // BLOCK
            model -= set(range(lo, hi))
        assert dirty_set(bm) == model
    assert len(bm) == len(model)
    assert bool(bm) == bool(model)
    last_partial = size % BLOCK and (nblocks - 1) in model
    assert bm.dirty_bytes == len(model) * BLOCK - (BLOCK - size % BLOCK if last_partial else 0)
    # extents: ascending, merged, clipped to the volume, exactly the dirty blocks
    ext = list(bm.extents())
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(ext))
    assert all(o + n <= size and n > 0 for o, n in ext)
    covered = set()
    for o, n in ext:
        covered |= blocks_of(o, n, BLOCK)
    assert covered == model
    assert sum(n for _, n in ext) == bm.dirty_bytes


@given(_ops(), st.sampled_from([512, 4096, 12288, 1 << 20]))
def test_extents_split_at_max_length_cover_the_same_bytes(case, max_length):
    size, ops = case
    bm = DirtyBitmap(size)
    for op, arg in ops:
        if op == "mark":
            bm.mark(*arg)
    whole = list(bm.extents())
    split = list(bm.extents(max_length=max_length))
    assert all(0 < n <= max_length for _, n in split)
    assert sum(n for _, n in split) == sum(n for _, n in whole)
    joined: list[list[int]] = []
    for o, n in split:
        if joined and joined[-1][0] + joined[-1][1] == o:
            joined[-1][1] += n
        else:
            joined.append([o, n])
    assert [tuple(j) for j in joined] == whole


def test_marking_past_the_volume_end_is_refused_and_marks_nothing():
    bm = DirtyBitmap(1 * MiB)
    with pytest.raises(OutOfRangeError):
        bm.mark(1 * MiB - 512, 1024)
    with pytest.raises(OutOfRangeError):
        bm.mark(-512, 1024)
    with pytest.raises(OutOfRangeError):
        bm.mark_many(np.array([0, 1 * MiB], dtype=np.uint64), np.array([512, 512], dtype=np.uint64))
    assert not bm


def test_a_range_that_wraps_around_2_64_is_refused_not_dropped():
    """A negative offset (or one near 2**64) whose end wraps past zero must be refused:
    silently dropping it would leave blocks unsynced."""
    bm = DirtyBitmap(1 * MiB)
    with pytest.raises(OutOfRangeError):
        bm.mark_many(np.array([-4096], dtype=np.int64), np.array([8192], dtype=np.int64))
    with pytest.raises(OutOfRangeError):
        bm.mark_many(np.array([(1 << 64) - 4096], dtype=np.uint64),
                     np.array([4096], dtype=np.uint64))
    assert not bm


def test_mark_many_refuses_arrays_of_different_shapes():
    with pytest.raises(ConfigError):
        DirtyBitmap(1 * MiB).mark_many(np.zeros(2, np.uint64), np.zeros(3, np.uint64))


def test_invalid_bitmap_geometry_is_refused():
    with pytest.raises(ConfigError):
        DirtyBitmap(0)
    with pytest.raises(ConfigError):
        DirtyBitmap(1 * MiB, block=2048)
    with pytest.raises(ConfigError):
        DirtyBitmap(1 * MiB, block=12288)


def test_mark_all_dirties_every_byte_including_a_partial_last_block():
    bm = DirtyBitmap(10 * BLOCK + 512)
    bm.mark_all()
    assert bm.dirty_bytes == 10 * BLOCK + 512
    assert list(bm.extents()) == [(0, 10 * BLOCK + 512)]


def test_a_volume_beyond_16_tib_starts_with_coarser_blocks():
    bm = DirtyBitmap(64 * TiB)
    assert bm.block == 16 * KiB
    bm.mark(64 * TiB - 512, 512)
    assert list(bm.extents()) == [(64 * TiB - 16 * KiB, 16 * KiB)]


# ---- bounding memory: coarsening resends more, never less -----------------------------


@given(st.lists(st.tuples(st.integers(0, (64 * MiB) // 512 - 1), st.integers(1, 256)),
                min_size=1, max_size=60),
       st.integers(1, 5))
def test_coarsening_never_forgets_a_dirty_byte(ranges, times):
    size = 64 * MiB
    ranges = [(o * 512, min(n * 512, size - o * 512)) for o, n in ranges]
    bm = DirtyBitmap(size)
    for r in ranges:
        bm.mark(*r)
    before = covered_bytes(bm)
    for _ in range(times):
        bm.coarsen()
    assert bm.block == BLOCK << times
    after = covered_bytes(bm)
    assert before <= after
    # a coarse bit stands for exactly the fine bits under it
    expected = set()
    for o, n in ranges:
        expected |= blocks_of(o, n, bm.block)
    assert dirty_set(bm) == expected


def test_a_memory_bound_coarsens_instead_of_growing():
    size = 1 * TiB
    rng = np.random.default_rng(7)
    offs = rng.integers(0, size // BLOCK - 1, 200_000, dtype=np.uint64) * np.uint64(BLOCK)
    lens = np.full(offs.size, BLOCK, dtype=np.uint64)
    bm = DirtyBitmap(size, max_bytes=256 * KiB)
    bm.mark_many(offs, lens)
    assert bm.memory_bytes <= 256 * KiB
    assert bm.block > BLOCK
    fine = DirtyBitmap(size)
    fine.mark_many(offs, lens)
    # every block the fine bitmap holds is inside a coarse one
    coarse_ids = bm.block_ids().astype(np.uint64)
    fine_ids = fine.block_ids().astype(np.uint64)
    ratio = bm.block // BLOCK
    assert np.isin(np.unique(fine_ids // np.uint64(ratio)), coarse_ids).all()


def test_update_from_a_coarser_bitmap_keeps_every_byte():
    fine = DirtyBitmap(8 * MiB)
    fine.mark(4096, 512)
    coarse = DirtyBitmap(8 * MiB, block=64 * KiB)
    coarse.mark(1 * MiB + 512, 512)
    fine.update(coarse)
    assert covered_bytes(coarse) <= covered_bytes(fine)
    assert (4096 // 512) in covered_bytes(fine)


# ---- persistence: a damaged file is refused, never read as "less dirty" ----------------


def _sample(size: int = 64 * MiB) -> DirtyBitmap:
    bm = DirtyBitmap(size)
    bm.mark(0, 512)
    bm.mark(5 * MiB, 3 * MiB)
    bm.mark(size - 4096, 4096)
    for i in range(100):
        bm.mark(17 * MiB + i * 3 * BLOCK, BLOCK)
    return bm


def test_persisted_bitmap_loads_back_identical(tmp_path):
    bm = _sample()
    n = bm.persist(tmp_path / "b.zcb", volume_id=3)
    assert n == (tmp_path / "b.zcb").stat().st_size
    back = DirtyBitmap.load(tmp_path / "b.zcb", volume_size=64 * MiB, volume_id=3)
    assert dirty_set(back) == dirty_set(bm)
    assert back.block == bm.block
    assert list(back.extents()) == list(bm.extents())
    assert not (tmp_path / "b.zcb.tmp").exists()


def test_a_coarsened_bitmap_persists_its_block_size(tmp_path):
    bm = _sample()
    bm.coarsen()
    bm.persist(tmp_path / "b.zcb")
    back = DirtyBitmap.load(tmp_path / "b.zcb", volume_size=64 * MiB)
    assert back.block == 2 * BLOCK
    assert dirty_set(back) == dirty_set(bm)


@given(st.data())
def test_any_damaged_byte_of_a_persisted_bitmap_is_refused(data):
    blob = _sample().serialize(volume_id=1)
    at = data.draw(st.integers(0, len(blob) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(blob)
    bad[at] ^= flip
    with pytest.raises(CorruptRecordError):
        DirtyBitmap.deserialize(bytes(bad), volume_size=64 * MiB, volume_id=1)


@given(st.data())
def test_a_truncated_or_extended_bitmap_file_is_refused(data):
    blob = _sample().serialize()
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    with pytest.raises(CorruptRecordError):
        DirtyBitmap.deserialize(blob[:cut], volume_size=64 * MiB)
    with pytest.raises(CorruptRecordError):
        DirtyBitmap.deserialize(blob + b"\0" * data.draw(st.integers(1, 100)),
                                volume_size=64 * MiB)


def _reheader(payload: bytes, *, version: int = 1, size: int = 64 * MiB, block: int = BLOCK,
              volume_id: int = 0) -> bytes:
    """A well-formed header (valid checksums) in front of `payload`."""
    head = HEADER.pack(b"ZCBMAP\r\n", version, HEADER.size, size, block, volume_id,
                       len(payload), crc32c(payload), 0)
    return head[:60] + struct.pack("<I", crc32c(head[:60])) + payload


def test_a_bitmap_of_another_volume_or_size_is_refused():
    blob = _sample().serialize(volume_id=2)
    with pytest.raises(CorruptRecordError, match="another volume"):
        DirtyBitmap.deserialize(blob, volume_size=64 * MiB, volume_id=3)
    with pytest.raises(CorruptRecordError, match="another volume"):
        DirtyBitmap.deserialize(blob, volume_size=128 * MiB, volume_id=2)


def test_a_future_bitmap_format_version_is_refused():
    blob = _reheader(_sample().serialize()[HEADER.size:], version=2)
    with pytest.raises(FormatVersionError):
        DirtyBitmap.deserialize(blob, volume_size=64 * MiB)


def test_an_invalid_block_size_with_valid_checksums_is_refused():
    for block in (0, 512, 3 * BLOCK):
        with pytest.raises(CorruptRecordError, match="block size"):
            DirtyBitmap.deserialize(_reheader(_sample().serialize()[HEADER.size:], block=block),
                                    volume_size=64 * MiB)


def test_a_checksummed_payload_that_is_not_a_bitmap_is_refused():
    with pytest.raises(CorruptRecordError, match="does not decode"):
        DirtyBitmap.deserialize(_reheader(b"\x01\x02\x03 not roaring at all"),
                                volume_size=64 * MiB)


def test_a_checksummed_bitmap_marking_past_the_volume_end_is_refused():
    payload = BitMap([0, (64 * MiB) // BLOCK]).serialize()
    with pytest.raises(CorruptRecordError, match="past the volume"):
        DirtyBitmap.deserialize(_reheader(payload), volume_size=64 * MiB)


def test_an_empty_bitmap_round_trips(tmp_path):
    DirtyBitmap(1 * MiB).persist(tmp_path / "e.zcb")
    assert not DirtyBitmap.load(tmp_path / "e.zcb", volume_size=1 * MiB)


@pytest.mark.parametrize("size", [1 * GiB, 3 * GiB + 512])
def test_bulk_marks_of_writes_match_single_marks(size):
    rng = np.random.default_rng(size)
    n = 5000
    offs = rng.integers(0, (size - 64 * KiB) // 512, n, dtype=np.uint64) * np.uint64(512)
    lens = rng.integers(1, 128, n, dtype=np.uint64) * np.uint64(512)
    bulk, single = DirtyBitmap(size), DirtyBitmap(size)
    for chunk in range(0, n, 777):
        bulk.mark_many(offs[chunk:chunk + 777], lens[chunk:chunk + 777])
    for o, n_ in zip(offs.tolist(), lens.tolist(), strict=True):
        single.mark(o, n_)
    assert bulk.block == single.block
    assert np.array_equal(bulk.block_ids(), single.block_ids())

