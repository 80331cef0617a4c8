"""What a journal must not trust (issue 9, findings 5, 6, 12 and 16): index files that
pass their CRC but disagree with their records, journal.meta files crafted with a valid
CRC, write buffers whose items are wider than a byte, closed journals and ids or offsets
that are bools or floats."""

from __future__ import annotations

import random
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


# ---- 5: index files that pass their CRC but disagree with their records --------------------


class IndexFile:
    """A v2 segment index file taken apart, to be changed and written back with valid
    checksums (as a buggy writer or a crafted file would)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = path.read_bytes()
        self.head = list(INDEX_HEADER.unpack(data[:64]))
        body = data[64:]
        self.stats = list(INDEX_STATS.unpack_from(body))
        count, ckpt_bytes = self.head[6], self.head[7]
        esize = records.EXTENT_DTYPE.itemsize
        at = INDEX_STATS.size
        self.extents = np.frombuffer(body[at : at + count * esize],
                                     dtype=records.EXTENT_DTYPE).copy()
        blob = body[at + count * esize :]
        assert len(blob) == ckpt_bytes
        self.checkpoints = []  # [seq, pos, time_ns, payload]
        at = 0
        while at < len(blob):
            seq, pos, t, stored, _ = INDEX_CKPT.unpack_from(blob, at)
            at += INDEX_CKPT.size
            self.checkpoints.append([seq, pos, t, blob[at : at + stored]])
            at += stored

    def write(self) -> None:
        blob = b"".join(INDEX_CKPT.pack(seq, pos, t, len(p), 0) + p
                        for seq, pos, t, p in self.checkpoints)
        body = INDEX_STATS.pack(*self.stats) + self.extents.tobytes() + blob
        head = self.head
        head[6], head[7], head[8] = len(self.extents), len(blob), _rec.crc32c(body)
        packed = INDEX_HEADER.pack(*head[:9], 0)
        self.path.write_bytes(packed[:60] + struct.pack("<I", _rec.crc32c(packed[:60]))
                              + body)


@pytest.fixture(scope="module")
def sealed_journal(tmp_path_factory):
    """A journal of three or more sealed segments with index files and an active one;
    raw, LZ4 and zero writes, a checkpoint after each few writes; returns the path and
    the image of the volume at each checkpoint."""
    path = tmp_path_factory.mktemp("idx") / "j"
    rng = random.Random(5)
    j = make(path, sizes=(2 * MiB,))
    model = bytearray(2 * MiB)
    images = {}
    n = 0
    while len(list(path.glob("seg-*.zci"))) < 3 or n < 200:
        n += 1
        offset = rng.randrange(2 * MiB // (16 * KiB)) * 16 * KiB
        kind = n % 5
        data = (bytes(16 * KiB) if kind == 0 else rng.randbytes(64) * 256 if kind == 1
                else rng.randbytes(16 * KiB))
        j.append([(0, offset, data)])
        model[offset : offset + len(data)] = data
        if n % 4 == 0:
            images[j.checkpoint().seq] = bytes(model)
    j.close()
    return path, images


def check_views(path: Path, images: dict[int, bytes]) -> Journal:
    """Reopen and compare every view with its image; returns the open journal."""
    j = Journal.open(path)
    assert sorted(c.seq for c in j.checkpoints()) == sorted(images)
    for seq, image in images.items():
        with j.view(seq) as view:
            assert view.read(0, 0, len(image)) == image, f"checkpoint {seq}"
    return j


def damaged_copy(sealed_journal, tmp_path, which: int, foreground: bool):
    src, images = sealed_journal
    path = tmp_path / "j"
    shutil.copytree(src, path)
    zcis = sorted(path.glob("seg-*.zci"))
    if foreground:  # the newest sealed segment cannot vouch: everything loads in open()
        zcis[-1].unlink()
        zcis = zcis[:-1]
    return path, images, IndexFile(zcis[which])


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("change", ["seq 0", "seq past the range", "seq of a neighbour",
                                    "one entry dropped"])
def test_index_entry_seq_outside_its_own_range_is_rescanned_not_trusted(
        sealed_journal, tmp_path, foreground, change):
    path, images, idx = damaged_copy(sealed_journal, tmp_path, 0, foreground)
    # an entry alone at its offset, so that the changed seq keeps the file's sort order
    offsets, counts = np.unique(idx.extents["offset"], return_counts=True)
    alone = np.flatnonzero(np.isin(idx.extents["offset"], offsets[counts == 1]))
    i = int(alone[len(alone) // 2])
    if change == "seq 0":
        idx.extents["seq"][i] = 0
    elif change == "seq past the range":
        idx.extents["seq"][i] = idx.stats[3] + 1000
    elif change == "seq of a neighbour":
        idx.extents["seq"][i] = idx.extents["seq"][(i + 1) % len(idx.extents)]
    else:
        idx.extents = np.delete(idx.extents, i)
    idx.write()
    with check_views(path, images) as j:
        assert j.reopen_report.rescanned_segments >= 1


@pytest.mark.parametrize("change", ["tag", "time", "seq of a write", "kind"])
def test_crafted_checkpoint_table_makes_no_phantom_checkpoint(sealed_journal, tmp_path,
                                                              change):
    path, images, idx = damaged_copy(sealed_journal, tmp_path, 1, False)
    entry = idx.checkpoints[0]
    if change == "tag":
        entry[3] = records.checkpoint_payload(records.CKPT_TAGGED, True, "phantom")
    elif change == "time":
        entry[2] -= 3600 * 10**9
    elif change == "kind":
        entry[3] = records.checkpoint_payload(records.CKPT_AUTO, False, None)
    else:  # the checkpoint moves onto a write's seq, the write onto the checkpoint's
        i = int(np.flatnonzero(idx.extents["seq"] < entry[0])[-1])
        idx.extents["seq"][i], entry[0] = entry[0], int(idx.extents["seq"][i])
        order = np.lexsort((idx.extents["seq"], idx.extents["offset"], idx.extents["volume"]))
        idx.extents = idx.extents[order]
    idx.write()
    with check_views(path, images) as j:
        assert all(c.tag is None and c.consistent for c in j.checkpoints())
        assert j.reopen_report.rescanned_segments == 1


def _swap(idx: IndexFile, kind) -> None:
    """Make two same-sized data entries of `kind` name each other's records."""
    ext = idx.extents
    pick = np.flatnonzero(kind(ext))
    by_size: dict[int, list[int]] = {}
    for i in pick:
        by_size.setdefault(int(ext["stored"][i]), []).append(int(i))
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    ext["pos"][a], ext["pos"][b] = ext["pos"][b], ext["pos"][a]


