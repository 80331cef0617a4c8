"""zcore.nbd.NBDClient against real servers (qemu-nbd, qemu-storage-daemon with a dirty
bitmap, nbdkit refusing unaligned requests, zcore's own NBD server) and against a scripted fake
that breaks the protocol on purpose: a hostile or buggy server gives an exception, never bytes."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from helpers.nbd import MiB, run, serving

from zcore import nbd
from zcore.adapters.qmp import QMPClient
from zcore.errors import (
    AlignmentError,
    ClosedError,
    OutOfRangeError,
    ProtocolError,
    RemoteIOError,
    StateError,
)
from zcore.fsutil import data_ranges, short_socket_path
from zcore.nbd import NBDClient
from zcore.nbd import protocol as p

KiB = 1 << 10
SIZE = 16 * MiB


def sparse_file(path: Path, size: int = SIZE,
                data: tuple[tuple[int, int], ...] = ((1 * MiB, 1 * MiB),
                                                     (8 * MiB + 64 * KiB, 2 * MiB))) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until `proc` has made the socket `path` (or fail with its output)."""
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args} made no socket {path}")
        time.sleep(0.05)


@contextlib.contextmanager
def process(args: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(sock, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def qemu_nbd(tmp_path: Path, image: Path, fmt: str, *, readonly: bool = False
             ) -> Iterator[Path]:
    sock = tmp_path / "qemu-nbd.sock"
    args = [require_tool("qemu-nbd"), "-f", fmt, "-k", str(sock), "-x", "disk", "-t",
            str(image)]
    if readonly:
        args.insert(1, "--read-only")
    with process(args, sock):
        yield sock


def flagged(extents: list[tuple[int, int, int]], bit: int = p.STATE_HOLE
            ) -> list[tuple[int, int]]:
    """The runs of extents with `bit` set (holes by default), adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for offset, length, flags in extents:
        if flags & bit:
            if out and out[-1][0] + out[-1][1] == offset:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((offset, length))
    return out


def complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for offset, length in ranges:
        if offset > pos:
            out.append((pos, offset - pos))
        pos = offset + length
    if pos < size:
        out.append((pos, size - pos))
    return out


def check_cover(extents: list[tuple[int, int, int]], offset: int, length: int) -> None:
    pos = offset
    for start, n, _ in extents:
        assert start == pos and n > 0
        pos += n
    assert pos == offset + length


# ---- qemu-nbd ------------------------------------------------------------------------------


def test_qemu_nbd_raw_reads_writes_and_holes_match_seek_data(tmp_path):
    image = sparse_file(tmp_path / "d.raw")
    expected = image.read_bytes()
    with qemu_nbd(tmp_path, image, "raw") as sock, NBDClient.connect_unix(sock, "disk") as c:
        assert c.size == SIZE and not c.read_only
        assert "base:allocation" in c.contexts
        assert c.read(0, SIZE) == expected  # one call, split into <= 32 MiB requests
        assert c.read(1 * MiB - 3, 7) == expected[1 * MiB - 3:1 * MiB + 4]
        fd = os.open(image, os.O_RDONLY)
        try:
            data = data_ranges(fd, 0, SIZE)
        finally:
            os.close(fd)
        extents = c.block_status(0, SIZE)
        check_cover(extents, 0, SIZE)
        assert flagged(extents) == complement(data, SIZE)
        # a range inside: clipped to it, still complete
        part = c.block_status(1 * MiB - 4096, 8192)
        check_cover(part, 1 * MiB - 4096, 8192)
        assert [f & p.STATE_HOLE for _, _, f in part] == [1, 0]

        payload = os.urandom(3 * MiB)
        c.write(4 * MiB, payload, fua=True)
        c.write(12 * MiB, memoryview(payload)[:64 * KiB])
        c.flush()
        assert c.read(4 * MiB, 3 * MiB) == payload
        buf = bytearray(64 * KiB)
        c.readinto(12 * MiB, memoryview(buf))
        assert bytes(buf) == payload[:64 * KiB]
        with pytest.raises(OutOfRangeError):
            c.read(SIZE - 10, 11)
    on_disk = image.read_bytes()
    assert on_disk[4 * MiB:7 * MiB] == payload
    assert on_disk[12 * MiB:12 * MiB + 64 * KiB] == payload[:64 * KiB]


def test_qemu_nbd_qcow2_holes_are_the_unwritten_clusters(tmp_path):
    image = tmp_path / "d.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=65536", str(image), str(SIZE)])
    written = [(0, 64 * KiB), (3 * MiB, 192 * KiB), (SIZE - 64 * KiB, 64 * KiB)]
    model = bytearray(SIZE)
    with qemu_nbd(tmp_path, image, "qcow2") as sock:
        with NBDClient.connect_unix(sock, "disk") as c:
            for offset, length in written:
                data = os.urandom(length)
                c.write(offset, data)
                model[offset:offset + length] = data
            c.flush()
    with qemu_nbd(tmp_path, image, "qcow2", readonly=True) as sock:
        with NBDClient.connect_unix(sock, "disk") as c:
            assert c.read_only
            extents = c.block_status(0, SIZE)
            check_cover(extents, 0, SIZE)
            assert flagged(extents) == complement(written, SIZE)
            assert c.read(0, SIZE) == model
            with pytest.raises(StateError, match="read-only"):
                c.write(0, bytes(512))


def test_unknown_export_is_a_clear_error(tmp_path):
    image = sparse_file(tmp_path / "d.raw", size=1 * MiB, data=())
    with qemu_nbd(tmp_path, image, "raw") as sock:
        with pytest.raises(ProtocolError, match="NBD_REP_ERR_UNKNOWN"):
            NBDClient.connect_unix(sock, "nope")


def test_nbdkit_that_refuses_unaligned_requests_gets_none(tmp_path):
    # blocksize-policy with error-policy=error answers EINVAL to any request off its
    # 4 KiB minimum or past its 64 KiB maximum: the client's requests must all fit
    sock = tmp_path / "nbdkit.sock"
    args = [require_tool("nbdkit"), "-f", "-U", str(sock), "--filter=blocksize-policy",
            "memory", str(SIZE), "blocksize-minimum=4096", "blocksize-preferred=65536",
            "blocksize-maximum=65536", "blocksize-error-policy=error"]
    with process(args, sock), NBDClient.connect_unix(sock, "") as c:
        assert (c.min_block, c.preferred_block, c.max_block) == (4096, 65536, 65536)
        data = os.urandom(300 * KiB)
        c.write(4096, data)
        assert c.read(4096, len(data)) == data
        assert c.read(4096 + 5, 10000) == data[5:10005]
        assert c.read(SIZE - 3, 3) == bytes(3)
        check_cover(c.block_status(100, 9000), 100, 9000)
        with pytest.raises(AlignmentError):
            c.write(4096 + 512, data[:4096])


# ---- qemu-storage-daemon and a dirty bitmap ------------------------------------------------


def test_dirty_bitmap_context_reports_exactly_the_written_granules(tmp_path):
    qsd = require_tool("qemu-storage-daemon")
    image = sparse_file(tmp_path / "d.raw", size=SIZE, data=((0, 4 * MiB),))
    nbd_sock, qmp_sock = tmp_path / "nbd.sock", tmp_path / "qmp.sock"
    granularity = 64 * KiB
    args = [qsd,
            "--blockdev", f"driver=file,filename={image},node-name=file0",
            "--blockdev", "driver=raw,file=file0,node-name=disk",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--chardev", f"socket,id=qmp,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=qmp",
            "--export", "type=nbd,id=w,node-name=disk,name=w,writable=on"]
    with process(args, qmp_sock), QMPClient(qmp_sock) as qmp:
        assert nbd_sock.exists()  # --nbd-server comes before --chardev on the command line
        qmp.execute("block-dirty-bitmap-add",
                    {"node": "disk", "name": "b1", "granularity": granularity})
        # writes: inside one granule, across two, a whole aligned run, and one at the end
        writes = [(100 * KiB, 10 * KiB), (250 * KiB, 20 * KiB), (2 * MiB, 256 * KiB),
                  (SIZE - 4 * KiB, 4 * KiB)]
        with NBDClient.connect_unix(nbd_sock, "w") as c:
            for offset, length in writes:
                c.write(offset, os.urandom(length))
            c.flush()
        # freeze the bitmap (an enabled one cannot go out read-only) and export it
        qmp.execute("block-dirty-bitmap-disable", {"node": "disk", "name": "b1"})
        qmp.execute("block-export-add", {"type": "nbd", "id": "r", "node-name": "disk",
                                         "name": "r", "writable": False,
                                         "bitmaps": ["b1"]})
        context = "qemu:dirty-bitmap:b1"
        with NBDClient.connect_unix(nbd_sock, "r", meta_contexts=("base:allocation",
                                                                  context)) as c:
            assert set(c.contexts) == {"base:allocation", context}
            extents = c.block_status(0, SIZE, context)
            check_cover(extents, 0, SIZE)
            dirty = flagged(extents, p.STATE_DIRTY)
            expected: list[tuple[int, int]] = []
            for offset, length in writes:
                lo = offset // granularity * granularity
                hi = -(-(offset + length) // granularity) * granularity
                if expected and expected[-1][0] + expected[-1][1] >= lo:
                    expected[-1] = (expected[-1][0], hi - expected[-1][0])
                else:
                    expected.append((lo, hi - lo))
            assert dirty == expected
            # and a window of it, clipped
            window = c.block_status(96 * KiB, 100 * KiB, context)
            check_cover(window, 96 * KiB, 100 * KiB)
            assert [(o, n, f & p.STATE_DIRTY) for o, n, f in window] == [
                (96 * KiB, 32 * KiB, 1), (128 * KiB, 64 * KiB, 0), (192 * KiB, 4 * KiB, 1)]
            assert c.read(0, 4 * MiB) == image.read_bytes()[:4 * MiB]


# ---- zcore's own server --------------------------------------------------------------------


def test_zcore_server_over_tcp_and_unix(tmp_path):
    path = sparse_file(tmp_path / "f.img")
    with serving([nbd.file_export(path, "f")], tmp_path) as srv:
        assert srv.address is not None
        host, port = srv.address
        with NBDClient.connect_tcp(host, port, "f") as c:
            assert c.size == SIZE and c.min_block == 512
            data = os.urandom(1 * MiB)
            c.write(5 * MiB, data)
            c.flush()
            assert c.read(5 * MiB, len(data)) == data
            # unaligned read: widened to 512-byte blocks and cut back
            assert c.read(5 * MiB + 7, 1000) == data[7:1007]
            with pytest.raises(AlignmentError):
                c.write(5 * MiB + 7, b"x" * 512)
            with pytest.raises(StateError, match="qemu:dirty-bitmap"):
                c.block_status(0, SIZE, "qemu:dirty-bitmap:b1")
        with NBDClient.connect_unix(tmp_path / "nbd.sock", "f") as c:
            fd = os.open(path, os.O_RDONLY)
            try:
                data_now = data_ranges(fd, 0, SIZE)
            finally:
                os.close(fd)
            extents = c.block_status(0, SIZE)
            check_cover(extents, 0, SIZE)
            assert flagged(extents) == complement(data_now, SIZE)
            assert c.read(0, SIZE) == path.read_bytes()
            c.close()
            with pytest.raises(ClosedError):
                c.read(0, 1)
            c.close()


# ---- a hostile server ----------------------------------------------------------------------


Request = tuple[int, int, int, int, int]  # flags, command, handle, offset, length


class Hangup(bytes):
    """Reply bytes after which the fake server closes the connection."""


def chunk(handle: int, kind: int, payload: bytes, *, done: bool = True) -> bytes:
    return struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0,
                       kind, handle, len(payload)) + payload


def data_chunk(handle: int, offset: int, data: bytes, *, done: bool = True) -> bytes:
    return chunk(handle, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data,
                 done=done)


class FakeServer:
    """A scripted NBD server on a Unix socket: a correct fixed-newstyle handshake (unless
    told otherwise), then `answer(request)` bytes for each request (None: hang up)."""

    def __init__(self, path: Path, answer: Callable[[Request], bytes | None], *,
                 size: int = 1 * MiB, magic: int = p.NBDMAGIC, structured: bool = True,
                 block: tuple[int, int, int] | None = None) -> None:
        self.path, self.answer, self.size = path, answer, size
        self.magic, self.structured, self.block = magic, structured, block
        self.requests: list[Request] = []
        self.options: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with short_socket_path(path) as address:
            self.listener.bind(address)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, struct.error):
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self._session(conn)

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise OSError("client went away")
            out += got
        return out

    def _reply(self, conn: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", p.OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", self.magic, p.IHAVEOPT,
                                 p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        self._recv(conn, 4)
        while True:
            _, option, length = struct.unpack(">QII", self._recv(conn, 16))
            self._recv(conn, length)
            self.options.append(option)
            if option == p.OPT_ABORT:
                return
            if option == p.OPT_STRUCTURED_REPLY:
                self._reply(conn, option, p.REP_ACK if self.structured else p.REP_ERR_UNSUP)
            elif option == p.OPT_SET_META_CONTEXT:
                self._reply(conn, option, p.REP_META_CONTEXT,
                            struct.pack(">I", 7) + b"base:allocation")
                self._reply(conn, option, p.REP_ACK)
            elif option == p.OPT_GO:
                self._reply(conn, option, p.REP_INFO, struct.pack(
                    ">HQH", p.INFO_EXPORT, self.size, p.TF_HAS_FLAGS | p.TF_SEND_FLUSH))
                if self.block:
                    self._reply(conn, option, p.REP_INFO,
                                struct.pack(">HIII", p.INFO_BLOCK_SIZE, *self.block))
                self._reply(conn, option, p.REP_ACK)
                break
            else:
                self._reply(conn, option, p.REP_ERR_UNSUP)
        while True:
            magic, *fields = struct.unpack(">IHHQQI", self._recv(conn, 28))
            if magic != p.REQUEST_MAGIC:
                return  # the client's fault: it sees the connection close
            request: Request = tuple(fields)  # type: ignore[assignment]
            self.requests.append(request)
            if request[1] == p.CMD_DISC:
                return
            if request[1] == p.CMD_WRITE:
                self._recv(conn, request[4])
            out = self.answer(request)
            if out is None:
                return
            conn.sendall(out)
            if isinstance(out, Hangup):
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@contextlib.contextmanager
def fake(tmp_path: Path, answer: Callable[[Request], bytes | None] = lambda r: None,
         **kwargs: object) -> Iterator[FakeServer]:
    server = FakeServer(tmp_path / "fake.sock", answer, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


def good_read(r: Request) -> bytes:
    """A correct reply: the data is the offset's low byte repeated."""
    _, _, handle, offset, length = r
    return data_chunk(handle, offset, bytes([offset & 0xFF]) * length)


def test_fake_server_answering_correctly_is_read(tmp_path):
    with fake(tmp_path, good_read) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        assert c.contexts == {"base:allocation": 7}
        assert c.read(3, 5) == b"\x03" * 5


def test_bad_greeting_magic(tmp_path):
    with fake(tmp_path, magic=0x1234) as srv:
        with pytest.raises(ProtocolError, match="not an NBD server"):
            NBDClient.connect_unix(srv.path, "x")


def test_a_server_without_structured_replies_is_refused(tmp_path):
    with fake(tmp_path, structured=False) as srv:
        with pytest.raises(ProtocolError, match="structured replies"):
            NBDClient.connect_unix(srv.path, "x")
    assert srv.options == [p.OPT_STRUCTURED_REPLY, p.OPT_ABORT]  # a soft disconnect


def hostile(reply: Callable[[int, int, int], bytes]) -> Callable[[Request], bytes | None]:
    return lambda r: reply(r[2], r[3], r[4])


@pytest.mark.parametrize("reply, match", [
    # a reply for another request
    (lambda h, o, n: data_chunk(h + 1, o, b"\x01" * n), "handle"),
    # a chunk reaching past the request
    (lambda h, o, n: data_chunk(h, o + 1, b"\x01" * n), "outside the read"),
    # a chunk before it
    (lambda h, o, n: data_chunk(h, o - 512, b"\x01" * n), "outside the read"),
    # a truncated reply: the header promises more than comes before the server hangs up
    (lambda h, o, n: Hangup(data_chunk(h, o, b"\x01" * n)[:-100]), "closed the connection"),
    (lambda h, o, n: Hangup(data_chunk(h, o, b"")[:10]), "closed the connection"),
    # overlapping chunks
    (lambda h, o, n: data_chunk(h, o, b"\x01" * n, done=False) + data_chunk(h, o, b"\x02"),
     "overlaps"),
    (lambda h, o, n: data_chunk(h, o, b"\x01" * 1024, done=False)
     + data_chunk(h, o + 512, b"\x02"), "overlaps"),
    # done before every byte was sent
    (lambda h, o, n: data_chunk(h, o, b"\x01" * (n // 2)), "covered"),
    # a hole chunk of the wrong size
    (lambda h, o, n: chunk(h, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">Q", o)), "hole chunk"),
    # a simple reply to a read where structured replies were negotiated
    (lambda h, o, n: struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, h) + b"\x01" * n,
     "simple reply"),
    # a bad reply magic
    (lambda h, o, n: b"\x00" * 20, "reply magic"),
    # a block status chunk in a read's reply
    (lambda h, o, n: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 7, n, 0)),
     "chunk type"),
    # an error chunk whose message length lies
    (lambda h, o, n: chunk(h, p.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 50) + b"x"),
     "error chunk"),
])
def test_a_hostile_read_reply_raises_and_closes(tmp_path, reply, match):
    with fake(tmp_path, hostile(reply)) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        with pytest.raises(ProtocolError, match=match):
            c.read(4096, 4096)
        with pytest.raises(ClosedError):
            c.read(0, 1)


