"""Damage to a committed journal directory: reopen must refuse with a zcore.errors class,
report the damage, or serve exactly what was acknowledged; never a clean open over
wrong or missing data.  Every record here is committed, so dropped_bytes (which counts
only a torn unsynced tail) must stay 0.

The cases that fail today are issue 9 findings, as strict xfails; the control cases show
the oracle accepts what the journal does handle (a flipped bit in a sealed record)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from reliability import crashsim
from reliability.workload import VOLUMES, Expect, Workload, create
from zcore._native import record as _rec
from zcore.errors import ZcoreError
from zcore.journal import Journal

SEED, OPS = 2, 320


def _xfail(n: int, why: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"issue 9 finding {n}: {why}")


@pytest.fixture(scope="module")
def golden() -> Iterator[tuple[Path, Workload, Expect]]:
    root = Path(crashsim.scratch_dir("zc-damage-"))
    try:
        work = Workload(SEED, OPS)
        # one early promotion (history in the replicas), then none: the segments stay
        promotes = [op for op in work.ops if op.kind == "promote"]
        work.ops = [op for op in work.ops if op.kind != "promote" or op is promotes[0]]
        marks: list = []
        journal = create(root / "golden")
        work.run(journal, marks.append)
        journal.close()
        names = sorted(p.name for p in (root / "golden").iterdir())
        # the damage below needs sealed segments, their indexes and promoted history
        assert sum(n.endswith(".zci") for n in names) >= 2, names
        assert sum(n.endswith(".zcj") for n in names) >= 3, names
        yield root / "golden", work, Expect.of(marks)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def damaged(golden, tmp_path: Path) -> Callable[[Callable[[Path], None]], list[str]]:
    src, work, expect = golden

    def run(damage: Callable[[Path], None]) -> list[str]:
        path = tmp_path / "j"
        shutil.copytree(src, path)
        damage(path)
        return check_damaged(path, work, expect)

    return run


NOT_DAMAGE = {"rescanned_segments", "resumed_promotion"}  # routine, not a damage report


def _reported(report: object) -> bool:
    """Whether the reopen report says anything about damage (fields added by the issue 9
    fixes count as soon as they differ from their defaults)."""
    return any(getattr(report, f.name) != f.default for f in dataclasses.fields(report)
               if f.name not in NOT_DAMAGE)


def _read_all(journal: Journal, at: object) -> dict[int, bytes]:
    with journal.view(at) as view:
        return {vid: view.read(vid, 0, size) for vid, _, size in VOLUMES}


def check_damaged(path: Path, work: Workload, expect: Expect) -> list[str]:
    try:
        journal = Journal.open(path)
    except ZcoreError:
        return []  # refused, with a zcore.errors class
    except Exception as exc:
        return [f"open raised {type(exc).__name__} (not a zcore.errors class): {exc}"]
    bad = []
    try:
        journal.wait_loaded()
        report = journal.reopen_report
        if report.dropped_bytes:
            bad.append(f"{report.dropped_bytes} committed bytes dropped as a torn tail "
                       f"({report.reason})")
        clean = not _reported(report)
        listed = {c.seq: c for c in journal.checkpoints()}
        floor = max(journal.promoted_seq, expect.promote)
        missing = [s for s in work.checkpoints if floor <= s <= expect.acked and s not in listed]
        if missing and clean:
            bad.append(f"acknowledged checkpoints {missing} are gone and the reopen is clean")
        for seq, c in sorted(listed.items()):
            try:
                got = _read_all(journal, c)
            except ZcoreError:
                continue  # the damage is detected when read
            if got != work.model_at(seq) and clean:
                bad.append(f"checkpoint seq {seq} reads wrong bytes after a clean reopen")
    except ZcoreError:
        pass
    except Exception as exc:
        bad.append(f"{type(exc).__name__} (not a zcore.errors class): {exc}")
    finally:
        try:
            journal.close()
        except ZcoreError:
            pass
    return bad


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.zcj"))


def _records(seg: Path) -> np.ndarray:
    data = seg.read_bytes()
    sizes = np.zeros(max(v for v, _, _ in VOLUMES) + 1, dtype=np.uint64)
    for vid, _, size in VOLUMES:
        sizes[vid] = size
    return _rec.scan(data[64:], 64, int(seg.name[4:12]), 0, sizes).array()


def _flip(path: Path, at: int, bit: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ bit]))


# ---- controls: the oracle accepts what the journal handles ---------------------------------


def test_an_undamaged_journal_passes_the_damage_oracle(damaged) -> None:
    assert damaged(lambda path: None) == []


def test_a_flipped_bit_in_a_sealed_record_is_refused_or_reported(damaged) -> None:
    def damage(path: Path) -> None:
        seg = _segments(path)[-2]
        recs = _records(seg)
        raw = recs[recs["type"] == 1][-1]
        _flip(seg, int(raw["pos"]) + 64 + int(raw["stored"]) - 1)

    assert damaged(damage) == []


# ---- issue 9 findings ------------------------------------------------------------------


def test_a_missing_oldest_segment_is_reported(damaged) -> None:
    def damage(path: Path) -> None:
        seg = _segments(path)[0]
        seg.unlink()
        seg.with_suffix(".zci").unlink(missing_ok=True)

    assert damaged(damage) == []


def test_a_missing_newest_segment_is_reported(damaged) -> None:
    assert damaged(lambda path: _segments(path)[-1].unlink()) == []


def test_a_sealed_segment_truncated_at_a_record_boundary_is_reported(damaged) -> None:
    def damage(path: Path) -> None:
        seg = _segments(path)[-2]
        recs = _records(seg)
        cut = int(recs["pos"][len(recs) // 2])
        with open(seg, "r+b") as f:
            f.truncate(cut)

    assert damaged(damage) == []


def test_a_crc_valid_index_with_a_wrong_entry_seq_is_refused_or_reported(damaged) -> None:
    def damage(path: Path) -> None:
        zci = sorted(path.glob("seg-*.zci"))[1]  # a middle one: loaded in the background
        buf = bytearray(zci.read_bytes())
        ndata = struct.unpack_from("<I", buf, 48)[0]
        assert ndata > 0
        struct.pack_into("<Q", buf, 64 + 40 + 48 * (ndata // 2), 0)  # one entry: seq 0
        struct.pack_into("<I", buf, 56, _rec.crc32c(bytes(buf[64:])))
        struct.pack_into("<I", buf, 60, _rec.crc32c(bytes(buf[:60])))
        zci.write_bytes(bytes(buf))

    assert damaged(damage) == []


def _rewrite_meta(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads((path / "journal.meta").read_bytes())
    change(doc["meta"])
    doc["crc32c"] = _rec.crc32c(json.dumps(doc["meta"], sort_keys=True).encode())
    (path / "journal.meta").write_text(json.dumps(doc))


def test_a_crc_valid_meta_with_invalid_settings_is_refused(damaged, golden) -> None:
    src, _, _ = golden
    path = src.parent / "meta5"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(src, path)
    _rewrite_meta(path, lambda m: m["settings"].update(segment_bytes=5))
    with pytest.raises(ZcoreError):
        Journal.open(path).close()


def test_a_crc_valid_meta_with_a_wrongly_typed_field_raises_a_zcore_error(damaged) -> None:
    assert damaged(lambda path: _rewrite_meta(
        path, lambda m: m["volumes"][0].update(size="big"))) == []


def test_a_flipped_bit_inside_the_active_segment_is_not_a_torn_tail(damaged) -> None:
    def damage(path: Path) -> None:
        seg = _segments(path)[-1]
        recs = _records(seg)
        assert len(recs) >= 4
        mid = recs[len(recs) // 2]
        _flip(seg, int(mid["pos"]) + 64 + max(int(mid["stored"]) // 2, 0))

    assert damaged(damage) == []


def test_flipped_bits_in_a_replica_are_detected(damaged) -> None:
    def damage(path: Path) -> None:
        rng = random.Random(8)
        for vid, _, size in VOLUMES:
            replica = path / f"replica-{vid:04d}.img"
            for _ in range(64):
                _flip(replica, rng.randrange(size), 1 << rng.randrange(8))

    assert damaged(damage) == []


# ---- API misuse that must not make a journal unopenable ---------------------------------


def test_a_new_journal_is_not_in_history_error(tmp_path: Path) -> None:
    with create(tmp_path / "j") as journal:
        assert journal.status().history_state != "error"


def test_a_wide_item_memoryview_is_refused_or_journaled_whole(tmp_path: Path) -> None:
    path = tmp_path / "j"
    data = bytes(range(256)) * 16  # 4 KiB
    with create(path) as journal:
        try:
            journal.append([(1, 0, memoryview(data).cast("I"))])
            journal.commit()
            journal.checkpoint()
        except ZcoreError:
            return  # refused before anything was written: fine
    with Journal.open(path) as journal:
        with journal.view(journal.latest_checkpoint()) as view:
            assert view.read(1, 0, len(data)) == data
        journal.promote_to(journal.last_seq + 1)
