"""pytest-benchmark micro-benchmarks of the journal's hot paths, each beside a baseline.

Not part of the test suite (pyproject's testpaths is tests/).  Run them with

    pytest bench/ --benchmark-only [--benchmark-group-by=group]

Groups pair a zcore kernel with the plain operation it should be compared against
(memcpy-like bytes copy, os.pread, ...), as the harness does for whole suites.
"""

from __future__ import annotations

import os

import lz4.block
import numpy as np
import pytest

from zcore import records
from zcore._native import record as _rec
from zcore._native.index import ExtentIndex
from zcore.journal import Journal, JournalSettings, VolumeSpec

KiB = 1 << 10
MiB = 1 << 20

# Extents in the populated index: 1 GiB of 4-64 KiB writes is ~30k; 200k is a busy journal.
INDEX_EXTENTS = 200_000
INDEX_VOLUME_BYTES = 4 << 30
# Journal behind the View.read benchmark: 64 MiB of random writes over a 256 MiB volume.
VIEW_JOURNAL_BYTES = 64 * MiB
VIEW_VOLUME_BYTES = 256 * MiB
READS = 1024  # random offsets cycled through by the 4 KiB read benchmarks

RNG = np.random.default_rng(7)


def _random(n: int) -> bytes:
    return RNG.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _bundle(total: int, volume_bytes: int, seq: int = 1) -> tuple[bytes, int]:
    """Raw write records of 4-64 KiB at random 4 KiB-aligned offsets, up to `total` bytes."""
    pool = _random(8 * MiB)
    out = bytearray(total)
    at = 0
    while True:
        length = int(RNG.integers(1, 17)) * 4 * KiB
        if at + _rec.raw_record_size(length) > total:
            break
        offset = int(RNG.integers(0, (volume_bytes - length) // (4 * KiB))) * 4 * KiB
        src = int(RNG.integers(0, (len(pool) - length) // (4 * KiB))) * 4 * KiB
        at = _rec.encode_raw_into(out, at, 0, seq, offset, memoryview(pool)[src:src + length],
                                  1)
        seq += 1
    return bytes(out[:at]), seq


# ---- CRC32C ------------------------------------------------------------------------------

@pytest.mark.benchmark(group="checksum-1MiB")
def test_crc32c_1mib(benchmark):
    data = _random(MiB)
    benchmark(_rec.crc32c, data)


@pytest.mark.benchmark(group="checksum-1MiB")
def test_baseline_bytes_copy_1mib(benchmark):
    data = bytearray(_random(MiB))
    benchmark(bytes, data)


# ---- record encoding ---------------------------------------------------------------------

@pytest.mark.benchmark(group="encode-64KiB")
def test_encode_raw_into_64kib(benchmark):
    data = _random(64 * KiB)
    out = bytearray(_rec.raw_record_size(len(data)))
    benchmark(_rec.encode_raw_into, out, 0, 0, 1, 0, data, 1)


@pytest.mark.benchmark(group="encode-64KiB")
def test_encode_write_lz4_vm_like_64kib(benchmark):
    # half zeros, half random: compresses about 2x, like VM data
    data = _random(32 * KiB) + bytes(32 * KiB)
    benchmark(records.encode_write, 0, 1, 0, data, 1)


@pytest.mark.benchmark(group="encode-64KiB")
def test_baseline_lz4_compress_64kib(benchmark):
    data = _random(32 * KiB) + bytes(32 * KiB)
    benchmark(lz4.block.compress, data, store_size=False)


# ---- bundle validation -------------------------------------------------------------------

@pytest.mark.benchmark(group="scan-1MiB")
def test_scan_1mib_bundle(benchmark):
    bundle, _ = _bundle(MiB, 4 << 30)
    sizes = np.array([4 << 30], dtype=np.uint64)
    batch = benchmark(_rec.scan, bundle, 64, 1, 0, sizes)
    assert batch.status == 0 and batch.consumed == len(bundle)


@pytest.mark.benchmark(group="scan-1MiB")
def test_baseline_crc32c_of_the_same_bundle(benchmark):
    bundle, _ = _bundle(MiB, 4 << 30)
    benchmark(_rec.crc32c, bundle)


# ---- extent index ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def populated_index():
    n = INDEX_EXTENTS
    ext = np.zeros(n, dtype=records.EXTENT_DTYPE)
    lengths = RNG.integers(1, 17, size=n) * 4 * KiB
    ext["seq"] = np.arange(1, n + 1)
    ext["offset"] = RNG.integers(0, (INDEX_VOLUME_BYTES - lengths) // (4 * KiB)) * 4 * KiB
    ext["length"] = lengths
    ext["stored"] = lengths + 64
    ext["pos"] = np.arange(n) * 70 * KiB
    ext["segment"] = 1
    ext["volume"] = 0
    ext["type"] = records.REC_WRITE
    ext["flags"] = records.FLAG_BLOCKCRC
    index = ExtentIndex()
    index.add_array(ext.tobytes())
    offsets = (RNG.integers(0, INDEX_VOLUME_BYTES // (4 * KiB), size=READS) * 4 * KiB).tolist()
    return index, offsets


@pytest.mark.benchmark(group="index-plan")
def test_index_plan_4k_latest(benchmark, populated_index):
    index, offsets = populated_index
    it = iter(range(1 << 62))

    def plan():
        return index.plan(0, offsets[next(it) % READS], 4 * KiB, INDEX_EXTENTS + 1)

    benchmark(plan)


@pytest.mark.benchmark(group="index-plan")
def test_index_plan_1mib_halfway(benchmark, populated_index):
    index, offsets = populated_index
    it = iter(range(1 << 62))

    def plan():
        off = min(offsets[next(it) % READS], INDEX_VOLUME_BYTES - MiB)
        return index.plan(0, off, MiB, INDEX_EXTENTS // 2)

    benchmark(plan)


# ---- read-through ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def journal_view(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro-journal")
    journal = Journal.create(path / "j", [VolumeSpec(0, "disk0", VIEW_VOLUME_BYTES)],
                             settings=JournalSettings())
    appended = 0
    half = None
    while appended < VIEW_JOURNAL_BYTES:
        bundle, _ = _bundle(MiB, VIEW_VOLUME_BYTES, journal.last_seq + 1)
        journal.append_encoded(bundle)
        appended += len(bundle)
        if half is None and appended >= VIEW_JOURNAL_BYTES // 2:
            half = journal.checkpoint("half")
    journal.checkpoint("end")
    journal.commit()
    view = journal.view(half)
    plain = path / "plain.img"
    with open(plain, "wb") as f:
        f.write(_random(VIEW_VOLUME_BYTES))
    fd = os.open(plain, os.O_RDONLY)
    offsets = (RNG.integers(0, VIEW_VOLUME_BYTES // (4 * KiB), size=READS) * 4 * KiB).tolist()
    for off in offsets:  # warm
        view.read(0, off, 4 * KiB)
        os.pread(fd, 4 * KiB, off)
    yield view, fd, offsets
    os.close(fd)
    view.close()
    journal.close()


@pytest.mark.benchmark(group="read-4KiB")
def test_view_read_4k(benchmark, journal_view):
    view, _, offsets = journal_view
    it = iter(range(1 << 62))
    benchmark(lambda: view.read(0, offsets[next(it) % READS], 4 * KiB))


@pytest.mark.benchmark(group="read-4KiB")
def test_baseline_os_pread_4k(benchmark, journal_view):
    _, fd, offsets = journal_view
    it = iter(range(1 << 62))
    benchmark(lambda: os.pread(fd, 4 * KiB, offsets[next(it) % READS]))