def test_an_error_chunk_names_the_errno_and_the_connection_stays_usable(tmp_path):
    def answer(r: Request) -> bytes:
        _, _, h, o, _ = r
        if o == 0:
            return (data_chunk(h, o, b"\x01" * 512, done=False)
                    + chunk(h, p.REPLY_TYPE_ERROR_OFFSET,
                            struct.pack(">IH", 5, 4) + b"oops" + struct.pack(">Q", o + 512),
                            done=False)
                    + chunk(h, p.REPLY_TYPE_NONE, b""))
        return good_read(r)

    with fake(tmp_path, answer) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        with pytest.raises(RemoteIOError, match=r"EIO.*at offset 512: oops") as info:
            c.read(0, 4096)
        assert info.value.errno == 5
        assert c.read(4096, 10) == b"\x00" * 10  # 4096 & 0xff


def test_hole_chunks_read_as_zeros(tmp_path):
    def answer(r: Request) -> bytes:
        _, _, h, o, n = r
        half = n // 2
        return (chunk(h, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", o + half, n - half),
                      done=False)
                + data_chunk(h, o, b"\x09" * half))

    with fake(tmp_path, answer) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        assert c.read(0, 8192) == b"\x09" * 4096 + bytes(4096)


def test_block_sizes_are_honoured(tmp_path):
    with fake(tmp_path, good_read, block=(4096, 4096, 64 * KiB)) as srv:
        with NBDClient.connect_unix(srv.path, "x") as c:
            assert c.read(100, 10) == bytes([0]) * 10
            assert len(c.read(8192, 200 * KiB)) == 200 * KiB
            with pytest.raises(AlignmentError):
                c.write(100, b"x" * 4096)
    reads = [(o, n) for _, cmd, _, o, n in srv.requests if cmd == p.CMD_READ]
    assert reads[0] == (0, 4096)
    assert all(o % 4096 == 0 and n % 4096 == 0 and n <= 64 * KiB for o, n in reads)
    assert sum(n for o, n in reads[1:]) == 200 * KiB


