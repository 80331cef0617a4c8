"""Golden fixtures: format v1 (tests/data/golden-v1, written by tests/data/make_golden.py),
journal format v2 (golden-v2) and segment v3 with zstd records (golden-v3).

A failure here means the bytes zcore writes or reads changed: that is a format change
(docs/format.md 2), which needs a version bump and a reader for version 1, never a
regenerated fixture.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import lz4.block
import numpy as np
import pytest

from zcore import records
from zcore._native import record as _rec
from zcore.fsutil import read_state
from zcore.journal import Journal, ReopenReport

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden-v1"
GOLDEN_INDEX_V2 = DATA / "golden-index-v2"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()
RECORDS_BIN = (GOLDEN / "records.bin").read_bytes()
RECORDS_JSON = json.loads((GOLDEN / "records.json").read_text())
JOURNAL_JSON = json.loads((GOLDEN / "journal.json").read_text())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frozen(entry: dict) -> bytes:
    return RECORDS_BIN[entry["pos"] : entry["pos"] + entry["size"]]


def test_golden_fixtures_stay_small():
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 200 * 1024


# ---- records ----------------------------------------------------------------------------


def test_golden_records_bin_is_one_valid_bundle():
    sizes = np.zeros(65536, dtype=np.uint64)
    sizes[[0, 1, 2, 3, 65535]] = 1 << 41
    batch = _rec.scan(RECORDS_BIN, 0, 1, 0, sizes)
    assert batch.status == 0 and batch.consumed == len(RECORDS_BIN)
    exts = batch.array()
    assert len(exts) == len(RECORDS_JSON)
    for ext, entry in zip(exts, RECORDS_JSON, strict=True):
        for field in ("type", "flags", "volume", "seq", "offset", "length", "stored"):
            assert int(ext[field]) == entry[field], (entry["name"], field)
        assert int(ext["pos"]) == entry["pos"]
    kinds = {(e["type"], e["flags"]) for e in RECORDS_JSON}
    assert kinds == {
        (records.REC_WRITE, records.FLAG_BLOCKCRC), (records.REC_SYNC, records.FLAG_BLOCKCRC),
        (records.REC_WRITE, records.FLAG_LZ4), (records.REC_SYNC, records.FLAG_LZ4),
        (records.REC_ZERO, 0), (records.REC_CHECKPOINT, 0),
    }


def test_encoding_the_golden_inputs_today_yields_records_bin():
    inputs = list(maker.record_inputs())
    assert len(inputs) == len(RECORDS_JSON)
    for spec, entry in zip(inputs, RECORDS_JSON, strict=True):
        assert spec["name"] == entry["name"]
        rec = frozen(entry)
        if spec["data"] is not None:  # the seeded generator still makes the same inputs
            assert sha(spec["data"]) == entry["data_sha256"], entry["name"]
        assert records.record_time(rec, 0) == spec["time_ns"] == entry["time_ns"]
        if entry["flags"] & records.FLAG_LZ4:
            # LZ4's output may change with the library: check what the block decodes to,
            # and that the codec frames the frozen block into exactly the frozen record
            block = rec[64 : 64 + entry["stored"]]
            assert lz4.block.decompress(block, uncompressed_size=entry["length"]) == spec["data"]
            again = _rec.encode_stored(entry["type"], entry["flags"], entry["volume"],
                                       entry["seq"], entry["offset"], entry["length"],
                                       entry["time_ns"], block)
            assert again == rec, entry["name"]
            today = maker.encode(spec)
            head, _ = _rec.parse_header(today[:64])
            assert head["flags"] == records.FLAG_LZ4 and head["type"] == entry["type"]
            assert lz4.block.decompress(today[64 : 64 + head["stored"]],
                                        uncompressed_size=head["length"]) == spec["data"]
        else:
            assert maker.encode(spec) == rec, entry["name"]


def test_golden_records_decode_to_their_inputs():
    for spec, entry in zip(maker.record_inputs(), RECORDS_JSON, strict=True):
        rec = frozen(entry)
        _rec.verify_payload(rec[:64], rec[64:])
        payload = rec[64 : 64 + entry["stored"]]
        if entry["type"] == records.REC_CHECKPOINT:
            kind, consistent, tag = spec["checkpoint"]
            marker = records.decode_checkpoint_payload(payload)
            assert (marker.kind, marker.consistent, marker.tag) == (kind, consistent, tag)
        elif entry["type"] == records.REC_ZERO:
            assert entry["stored"] == 0 and entry["size"] == 64
            assert spec["data"] == bytes(entry["length"])
        elif entry["flags"] & records.FLAG_BLOCKCRC:
            table = _rec.blockcrc_table_size(entry["length"])
            assert payload[table:] == spec["data"]
        assert rec[64 + entry["stored"] :] == bytes(entry["size"] - 64 - entry["stored"])


def _hex(rows: str) -> bytes:
    return bytes.fromhex("".join(line.split("  ")[1] for line in rows.strip().splitlines()))


def test_format_spec_test_vectors_match_the_codec():
    """docs/format.md 4.9 prints two records; the codec must produce exactly those."""
    ckpt = records.encode_checkpoint(7, 1_700_000_000_000_000_000, records.CKPT_TAGGED, True,
                                     "nightly")
    assert ckpt[:80] == _hex("""
