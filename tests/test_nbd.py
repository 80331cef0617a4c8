"""The NBD server at the protocol level: negotiation, commands, and hostile clients, driven
by a raw client (helpers.nbd.RawClient) that can break the protocol on purpose.  Real
clients (qemu, libnbd's tools, fio) are in test_nbd_clients.py."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time

import pytest
from helpers.nbd import MiB, RawClient, ServerClosed, build_journal, serving, write_tls_files
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zcore import nbd
from zcore.errors import ConfigError, ProtocolError
from zcore.nbd import Export, FileBackend, TLSConfig

SIZE = 4 * MiB


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, data


@pytest.fixture
def server(tmp_path, image):
    path, _ = image
    with serving([nbd.file_export(path, "disk")], tmp_path) as srv:
        yield srv


def connect(srv, name="disk", *, structured=False, unix=False) -> RawClient:
    c = RawClient(srv.server.addresses[1][1] if unix else srv.address)
    c.connect_export(name, structured=structured)
    return c


def eventually(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- negotiation ---------------------------------------------------------------------------


def test_go_reports_size_flags_and_block_sizes(server):
    with RawClient(server.address) as c:
        flags = c.hello()
        assert flags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        info = c.go("disk", info=(nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME, nbd.INFO_DESCRIPTION))
        assert info["size"] == SIZE
        assert info["block_sizes"] == [512, 4096, nbd.DEFAULT_MAX_REQUEST]
        assert info["name"] == "disk"
        assert "raw file" in info["description"]
        f = info["flags"]
        assert f & nbd.TF_HAS_FLAGS and f & nbd.TF_SEND_FLUSH and f & nbd.TF_SEND_FUA
        assert f & nbd.TF_SEND_WRITE_ZEROES and f & nbd.TF_CAN_MULTI_CONN
        assert f & nbd.TF_SEND_TRIM and f & nbd.TF_SEND_FAST_ZERO  # a file can punch holes
        assert not f & (nbd.TF_READ_ONLY | nbd.TF_SEND_DF)
        assert c.read(0, 512)[0] == 0


def test_info_then_go_and_structured_replies_add_df(server, image):
    with RawClient(server.address) as c:
        c.hello()
        assert c.go("disk", option=nbd.OPT_INFO)["size"] == SIZE
        info = c.go("disk", structured=True)
        assert info["flags"] & nbd.TF_SEND_DF
        err, data = c.read(1000, 3000)
        assert err == 0 and data == image[1][1000:4000]


def test_export_name_enters_transmission_without_zero_padding_when_asked(server, image):
    for client_flags, pad in ((nbd.CLIENT_FIXED_NEWSTYLE | nbd.CLIENT_NO_ZEROES, 0),
                              (nbd.CLIENT_FIXED_NEWSTYLE, 124)):
        with RawClient(server.address) as c:
            c.hello(client_flags)
            c.option(nbd.OPT_EXPORT_NAME, b"disk")
            size, flags = struct.unpack(">QH", c.recv_exact(10))
            assert size == SIZE and flags & nbd.TF_HAS_FLAGS
            assert c.recv_exact(pad) == bytes(pad)
            assert c.read(4096, 4096) == (0, image[1][4096:8192])


def test_list_names_every_export_and_refuses_data(tmp_path, image):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    exports = [nbd.file_export(image[0], "disk"), nbd.file_export(other, "other", readonly=True)]
    with serving(exports, tmp_path) as srv, RawClient(srv.address) as c:
        c.hello()
        c.option(nbd.OPT_LIST)
        names = []
        while True:
            _, kind, data = c.opt_reply()
            if kind == nbd.REP_ACK:
                break
            assert kind == nbd.REP_SERVER
            (n,) = struct.unpack_from(">I", data)
            names.append(data[4 : 4 + n].decode())
        assert names == ["disk", "other"]
        c.option(nbd.OPT_LIST, b"junk")
        assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
        assert c.go("other")["flags"] & nbd.TF_READ_ONLY


def test_unknown_option_and_unknown_export_are_errors_not_disconnects(server):
    with RawClient(server.address) as c:
        c.hello()
        c.option(99, b"whatever")
        assert c.opt_reply()[1] == nbd.REP_ERR_UNSUP
        assert c.go("nope")["error"] == nbd.REP_ERR_UNKNOWN
        c.option(nbd.OPT_GO, b"\x00\x00\x00\x10abc")  # name length past the option's end
        assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
        c.option(nbd.OPT_STARTTLS)
        assert c.opt_reply()[1] == nbd.REP_ERR_POLICY  # no TLS configured
        assert c.go("disk")["size"] == SIZE


def test_default_export_answers_the_empty_name(tmp_path, image):
    with serving([nbd.file_export(image[0], "disk")], tmp_path) as srv, \
            RawClient(srv.address) as c:
        c.hello()
        assert c.go("")["size"] == SIZE


def test_abort_is_acknowledged_then_closed(server):
    with RawClient(server.address) as c:
        c.hello()
        c.option(nbd.OPT_ABORT)
        assert c.opt_reply()[1] == nbd.REP_ACK
        assert c.is_closed()


def test_unix_socket_serves_the_same_export(server, image):
    with connect(server, unix=True) as c:
        assert c.read(0, 8192) == (0, image[1][:8192])
    assert any(u.startswith("nbd+unix:///disk?socket=") for u in server.uris())
    assert f"nbd://127.0.0.1:{server.address[1]}/disk" in server.uris()


# ---- commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_write_read_flush_fua_and_zeroes_reach_the_file(server, image, structured):
    path, data = image
    with connect(server, structured=structured) as c:
        payload = os.urandom(3 * 4096)
        assert c.write(8192, payload) == 0
        assert c.write(MiB, payload[:512], flags=nbd.CMD_FLAG_FUA) == 0
        assert c.simple(nbd.CMD_WRITE_ZEROES, 2 * MiB, 64 * 1024) == 0
        assert c.simple(nbd.CMD_WRITE_ZEROES, 3 * MiB, 512, flags=nbd.CMD_FLAG_FUA) == 0
        assert c.simple(nbd.CMD_FLUSH) == 0
        assert c.read(8192, len(payload)) == (0, payload)
        assert c.read(2 * MiB, 65536) == (0, bytes(65536))
        assert c.write(0, b"") == 0  # a zero-length write is a no-op
        assert c.read(0, 0) == (0, b"")
    disk = path.read_bytes()
    assert disk[8192 : 8192 + len(payload)] == payload
    assert disk[MiB : MiB + 512] == payload[:512]
    assert disk[2 * MiB : 2 * MiB + 65536] == bytes(65536)
    assert disk[:8192] == data[:8192]


def test_pipelined_requests_of_every_size_all_get_their_reply(server, image):
    """Requests sent back to back (small ones batched, large ones streamed into pooled
    buffers) are answered exactly once each, with the right data."""
    with connect(server) as c:
        sizes = [512, 4096, 65536, 130000 // 512 * 512, MiB, 3 * MiB]
        expect = bytearray(image[1])
        lengths = {}
        for i, n in enumerate(sizes):
            payload = bytes([i + 1]) * n
            lengths[c.request(nbd.CMD_WRITE, 0, n, payload=payload)] = 0
            expect[:n] = payload
            lengths[c.request(nbd.CMD_READ, 0, n)] = n
        seen = {}
        for _ in range(len(lengths)):
            handle, err, data = c.reply(lengths=lengths)
            assert err == 0 and handle not in seen
            seen[handle] = data
        # each read saw the writes sent before it (this server answers in order)
        for i, n in enumerate(sizes):
            got = seen[2 * i + 2]
            assert got[:n] == bytes([i + 1]) * n
        assert c.read(0, 3 * MiB) == (0, bytes(expect[: 3 * MiB]))


def test_unaligned_reads_are_served_and_unaligned_writes_refused(server, image):
    with connect(server, structured=True) as c:
        assert c.read(1, 1) == (0, image[1][1:2])
        assert c.read(511, 1026) == (0, image[1][511:1537])
        assert c.write(100, b"x" * 512) == nbd.EINVAL
        assert c.write(0, b"x" * 100) == nbd.EINVAL
        assert c.simple(nbd.CMD_WRITE_ZEROES, 1, 512) == nbd.EINVAL
    assert image[0].read_bytes() == image[1]


@pytest.mark.parametrize("structured", [False, True])
def test_requests_past_the_end_get_einval_or_enospc_and_change_nothing(server, image,
                                                                        structured):
    with connect(server, structured=structured) as c:
        assert c.read(SIZE - 512, 1024) == (nbd.EINVAL, b"")
        assert c.read(2**63, 512) == (nbd.EINVAL, b"")
        assert c.write(SIZE, b"y" * 512) == nbd.ENOSPC
        assert c.write(SIZE - 512, b"y" * 1024) == nbd.ENOSPC
        assert c.simple(nbd.CMD_WRITE_ZEROES, SIZE - 512, 1024) == nbd.ENOSPC
        assert c.read(0, 512) == (0, image[1][:512])  # still in business
    assert image[0].read_bytes() == image[1]


def test_oversized_requests_are_refused_and_the_connection_survives(tmp_path, image):
    exports = [nbd.file_export(image[0], "disk")]
    with serving(exports, tmp_path, max_request=MiB) as srv:
        with connect(srv, structured=True) as c:
            assert c.read(0, MiB + 4096) == (nbd.EOVERFLOW, b"")
            assert c.write(0, b"z" * (MiB + 4096)) == nbd.EOVERFLOW  # payload read past
            assert c.read(0, MiB) == (0, image[1][:MiB])
        with connect(srv) as c:
            assert c.read(0, 2 * MiB) == (nbd.EINVAL, b"")
            assert c.write(0, b"z" * (2 * MiB)) == nbd.EINVAL
            assert c.read(0, 4096) == (0, image[1][:4096])
    assert image[0].read_bytes() == image[1]


def test_unknown_commands_and_flags_get_einval(server):
    with connect(server, structured=True) as c:
        assert c.simple(42) == nbd.EINVAL
        assert c.simple(nbd.CMD_TRIM, 0, 4096) == 0  # a file export punches a hole
        assert c.read(0, 4096) == (0, bytes(4096))
        assert c.simple(nbd.CMD_FLUSH, flags=0x100) == nbd.EINVAL
        assert c.read(0, 512, flags=0x40)[0] == nbd.EINVAL
        assert c.simple(nbd.CMD_WRITE_ZEROES, 0, 512,  # keeping allocation is not fast
                        flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE) == nbd.ENOTSUP
        assert c.read(0, 512)[0] == 0


def test_disc_closes_after_answering_what_came_before(server, image):
    with connect(server) as c:
        h = c.request(nbd.CMD_READ, 0, 4096)
        c.request(nbd.CMD_DISC)
        assert c.reply(4096) == (h, 0, image[1][:4096])
        assert c.is_closed()


def test_read_only_export_refuses_writes_with_eperm(tmp_path, image):
    with serving([nbd.file_export(image[0], "ro", readonly=True)], tmp_path) as srv, \
            connect(srv, "ro") as c:
        assert c.write(0, b"w" * 512) == nbd.EPERM
        assert c.simple(nbd.CMD_WRITE_ZEROES, 0, 512) == nbd.EPERM
        assert c.simple(nbd.CMD_FLUSH) == 0
    assert image[0].read_bytes() == image[1]


def test_backend_failures_become_nbd_errors_not_crashes(tmp_path, image):
    class Failing(FileBackend):
        def write(self, offset, data):
            if offset == 0:
                raise OSError(28, "disk full")
            if offset == 512:
                raise RuntimeError("bug in a backend")
            return super().write(offset, data)

        def flush(self):
            raise OSError(5, "fsync failed")

    export = Export("f", Failing(image[0]))
    with serving([export], tmp_path) as srv, connect(srv, "f", structured=True) as c:
        assert c.write(0, b"a" * 512) == nbd.ENOSPC
        assert c.write(512, b"a" * 512) == nbd.EIO
        assert c.simple(nbd.CMD_FLUSH) == nbd.EIO
        assert c.write(1024, b"b" * 512, flags=nbd.CMD_FLAG_FUA) == nbd.EIO
        assert c.read(1024, 512) == (0, b"b" * 512)


class SlowFlush(FileBackend):
    """A file whose FLUSH takes `delay` seconds (an fdatasync after many writes); records
    what the file held when each flush began and the order of flushes and the close."""

    def __init__(self, path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.events: list[str] = []
        self.seen_at_flush: list[bytes] = []

    def flush(self) -> None:
        self.events.append("flush")
        self.seen_at_flush.append(os.pread(self._fd, 512, 0))
        time.sleep(self.delay)
        super().flush()
        self.events.append("flushed")

    def close(self) -> None:
        self.events.append("close")
        super().close()


def test_a_slow_flush_does_not_stall_other_connections_and_keeps_its_order(tmp_path, image):
    backend = SlowFlush(image[0], 2.0)
    with serving([Export("disk", backend)], tmp_path) as srv, connect(srv) as a, \
            connect(srv) as b:
        assert a.write(0, b"w" * 512) == 0
        flush = a.request(nbd.CMD_FLUSH)
        later = a.request(nbd.CMD_READ, 0, 512)  # held until the FLUSH is replied to
        assert eventually(lambda: backend.events == ["flush"])
        t0 = time.monotonic()
        assert b.read(512, 512) == (0, image[1][512:1024])  # served while A's flush runs
        assert time.monotonic() - t0 < backend.delay / 2
        assert b.write(1024, b"x" * 512, flags=nbd.CMD_FLAG_FUA) == 0
        assert a.reply() == (flush, 0, b"")
        assert a.reply(512) == (later, 0, b"w" * 512)
    # the write completed before the FLUSH was in the file when its sync began
    assert backend.seen_at_flush[0] == b"w" * 512
    assert backend.events[-1] == "close"


def test_a_flush_running_when_the_server_closes_ends_before_its_backend_closes(tmp_path,
                                                                               image):
    backend = SlowFlush(image[0], 0.5)
    with serving([Export("disk", backend)], tmp_path) as srv:
        c = connect(srv)
        c.request(nbd.CMD_FLUSH)
        assert eventually(lambda: backend.events == ["flush"])
    c.close()
    assert backend.events == ["flush", "flushed", "close"]


def test_an_export_removed_during_a_flush_closes_its_backend_after_the_flush(tmp_path, image):
    backend = SlowFlush(image[0], 0.5)
    with serving([Export("disk", backend)], tmp_path) as srv:
        c = connect(srv)
        c.request(nbd.CMD_FLUSH)
        assert eventually(lambda: backend.events == ["flush"])
        srv.call(srv.server.remove_export, "disk")
        assert eventually(lambda: backend.events[-1:] == ["close"])
        c.close()
    assert backend.events == ["flush", "flushed", "close"]


class GatedRead(FileBackend):
    """A file whose reads wait until `gate` is set (a repository on a slow share), off
    the loop when its export has `blocking_reads`; records the reading threads, and
    fails a read at `bad_offset`."""

    def __init__(self, path, bad_offset: int = -1) -> None:
        super().__init__(path, readonly=True)
        self.gate = threading.Event()
        self.threads: list[str] = []
        self.events: list[str] = []
        self.bad_offset = bad_offset

    def read_into(self, offset: int, buf) -> None:
        self.threads.append(threading.current_thread().name)
        self.events.append("read")
        assert self.gate.wait(10)
        if offset == self.bad_offset:
            raise OSError(errno.EIO, "the share went away")
        super().read_into(offset, buf)
        self.events.append("read done")

    def close(self) -> None:
        self.events.append("close")
        super().close()


def test_blocking_reads_run_off_the_loop_in_order_and_before_their_backend_closes(
        tmp_path, image):
    gated = GatedRead(image[0], bad_offset=4096)
    other = tmp_path / "other.img"
    other.write_bytes(b"o" * 8192)
    exports = [Export("slow", gated, blocking_reads=True), Export("fast", FileBackend(other))]
    with serving(exports, tmp_path) as srv, connect(srv, "slow") as a, \
            connect(srv, "fast") as b:
        first = a.request(nbd.CMD_READ, 0, 512)
        later = a.request(nbd.CMD_READ, 512, 512)  # held until the first is answered
        assert eventually(lambda: gated.events == ["read"])
        assert b.read(0, 512) == (0, b"o" * 512)  # the loop serves others meanwhile
        gated.gate.set()
        assert a.reply(512) == (first, 0, image[1][:512])
        assert a.reply(512) == (later, 0, image[1][512:1024])
        assert a.read(4096, 512) == (nbd.EIO, b"")  # a failed read is an EIO reply
        assert a.read(0, 512) == (0, image[1][:512])  # and the connection goes on
        loop_thread = srv.call(threading.current_thread).name
        assert gated.threads and loop_thread not in gated.threads
        gated.gate.clear()
        a.request(nbd.CMD_READ, 0, 512)
        assert eventually(lambda: gated.events[-1] == "read")
        srv.call(srv.server.remove_export, "slow")
        assert "close" not in gated.events  # not under the running read
        gated.gate.set()
        assert eventually(lambda: gated.events[-1:] == ["close"])
        assert gated.events[-2:] == ["read done", "close"]


# ---- hostile clients -----------------------------------------------------------------------


def test_request_header_of_the_wrong_length_or_magic_is_a_protocol_error():
    header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0x1, nbd.CMD_WRITE, 7, 4096, 512)
    assert nbd.parse_request(header) == nbd.Request(0x1, nbd.CMD_WRITE, 7, 4096, 512)
    assert nbd.parse_request(memoryview(bytearray(header))).handle == 7
    for bad in (b"", header[:-1], header + b"\0", b"\xff" + header[1:]):
        with pytest.raises(ProtocolError):
            nbd.parse_request(bad)


@given(data=st.binary(max_size=64)
       | st.binary(min_size=24, max_size=24).map(lambda rest: struct.pack(">I", 0x25609513) + rest))
def test_any_bytes_parse_as_a_request_or_raise_protocol_error(data):
    try:
        req = nbd.parse_request(data)
    except ProtocolError:
        assert len(data) != nbd.REQUEST_SIZE or data[:4] != struct.pack(">I", nbd.REQUEST_MAGIC)
        return
    assert struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, *req) == data


def test_bad_magic_unknown_flags_and_unknown_export_name_drop_the_connection(server):
    with RawClient(server.address) as c:
        c.hello()
        c.option(nbd.OPT_GO, magic=0x1234)
        assert c.is_closed()
    with RawClient(server.address) as c:
        c.hello(client_flags=0x80)
        assert c.is_closed()
    with RawClient(server.address) as c:
        c.hello()
        c.option(nbd.OPT_EXPORT_NAME, b"nope")
        assert c.is_closed()
    with connect(server) as c:
        c.request(nbd.CMD_READ, 0, 512, magic=0xDEADBEEF)
        assert c.is_closed()
    with connect(server) as c:  # the server is unharmed
        assert c.read(0, 512)[0] == 0


def test_oversized_option_data_is_skipped_and_refused(server):
    with RawClient(server.address) as c:
        c.hello()
        c.option(nbd.OPT_GO, b"\x00" * (nbd.MAX_OPTION_DATA + 1))
        assert c.opt_reply()[1] == nbd.REP_ERR_TOO_BIG
        c.option(77, os.urandom(200_000))
        assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
        assert c.go("disk")["size"] == SIZE
    with RawClient(server.address) as c:
        c.hello()
        c.option(nbd.OPT_EXPORT_NAME, b"x" * (nbd.MAX_OPTION_DATA + 1))
        assert c.is_closed()


def test_client_vanishing_mid_write_applies_nothing(server, image):
    path, data = image
    for size in (8192, 3 * MiB):  # payload in the staging buffer / in a pooled buffer
        c = connect(server)
        c.send(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 7, 0, size))
        c.send(b"\xaa" * (size // 2))
        time.sleep(0.1)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # reset, mid-payload
    with connect(server) as c:
        assert c.read(0, 3 * MiB) == (0, data[: 3 * MiB])
    assert path.read_bytes() == data


def test_client_vanishing_mid_handshake_and_mid_header(server):
    for chunks in ([b""], [struct.pack(">I", 3)[:2]],
                   [struct.pack(">I", 3), struct.pack(">QI", nbd.IHAVEOPT, nbd.OPT_GO)]):
        c = RawClient(server.address)
        c.recv_exact(18)
        for chunk in chunks:
            c.send(chunk)
        c.close()
    with connect(server) as c:
        c.send(struct.pack(">IHHQ", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 1))
        c.close()
    with connect(server) as c:
        assert c.read(0, 512)[0] == 0
    assert eventually(lambda: server.call(lambda: server.server.connections) == 0)


def test_stalled_handshake_is_dropped(tmp_path, image):
    with serving([nbd.file_export(image[0], "disk")], tmp_path,
                 handshake_timeout=0.3) as srv, RawClient(srv.address) as c:
        c.recv_exact(18)
        assert c.is_closed(timeout=5)


def test_connection_limit_refuses_the_excess(tmp_path, image):
    with serving([nbd.file_export(image[0], "disk")], tmp_path, max_connections=2) as srv:
        a, b = connect(srv), connect(srv)
        with RawClient(srv.address) as c:
            with pytest.raises((ServerClosed, ConnectionError)):
                c.hello()
        a.close()
        b.close()
        assert eventually(lambda: srv.call(lambda: srv.server.connections) == 0)
        with connect(srv) as c:
            assert c.read(0, 512)[0] == 0


def test_client_that_never_reads_replies_is_not_buffered_without_bound(server):
    """A client pipelining reads without reading the replies: the server stops taking
    requests once its socket is full instead of queueing megabytes per request."""
    c = connect(server)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    requests = b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, i, 0,
                                    4 * MiB) for i in range(200))
    sender = threading.Thread(target=lambda: _send_quietly(c.sock, requests), daemon=True)
    sender.start()
    time.sleep(0.5)

    def buffered():
        return [conn.queued_reply_bytes for conn in server.server.connection_info()]

    assert max(server.call(buffered)) <= 4 * MiB + 64
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    with connect(server) as d:
        assert d.read(0, 512)[0] == 0


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_many_connections_on_several_exports_at_once(tmp_path):
    images = {f"d{i}": os.urandom(MiB) for i in range(3)}
    exports = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        exports.append(nbd.file_export(tmp_path / name, name))
    errors = []

    def worker(name, k):
        try:
            with connect(srv, name, structured=bool(k % 2), unix=bool(k % 3 == 0)) as c:
                for i in range(20):
                    off = ((k * 20 + i) % 256) * 4096
                    payload = bytes([k]) * 4096
                    assert c.write(off + 0, payload) == 0 if name == "d0" else True
                    err, got = c.read(off, 4096)
                    assert err == 0
                    if name != "d0":
                        assert got == images[name][off : off + 4096]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with serving(exports, tmp_path) as srv:
        threads = [threading.Thread(target=worker, args=(f"d{k % 3}", k)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


# ---- exports of views and scratch overlays -------------------------------------------------


@pytest.fixture
def journal(tmp_path):
    j, snaps = build_journal(tmp_path / "j", sizes=(2 * MiB, MiB), rounds=2, writes=30)
    yield j, snaps
    j.close()


def test_view_export_serves_the_checkpoint_read_only(tmp_path, journal):
    j, snaps = journal
    exports = [nbd.view_export(j, ckpt, "disk0", f"v{i}") for i, (ckpt, _) in enumerate(snaps)]
    with serving(exports, tmp_path) as srv:
        for i, (_, images) in enumerate(snaps):
            with connect(srv, f"v{i}", structured=True) as c:
                assert c.read(0, 2 * MiB) == (0, images["disk0"])
                assert c.read(777, 5000) == (0, images["disk0"][777:5777])
                assert c.write(0, b"x" * 512) == nbd.EPERM
    assert not j._pins  # the server closed the views it owned


def test_scratch_export_takes_writes_and_discards_them_on_close(tmp_path, journal):
    j, snaps = journal
    ckpt, images = snaps[-1]
    export = nbd.scratch_export(j, ckpt, "disk1", "s", limit_bytes=256 * 1024)
    assert export.kind == "scratch"
    with serving([export], tmp_path) as srv:
        with connect(srv, "s", structured=True) as c:
            assert c.write(4096, b"\x42" * 8192, flags=nbd.CMD_FLAG_FUA) == 0
            assert c.simple(nbd.CMD_TRIM, 0, 4096) == 0  # overlays offer trim
            assert c.read(0, 16384) == (0, images["disk1"][:4096] + b"\x42" * 8192
                                        + images["disk1"][12288:16384])
            assert c.write(0, b"\x01" * (512 * 1024)) == nbd.ENOSPC  # over the limit
        with connect(srv, "s") as c:  # a second connection sees the same overlay
            assert c.read(4096, 8192) == (0, b"\x42" * 8192)
    with j.view(ckpt) as v:
        assert v.read("disk1", 0, MiB) == images["disk1"]
    assert not j._pins


def test_export_and_server_settings_are_validated(tmp_path, image):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(ConfigError):
        FileBackend(odd)
    backend = FileBackend(image[0])
    with pytest.raises(ConfigError):
        Export("x" * 5000, backend)
    with pytest.raises(ConfigError):
        nbd.NBDServer([], max_request=1000)
    server = nbd.NBDServer([Export("a", backend)])
    with pytest.raises(ConfigError):
        server.add_export(Export("a", backend))
    backend.close()
    with pytest.raises(ConfigError):
        TLSConfig(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key")).server_context()


# ---- TLS -----------------------------------------------------------------------------------


def tls_client(address, tls_dir, *, client_cert=True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca-cert.pem"))
    if client_cert:
        ctx.load_cert_chain(str(tls_dir / "client-cert.pem"), str(tls_dir / "client-key.pem"))
    return ctx


def test_tls_is_required_then_negotiated_with_starttls(tmp_path, image):
    tls_dir = tmp_path / "tls"
    write_tls_files(tls_dir)
    tls = TLSConfig(str(tls_dir / "server-cert.pem"), str(tls_dir / "server-key.pem"),
                    ca=str(tls_dir / "ca-cert.pem"))
    with serving([nbd.file_export(image[0], "disk")], tmp_path, tls=tls) as srv:
        assert srv.uris()[0].startswith("nbds://")
        with RawClient(srv.address) as c:  # options before STARTTLS: TLS required
            c.hello()
            assert c.go("disk")["error"] == nbd.REP_ERR_TLS_REQD
            c.option(nbd.OPT_LIST)
            assert c.opt_reply()[1] == nbd.REP_ERR_TLS_REQD
            c.option(nbd.OPT_EXPORT_NAME, b"disk")  # cannot be refused: dropped
            assert c.is_closed()
        with RawClient(srv.address) as c:
            c.hello()
            c.option(nbd.OPT_STARTTLS)
            assert c.opt_reply()[1] == nbd.REP_ACK
            c.sock = tls_client(srv.address, tls_dir).wrap_socket(c.sock,
                                                                  server_hostname="localhost")
            c.option(nbd.OPT_STARTTLS)
            assert c.opt_reply()[1] == nbd.REP_ERR_INVALID  # already running
            assert c.go("disk", structured=True)["size"] == SIZE
            assert c.read(0, 2 * MiB) == (0, image[1][: 2 * MiB])
            assert c.write(0, b"t" * 4096) == 0
        with RawClient(srv.address) as c:  # no client certificate: refused
            c.hello()
            c.option(nbd.OPT_STARTTLS)
            assert c.opt_reply()[1] == nbd.REP_ACK
            with pytest.raises((ssl.SSLError, ConnectionError, ServerClosed)):
                c.sock = tls_client(srv.address, tls_dir, client_cert=False).wrap_socket(
                    c.sock, server_hostname="localhost")
                c.go("disk")
        with connect_tls(srv, tls_dir) as c:
            assert c.read(0, 4096) == (0, b"t" * 4096)


def connect_tls(srv, tls_dir) -> RawClient:
    c = RawClient(srv.address)
    c.hello()
    c.option(nbd.OPT_STARTTLS)
    assert c.opt_reply()[1] == nbd.REP_ACK
    c.sock = tls_client(srv.address, tls_dir).wrap_socket(c.sock, server_hostname="localhost")
    c.go("disk")
    return c


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=60)
@given(garbage=st.binary(min_size=1, max_size=2000),
       phase=st.sampled_from(["hello", "options", "transmission"]))
def test_garbage_from_a_client_never_crashes_the_server_nor_writes(tmp_path_factory, garbage,
                                                                   phase):
    tmp = tmp_path_factory.mktemp("garbage")
    data = os.urandom(MiB)
    (tmp / "d.img").write_bytes(data)
    with serving([nbd.file_export(tmp / "d.img", "d")], tmp, handshake_timeout=2) as srv:
        c = RawClient(srv.address, timeout=2)
        if phase != "hello":
            c.hello()
        if phase == "transmission":
            c.go("d")
        c.send(garbage)
        c.sock.settimeout(0.05)
        try:
            while c.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass
        c.close()
        with connect(srv, "d") as good:
            assert good.read(0, MiB) == (0, data)
    assert (tmp / "d.img").read_bytes() == data


class NBDModel(RuleBasedStateMachine):
    """Reads, writes, zeroes, trims, flushes and block status over several connections
    (simple and structured replies, pipelined, base:allocation), against a bytearray."""

    SIZE = 256 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="zcore-nbd-model-")
        self.model = bytearray(os.urandom(self.SIZE))
        path = os.path.join(self.tmp, "d.img")
        with open(path, "wb") as f:
            f.write(self.model)
        self.ctx = serving([nbd.file_export(path, "d")], self.tmp, max_request=64 * 1024)
        self.srv = self.ctx.__enter__()
        self.clients = [connect(self.srv, "d"), connect(self.srv, "d", structured=True)]
        self.status = RawClient(self.srv.address)
        self.status.connect_export("d", allocation=True)

    sectors = st.integers(0, 511)

    @rule(k=st.integers(0, 1), first=sectors, count=st.integers(1, 512))
    def trim(self, k, first, count):
        offset, length = first * 512, count * 512
        err = self.clients[k].simple(nbd.CMD_TRIM, offset, length)
        if offset + length > self.SIZE:
            assert err == nbd.ENOSPC
        else:  # a file export punches: the range reads as zeros
            assert err == 0
            self.model[offset : offset + length] = bytes(length)

    @rule(first=sectors, count=st.integers(1, 512), one=st.booleans())
    def block_status(self, first, count, one):
        offset, length = first * 512, count * 512
        err, extents = self.status.block_status(
            offset, length, flags=nbd.CMD_FLAG_REQ_ONE if one else 0)
        if offset + length > self.SIZE:
            assert err == nbd.EINVAL
            return
        assert err == 0 and extents and (len(extents) == 1 or not one)
        assert sum(n for n, _ in extents) <= length
        for n, state in extents:  # what says zero reads as zeros
            assert n > 0
            if state & nbd.STATE_ZERO:
                assert self.model[offset : offset + n] == bytes(n)
            offset += n

    @rule(k=st.integers(0, 1), first=sectors, count=st.integers(1, 160), byte=st.integers(0, 255))
    def write(self, k, first, count, byte):
        offset, length = first * 512, count * 512
        payload = bytes([byte]) * length
        err = self.clients[k].write(offset, payload)
        if length > 64 * 1024:  # refused before its payload is even looked at
            assert err in (nbd.EINVAL, nbd.EOVERFLOW)
        elif offset + length > self.SIZE:
            assert err == nbd.ENOSPC
        else:
            assert err == 0
            self.model[offset : offset + length] = payload

    @rule(k=st.integers(0, 1), first=sectors, count=st.integers(1, 512))
    def zero(self, k, first, count):
        offset, length = first * 512, count * 512
        err = self.clients[k].simple(nbd.CMD_WRITE_ZEROES, offset, length)
        if offset + length > self.SIZE:
            assert err == nbd.ENOSPC
        else:
            assert err == 0
            self.model[offset : offset + length] = bytes(length)

    @rule(k=st.integers(0, 1), offset=st.integers(0, 256 * 1024),
          length=st.integers(0, 70 * 1024))
    def read(self, k, offset, length):
        err, data = self.clients[k].read(offset, length)
        if offset + length > self.SIZE:
            assert err == nbd.EINVAL
        elif length > 64 * 1024:
            assert err in (nbd.EINVAL, nbd.EOVERFLOW)
        else:
            assert err == 0 and data == self.model[offset : offset + length]

    @rule(k=st.integers(0, 1), ops=st.lists(st.tuples(st.integers(0, 500),
                                                       st.integers(1, 12)), max_size=12))
    def pipelined_writes(self, k, ops):
        c = self.clients[k]
        handles = []
        for i, (first, count) in enumerate(ops):
            payload = bytes([i + 1]) * (count * 512)
            handles.append(c.request(nbd.CMD_WRITE, first * 512, len(payload),
                                     payload=payload))
            self.model[first * 512 : first * 512 + len(payload)] = payload
        for h in handles:  # this server applies and answers in order
            assert c.reply()[:2] == (h, 0)

    @rule(k=st.integers(0, 1))
    def flush(self, k):
        assert self.clients[k].simple(nbd.CMD_FLUSH, flags=nbd.CMD_FLAG_FUA) == 0

    @rule(k=st.integers(0, 1), structured=st.booleans())
    def reconnect(self, k, structured):
        self.clients[k].request(nbd.CMD_DISC)
        self.clients[k].close()
        self.clients[k] = connect(self.srv, "d", structured=structured)

    @invariant()
    def file_matches(self):
        with open(os.path.join(self.tmp, "d.img"), "rb") as f:
            assert f.read() == self.model

    def teardown(self):
        for c in [*self.clients, self.status]:
            c.close()
        self.ctx.__exit__(None, None, None)
        shutil.rmtree(self.tmp)


TestNBDModel = NBDModel.TestCase
