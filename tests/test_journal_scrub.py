"""Replica block sums and the scrub (issue 9, finding 8): a flipped bit in promoted history
is never served, the scrub and `zcore journal check` find damage in records, index files
and replicas, and a crash during promotion leaves sums that match the replica."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import zcore_cmd
from helpers.journal import abandon

from zcore._native import record as _rec
from zcore.errors import ReplicaChecksumError
from zcore.journal import DamageKind, Journal, JournalSettings, VolumeSpec
from zcore.journal.replica import HEADER_BYTES, SUM_BLOCK, ReplicaSums, zero_crc
from zcore.replication.scrubbing import ScrubTimer

KiB = 1 << 10
MiB = 1 << 20
VOLUME = 1 * MiB


def _flip(path: Path, pos: int, bit: int = 0) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = bytearray(os.pread(fd, 1, pos))
        b[0] ^= 1 << bit
        os.pwrite(fd, bytes(b), pos)
    finally:
        os.close(fd)


def _fill(j: Journal, model: bytearray, rng: random.Random, n: int,
          *, unaligned: bool = True) -> None:
    """Append n random writes (some sector-sized at unaligned offsets) and a checkpoint."""
    for _ in range(n):
        if unaligned and rng.random() < 0.4:
            length = rng.choice([512, 1024, 1536, 5120])
            offset = rng.randrange(0, VOLUME - length, 512)
        else:
            length = rng.choice([4, 8, 16]) * KiB
            offset = rng.randrange(0, VOLUME - length, 4 * KiB)
        data = rng.randbytes(length)
        j.append([(0, offset, data)], compress=rng.random() < 0.3)
        model[offset : offset + length] = data
    j.checkpoint()


def _promoted_journal(tmp_path: Path, seed: int = 1) -> tuple[Journal, bytearray]:
    rng = random.Random(seed)
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d0", VOLUME)])
    model = bytearray(VOLUME)
    _fill(j, model, rng, 60)
    j.promote_to(j.last_seq + 1)
    return j, model


def _read_all(j: Journal) -> bytes:
    return j.read_at(j.last_seq + 1, 0, 0, VOLUME)


# ---- reads and the scrub over a damaged replica ----------------------------------------

def test_scrub_finds_a_flipped_replica_bit(tmp_path: Path) -> None:
    j, model = _promoted_journal(tmp_path)
    with j:
        assert j.scrub().clean
        nonzero = np.flatnonzero(np.frombuffer(bytes(model), dtype=np.uint8))
        pos = int(nonzero[len(nonzero) // 2])
        _flip(tmp_path / "j" / "replica-0000.img", pos, 3)
        report = j.scrub()
        assert report.complete and not report.clean
        [d] = report.damage
        assert d.kind == DamageKind.REPLICA and d.volume == 0
        assert d.offset == pos // SUM_BLOCK * SUM_BLOCK and d.length == SUM_BLOCK


def test_read_of_a_damaged_replica_block_raises_and_returns_nothing(tmp_path: Path) -> None:
    j, model = _promoted_journal(tmp_path)
    with j:
        block = 37
        _flip(tmp_path / "j" / "replica-0000.img", block * SUM_BLOCK + 100)
        ckpt = j.checkpoint()
        with j.view(ckpt) as view:
            # a read that only touches the block's neighbours is served, exactly
            assert view.read(0, (block + 1) * SUM_BLOCK, SUM_BLOCK) == \
                bytes(model[(block + 1) * SUM_BLOCK : (block + 2) * SUM_BLOCK])
            for offset, length in [(block * SUM_BLOCK, SUM_BLOCK),  # the block itself
                                   (block * SUM_BLOCK + 512, 512),  # a sector of it
                                   ((block - 2) * SUM_BLOCK, 8 * SUM_BLOCK)]:  # across it
                with pytest.raises(ReplicaChecksumError) as err:
                    view.read(0, offset, length)
                assert err.value.volume == 0 and err.value.offset == block * SUM_BLOCK
                assert "volume 0" in str(err.value)
                buf = bytearray(b"\xee" * length)
                with pytest.raises(ReplicaChecksumError):
                    view.read_into(0, offset, buf)
                assert buf == bytes(length)  # nothing of the damaged read is left in it


def test_every_flipped_replica_bit_is_refused_not_served(tmp_path: Path) -> None:
    """The review's repro of finding 8: flipped bits in promoted history, none served."""
    j, model = _promoted_journal(tmp_path, seed=2)
    rng = random.Random(3)
    img = tmp_path / "j" / "replica-0000.img"
    with j:
        for _ in range(100):
            pos = rng.randrange(VOLUME)
            bit = rng.randrange(8)
            _flip(img, pos, bit)
            with pytest.raises(ReplicaChecksumError):
                j.read_at(j.last_seq + 1, 0, pos // 512 * 512, 512)
            _flip(img, pos, bit)
        assert _read_all(j) == bytes(model)


def test_promotion_over_a_damaged_block_keeps_it_damaged(tmp_path: Path) -> None:
    j, _ = _promoted_journal(tmp_path, seed=4)
    with j:
        block = 11
        _flip(tmp_path / "j" / "replica-0000.img", block * SUM_BLOCK + 4000)
        j.append([(0, block * SUM_BLOCK, b"\x01" * 512)])  # covers part of the block
        j.checkpoint()
        j.promote_to(j.last_seq + 1)
        with pytest.raises(ReplicaChecksumError):
            j.read_at(j.last_seq + 1, 0, block * SUM_BLOCK, 512)
        assert [d.offset for d in j.scrub().damage] == [block * SUM_BLOCK]
        j.append([(0, block * SUM_BLOCK, b"\x02" * SUM_BLOCK)])  # covers all of it
        j.checkpoint()
        j.promote_to(j.last_seq + 1)
        assert j.read_at(j.last_seq + 1, 0, block * SUM_BLOCK, SUM_BLOCK) == \
            b"\x02" * SUM_BLOCK
        assert j.scrub().clean


# ---- records and index files -------------------------------------------------------------

def _sealed_journal(path: Path) -> Journal:
    rng = random.Random(5)
    j = Journal.create(path, [VolumeSpec(0, "d0", 8 * MiB)],
                       settings=JournalSettings(segment_bytes=1 * MiB))
    for i in range(80):
        j.append([(0, rng.randrange(0, 8 * MiB - 64 * KiB, 4096), rng.randbytes(32 * KiB))],
                 compress=False)
        if i % 10 == 9:
            j.checkpoint()
    assert sum(s.sealed for s in j.segments()) >= 2
    return j


def _first_sealed(j: Journal) -> tuple[Path, int]:
    seg = next(s for s in j.segments() if s.sealed)
    return seg.path, seg.min_seq


def test_scrub_finds_a_flipped_bit_in_a_record(tmp_path: Path) -> None:
    j = _sealed_journal(tmp_path / "j")
    with j:
        assert j.scrub().clean
        path, min_seq = _first_sealed(j)
        _flip(path, 64 + 64 + 200, 5)  # inside the first record's payload
        report = j.scrub()
        bad = [d for d in report.damage if d.kind == DamageKind.RECORD]
        assert len(bad) == 1 and report.complete
        assert bad[0].file == str(path) and bad[0].offset == 64
        assert bad[0].seqs == (min_seq, min_seq)
        assert "checksum" in bad[0].detail
        # the records after it were still checked
        assert report.records == sum(s.records for s in j.segments()) - 1


def test_journal_check_reports_a_flipped_record_bit(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _sealed_journal(path)
    seg, min_seq = _first_sealed(j)
    j.close()
    cmd = zcore_cmd("journal", "check", str(path), "--json")
    clean = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["clean"] is True
    _flip(seg, 64 + 64 + 300, 1)
    found = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["clean"] is False and report["complete"] is True
    [d] = report["damage"]
    assert d["kind"] == "record" and d["file"] == str(seg) and d["seqs"] == [min_seq, min_seq]
    text = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)
    assert text.returncode == 1 and "record" in text.stdout and seg.name in text.stdout


def test_journal_check_refuses_a_held_journal_and_a_non_journal(tmp_path: Path) -> None:
    cmd = zcore_cmd("journal", "check")
    with _sealed_journal(tmp_path / "j"):
        held = subprocess.run([*cmd, str(tmp_path / "j")], capture_output=True, text=True,
                              timeout=120)
    assert held.returncode == 2 and "open in another process" in held.stderr
    none = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "holds no journal" in none.stderr
    usage = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2


def test_scrub_finds_an_index_file_that_disagrees_with_its_segment(tmp_path: Path) -> None:
    j = _sealed_journal(tmp_path / "j")
    with j:
        seg, _ = _first_sealed(j)
        zci = seg.with_suffix(".zci")
        data = bytearray(zci.read_bytes())
        # a CRC-valid index whose first extent's seq is wrong (finding 5's crafted file)
        first = 64 + 40  # body: 40 bytes of stats, then the extents (seq first)
        seq = struct.unpack_from("<Q", data, first)[0]
        struct.pack_into("<Q", data, first, seq + 1)
        body_crc = _rec.crc32c(bytes(data[64:]))
        struct.pack_into("<I", data, 56, body_crc)
        struct.pack_into("<I", data, 60, _rec.crc32c(bytes(data[:60])))
        zci.write_bytes(bytes(data))
        report = j.scrub()
        [d] = report.damage
        assert d.kind == DamageKind.INDEX and d.file == str(zci)


# ---- the sums on disk: sparse replicas, format 1 journals ------------------------------

def test_sums_of_a_sparse_replica_cost_nothing_and_check_as_zeros(tmp_path: Path) -> None:
    size = 1 << 30
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d0", size)])
    with j:
        sidecar = tmp_path / "j" / "replica-0000.sum"
        st = sidecar.stat()
        assert st.st_size == HEADER_BYTES + 4 * (size // SUM_BLOCK)
        assert st.st_blocks * 512 <= 8 * KiB  # the header: entries of zeros are holes
        j.append([(0, 5 * SUM_BLOCK, b"\x07" * SUM_BLOCK)])
        j.checkpoint()
        j.promote_to(j.last_seq + 1)
        sums = np.fromfile(sidecar, dtype="<u4", offset=HEADER_BYTES)
        assert np.flatnonzero(sums).tolist() == [5]
        expected = _rec.crc32c(b"\x07" * SUM_BLOCK) ^ zero_crc(SUM_BLOCK)
        assert int(sums[5]) == expected
        assert sidecar.stat().st_blocks * 512 <= 16 * KiB
        # a hole reads as checked zeros; the scrub reads only the data (not 1 GiB)
        assert j.read_at(j.last_seq + 1, 0, 100 * MiB, 64 * KiB) == bytes(64 * KiB)
        report = j.scrub()
        assert report.clean and report.bytes_read < 8 * MiB
        assert report.replica_blocks == size // SUM_BLOCK
        j.append([(0, 4 * SUM_BLOCK, bytes(3 * SUM_BLOCK))])  # a ZERO record over it
        j.checkpoint()
        j.promote_to(j.last_seq + 1)
        sums = np.fromfile(sidecar, dtype="<u4", offset=HEADER_BYTES)
        assert np.flatnonzero(sums).tolist() == []
        assert j.read_at(j.last_seq + 1, 0, 0, 16 * SUM_BLOCK) == bytes(16 * SUM_BLOCK)
        assert j.scrub().clean


def test_a_volume_whose_size_is_not_a_block_multiple_has_a_short_last_block(
        tmp_path: Path) -> None:
    size = 64 * KiB + 1536
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d0", size)])
    with j:
        j.append([(0, size - 1024, b"\x09" * 1024), (0, 0, b"\x03" * 512)])
        j.checkpoint()
        j.promote_to(j.last_seq + 1)
        assert j.read_at(j.last_seq + 1, 0, size - 1536, 1536) == bytes(512) + b"\x09" * 1024
        assert j.scrub().clean
        _flip(tmp_path / "j" / "replica-0000.img", size - 1)
        with pytest.raises(ReplicaChecksumError) as err:
            j.read_at(j.last_seq + 1, 0, size - 512, 512)
        assert err.value.offset == 64 * KiB and err.value.length == SUM_BLOCK
        assert [d.offset for d in j.scrub().damage] == [64 * KiB]


def test_journal_without_sums_gets_them_from_its_replica_with_a_note(tmp_path: Path) -> None:
    """A format 1 journal (no sidecar): its sums are computed at open from the replica as
    it is, trusted once, and said so."""
    j, model = _promoted_journal(tmp_path, seed=6)
    j.close()
    (tmp_path / "j" / "replica-0000.sum").unlink()
    with Journal.open(tmp_path / "j") as j:
        assert len(j.integrity_notes) == 1 and "trusted once" in j.integrity_notes[0]
        assert _read_all(j) == bytes(model)
        assert j.scrub().clean
    with Journal.open(tmp_path / "j") as j:
        assert j.integrity_notes == []


# ---- a crash during promotion ----------------------------------------------------------

class Crash(BaseException):
    """Raised inside promotion to stop it as a kill -9 would."""


def _crash_promotion(monkeypatch: pytest.MonkeyPatch, j: Journal, after_writes: int) -> None:
    """Promote everything, crashing after `after_writes` replica writes (-1: at the replica
    fsync, once every write and the sums are written), then abandon the journal."""
    real_write = ReplicaSums.write
    calls = [0]

    def write(self: ReplicaSums, *args: object, **kw: object) -> None:
        if calls[0] == after_writes:
            raise Crash
        calls[0] += 1
        real_write(self, *args, **kw)  # type: ignore[arg-type]

    real_fsync = os.fsync
    replica_fds = set(j._replica_fds.values())

    def fsync(fd: int) -> None:
        if after_writes < 0 and fd in replica_fds:
            raise Crash
        real_fsync(fd)

    monkeypatch.setattr(ReplicaSums, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(Crash):
        j.promote_to(j.last_seq + 1)
    monkeypatch.undo()
    abandon(j)


@pytest.mark.parametrize("lost", ["nothing", "the new sums", "the new replica data"])
@pytest.mark.parametrize("after_writes", [0, 7, 30, -1])
def test_crash_during_promotion_leaves_sums_consistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str, after_writes: int) -> None:
    """Whatever part of the interrupted promotion reached the disk (the replica's new
    blocks without their sums, or the reverse), reopening finishes it and the sums match
    the replica before anything is served."""
    rng = random.Random(after_writes + 100)
    j = Journal.create(tmp_path / "j", [VolumeSpec(0, "d0", VOLUME)])
    model = bytearray(VOLUME)
    _fill(j, model, rng, 40)
    j.promote_to(j.last_seq + 1)  # a replica with data, and sums to go stale
    _fill(j, model, rng, 40)
    j.commit()
    jdir = tmp_path / "j"
    before = {name: (jdir / name).read_bytes()
              for name in ("replica-0000.img", "replica-0000.sum")}
    _crash_promotion(monkeypatch, j, after_writes)
    if lost == "the new sums":  # the replica's pages reached the disk, the sums' did not
        (jdir / "replica-0000.sum").write_bytes(before["replica-0000.sum"])
    elif lost == "the new replica data":
        (jdir / "replica-0000.img").write_bytes(before["replica-0000.img"])
    with Journal.open(jdir) as j:
        assert j.reopen_report.resumed_promotion
        assert j.promoted_seq == j.last_seq + 1
        assert _read_all(j) == bytes(model)
        assert j.scrub().clean
    with Journal.open(jdir) as j:  # and what is on disk now is consistent by itself
        assert j.scrub().clean and _read_all(j) == bytes(model)


# ---- the scrub's pace, and the recovery site's timer ----------------------------------

def test_scrub_keeps_its_rate_and_stops_when_asked(tmp_path: Path) -> None:
    j, _ = _promoted_journal(tmp_path, seed=7)
    with j:
        fast = j.scrub()
        slow = j.scrub(rate_bytes_per_s=8 * MiB)
        assert slow.bytes_read == fast.bytes_read
        assert slow.seconds >= 0.8 * slow.bytes_read / (8 * MiB)
        stop = threading.Event()
        stop.set()
        stopped = j.scrub(rate_bytes_per_s=1 * MiB, stop=stop)
        assert not stopped.complete


def test_site_scrub_timer_reports_damage_as_events(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    j, _ = _promoted_journal(tmp_path, seed=8)

    async def run() -> None:
        timer = ScrubTimer(lambda: [("vpg", "vm1", j)], interval=0.01, rate=None)
        timer.start()
        for _ in range(500):
            if timer.events:
                break
            await asyncio.sleep(0.01)
        assert timer.events and timer.events[-1].report.clean
        _flip(tmp_path / "j" / "replica-0000.img", 200 * KiB + 5)
        for _ in range(500):
            if not timer.events[-1].report.clean:
                break
            await asyncio.sleep(0.01)
        await timer.stop()
        event = timer.events[-1]
        assert (event.vpg, event.vm) == ("vpg", "vm1")
        assert [d.offset for d in event.report.damage] == [200 * KiB]

    with j, caplog.at_level("INFO", logger="zcore.replication.scrubbing"):
        asyncio.run(run())
    assert any("replica damage" in r.getMessage() for r in caplog.records)


def test_recovery_site_runs_the_scrub_timer(tmp_path: Path) -> None:
    from zcore.replication.recovery_site import RecoverySite

    async def run() -> None:
        rs = RecoverySite(tmp_path / "rs")
        rs.scrubber.interval = 0.01
        await rs.start()
        for _ in range(500):
            if rs.scrubber.rounds:
                break
            await asyncio.sleep(0.01)
        await rs.stop()
        assert rs.scrubber.rounds >= 1

    asyncio.run(run())

