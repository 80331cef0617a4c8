"""Sparse-aware NBD: base:allocation metadata contexts and NBD_CMD_BLOCK_STATUS on every
export kind, TRIM and fast zero on protected volumes (zero records in the stream, holes
punched in the backing file and, at promotion, in the replica), and NBD_FLAG_CAN_MULTI_CONN
(a FLUSH on one connection covers the writes another connection completed).  Driven by
the raw client (helpers.nbd.RawClient) and by real clients: nbdinfo --map, qemu-img map,
qemu-io discard."""

from __future__ import annotations

import json
import os
import struct

import pytest
from conftest import require_tool
from helpers.nbd import MiB, Protected, RawClient, run, serving

from zcore import nbd
from zcore.fsutil import STATE_HOLE, STATE_ZERO, data_ranges, punch_hole
from zcore.journal import Journal, VolumeSpec
from zcore.recovery import DurableOverlay

HZ = STATE_HOLE | STATE_ZERO
SIZE = 16 * MiB
KiB = 1 << 10


def sparse_file(path, size=SIZE, data=((1 * MiB, 1 * MiB), (8 * MiB, 2 * MiB))):
    """A file of `size` bytes, holes but for the (offset, length) `data` ranges."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def runs_of(extents, offset=0):
    """[(length, state)] as [(start, length, state)]."""
    out = []
    for length, state in extents:
        out.append((offset, length, state))
        offset += length
    return out


def nbdinfo_map(uri) -> list[tuple[int, int, int]]:
    nbdinfo = require_tool("nbdinfo")
    doc = json.loads(run([nbdinfo, "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in doc]


def holes_of(runs) -> list[tuple[int, int]]:
    return [(s, n) for s, n, state in runs if state & STATE_HOLE]


# ---- the file layer ------------------------------------------------------------------------


def test_data_ranges_and_punch_hole_on_a_sparse_file(tmp_path):
    path = sparse_file(tmp_path / "f.img")
    fd = os.open(path, os.O_RDWR)
    try:
        assert data_ranges(fd, 0, SIZE) == [(1 * MiB, 1 * MiB), (8 * MiB, 2 * MiB)]
        assert data_ranges(fd, 1 * MiB + 4096, 4096) == [(1 * MiB + 4096, 4096)]
        assert data_ranges(fd, 0, 1 * MiB) == []
        before = os.fstat(fd).st_blocks
        punch_hole(fd, 8 * MiB, 1 * MiB)
        assert os.fstat(fd).st_blocks * 512 <= before * 512 - 1 * MiB
        assert os.fstat(fd).st_size == SIZE  # KEEP_SIZE
        assert os.pread(fd, 1 * MiB, 8 * MiB) == bytes(1 * MiB)
        assert data_ranges(fd, 0, SIZE) == [(1 * MiB, 1 * MiB), (9 * MiB, 1 * MiB)]
        with pytest.raises(ValueError):
            punch_hole(fd, -1, 10)
    finally:
        os.close(fd)


# ---- negotiation ---------------------------------------------------------------------------


def test_meta_contexts_are_listed_set_and_tied_to_the_export(tmp_path):
    a, b = sparse_file(tmp_path / "a.img"), sparse_file(tmp_path / "b.img")
    with serving([nbd.file_export(a, "a"), nbd.file_export(b, "b")], tmp_path) as srv:
        with RawClient(srv.address) as c:
            c.hello()
            # LIST with no query lists what there is; works without structured replies
            got = c.meta_context(nbd.OPT_LIST_META_CONTEXT, "a", [])
            assert got == [(nbd.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
                           (nbd.REP_ACK, b"")]
            assert c.meta_context(nbd.OPT_LIST_META_CONTEXT, "a", ["qemu:dirty-bitmap:x"]) \
                == [(nbd.REP_ACK, b"")]
            # SET needs structured replies; an unknown export is refused
            assert c.meta_context(nbd.OPT_SET_META_CONTEXT, "a", ["base:allocation"])[0][0] \
                == nbd.REP_ERR_INVALID
            c.option(nbd.OPT_STRUCTURED_REPLY)
            assert c.opt_reply()[1] == nbd.REP_ACK
            c.structured = True
            assert c.meta_context(nbd.OPT_SET_META_CONTEXT, "nope", ["base:allocation"])[0][0] \
                == nbd.REP_ERR_UNKNOWN
            # selected for "a", then GO to "b": the selection does not carry over
            assert len(c.meta_context(nbd.OPT_SET_META_CONTEXT, "a", ["base:allocation"])) == 2
            assert "error" not in c.go("b")
            assert c.block_status(0, 4096)[0] == nbd.EINVAL
            assert c.read(0, 512)[0] == 0
        with RawClient(srv.address) as c:
            c.connect_export("b", allocation=True)
            assert c.block_status(0, SIZE) == (0, [(1 * MiB, HZ), (1 * MiB, 0), (6 * MiB, HZ),
                                                  (2 * MiB, 0), (6 * MiB, HZ)])


def test_malformed_meta_context_options_are_refused_and_the_handshake_goes_on(tmp_path):
    path = sparse_file(tmp_path / "a.img")
    with serving([nbd.file_export(path, "a")], tmp_path) as srv, RawClient(srv.address) as c:
        c.hello()
        c.option(nbd.OPT_STRUCTURED_REPLY)
        assert c.opt_reply()[1] == nbd.REP_ACK
        c.structured = True
        bad = [
            struct.pack(">I", 1) + b"a" + struct.pack(">I", 2**32 - 1),  # queries missing
            struct.pack(">I", 99) + b"a" + struct.pack(">I", 0),  # name past the data
            struct.pack(">I", 1) + b"a" + struct.pack(">II", 1, 5) + b"\xff\xfe:ab",  # not UTF-8
            struct.pack(">I", 1) + b"a" + struct.pack(">I", 0) + b"junk",  # trailing bytes
            b"\0\0",  # too short
        ]
        for option in (nbd.OPT_LIST_META_CONTEXT, nbd.OPT_SET_META_CONTEXT):
            for data in bad:
                c.option(option, data)
                assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
        # "base:" lists every base context; an empty SET selects none
        assert [k for k, _ in c.meta_context(nbd.OPT_LIST_META_CONTEXT, "a", ["base:"])] \
            == [nbd.REP_META_CONTEXT, nbd.REP_ACK]
        assert c.meta_context(nbd.OPT_SET_META_CONTEXT, "a", []) == [(nbd.REP_ACK, b"")]
        assert "error" not in c.go("a")
        assert c.block_status(0, 4096)[0] == nbd.EINVAL  # nothing was selected
        assert c.read(1 * MiB, 512) == (0, path.read_bytes()[1 * MiB : 1 * MiB + 512])


def test_flags_offer_fast_zero_where_the_backend_can_punch(tmp_path):
    path = sparse_file(tmp_path / "a.img")
    with serving([nbd.file_export(path, "rw"), nbd.file_export(path, "ro", readonly=True)],
                 tmp_path) as srv:
        with RawClient(srv.address) as c:
            c.hello()
            rw = c.go("rw")["flags"]
            assert rw & nbd.TF_SEND_FAST_ZERO and rw & nbd.TF_SEND_TRIM
        with RawClient(srv.address) as c:
            c.hello()
            ro = c.go("ro")["flags"]
            assert not ro & (nbd.TF_SEND_FAST_ZERO | nbd.TF_SEND_TRIM)


# ---- block status --------------------------------------------------------------------------


def test_block_status_req_one_and_the_extent_cap(tmp_path):
    # 3000 alternating 4 KiB runs of data and hole: more than one reply may carry
    path = tmp_path / "striped.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, 3000, 2):
            f.seek(i * 4096)
            f.write(b"\x01" * 4096)
    with serving([nbd.file_export(path, "s")], tmp_path) as srv, RawClient(srv.address) as c:
        c.connect_export("s", allocation=True)
        err, extents = c.block_status(0, SIZE)
        assert err == 0 and len(extents) == nbd.MAX_STATUS_EXTENTS
        assert extents[:3] == [(4096, 0), (4096, HZ), (4096, 0)]
        err, one = c.block_status(8192, 3 * 4096, flags=nbd.CMD_FLAG_REQ_ONE)
        assert (err, one) == (0, [(4096, 0)])
        # REQ_ONE never returns more than was asked, even inside a long run
        err, one = c.block_status(12 * MiB, 512, flags=nbd.CMD_FLAG_REQ_ONE)
        assert (err, one) == (0, [(512, HZ)])
        # asking again from where a reply ended walks the whole export
        pos, walked = 0, []
        while pos < SIZE:
            err, extents = c.block_status(pos, SIZE - pos)
            assert err == 0 and extents
            walked += runs_of(extents, pos)
            pos += sum(n for n, _ in extents)
        assert pos == SIZE
        assert sum(n for _, n, s in walked if s == 0) == 1500 * 4096


def test_hostile_block_status_gets_errors_and_the_connection_stays_sane(tmp_path):
    path = sparse_file(tmp_path / "a.img")
    with serving([nbd.file_export(path, "a")], tmp_path) as srv:
        with RawClient(srv.address) as c:
            c.connect_export("a", allocation=True)
            assert c.block_status(0, 0)[0] == nbd.EINVAL
            assert c.block_status(SIZE - 512, 1024)[0] == nbd.EINVAL
            assert c.block_status(SIZE, 512)[0] == nbd.EINVAL
            assert c.block_status(2**64 - 512, 512)[0] == nbd.EINVAL
            assert c.block_status(0, 512, flags=nbd.CMD_FLAG_FUA)[0] == nbd.EINVAL
            assert c.block_status(0, 512, flags=1 << 9)[0] == nbd.EINVAL
            err, data = c.read(1 * MiB, 4096)
            assert err == 0 and data == path.read_bytes()[1 * MiB : 1 * MiB + 4096]
            assert c.block_status(0, 4096) == (0, [(4096, HZ)])
        # structured replies but no context: EINVAL in a structured error chunk
        with RawClient(srv.address) as c:
            c.connect_export("a", structured=True)
            assert c.block_status(0, 4096)[0] == nbd.EINVAL
            assert c.read(0, 512)[0] == 0
        # no structured replies at all: a simple error reply
        with RawClient(srv.address) as c:
            c.connect_export("a")
            assert c.simple(nbd.CMD_BLOCK_STATUS, 0, 4096) == nbd.EINVAL
            assert c.read(0, 512)[0] == 0


def journal_with_holes(path):
    """One 16 MiB volume: replica data at [0, 1M) (promoted), then journaled: zeros at
    [0, 512K) (a ZERO record over replica data) and data at [4M, 5M).  Returns
    (journal, checkpoint, expected runs)."""
    journal = Journal.create(path, [VolumeSpec(0, "disk0", SIZE)], vm="vm1")
    journal.append([(0, 0, os.urandom(1 * MiB))])
    first = journal.checkpoint("replica")
    journal.promote_to(first.seq)
    journal.append([(0, 0, bytes(512 * KiB)), (0, 4 * MiB, os.urandom(1 * MiB))])
    ckpt = journal.checkpoint("after")
    journal.commit()
    expect = [(0, 512 * KiB, HZ), (512 * KiB, 512 * KiB, 0), (1 * MiB, 3 * MiB, HZ),
              (4 * MiB, 1 * MiB, 0), (5 * MiB, 11 * MiB, HZ)]
    return journal, ckpt, expect


def test_view_allocation_from_records_and_replica_holes(tmp_path):
    journal, ckpt, expect = journal_with_holes(tmp_path / "j")
    try:
        with journal.view(ckpt) as view:
            assert view.allocation("disk0", 0, SIZE) == expect
            assert view.allocation("disk0", 768 * KiB, 4 * MiB) == [
                (768 * KiB, 256 * KiB, 0), (1 * MiB, 3 * MiB, HZ), (4 * MiB, 768 * KiB, 0)]
            image = view.read("disk0", 0, SIZE)
        for start, length, state in expect:  # holes read as zeros, data is not zero
            chunk = image[start : start + length]
            assert (chunk == bytes(length)) == bool(state & STATE_ZERO)
    finally:
        journal.close()


def test_req_one_walks_view_and_scratch_exports_extent_by_extent(tmp_path, monkeypatch):
    from zcore.journal import readthrough

    monkeypatch.setattr(readthrough, "ALLOCATION_WINDOW", 1 * MiB)  # plans in 16 pieces
    journal, ckpt, expect = journal_with_holes(tmp_path / "j")
    exports = [nbd.view_export(journal, ckpt, "disk0", "pit"),
               nbd.scratch_export(journal, ckpt, "disk0", "scratch")]
    try:
        with serving(exports, tmp_path) as srv:
            for name in ("pit", "scratch"):
                with RawClient(srv.address) as c:
                    c.connect_export(name, allocation=True)
                    pos, walked = 0, []
                    while pos < SIZE:
                        err, one = c.block_status(pos, SIZE - pos, flags=nbd.CMD_FLAG_REQ_ONE)
                        assert err == 0 and len(one) == 1
                        walked.append((pos, *one[0]))
                        pos += one[0][0]
                    assert walked == expect, name
                    assert c.block_status(0, SIZE) == (0, [(n, st) for _, n, st in expect])
    finally:
        journal.close()


def test_nbdinfo_map_shows_the_holes_of_every_export_kind(tmp_path):
    journal, ckpt, expect = journal_with_holes(tmp_path / "j")
    (tmp_path / "p").mkdir()
    protected = Protected(tmp_path / "p", size=SIZE)
    plain = sparse_file(tmp_path / "plain.img")
    overlay = DurableOverlay(journal.view(ckpt), "disk0", tmp_path / "ov", owns_view=True)
    try:
        protected.volume.write(2 * MiB, os.urandom(1 * MiB))
        exports = [nbd.volume_export(protected.volume), nbd.file_export(plain, "plain"),
                   nbd.view_export(journal, ckpt, "disk0", "pit"),
                   nbd.scratch_export(journal, ckpt, "disk0", "scratch"),
                   nbd.overlay_export(overlay, "overlay")]
        with serving(exports, tmp_path) as srv:
            assert nbdinfo_map(srv.uri("pit")) == expect
            assert holes_of(nbdinfo_map(srv.uri("disk0"))) == [(0, 2 * MiB), (3 * MiB, 13 * MiB)]
            assert holes_of(nbdinfo_map(srv.uri("plain"))) == [
                (0, 1 * MiB), (2 * MiB, 6 * MiB), (10 * MiB, 6 * MiB)]
            for name in ("scratch", "overlay"):
                with RawClient(srv.address) as c:
                    c.connect_export(name)
                    assert c.write(8 * MiB, b"\x07" * MiB) == 0  # data over a view hole
                    assert c.simple(nbd.CMD_WRITE_ZEROES, 4 * MiB, 512 * KiB,
                                    flags=nbd.CMD_FLAG_FAST_ZERO) == 0  # a hole over data
                assert nbdinfo_map(srv.uri(name)) == [
                    (0, 512 * KiB, HZ), (512 * KiB, 512 * KiB, 0),
                    (1 * MiB, 3 * MiB + 512 * KiB, HZ), (4 * MiB + 512 * KiB, 512 * KiB, 0),
                    (5 * MiB, 3 * MiB, HZ), (8 * MiB, 1 * MiB, 0), (9 * MiB, 7 * MiB, HZ)], name
    finally:
        protected.close()
        journal.close()


def test_qemu_img_map_over_nbd_sees_the_view_holes(tmp_path):
    qemu_img = require_tool("qemu-img")
    journal, ckpt, expect = journal_with_holes(tmp_path / "j")
    try:
        with serving([nbd.view_export(journal, ckpt, "disk0", "pit")], tmp_path) as srv:
            out = run([qemu_img, "map", "--output=json", "-f", "raw", srv.uri("pit")]).stdout
            copy = tmp_path / "copy.raw"  # a sparse copy: only the data is written
            run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri("pit"), str(copy)])
        got = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)]
        assert got == [(s, n, not state & STATE_HOLE, bool(state & STATE_ZERO))
                       for s, n, state in expect]
        with journal.view(ckpt) as view:
            assert copy.read_bytes() == view.read("disk0", 0, SIZE)
        assert allocated(copy) <= 1536 * KiB + 256 * KiB  # the 1.5 MiB of data, and slack
    finally:
        journal.close()


# ---- TRIM and fast zero on protected volumes ------------------------------------------------


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_of_a_protected_volume_punches_the_backing_file_and_then_the_replica(tmp_path):
    qemu_io = require_tool("qemu-io")
    protected = Protected(tmp_path, size=SIZE)
    try:
        replica = protected.journal.path / "replica-0000.img"
        with serving([nbd.volume_export(protected.volume)], tmp_path) as srv:
            run([qemu_io, "-f", "raw", "-c", "write -P 0xab 0 16M", srv.uri("disk0")])
            first = protected.checkpoint("written")
            protected.journal.promote_to(first)
            assert allocated(replica) >= SIZE
            backing_before = allocated(protected.path)
            run([qemu_io, "-f", "raw", "-c", "discard 0 8M", "-c", "read -P 0 0 8M",
                 "-c", "read -P 0xab 8M 8M", srv.uri("disk0")])
            assert allocated(protected.path) <= backing_before - 8 * MiB
            # fast zero: punched too, no payload on the wire
            with RawClient(srv.address) as c:
                c.connect_export("disk0")
                assert c.simple(nbd.CMD_WRITE_ZEROES, 12 * MiB, 1 * MiB,
                                flags=nbd.CMD_FLAG_FAST_ZERO) == 0
                # NO_HOLE cannot be fast: refused at once, nothing changes
                assert c.simple(nbd.CMD_WRITE_ZEROES, 14 * MiB, 1 * MiB,
                                flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE) \
                    == nbd.ENOTSUP
            assert allocated(protected.path) <= backing_before - 9 * MiB
        seq = protected.checkpoint("trimmed")
        model = b"\x00" * (8 * MiB) + b"\xab" * (4 * MiB) + bytes(MiB) + b"\xab" * (3 * MiB)
        assert protected.path.read_bytes() == model
        assert protected.captured(seq) == model
        with protected.journal.view(seq) as view:  # captured as zero records: holes
            assert holes_of(view.allocation("disk0", 0, SIZE)) == [(0, 8 * MiB),
                                                                   (12 * MiB, 1 * MiB)]
        before = allocated(replica)
        protected.journal.promote_to(seq)
        assert allocated(replica) <= before - 9 * MiB
        fd = os.open(replica, os.O_RDONLY)
        try:
            assert data_ranges(fd, 0, SIZE) == [(8 * MiB, 4 * MiB), (13 * MiB, 3 * MiB)]
        finally:
            os.close(fd)
        assert protected.captured(seq) == model  # read back through the replica's sums
        report = protected.journal.scrub()
        assert report.clean and report.replica_blocks, report
    finally:
        protected.close()


def test_fast_zero_refused_where_it_cannot_be_fast(tmp_path):
    journal, ckpt, _ = journal_with_holes(tmp_path / "j")
    try:
        with serving([nbd.view_export(journal, ckpt, "disk0", "pit")], tmp_path) as srv, \
                RawClient(srv.address) as c:
            c.connect_export("pit")
            assert c.simple(nbd.CMD_WRITE_ZEROES, 0, 4096,
                            flags=nbd.CMD_FLAG_FAST_ZERO) == nbd.EPERM
            assert c.simple(nbd.CMD_TRIM, 0, 4096) == nbd.EPERM
    finally:
        journal.close()


# ---- multi-conn: a flush on one connection covers another's completed writes ---------------


class FlushWitness:
    """Wraps a backend's flush: records, at each flush, what a separate descriptor reads
    from the backing file (the page cache fdatasync makes durable)."""

    def __init__(self, backend, path) -> None:
        self.path = path
        self.seen: list[bytes] = []
        self._flush = backend.flush
        backend.flush = self

    def __call__(self) -> None:
        with open(self.path, "rb") as f:
            self.seen.append(f.read())
        self._flush()


def two_connections_write_then_flush(srv, name, offset, data):
    with RawClient(srv.address) as a, RawClient(srv.address) as b:
        a.connect_export(name)
        b.connect_export(name)
        assert a.write(offset, data) == 0  # completed: its reply is in
        assert b.simple(nbd.CMD_FLUSH) == 0


@pytest.mark.parametrize("kind", ["volume", "file"])
def test_multi_conn_flush_on_b_covers_writes_completed_on_a(tmp_path, kind):
    data = os.urandom(256 * KiB)
    if kind == "volume":
        protected = Protected(tmp_path, size=SIZE)
        export, path = nbd.volume_export(protected.volume), protected.path
    else:
        protected = None
        path = sparse_file(tmp_path / "f.img")
        export = nbd.file_export(path, "disk0")
    try:
        witness = FlushWitness(export.backend, path)
        with serving([export], tmp_path) as srv:
            info = RawClient(srv.address)
            with info:
                info.hello()
                assert info.go("disk0")["flags"] & nbd.TF_CAN_MULTI_CONN
            two_connections_write_then_flush(srv, "disk0", 3 * MiB, data)
        assert len(witness.seen) == 1
        assert witness.seen[0][3 * MiB : 3 * MiB + len(data)] == data
    finally:
        if protected is not None:
            protected.close()


def test_multi_conn_flush_on_b_makes_a_durable_overlay_write_survive_a_crash(tmp_path):
    journal, ckpt, _ = journal_with_holes(tmp_path / "j")
    data = os.urandom(64 * KiB)
    overlay = DurableOverlay(journal.view(ckpt), "disk0", tmp_path / "ov", owns_view=True)
    try:
        with serving([nbd.overlay_export(overlay, "ov", owned=False)], tmp_path) as srv:
            two_connections_write_then_flush(srv, "ov", 6 * MiB, data)
            # a crash now: reopen the overlay's files as they are, without closing it
            with DurableOverlay(journal.view(ckpt), "disk0", tmp_path / "ov",
                                owns_view=True) as after:
                assert after.read(6 * MiB, len(data)) == data
    finally:
        overlay.close()
        journal.close()


def test_capture_zero_checks_its_range_and_logs_a_failed_punch_dirty(tmp_path):
    from zcore._native.capture import CaptureRing
    from zcore.errors import AlignmentError, ConfigError, NativeIOError, OutOfRangeError

    path = sparse_file(tmp_path / "b.img", size=1 * MiB, data=((0, 1 * MiB),))
    fd = os.open(path, os.O_RDWR)
    ring = CaptureRing(1 << 20)
    try:
        with pytest.raises(AlignmentError):
            ring.zero(fd, 1, 1 * MiB, 100, 4096)
        with pytest.raises(OutOfRangeError):
            ring.zero(fd, 1, 1 * MiB, 1 * MiB - 512, 1024)
        with pytest.raises(ConfigError):
            ring.zero(fd, 1, 1 * MiB, 0, 0)
        assert ring.stats()["writes"] == 0 and os.pread(fd, 4096, 0) != bytes(4096)
        assert ring.zero(fd, 1, 1 * MiB, 0, 64 * KiB) > 0
        assert os.pread(fd, 64 * KiB, 0) == bytes(64 * KiB)
        assert data_ranges(fd, 0, 1 * MiB) == [(64 * KiB, 1 * MiB - 64 * KiB)]
        with pytest.raises(NativeIOError):
            ring.zero(-1, 1, 1 * MiB, 128 * KiB, 4096)
        volumes, offsets, lengths = ring.take_dirty()
        assert (volumes.tolist(), offsets.tolist(), lengths.tolist()) == ([1], [128 * KiB],
                                                                          [4096])
    finally:
        ring.close()
        os.close(fd)