def test_impossible_block_sizes_are_refused(tmp_path):
    with fake(tmp_path, block=(3000, 4096, 64 * KiB)) as srv:
        with pytest.raises(ProtocolError, match="block sizes"):
            NBDClient.connect_unix(srv.path, "x")


def status_reply(extents: list[tuple[int, int]], context: int = 7
                 ) -> Callable[[Request], bytes]:
    def answer(r: Request) -> bytes:
        body = struct.pack(">I", context) + b"".join(struct.pack(">II", n, f)
                                                     for n, f in extents)
        return chunk(r[2], p.REPLY_TYPE_BLOCK_STATUS, body)
    return answer


def test_short_block_status_replies_are_asked_again(tmp_path):
    # every reply covers 5 KiB from the request's offset (the second one's last extent
    # reaches past the request: clipped)
    with fake(tmp_path, status_reply([(1024, 1), (4096, 0)])) as srv:
        with NBDClient.connect_unix(srv.path, "x") as c:
            got = c.block_status(512, 8192)
    assert got == [(512, 1024, 1), (1536, 4096, 0), (5632, 1024, 1), (6656, 2048, 0)]
    status = [(o, n) for _, cmd, _, o, n in srv.requests if cmd == p.CMD_BLOCK_STATUS]
    assert status == [(512, 8192), (5632, 3072)]


