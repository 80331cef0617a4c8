"""Delta sync (zcore.deltasync, docs/format.md 10c) against a byte model: random differing
blocks, crashes of either side (the target's unflushed writes torn) and resumes, hostile
peers, malformed and oversized frames, sparse files, and the asyncio transport.

The model is the source's bytes: after a sync the target must hold exactly them.  A
hostile source can make the target hold only what the source itself claims (its verdict);
every test of a source that misbehaves otherwise asserts the sync fails and the target's
progress never passes a block it did not verify."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct

import pytest
from helpers.deltasync import Crashed, MemVolume, Stalled, frames, pump
from hypothesis import given, settings
from hypothesis import strategies as st

from zcore import records, wire
from zcore.deltasync import (
    LEVEL_SIZES,
    MAX_DSYNC_FRAME,
    PROGRESS_FORMAT,
    PROGRESS_VERSION,
    BlockHasher,
    DeltaSource,
    DeltaTarget,
    FileVolume,
    run_source,
    run_target,
)
from zcore.deltasync.messages import BlockSet, data_frame, encode_blockset, parse_blockset
from zcore.errors import CorruptRecordError, ProtocolError
from zcore.fsutil import read_state, write_state

MiB = 1 << 20
KiB = 1 << 10


def volume_pair(size: int, writes: list[tuple[int, bytes]], seed: int = 0
                ) -> tuple[MemVolume, MemVolume]:
    """Source and target volumes equal but for `writes` applied to the source; the base
    holds random data with a zero MiB and a zero tail, as disks do."""
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(size))
    base[MiB : 2 * MiB] = bytes(len(base[MiB : 2 * MiB]))
    base[size - size // 8 :] = bytes(size // 8)
    src = bytearray(base)
    for offset, data in writes:
        src[offset : offset + len(data)] = data[: size - offset]
    return MemVolume(src), MemVolume(base)


def differing_bytes(a: bytes | bytearray, b: bytes | bytearray) -> int:
    return sum(4096 for i in range(0, len(a), 4096) if a[i : i + 4096] != b[i : i + 4096])


writes_strategy = st.lists(
    st.tuples(st.integers(0, 6 * MiB // 512 - 1).map(lambda s: s * 512),
              st.integers(1, 300).map(lambda n: n * 512),
              st.sampled_from(["random", "zero", "same"])),
    max_size=12)


def materialize(size: int, spec: list[tuple[int, int, str]], seed: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    out = []
    for offset, length, kind in spec:
        offset %= size
        length = min(length, size - offset)
        data = rng.randbytes(length) if kind == "random" else bytes(length)
        out.append((offset, data if kind != "same" else b""))  # "same" writes nothing
    return out


@given(size_sectors=st.integers(1, 7 * MiB // 512), spec=writes_strategy,
       crashes=st.lists(st.tuples(st.sampled_from(["source", "target", "both"]),
                                  st.integers(0, 40)), max_size=3),
       batch_blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sync_after_crashes_of_either_side_leaves_target_identical_to_source(
        tmp_path_factory, size_sectors, spec, crashes, batch_blocks, seed):
    size = size_sectors * 512
    src, dst = volume_pair(size, materialize(size, spec, seed), seed)
    progress = tmp_path_factory.mktemp("p") / "progress.json"
    rng = random.Random(seed)
    for who, after in crashes:
        source = DeltaSource({7: src})
        target = DeltaTarget({7: dst}, progress, batch_blocks=batch_blocks, progress_bytes=1)
        try:
            pump(source, target, rng=rng, crash_after=after)
        except Crashed:
            if who in ("target", "both"):
                dst.crash(rng)  # the target loses some of its unflushed writes
        if progress.exists():  # what was recorded as verified holds the source's bytes
            synced = read_state(progress, PROGRESS_FORMAT, PROGRESS_VERSION)["volumes"]["7"]
            assert dst.durable[: synced["synced"]] == src.data[: synced["synced"]]
    source = DeltaSource({7: src})
    target = DeltaTarget({7: dst}, progress, batch_blocks=batch_blocks, progress_bytes=1)
    pump(source, target, rng=rng)
    assert dst.data == src.data
    assert dst.durable == src.data  # flushed before DONE
    assert read_state(progress, PROGRESS_FORMAT, PROGRESS_VERSION)["volumes"]["7"] == {
        "size": size, "synced": size}


def test_sync_sends_little_more_than_the_differing_blocks():
    size = 9 * MiB
    rng = random.Random(3)
    writes = [(rng.randrange(0, size // 4096 - 64) * 4096, rng.randbytes(rng.choice(
        [4096, 12288, 65536, 300 * KiB]))) for _ in range(20)]
    src, dst = volume_pair(size, writes)
    differing = differing_bytes(src.data, dst.data)
    source = DeltaSource({1: src}, compress=False)
    pump(source, DeltaTarget({1: dst}, batch_blocks=4))
    assert dst.data == src.data
    assert source.data_bytes == differing  # exactly the differing 4 KiB blocks


def test_resume_sends_nothing_again_below_the_recorded_progress(tmp_path):
    size = 8 * MiB
    src, dst = volume_pair(size, [(o, os.urandom(64 * KiB)) for o in range(0, size, MiB)])
    progress = tmp_path / "p.json"
    first = DeltaSource({1: src}, compress=False)
    target = DeltaTarget({1: dst}, progress, batch_blocks=1, window=1, progress_bytes=1)
    with pytest.raises(Crashed):
        pump(first, target, crash_after=25)
    synced = read_state(progress, PROGRESS_FORMAT, PROGRESS_VERSION)["volumes"]["1"]["synced"]
    assert 0 < synced < size
    second = DeltaSource({1: src}, compress=False)
    pump(second, DeltaTarget({1: dst}, progress, batch_blocks=1, progress_bytes=1))
    assert dst.data == src.data
    # only blocks above the progress (some may already have arrived, unverified)
    assert 0 < second.data_bytes <= (size - synced) // MiB * 64 * KiB


def test_progress_of_other_volume_sizes_is_ignored_and_damage_is_reported(tmp_path):
    size = 3 * MiB
    src, dst = volume_pair(size, [(0, os.urandom(4096))])
    progress = tmp_path / "p.json"
    write_state(progress, PROGRESS_FORMAT, PROGRESS_VERSION,
                {"volumes": {"1": {"size": size * 2, "synced": 2 * MiB}}})
    pump(DeltaSource({1: src}), DeltaTarget({1: dst}, progress))
    assert dst.data == src.data  # block 0 was not skipped
    progress.write_text('{"meta": {"volumes": {}}, "crc32c": 1}')
    with pytest.raises(CorruptRecordError):
        DeltaTarget({1: dst}, progress)


# ---- hostile sources ----------------------------------------------------------------------

def hostile_run(tamper, size=4 * MiB, batch_blocks=2, tmp_path=None):
    src, dst = volume_pair(size, [(MiB // 2, os.urandom(8192)), (3 * MiB, os.urandom(4096))])
    before = bytes(dst.data)
    progress = tmp_path / "p.json" if tmp_path else None
    target = DeltaTarget({1: dst}, progress, batch_blocks=batch_blocks, progress_bytes=1)
    with pytest.raises((ProtocolError, Stalled)) as info:
        pump(DeltaSource({1: src}), target, tamper=tamper)
    return src, dst, before, target, progress, info.value


def test_source_that_skips_a_differing_block_fails_verification(tmp_path):
    dropped = []

    def drop_first_data(direction, f):
        if f.type == wire.DSYNC_DATA and not dropped:
            dropped.append(f)
            return []
        return None

    *_, target, progress, exc = hostile_run(drop_first_data, tmp_path=tmp_path)
    assert dropped and "differs from the source's verdict" in str(exc)
    assert target.synced[1] == 0 and not target.done
    assert not progress.exists()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_hashes_claiming_equal_where_blocks_differ_cannot_make_the_target_skip_them(
        tmp_path, level):
    # whatever makes the source believe the target's blocks equal its own (a lying or
    # garbled HASHES, a broken comparison), the target's check of the verdict catches it
    src_holder = {}

    def forge_equal(direction, f):
        if f.type == wire.DSYNC_START:
            src_holder["key"] = bytes.fromhex(wire.parse_control(f)["key"])
        if f.type == wire.DSYNC_HASHES and parse_blockset(f).level == level:
            bs = parse_blockset(f)
            hasher = BlockHasher(src_holder["key"], bs.volume, src_holder["volume"])
            size = LEVEL_SIZES[bs.level]
            entries = []
            for offset, count in bs.runs:
                for b in range(offset, offset + count * size, size):
                    if level == 0:
                        entries.append(hasher.level0(b, 1)[0][0])
                    else:
                        parent = b - b % LEVEL_SIZES[level - 1]
                        kids = hasher.children(level, parent)
                        entries.append(kids[(b - parent) // size])
            return [encode_blockset(wire.DSYNC_HASHES, BlockSet(
                bs.volume, bs.level, bs.batch, bs.runs, tuple(entries)))]
        return None

    src, dst = volume_pair(4 * MiB, [(MiB // 2, os.urandom(8192)), (3 * MiB, os.urandom(4096))])
    src_holder["volume"] = src
    progress = tmp_path / "p.json"
    target = DeltaTarget({1: dst}, progress, batch_blocks=2, progress_bytes=1)
    with pytest.raises(ProtocolError, match="differs from the source's verdict"):
        pump(DeltaSource({1: src}), target, tamper=forge_equal)
    assert target.synced[1] == 0 and not progress.exists()


def test_source_sending_other_bytes_than_its_verdict_fails_verification(tmp_path):
    def other_bytes(direction, f):
        if f.type == wire.DSYNC_DATA:
            vid, batch = struct.unpack_from("<II", f.payload)
            recs = bytes(f.payload[8:])
            head = records.read_header(recs)
            forged = records.encode_write(vid, head.seq, head.offset, os.urandom(head.length),
                                          0, compress=False)
            return [data_frame(vid, batch, [forged])]
        return None

    *_, target, _, exc = hostile_run(other_bytes, tmp_path=tmp_path)
    assert isinstance(exc, ProtocolError) and "verdict" in str(exc)
    assert target.synced[1] == 0


def test_source_hashing_under_another_key_fails_verification(tmp_path):
    def swap_key(direction, f):
        if f.type == wire.DSYNC_START:
            msg = wire.parse_control(f)
            msg["key"] = os.urandom(32).hex()
            return [wire.control(wire.DSYNC_START, 0, **msg)]
        return None

    _, _, _, target, progress, exc = hostile_run(swap_key, tmp_path=tmp_path)
    assert isinstance(exc, ProtocolError) and "verdict" in str(exc)
    assert target.synced[1] == 0 and not progress.exists()


def test_records_outside_their_batch_are_refused_before_any_write(tmp_path):
    def misplace(direction, f):
        if f.type == wire.DSYNC_DATA:
            vid, _ = struct.unpack_from("<II", f.payload)
            forged = records.encode_write(vid, 1, 3 * MiB + 4096, os.urandom(4096), 0,
                                          compress=False)
            return [data_frame(vid, 0, [forged])]  # batch 0 is [0, 2 MiB)
        return None

    _, dst, before, _, _, exc = hostile_run(misplace, tmp_path=tmp_path)
    assert isinstance(exc, ProtocolError)
    assert bytes(dst.data[2 * MiB :]) == before[2 * MiB :]


def test_damaged_record_in_data_is_refused(tmp_path):
    def flip(direction, f):
        if f.type == wire.DSYNC_DATA:
            payload = bytearray(f.payload)
            payload[-1] ^= 1
            return [wire.frame(wire.DSYNC_DATA, 0, payload)]
        return None

    _, _, _, target, _, exc = hostile_run(flip, tmp_path=tmp_path)
    assert isinstance(exc, ProtocolError) and target.synced[1] == 0


# ---- hostile targets ----------------------------------------------------------------------

def test_target_hashes_for_blocks_not_asked_for_are_refused():
    def shift(direction, f):
        if f.type == wire.DSYNC_HASHES and parse_blockset(f).level == 1:
            bs = parse_blockset(f)
            runs = tuple((o + LEVEL_SIZES[1], c) for o, c in bs.runs)
            return [encode_blockset(wire.DSYNC_HASHES, BlockSet(
                bs.volume, bs.level, bs.batch, runs, bs.entries))]
        return None

    *_, exc = hostile_run(shift)
    assert isinstance(exc, ProtocolError) and "not the blocks asked for" in str(exc)


def test_target_lying_about_its_hashes_only_changes_what_it_receives():
    # a target claiming every block zero is sent every nonzero block of the source
    def all_zero(direction, f):
        if f.type == wire.DSYNC_HASHES:
            bs = parse_blockset(f)
            zero = b"\x01" + bytes(16)
            return [encode_blockset(wire.DSYNC_HASHES, BlockSet(
                bs.volume, bs.level, bs.batch, bs.runs, (zero,) * bs.nblocks))]
        return None

    src, dst = volume_pair(3 * MiB, [])
    source = DeltaSource({1: src}, compress=False)
    pump(source, DeltaTarget({1: dst}), tamper=all_zero)
    assert dst.data == src.data
    nonzero = sum(4096 for i in range(0, src.size, 4096) if any(src.data[i : i + 4096]))
    assert source.data_bytes == nonzero


@pytest.mark.parametrize("ftype", [wire.DSYNC_HASHES, wire.DSYNC_REFINE, wire.DSYNC_VERDICT])
@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=400))
def test_malformed_block_sets_raise_protocol_error_only(ftype, payload):
    try:
        parse_blockset(wire.Frame(ftype, 0, memoryview(payload)))
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(ftype=st.sampled_from([wire.DSYNC_HASHES, wire.DSYNC_DATA, wire.DSYNC_VERDICT,
                              wire.DSYNC_REFINE, wire.DSYNC_DONE, wire.DSYNC_START]),
       payload=st.binary(max_size=300), head=st.binary(min_size=16, max_size=16))
def test_malformed_frames_mid_sync_raise_protocol_error_on_both_sides(ftype, payload, head):
    src, dst = volume_pair(2 * MiB, [(0, os.urandom(4096))])
    source = DeltaSource({1: src})
    target = DeltaTarget({1: dst})
    start = frames(target.on_offer(frames(source.offer())[0]))[0]
    source.on_frame(start)
    target.next_hashes()
    junk = wire.Frame(ftype, 0, memoryview(head + payload))
    for side in (source, target):
        try:
            side.on_frame(junk)
        except ProtocolError:
            pass
    assert target.synced[1] == 0


def test_oversized_frame_is_refused_before_its_payload_is_allocated():
    reader = wire.FrameReader(MAX_DSYNC_FRAME)
    head = wire.HEADER.pack(wire.MAGIC, wire.DSYNC_DATA, 0, 0, 1 << 31, 0, 0)
    head = head[:20] + struct.pack("<I", wire.crc32c(head[:20]))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(head)
    assert reader.payload_allocated == 0


def test_block_set_counts_beyond_the_bounds_are_refused():
    for nruns, count in ((1025, 1), (1, 16385)):
        payload = struct.pack("<IIII", 1, 0, 0, nruns) + struct.pack("<QII", 0, count, 0)
        with pytest.raises(ProtocolError):
            parse_blockset(wire.Frame(wire.DSYNC_HASHES, 0, memoryview(payload)))


def test_offer_of_other_volumes_or_protocol_is_refused():
    src, dst = volume_pair(2 * MiB, [])
    offer = frames(DeltaSource({1: src}).offer())[0]
    with pytest.raises(ProtocolError, match="not the target's"):
        DeltaTarget({2: dst}).on_offer(offer)
    bad = wire.control(wire.DSYNC_OFFER, 0, protocol=2, volumes=[{"id": 1, "size": 2 * MiB}])
    with pytest.raises(ProtocolError, match="protocol 2"):
        DeltaTarget({1: dst}).on_offer(frames(bad)[0])


def test_start_with_a_short_key_or_bad_resume_is_refused():
    src, _ = volume_pair(2 * MiB, [])
    for key, resume in (("00" * 16, 0), ("00" * 32, 4096), ("zz" * 32, 0)):
        start = wire.control(wire.DSYNC_START, 0, key=key, batch=1,
                             volumes=[{"id": 1, "size": 2 * MiB, "resume": resume}])
        with pytest.raises(ProtocolError):
            DeltaSource({1: src}).on_frame(frames(start)[0])


# ---- sparse files and the transport ---------------------------------------------------------

class CountingReads:
    """A FileVolume seen through read_into and data_extents only (no zero-copy view), with
    the bytes read counted."""

    def __init__(self, volume):
        self.volume, self.bytes_read = volume, 0

    @property
    def size(self):
        return self.volume.size

    def read_into(self, offset, buf):
        self.bytes_read += len(memoryview(buf))
        self.volume.read_into(offset, buf)

    def pwrite(self, offset, data):
        self.volume.pwrite(offset, data)

    def flush(self):
        self.volume.flush()

    def data_extents(self, start, end):
        return self.volume.data_extents(start, end)


def sparse_file(path, size, extents):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def test_sparse_files_sync_without_reading_their_holes(tmp_path):
    size = 64 * MiB
    common = [(5 * MiB, os.urandom(MiB)), (40 * MiB, os.urandom(256 * KiB))]
    sparse_file(tmp_path / "src", size, [*common, (20 * MiB, os.urandom(8192))])
    sparse_file(tmp_path / "dst", size, [*common, (50 * MiB, os.urandom(4096))])
    with FileVolume(tmp_path / "src") as s, FileVolume(tmp_path / "dst", writable=True) as d:
        src, dst = CountingReads(s), CountingReads(d)
        source = DeltaSource({1: src})
        pump(source, DeltaTarget({1: dst}))
    assert (tmp_path / "src").read_bytes() == (tmp_path / "dst").read_bytes()
    assert src.bytes_read < 4 * MiB and dst.bytes_read < 4 * MiB  # holes never read
    assert source.differing_blocks == 3  # 2 blocks at 20 MiB, 1 zeroed at 50 MiB


def test_zero_blocks_the_source_sends_are_punched_on_file_and_replica_targets(tmp_path):
    """Where the target holds data the source has as zeros, the ZERO records it receives
    punch holes (the space comes back) instead of writing zeros; a journal's replica keeps
    its block sums right while it is punched."""
    from zcore.journal import Journal, VolumeSpec
    from zcore.journal.replicavolume import ReplicaVolume

    size = 16 * MiB
    sparse_file(tmp_path / "src", size, [(MiB, os.urandom(MiB))])
    for name in ("dst", "replica"):
        sparse_file(tmp_path / name, size, [(MiB, os.urandom(MiB)),
                                            (8 * MiB, os.urandom(4 * MiB))])
    before = os.stat(tmp_path / "dst").st_blocks * 512
    with FileVolume(tmp_path / "src") as s, FileVolume(tmp_path / "dst", writable=True) as d:
        pump(DeltaSource({1: s}), DeltaTarget({1: d}))
    assert (tmp_path / "src").read_bytes() == (tmp_path / "dst").read_bytes()
    assert os.stat(tmp_path / "dst").st_blocks * 512 <= before - 4 * MiB + 64 * KiB

    journal = Journal.create(tmp_path / "j", [VolumeSpec(0, "disk0", size)], vm="vm1",
                             replica_files={0: tmp_path / "replica"})
    try:
        with FileVolume(tmp_path / "src") as s:
            target = ReplicaVolume(journal, 0)
            pump(DeltaSource({0: s}), DeltaTarget({0: target}))
        replica = next((tmp_path / "j").rglob("replica-0000.img"))
        assert os.stat(replica).st_blocks * 512 <= 2 * MiB + 64 * KiB
        c = journal.checkpoint("after")
        journal.commit()
        with journal.view(c) as view:  # read through the sums: no checksum error
            assert view.read(0, 0, size) == (tmp_path / "src").read_bytes()
    finally:
        journal.close()


def test_mapped_and_read_hashes_of_a_sparse_file_agree(tmp_path):
    sparse_file(tmp_path / "v", 9 * MiB + 1536, [(MiB + 512, os.urandom(70 * KiB)),
                                                 (9 * MiB, os.urandom(1536))])
    key = os.urandom(32)
    with FileVolume(tmp_path / "v") as v:
        mapped, read = BlockHasher(key, 2, v), BlockHasher(key, 2, CountingReads(v))
        assert mapped.level0(0, 10) == read.level0(0, 10)
        assert mapped.children(2, 9 * MiB) == read.children(2, 9 * MiB)
        assert mapped.entry(1, MiB + 64 * KiB) == read.entry(1, MiB + 64 * KiB)


async def _sync_over_socketpair(source, target):
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    try:
        return await asyncio.gather(run_source(ra, wa, source), run_target(rb, wb, target),
                                    return_exceptions=True)
    finally:
        wa.close()
        wb.close()


def test_transport_syncs_files_end_to_end_and_counts_bytes(tmp_path):
    size = 70 * MiB
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    changed = bytearray(data)
    changed[3 * MiB : 3 * MiB + 12288] = bytes(12288)
    changed[69 * MiB :] = os.urandom(MiB)
    (tmp_path / "dst").write_bytes(changed)
    with FileVolume(tmp_path / "src") as src, FileVolume(tmp_path / "dst", writable=True) as dst:
        sent, received = asyncio.run(_sync_over_socketpair(
            DeltaSource({3: src}), DeltaTarget({3: dst}, tmp_path / "p.json")))
    assert (tmp_path / "dst").read_bytes() == data
    assert sent.bytes_sent == received.bytes_received
    assert MiB + 12288 < sent.bytes_sent < MiB + 12288 + 64 * KiB


def test_transport_reports_the_peers_reason_when_a_sync_fails(tmp_path):
    (tmp_path / "src").write_bytes(os.urandom(2 * MiB))
    (tmp_path / "dst").write_bytes(os.urandom(3 * MiB))
    with FileVolume(tmp_path / "src") as src, FileVolume(tmp_path / "dst", writable=True) as dst:
        out = asyncio.run(_sync_over_socketpair(DeltaSource({1: src}), DeltaTarget({1: dst})))
    assert all(isinstance(r, ProtocolError) for r in out)
    assert "not the target's" in str(out[0])  # the source heard why


def test_target_with_more_batches_in_flight_than_the_bound_is_refused():
    data = bytes(66 * MiB)  # zero: cheap to hash, every batch equal
    source = DeltaSource({1: MemVolume(data)})
    target = DeltaTarget({1: MemVolume(data)}, batch_blocks=1)
    source.on_frame(frames(target.on_offer(frames(source.offer())[0]))[0])
    replies = [source.on_frame(frames(target.next_hashes())[0]) for _ in range(64)]
    assert all(r[-1:] and frames(r[-1])[0].type == wire.DSYNC_VERDICT for r in replies)
    # equal batches are verdicted at once; unanswered REFINEs would pile up instead:
    src2, dst2 = MemVolume(os.urandom(66 * MiB)), MemVolume(bytes(66 * MiB))
    source = DeltaSource({1: src2})
    target = DeltaTarget({1: dst2}, batch_blocks=1)
    source.on_frame(frames(target.on_offer(frames(source.offer())[0]))[0])
    for _ in range(64):
        source.on_frame(frames(target.next_hashes())[0])  # REFINEs left unanswered
    with pytest.raises(ProtocolError, match="in flight"):
        source.on_frame(frames(target.next_hashes())[0])