KINDS = {
    "raw": lambda e: (e["flags"] & records.FLAG_BLOCKCRC) != 0,
    "lz4": lambda e: (e["flags"] & records.FLAG_LZ4) != 0,
}


@pytest.mark.parametrize("kind", ["raw", "lz4", "raw as zero", "lz4 as zero"])
def test_index_entry_naming_another_record_is_refused_on_read(sealed_journal, tmp_path, kind):
    path, images, idx = damaged_copy(sealed_journal, tmp_path, 0, False)
    if kind.endswith(" as zero"):  # the entry of a write claims a zero record
        i = int(np.flatnonzero(KINDS[kind.split()[0]](idx.extents))[0])
        idx.extents["type"][i] = records.REC_ZERO
        idx.extents["flags"][i] = 0
        idx.extents["stored"][i] = 0
    else:
        _swap(idx, KINDS[kind])
    idx.write()
    wrong = 0
    with Journal.open(path) as j:
        for seq, image in images.items():
            with j.view(seq) as view:
                for at in range(0, len(image), 16 * KiB):
                    try:
                        got = view.read(0, at, 16 * KiB)
                    except CorruptRecordError:
                        continue
                    wrong += got != image[at : at + 16 * KiB]
    assert wrong == 0


def test_wide_item_buffer_is_refused_by_nbd_files_and_scratch_overlays(tmp_path):
    from zcore.nbd.exports import FileBackend
    from zcore.recovery import ScratchOverlay

    wide = memoryview(bytearray(b"w" * 4096)).cast("I")
    backend = FileBackend(tmp_path / "img", size=MiB)
    with pytest.raises(ConfigError):
        backend.write(0, wide)
    buf = bytearray(4096)
    backend.read_into(0, buf)
    assert buf == bytes(4096)
    backend.close()
    j = make(tmp_path / "j")
    scratch = ScratchOverlay.open(j, j.checkpoint(), 0)
    with pytest.raises(ConfigError):
        scratch.write(0, wide)
    assert scratch.read(0, 4096) == bytes(4096)
    scratch.close()
    j.close()