def test_an_extent_past_a_capped_request_is_cut_at_it(tmp_path):
    # a 2 GiB span takes two 1 GiB requests; the server's last extent may reach past the
    # request, and the next request starts where the first one ended, not beyond
    span = nbd.client.MAX_STATUS_REQUEST

    def answer(r: Request) -> bytes:
        return status_reply([(r[4] + 512, 0)])(r)

    with fake(tmp_path, answer, size=2 * span + 4096) as srv:
        with NBDClient.connect_unix(srv.path, "x") as c:
            assert c.block_status(0, 2 * span) == [(0, span, 0), (span, span, 0)]
    status = [(o, n) for _, cmd, _, o, n in srv.requests if cmd == p.CMD_BLOCK_STATUS]
    assert status == [(0, span), (span, span)]


@pytest.mark.parametrize("answer, match", [
    (status_reply([(4096, 0)], context=8), "context id 8"),
    (status_reply([(0, 0)]), "length 0"),
    (status_reply([(512, 0), (1 * MiB, 0), (512, 0)]), "past the request"),
    (lambda r: chunk(r[2], p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 7)), "status chunk"),
])
def test_a_hostile_block_status_reply_raises(tmp_path, answer, match):
    with fake(tmp_path, answer) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        with pytest.raises(ProtocolError, match=match):
            c.block_status(0, 1 * MiB)