0000  03 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00
0010  00 00 00 00 00 00 00 00 0b 00 00 00 0b 00 00 00
0020  00 00 2a 36 fe 9c 97 17 48 12 34 69 00 00 00 00
0030  00 00 00 00 00 00 00 00 00 00 00 00 11 a4 40 34
0040  02 01 07 00 6e 69 67 68 74 6c 79 00 00 00 00 00
""")
    assert len(ckpt) == 128 and ckpt[80:] == bytes(48)
    raw = _rec.encode_raw(3, 5, 4096, bytes(range(256)) * 2, 1_700_000_000_000_000_001)
    assert len(raw) == 640
    assert raw[:72] == _hex("""
0000  01 00 02 00 03 00 00 00 05 00 00 00 00 00 00 00
0010  00 10 00 00 00 00 00 00 00 02 00 00 40 02 00 00
0020  01 00 2a 36 fe 9c 97 17 f9 d7 08 e6 00 00 00 00
0030  00 00 00 00 00 00 00 00 00 00 00 00 48 f2 53 40
0040  5a ee 10 ae 00 00 00 00
""")
    assert raw[72:128] == bytes(56) and raw[128:] == bytes(range(256)) * 2
    assert _rec.crc32c(b"123456789") == 0xE3069283
    assert _rec.crc32c(b"") == 0


# ---- the journal directory --------------------------------------------------------------


@pytest.fixture
def golden_journal(tmp_path) -> Path:
    path = tmp_path / "journal"
    shutil.copytree(GOLDEN / "journal", path)
    return path


def check_contents(journal: Journal) -> None:
    expect = JOURNAL_JSON["checkpoints"]
    got = journal.checkpoints()
    assert [c.id for c in got] == [int(s) for s in expect]
    for c in got:
        e = expect[str(c.seq)]
        assert (c.time_ns, c.kind, c.tag, c.consistent) == (
            e["time_ns"], e["kind"], e["tag"], e["consistent"])
        with journal.view(c) as view:
            for v in JOURNAL_JSON["volumes"]:
                image = view.read(v["name"], 0, v["size"])
                assert sha(image) == e["sha256"][str(v["id"])], (c.seq, v["name"])


def test_golden_journal_opens_and_reads_back(golden_journal):
    journal = Journal.open(golden_journal)
    assert journal.reopen_report == ReopenReport()  # nothing torn, no index rebuilt
    assert journal.journal_id == maker.JOURNAL_ID.bytes
    assert journal.vm == "golden-vm"
    assert [(v.id, v.name, v.size) for v in journal.volumes.values()] == [
        (v["id"], v["name"], v["size"]) for v in JOURNAL_JSON["volumes"]]
    assert journal.last_seq == journal.durable_seq == JOURNAL_JSON["last_seq"]
    assert journal.promoted_seq == JOURNAL_JSON["promoted_seq"]
    check_contents(journal)
    journal.close()
    # reading changed nothing on disk but the in-place upgrade to journal format v2
    # (docs/format.md 7.7): a manifest of the segments as found, then journal.meta v2
    for f in (GOLDEN / "journal").iterdir():
        if f.name != "journal.meta":
            assert (golden_journal / f.name).read_bytes() == f.read_bytes(), f.name
    old, new = (read_state(p / "journal.meta", "zcore-journal", (1, 2))
                for p in (GOLDEN / "journal", golden_journal))
    assert old["version"] == 1 and new == {**old, "version": 2}
    manifest = read_state(golden_journal / "journal.manifest", "zcore-journal-manifest", 1)
    segs = sorted(golden_journal.glob("seg-*.zcj"))
    assert manifest["active"] == int(segs[-1].name[4:12])
    assert [n for n, _, _ in manifest["sealed"]] == [int(p.name[4:12]) for p in segs[:-1]]
    assert manifest["damaged"] == []


def test_golden_v1_upgrade_interrupted_before_its_meta_is_redone(golden_journal):
    """A crash between the upgrade's manifest and its journal.meta leaves a v1 meta
    beside a manifest: the next open upgrades again, and the journal reads back."""
    journal = Journal.open(golden_journal)
    journal.close()
    shutil.copy(GOLDEN / "journal" / "journal.meta", golden_journal / "journal.meta")
    journal = Journal.open(golden_journal)
    assert journal.reopen_report == ReopenReport()
    check_contents(journal)
    journal.close()
    meta = read_state(golden_journal / "journal.meta", "zcore-journal", (1, 2))
    assert meta["version"] == 2


def test_golden_journal_reads_back_without_its_index_files(golden_journal):
    zcis = sorted(golden_journal.glob("seg-*.zci"))
    for z in zcis:
        z.unlink()
    journal = Journal.open(golden_journal)
    assert journal.reopen_report.rescanned_segments == len(zcis)
    check_contents(journal)
    journal.close()
    for z in zcis:  # rebuilt byte for byte in the current index format (v2)
        assert z.read_bytes() == (GOLDEN_INDEX_V2 / z.name).read_bytes(), z.name


def test_golden_journal_reads_back_through_v2_index_files(golden_journal):
    for z in GOLDEN_INDEX_V2.glob("seg-*.zci"):
        shutil.copy(z, golden_journal / z.name)
    journal = Journal.open(golden_journal)
    assert journal.reopen_report.rescanned_segments == 0
    check_contents(journal)
    journal.close()


def test_golden_v1_index_files_are_still_read(golden_journal):
    journal = Journal.open(golden_journal)  # the v1 fixtures hold v1 index files
    assert journal.reopen_report.rescanned_segments == 0
    check_contents(journal)
    journal.close()


def test_golden_journal_accepts_new_records_and_promotion(golden_journal):
    journal = Journal.open(golden_journal)
    journal.append([("disk0", 0, b"\xaa" * 4096)])
    c = journal.checkpoint("after golden")
    newest = max(int(s) for s in JOURNAL_JSON["checkpoints"])
    journal.promote_to(newest)
    journal.close()
    journal = Journal.open(golden_journal)
    assert journal.checkpoints()[-1] == c
    with journal.view(newest) as view:
        image = view.read(0, 0, 32 * 1024)
        assert sha(image) == JOURNAL_JSON["checkpoints"][str(newest)]["sha256"]["0"]
    with journal.view(c) as view:
        assert view.read(0, 0, 4096) == b"\xaa" * 4096
        assert view.read(0, 4096, 32 * 1024 - 4096) == image[4096:]
    journal.close()


# ---- journal format v2 (tests/data/golden-v2, written by tests/data/make_golden_v2.py) --

GOLDEN_V2 = DATA / "golden-v2"
JOURNAL_V2_JSON = json.loads((GOLDEN_V2 / "journal.json").read_text())


def test_golden_v2_journal_opens_clean_reads_back_and_changes_nothing(tmp_path):
    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V2 / "journal", path)
    journal = Journal.open(path)
    assert journal.reopen_report == ReopenReport()
    assert journal.last_seq == journal.durable_seq == JOURNAL_V2_JSON["last_seq"]
    assert journal.promoted_seq == JOURNAL_V2_JSON["promoted_seq"]
    expect = JOURNAL_V2_JSON["checkpoints"]
    assert [c.seq for c in journal.checkpoints()] == [int(s) for s in expect]
    for c in journal.checkpoints():
        with journal.view(c) as view:
            for v in JOURNAL_V2_JSON["volumes"]:
                image = view.read(v["id"], 0, v["size"])
                assert sha(image) == expect[str(c.seq)]["sha256"][str(v["id"])]
    journal.close()
    for f in (GOLDEN_V2 / "journal").iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes(), f.name


def test_golden_v2_files_are_what_format_md_says(tmp_path):
    src = GOLDEN_V2 / "journal"
    assert read_state(src / "journal.meta", "zcore-journal", 2)["version"] == 2
    manifest = read_state(src / "journal.manifest", "zcore-journal-manifest", 1)
    segs = sorted(src.glob("seg-*.zcj"))
    assert manifest["active"] == int(segs[-1].name[4:12])
    for (number, length, last), seg in zip(manifest["sealed"], segs[:-1], strict=True):
        assert number == int(seg.name[4:12]) and length == seg.stat().st_size
        data = seg.read_bytes()
        sizes = np.full(4, 1 << 20, dtype=np.uint64)
        assert int(_rec.scan(data[64:], 64, number, 0, sizes).array()["seq"][-1]) == last
    for seg in segs:
        head = seg.read_bytes()[:64]
        assert struct.unpack_from("<I", head, 8)[0] == 2
        assert struct.unpack_from("<I", head, 60)[0] == _rec.crc32c(head[:48])
    active = segs[-1].read_bytes()
    units, _seq_low, crc = struct.unpack_from("<III", active, 48)
    assert units * 64 == len(active) and crc == _rec.crc32c(active[:56])


# ---- segment v3, wire protocol v2: zstd records (tests/data/golden-v3, written by
# tests/data/make_golden_v3.py) -----------------------------------------------------------

GOLDEN_V3 = DATA / "golden-v3"
RECORDS_V3_BIN = (GOLDEN_V3 / "records.bin").read_bytes()
RECORDS_V3_JSON = json.loads((GOLDEN_V3 / "records.json").read_text())
JOURNAL_V3_JSON = json.loads((GOLDEN_V3 / "journal.json").read_text())


def _load_v3_maker():
    spec = importlib.util.spec_from_file_location("make_golden_v3", DATA / "make_golden_v3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _v3_sizes() -> np.ndarray:
    sizes = np.zeros(65536, dtype=np.uint64)
    sizes[[0, 1, 2, 3, 65535]] = 1 << 41
    return sizes


def test_golden_v3_records_bin_is_one_valid_bundle_of_the_new_version_only():
    batch = _rec.scan(RECORDS_V3_BIN, 0, 1, 0, _v3_sizes())
    assert batch.status == 0 and batch.consumed == len(RECORDS_V3_BIN)
    exts = batch.array()
    for ext, entry in zip(exts, RECORDS_V3_JSON, strict=True):
        for field in ("type", "flags", "volume", "seq", "offset", "length", "stored"):
            assert int(ext[field]) == entry[field], (entry["name"], field)
    kinds = {(e["type"], e["flags"]) for e in RECORDS_V3_JSON}
    assert {(records.REC_WRITE, records.FLAG_ZSTD), (records.REC_SYNC, records.FLAG_ZSTD)} <= kinds
    # a v1-v2 segment, or a wire protocol v1 peer, refuses the first zstd record
    first = next(e for e in RECORDS_V3_JSON if e["flags"] == records.FLAG_ZSTD)
    old = _rec.scan(RECORDS_V3_BIN, 0, 1, 0, _v3_sizes(), records.FLAGS_V2)
    assert old.status == -4 and old.consumed == first["pos"]


def test_golden_v3_records_decode_to_their_inputs_through_the_one_decoder():
    v3 = _load_v3_maker()
    inputs = list(v3.record_inputs())
    for spec, entry in zip(inputs, RECORDS_V3_JSON, strict=True):
        assert spec["name"] == entry["name"]
        rec = RECORDS_V3_BIN[entry["pos"] : entry["pos"] + entry["size"]]
        if spec["data"] is not None:
            assert sha(spec["data"]) == entry["data_sha256"]
        if entry["flags"] & records.FLAGS_COMPRESSED:
            _rec.verify_payload(rec[:64], rec[64:])
            got = records.decode_payload(entry["flags"], rec[64 : 64 + entry["stored"]],
                                         entry["length"], entry["name"])
            assert got == spec["data"], entry["name"]
            if entry["flags"] == records.FLAG_ZSTD:
                # zstd's output may change with the library: the codec frames the frozen
                # frame into exactly the frozen record, and today's encoding decodes too
                frame = rec[64 : 64 + entry["stored"]]
                again = _rec.encode_stored(entry["type"], entry["flags"], entry["volume"],
                                           entry["seq"], entry["offset"], entry["length"],
                                           entry["time_ns"], frame)
                assert again == rec
                today = v3.encode(spec)
                head, _ = _rec.parse_header(today[:64])
                assert head["flags"] == records.FLAG_ZSTD
                assert records.decode_payload(head["flags"], today[64 : 64 + head["stored"]],
                                              head["length"], "today") == spec["data"]
        elif spec["kind"] != "checkpoint" and entry["type"] != records.REC_ZERO:
            assert v3.encode(spec) == rec, entry["name"]


def test_golden_v3_journal_opens_clean_reads_back_and_changes_nothing(tmp_path):
    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V3 / "journal", path)
    journal = Journal.open(path)
    assert journal.reopen_report == ReopenReport()
    assert journal.last_seq == journal.durable_seq == JOURNAL_V3_JSON["last_seq"]
    expect = JOURNAL_V3_JSON["checkpoints"]
    assert [c.seq for c in journal.checkpoints()] == [int(s) for s in expect]
    for c in journal.checkpoints():
        with journal.view(c) as view:
            for v in JOURNAL_V3_JSON["volumes"]:
                image = view.read(v["id"], 0, v["size"])
                assert sha(image) == expect[str(c.seq)]["sha256"][str(v["id"])]
    journal.close()
    for f in (GOLDEN_V3 / "journal").iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes(), f.name
    for seg in path.glob("seg-*.zcj"):
        assert struct.unpack_from("<I", seg.read_bytes(), 8)[0] == 3


def test_golden_v3_journal_promotes_its_zstd_records_into_the_replicas(tmp_path):
    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V3 / "journal", path)
    newest = max(int(s) for s in JOURNAL_V3_JSON["checkpoints"])
    journal = Journal.open(path)
    journal.promote_to(newest)
    assert journal.promoted_seq == newest
    journal.close()
    want = JOURNAL_V3_JSON["checkpoints"][str(newest)]["sha256"]
    for v in JOURNAL_V3_JSON["volumes"]:
        image = (path / f"replica-{v['id']:04d}.img").read_bytes()
        image += bytes(v["size"] - len(image))
        assert sha(image) == want[str(v["id"])]


def test_v2_journal_takes_zstd_records_into_a_new_v3_segment(tmp_path):
    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V2 / "journal", path)
    journal = Journal.open(path)
    active = journal.segments()[-1].number
    data = (b"zcore golden v3 " * 256)
    rec = records.encode_write(0, journal.last_seq + 1, 0, data, 1, zstd_level=3)
    assert _rec.parse_header(rec[:64])[0]["flags"] == records.FLAG_ZSTD
    journal.append_encoded(rec)
    c = journal.checkpoint("after zstd")
    segs = journal.segments()
    journal.close()
    assert segs[-1].number == active + 1  # the v2 segment was sealed, not given zstd
    heads = {s.number: struct.unpack_from("<I", s.path.read_bytes(), 8)[0] for s in segs}
    assert heads[active] == 2 and heads[active + 1] == 3
    journal = Journal.open(path)
    assert journal.reopen_report == ReopenReport()
    with journal.view(c) as view:
        assert view.read(0, 0, len(data)) == data
    journal.close()


def test_zstd_record_in_a_v2_segment_is_refused_as_damage(tmp_path):
    """A committed zstd record in a v2 segment was written by no zcore: reopening
    reports it as damage and never serves it."""
    from zcore.journal import segments

    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V2 / "journal", path)
    seg = sorted(path.glob("seg-*.zcj"))[-1]
    last = JOURNAL_V2_JSON["last_seq"]
    data = (b"zstd " * 1000)[:4096]
    rec = records.encode_write(0, last + 1, 0, data, 1, zstd_level=3)
    with open(seg, "r+b") as f:
        head = f.read(64)
        end = f.seek(0, 2) + len(rec)
        f.write(rec)
        f.seek(48)
        f.write(segments.pack_mark(head[:48], end, last + 1))  # committed: not a torn tail
    journal = Journal.open(path)
    report = journal.reopen_report
    assert report.damaged_seqs == ((last + 1, last + 1),) and report.dropped_bytes == 0
    assert "malformed record" in report.damage[0]
    journal.close()


def test_a_v2_segment_whose_index_lists_zstd_records_is_rescanned_and_reported(tmp_path):
    """golden-v3 with one sealed segment's header turned into a v2 header (CRCs fixed
    up): its .zci still lists the zstd records, so the index is not trusted; the rescan
    reports them as damage instead of serving them."""
    from zcore.journal import segments

    path = tmp_path / "journal"
    shutil.copytree(GOLDEN_V3 / "journal", path)
    sizes = np.full(4, 1 << 20, dtype=np.uint64)
    for seg in sorted(path.glob("seg-*.zcj"))[:-1]:
        data = bytearray(seg.read_bytes())
        exts = _rec.scan(bytes(data[64:]), 64, 0, 0, sizes).array()
        if np.any(exts["flags"] == records.FLAG_ZSTD):
            break
    zstd_seqs = [int(e["seq"]) for e in exts if e["flags"] == records.FLAG_ZSTD]
    struct.pack_into("<I", data, 8, 2)
    struct.pack_into("<I", data, 60, _rec.crc32c(bytes(data[:48])))
    mark = segments.read_mark(bytes(data[:64]))
    if mark is not None:
        data[48:60] = segments.pack_mark(bytes(data[:48]), mark[0], mark[1])
    seg.write_bytes(bytes(data))
    journal = Journal.open(path)
    journal.wait_loaded()
    report = journal.reopen_report
    assert report.rescanned_segments >= 1
    damaged = {lo for lo, _hi in report.damaged_seqs}
    assert set(zstd_seqs) <= damaged, (zstd_seqs, report)
    journal.close()


def test_make_golden_v3_reproduces_the_fixture(tmp_path):
    _load_v3_maker().main(["", str(tmp_path / "out")])
    for name in ("records.bin", "records.json", "journal.json"):
        assert (tmp_path / "out" / name).read_bytes() == (GOLDEN_V3 / name).read_bytes()
    for f in (GOLDEN_V3 / "journal").iterdir():
        assert (tmp_path / "out" / "journal" / f.name).read_bytes() == f.read_bytes(), f.name
