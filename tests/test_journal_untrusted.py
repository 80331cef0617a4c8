"""What a journal must not trust (issue 9, findings 5, 6, 12 and 16): index files that
pass their CRC but disagree with their records, journal.meta files crafted with a valid
CRC, write buffers whose items are wider than a byte, closed journals and ids or offsets
that are bools or floats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zcore import records
from zcore.errors import ClosedError, ConfigError, CorruptRecordError, ZcoreError
from zcore.fsutil import read_state, write_state
from zcore.journal import Journal, JournalSettings, VolumeSpec
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


# ---- 6: journal.meta crafted with a valid CRC -----------------------------------------------


def craft_meta(path: Path, change) -> None:
    """Rewrite journal.meta of the closed journal at `path` through `change(meta)`, with
    a valid CRC, as a crafted or buggy writer would."""
    meta = read_state(path / META_NAME, META_FORMAT, META_VERSION)
    change(meta)
    write_state(path / META_NAME, META_FORMAT, META_VERSION, meta)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(meta):
        obj = meta
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return change


CRAFTED = {
    "5-byte segments": _set("settings", "segment_bytes", 5),
    "float segment size": _set("settings", "segment_bytes", 1048576.0),
    "history of a minute": _set("settings", "history_seconds", 60),
    "history as text": _set("settings", "history_seconds", "86400"),
    "unknown setting": _set("settings", "colour", "blue"),
    "settings a list": _set("settings", []),
    "duplicate volume id": lambda m: m["volumes"].append(dict(m["volumes"][0], name="b")),
    "duplicate volume name": lambda m: m["volumes"].append(dict(m["volumes"][0], id=9)),
    "volume id 65536": _set("volumes", 0, "id", 65536),
    "volume id without a replica": _set("volumes", 0, "id", 1),
    "volume id True": _set("volumes", 0, "id", True),
    "volume size 1000": _set("volumes", 0, "size", 1000),
    "volume size -512": _set("volumes", 0, "size", -512),
    "volume name 7": _set("volumes", 0, "name", 7),
    "volume with extra key": _set("volumes", 0, "x", 1),
    "no volumes": _set("volumes", []),
    "volumes an object": _set("volumes", {}),
    "journal id short": _set("journal_id", "abcd"),
    "journal id a number": _set("journal_id", 12),
    "vm a list": _set("vm", ["vm"]),
    "promoted seq negative": _set("promoted_seq", -1),
    "promoted seq float": _set("promoted_seq", 3.0),
    "promoted seq missing": lambda m: m.pop("promoted_seq"),
    "created a string": _set("created_ns", "now"),
}


@pytest.fixture(scope="module")
def closed_journal(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "j"
    j = make(path, hard_limit_bytes=8 * MiB)
    j.append([(0, 0, b"m" * 4096)])
    j.checkpoint()
    j.close()
    return path


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_meta_with_valid_crc_is_refused_as_damage(closed_journal, tmp_path, name):
    path = tmp_path / "j"
    shutil.copytree(closed_journal, path)
    craft_meta(path, CRAFTED[name])
    with pytest.raises(CorruptRecordError):
        Journal.open(path)
    craft_meta(path, lambda m: m.clear() or m.update(
        read_state(closed_journal / META_NAME, META_FORMAT, META_VERSION)))
    Journal.open(path).close()  # the lock and descriptors were released


def test_journal_settings_check_refuses_wrong_types():
    for bad in (dict(segment_bytes=float(MiB)), dict(history_seconds=True),
                dict(group_commit_bytes=None), dict(hard_limit_bytes=8.0 * MiB),
                dict(warning_fraction=float("nan")), dict(history_seconds=float("inf"))):
        with pytest.raises(ConfigError):
            JournalSettings(**bad).check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
FIELDS = ["journal_id", "vm", "created_ns", "promoted_seq", "promote_target",
          "settings", "volumes", ("settings", "segment_bytes"), ("settings", "history_seconds"),
          ("settings", "hard_limit_bytes"), ("settings", "hard_limit_percent"),
          ("settings", "warning_fraction"), ("settings", "group_commit_bytes"),
          ("volumes", 0), ("volumes", 0, "id"), ("volumes", 0, "size"),
          ("volumes", 0, "name")]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS), JSON | st.just(KeyError)),
                        min_size=1, max_size=3))
def test_crafted_meta_with_valid_crc_opens_or_raises_a_zcore_error(closed_journal, tmp_path,
                                                                     changes):
    path = tmp_path / "j"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(closed_journal, path)

    def change(meta):
        for where, value in changes:
            keys = where if isinstance(where, tuple) else (where,)
            obj = meta
            for k in keys[:-1]:
                if isinstance(obj, dict) and k in obj:
                    obj = obj[k]
                elif isinstance(obj, list) and isinstance(k, int) and k < len(obj):
                    obj = obj[k]
                else:
                    obj = None
            if not isinstance(obj, (dict, list)) or (
                    isinstance(obj, list) and (not isinstance(keys[-1], int)
                                               or keys[-1] >= len(obj))):
                continue
            if value is KeyError:
                if isinstance(obj, dict):
                    obj.pop(keys[-1], None)
                else:
                    del obj[keys[-1]]
            else:
                obj[keys[-1]] = value
    craft_meta(path, change)
    try:
        j = Journal.open(path)
    except ZcoreError:
        return
    try:  # whatever opened must answer with data or a zcore error, nothing else
        j.status()
        for c in j.checkpoints():
            with j.view(c) as view:
                for v in j.volumes.values():
                    view.read(v.id, 0, 4096)
    except ZcoreError:
        pass
    finally:
        j.close()