def test_a_long_unix_socket_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(os.fsencode(deep / "fake.sock")) > 107
    with fake(deep, good_read) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        assert c.read(1, 2) == b"\x01\x01"


def test_a_silent_server_times_out(tmp_path):
    stall = threading.Event()

    def answer(r: Request) -> bytes:
        stall.wait(10)
        return b""

    with fake(tmp_path, answer) as srv:
        c = NBDClient.connect_unix(srv.path, "x", timeout=0.2)
        with pytest.raises(TimeoutError):
            c.read(0, 512)
        stall.set()
        with pytest.raises(ClosedError):
            c.read(0, 512)


def test_write_errors_name_the_errno_and_eshutdown_disconnects(tmp_path):
    def answer(r: Request) -> bytes:
        _, cmd, h, o, _ = r
        if cmd == p.CMD_WRITE and o == 0:
            return struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.ENOSPC, h)
        if cmd == p.CMD_WRITE:
            return struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, h)
        return chunk(h, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.ESHUTDOWN, 3) + b"bye")

    with fake(tmp_path, answer) as srv, NBDClient.connect_unix(srv.path, "x") as c:
        with pytest.raises(RemoteIOError, match="ENOSPC") as info:
            c.write(0, b"x" * 4096)
        assert info.value.errno == p.ENOSPC
        c.write(4096, b"y" * 4096)  # still usable
        with pytest.raises(RemoteIOError, match=r"ESHUTDOWN.*bye"):
            c.flush()
        with pytest.raises(ClosedError):
            c.read(0, 1)
    assert [cmd for _, cmd, _, _, _ in srv.requests] == [
        p.CMD_WRITE, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_DISC]


def test_threads_sharing_one_client_each_get_their_own_bytes(tmp_path):
    path = sparse_file(tmp_path / "f.img", data=((0, SIZE),))
    image = path.read_bytes()
    failures: list[BaseException] = []
    with serving([nbd.file_export(path, "f")], tmp_path):
        with NBDClient.connect_unix(tmp_path / "nbd.sock", "f") as c:
            def reader(k: int) -> None:
                try:
                    for i in range(20):
                        offset = ((k * 20 + i) * 97 * KiB) % (SIZE - 256 * KiB)
                        assert c.read(offset, 256 * KiB) == image[offset:offset + 256 * KiB]
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert not failures, failures
