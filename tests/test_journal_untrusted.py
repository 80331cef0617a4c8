"""What a journal must not trust (issue 9, findings 5, 6, 12 and 16): index files that
pass their CRC but disagree with their records, journal.meta files crafted with a valid
CRC, write buffers whose items are wider than a byte, closed journals and ids or offsets
that are bools or floats."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zcore import records
from zcore._native import record as _rec
from zcore.errors import ClosedError, ConfigError, CorruptRecordError, ZcoreError
from zcore.fsutil import read_state, write_state
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.journal.indexfile import INDEX_CKPT, INDEX_HEADER, INDEX_STATS
from zcore.journal.meta import META_FORMAT, META_NAME, META_VERSION

KiB = 1 << 10
MiB = 1 << 20


def make(path: Path, sizes=(MiB,), **kw) -> Journal:
    kw.setdefault("segment_bytes", MiB)
    kw.setdefault("group_commit_bytes", 0)
    return Journal.create(path, [VolumeSpec(i, f"disk{i}", s) for i, s in enumerate(sizes)],
                          settings=JournalSettings(**kw))


# ---- 16: closed journals, bools and floats ------------------------------------------------


def test_closed_journal_refuses_catalogue_and_status_instead_of_stale_answers(tmp_path):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    c = j.checkpoint()
    j.close()
    for call in (j.checkpoints, j.latest_checkpoint, lambda: j.checkpoint_by_id(c.id),
                 j.status, j.segments):
        with pytest.raises(ClosedError):
            call()


@pytest.mark.parametrize("bad", [True, False, 0.0, 512.0])
def test_bool_or_float_volume_id_offset_or_seq_is_refused(tmp_path, bad):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    c = j.checkpoint()
    with pytest.raises(ConfigError):
        j.append([(bad, 0, b"b" * 512)])
    with pytest.raises(ConfigError):
        j.append([(0, bad, b"b" * 512)])
    with pytest.raises(ConfigError):
        j.read_at(bad, 0, 0, 512)
    with pytest.raises(ConfigError):
        j.read_at(c.seq, bad, 0, 512)
    with pytest.raises(ConfigError):
        j.read_at(c.seq, 0, bad, 512)
    with pytest.raises(ConfigError):
        j.checkpoint_by_id(bad)
    with j.view(c) as view:
        with pytest.raises(ConfigError):
            view.read(bad, 0, 512)
        with pytest.raises(ConfigError):
            view.read(0, bad, 512)
        with pytest.raises(ConfigError):
            view.read(0, 0, 512.0)
    assert j.last_seq == c.seq
    j.close()


# ---- 12: buffers whose items are wider than a byte ------------------------------------------


@pytest.mark.parametrize("fill", [b"\x5a", b"\x00"])
def test_wide_item_buffer_is_refused_before_anything_is_written(tmp_path, fill):
    j = make(tmp_path / "j")
    j.append([(0, 0, b"a" * 512)])
    last = j.last_seq
    wide = memoryview(bytearray(fill * 2048)).cast("I")  # 512 items of 4 bytes
    for data in (wide, np.frombuffer(bytes(fill * 2048), dtype=np.uint32)):
        with pytest.raises(ConfigError):
            j.append([(0, 4096, data)])
        with pytest.raises(ConfigError):
            records.encode_write(0, last + 1, 4096, data, 0)
    assert j.last_seq == last
    j.close()
    with Journal.open(tmp_path / "j") as j:  # nothing made it unopenable
        c = j.checkpoint()
        with j.view(c) as view:
            assert view.read(0, 0, 8192) == b"a" * 512 + bytes(7680)
        j.promote_to(c.seq)


def test_byte_buffers_of_every_kind_are_accepted_as_their_bytes(tmp_path):
    j = make(tmp_path / "j")
    data = bytes(range(256)) * 16
    j.append([(0, 0, memoryview(bytearray(data))),
              (0, 4096, np.frombuffer(data, dtype=np.uint8)),
              (0, 8192, memoryview(data).cast("B", (4, 1024)))])
    c = j.checkpoint()
    with j.view(c) as view:
        assert view.read(0, 0, 3 * 4096) == data * 3
    j.close()


def test_wide_item_buffer_is_refused_by_the_one_byte_view_check():
    view = records.byte_view(b"x" * 512)
    assert view.itemsize == 1 and len(view) == 512
    with pytest.raises(ConfigError):
        records.byte_view(memoryview(b"x" * 512).cast("H"))
    with pytest.raises(ConfigError):
        records.byte_view("text")
