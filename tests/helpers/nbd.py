"""Shared helpers of the NBD tests (no tests here): a raw protocol client that can misbehave
on purpose, a journal built from a known model, and a server running in a thread."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
from pathlib import Path

from zcore import nbd
from zcore.journal import Journal, VolumeSpec
from zcore.vpg import VPG, LocalLink, VPGSettings

MiB = 1 << 20
VOLUME = 32 * MiB


# ---- a journal whose every checkpoint image is known ---------------------------------------


def build_journal(path, *, sizes=(8 * MiB, 4 * MiB), rounds=3, writes=60, seed=1,
                  promote_first=True):
    """A journal of volumes disk0, disk1... fed random writes (some zero, some LZ4-friendly)
    with a tagged checkpoint after each round.  Returns (journal, [(checkpoint, {volume
    name: image bytes at that checkpoint})]).  With `promote_first`, the first round is
    promoted into the replicas, so views read both replica and journal."""
    rng = random.Random(seed)
    specs = [VolumeSpec(i, f"disk{i}", size) for i, size in enumerate(sizes)]
    journal = Journal.create(path, specs, vm="vm1")
    model = {s.name: bytearray(s.size) for s in specs}
    snapshots = []
    for r in range(rounds):
        for _ in range(writes):
            spec = rng.choice(specs)
            length = rng.randrange(1, 65) * 512
            offset = rng.randrange(0, (spec.size - length) // 512 + 1) * 512
            kind = rng.random()
            if kind < 0.15:
                data = bytes(length)
            elif kind < 0.5:
                data = bytes([rng.randrange(256)]) * length
            else:
                data = rng.randbytes(length)
            journal.append([(spec.id, offset, data)])
            model[spec.name][offset : offset + length] = data
        ckpt = journal.checkpoint(f"round {r}")
        snapshots.append((ckpt, {name: bytes(img) for name, img in model.items()}))
        if r == 0 and promote_first:
            journal.promote_to(ckpt.seq)
    journal.commit()
    return journal, snapshots


def write_image(path, data: bytes) -> Path:
    Path(path).write_bytes(data)
    return Path(path)


# ---- a protected volume whose stream feeds a journal -----------------------------------


class Protected:
    """A VPG with one VM and one volume, its stream feeding a journal in this process."""

    def __init__(self, root: Path, size: int = VOLUME) -> None:
        self.path = root / "disk0.img"
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.vpg = VPG("g", root / "vpg", VPGSettings(checkpoint_interval=3600))
        vm = self.vpg.add_vm("vm1")
        self.volume = self.vpg.add_volume(vm, "disk0", self.path)
        self.journals = LocalLink.create_journals(self.vpg, root / "journals")
        self.journal = self.journals["vm1"]
        self.link = LocalLink(self.vpg, self.journals)
        self.vpg.start()
        self.link.start()

    def checkpoint(self, tag: str) -> int:
        """A tagged checkpoint, delivered with everything before it into the journal."""
        seq = self.vpg.checkpoint(tag).seq
        self.link.stop()
        self.link.drain()
        self.link.start()
        return seq

    def captured(self, seq: int) -> bytes:
        with self.journal.view(seq) as view:
            return view.read("disk0", 0, self.volume.size)

    def close(self) -> None:
        self.link.stop()
        self.vpg.close()
        for j in self.journals.values():
            j.close()


# ---- a server in a thread -----------------------------------------------------------------


@contextlib.contextmanager
def serving(exports, tmp_path, **kwargs):
    """An NBDServer on 127.0.0.1 (ephemeral port) and on a Unix socket in tmp_path."""
    server = nbd.NBDServer(exports, **kwargs)
    thread = nbd.ServerThread(server, port=0, unix=os.path.join(tmp_path, "nbd.sock"))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """Run a client tool; fail the test with its output when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    if proc.returncode:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


# ---- a raw NBD client ----------------------------------------------------------------------


class ServerClosed(Exception):
    pass


class RawClient:
    """Speaks NBD byte by byte, so tests can also break the protocol on purpose."""

    def __init__(self, address, timeout: float = 5.0) -> None:
        if isinstance(address, str | os.PathLike):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(address))
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.handle = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ServerClosed(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    # handshake

    def hello(self, client_flags: int = nbd.CLIENT_FIXED_NEWSTYLE | nbd.CLIENT_NO_ZEROES) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == nbd.NBDMAGIC and opt_magic == nbd.IHAVEOPT
        self.send(struct.pack(">I", client_flags))
        return flags

    def option(self, option: int, data: bytes = b"", *, magic: int = nbd.IHAVEOPT) -> None:
        self.send(struct.pack(">QII", magic, option, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == nbd.OPT_REPLY_MAGIC
        return option, kind, self.recv_exact(length)

    def go(self, name: str, *, structured: bool = False, info=(nbd.INFO_BLOCK_SIZE,),
           option: int = nbd.OPT_GO) -> dict:
        """NBD_OPT_GO (or INFO); returns what the server said, or {"error": reply type}."""
        if structured:
            self.option(nbd.OPT_STRUCTURED_REPLY)
            _, kind, _ = self.opt_reply()
            assert kind == nbd.REP_ACK
            self.structured = True
        raw = name.encode()
        self.option(option, struct.pack(">I", len(raw)) + raw
                    + struct.pack(f">H{len(info)}H", len(info), *info))
        result: dict = {}
        while True:
            _, kind, data = self.opt_reply()
            if kind == nbd.REP_ACK:
                return result
            if kind != nbd.REP_INFO:
                result["error"] = kind
                result["message"] = data.decode(errors="replace")
                return result
            (info_type,) = struct.unpack_from(">H", data)
            if info_type == nbd.INFO_EXPORT:
                _, result["size"], result["flags"] = struct.unpack(">HQH", data)
            elif info_type == nbd.INFO_BLOCK_SIZE:
                _, *result["block_sizes"] = struct.unpack(">HIII", data)
            elif info_type == nbd.INFO_NAME:
                result["name"] = data[2:].decode()
            elif info_type == nbd.INFO_DESCRIPTION:
                result["description"] = data[2:].decode()

    def connect_export(self, name: str, *, structured: bool = False,
                       allocation: bool = False) -> dict:
        """Handshake and GO; with `allocation`, structured replies and base:allocation
        selected first."""
        self.hello()
        if allocation:
            self.option(nbd.OPT_STRUCTURED_REPLY)
            assert self.opt_reply()[1] == nbd.REP_ACK
            self.structured = True
            replies = self.meta_context(nbd.OPT_SET_META_CONTEXT, name, ["base:allocation"])
            assert replies[-1][0] == nbd.REP_ACK and len(replies) == 2, replies
            structured = False  # already agreed
        result = self.go(name, structured=structured)
        assert "error" not in result, result
        return result

    def meta_context(self, option: int, name: str, queries) -> list[tuple[int, bytes]]:
        """NBD_OPT_LIST/SET_META_CONTEXT; the (reply type, data) replies up to the ACK or
        an error."""
        raw = name.encode()
        body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            body += struct.pack(">I", len(q.encode())) + q.encode()
        self.option(option, body)
        out = []
        while True:
            _, kind, data = self.opt_reply()
            out.append((kind, data))
            if kind != nbd.REP_META_CONTEXT:
                return out

    def block_status(self, offset: int, length: int, flags: int = 0):
        """(error, [(length, state)...]) of an NBD_CMD_BLOCK_STATUS (structured replies)."""
        handle = self.request(nbd.CMD_BLOCK_STATUS, offset, length, flags=flags)
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        rflags, kind, got, n = struct.unpack(">HHQI", self.recv_exact(16))
        payload = self.recv_exact(n)
        assert got == handle and rflags & nbd.REPLY_FLAG_DONE
        if kind & 0x8000:
            return struct.unpack_from(">I", payload)[0], []
        assert kind == nbd.REPLY_TYPE_BLOCK_STATUS
        (ctx,) = struct.unpack_from(">I", payload)
        assert ctx == nbd.META_BASE_ALLOCATION_ID
        words = struct.unpack(f">{(n - 4) // 4}I", payload[4:])
        return 0, list(zip(words[0::2], words[1::2], strict=True))

    # transmission

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                payload: bytes = b"", magic: int = nbd.REQUEST_MAGIC) -> int:
        self.handle += 1
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, self.handle, offset, length)
                  + payload)
        return self.handle

    def reply(self, read_length: int = 0, lengths: dict | None = None) -> tuple[int, int, bytes]:
        """(handle, error, data) of the next reply; `read_length` bytes of data (or
        `lengths[handle]`) for a successful simple read reply."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            if lengths is not None:
                read_length = lengths.get(handle, 0)
            data = self.recv_exact(read_length) if read_length and not error else b""
            return handle, error, data
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        assert self.structured
        data = bytearray()
        error = 0
        while True:
            flags, kind, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            if kind == nbd.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif kind & 0x8000:
                (error,) = struct.unpack_from(">I", payload)
            if flags & nbd.REPLY_FLAG_DONE:
                return handle, error, bytes(data)
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == nbd.STRUCTURED_REPLY_MAGIC

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        handle = self.request(nbd.CMD_READ, offset, length, flags=flags)
        got, error, data = self.reply(length)
        assert got == handle
        return error, data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        handle = self.request(nbd.CMD_WRITE, offset, len(data), flags=flags, payload=data)
        got, error, _ = self.reply()
        assert got == handle
        return error

    def simple(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> int:
        handle = self.request(cmd, offset, length, flags=flags)
        got, error, _ = self.reply()
        assert got == handle
        return error


# ---- TLS material for tests (a throwaway CA, valid until 2126; never used elsewhere) -------


def write_tls_files(directory) -> dict[str, Path]:
    """Write the test CA, server and client certificates into `directory` with the file
    names GnuTLS-based clients (libnbd, qemu) look for; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in TLS_FILES.items():
        path = directory / name
        path.write_text(text)
        os.chmod(path, 0o600)
        paths[name] = path
    return paths


TLS_FILES: dict[str, str] = {
    "ca-cert.pem": """\
-----BEGIN CERTIFICATE-----
MIIBljCCAT2gAwIBAgIUKvO2k0Harz6EDPYYoO2LPX3tvtIwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNemNvcmUgdGVzdCBDQTAgFw0yNjExMjUwNzU5MjBaGA8yMTI2
MTEwMTA3NTkyMFowGDEWMBQGA1UEAwwNemNvcmUgdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABLNeR+IoDG6qL3tP8dMgAQxvZqoEFcvuwdV8v3ab9SaM
1yQZ99RlG37n5MdkXuNW5uL+k0+H0DmaDOeeUfR1z86jYzBhMB0GA1UdDgQWBBSP
q3mbzDxRAahdmi4reWCxsb76JjAfBgNVHSMEGDAWgBSPq3mbzDxRAahdmi4reWCx
sb76JjAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQD
AgNHADBEAiB/XX0Sn2Zk8v5zAYqG8dNENV0hk/GVxYz3S6AtAwbLqwIgJDdisLmd
OLGTTace5PCyENxQHw9jJwmb6s+drsSsGa4=
-----END CERTIFICATE-----
""",
    "server-cert.pem": """\
-----BEGIN CERTIFICATE-----
MIIBvTCCAWOgAwIBAgIUOUZKHB7T6UyGFQyG0RJOtiV2H3swCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNemNvcmUgdGVzdCBDQTAgFw0yNjExMjUwNzU5MjBaGA8yMTI2
MTEwMTA3NTkyMFowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE91XFqM5aiLvRM3F0a1zBiHk5AOowTCGyxA68C4qCyEEdInyB
5c8HuKxIPCheUdaHB9GdWSgNTL5xxJ1Cv3GtzqOBjDCBiTAaBgNVHREEEzARggls
b2NhbGhvc3SHBH8AAAEwCQYDVR0TBAIwADALBgNVHQ8EBAMCBaAwEwYDVR0lBAww
CgYIKwYBBQUHAwEwHQYDVR0OBBYEFPB/HqZLlg3rHWJ1MswAwyMYM1eCMB8GA1Ud
IwQYMBaAFI+reZvMPFEBqF2aLit5YLGxvvomMAoGCCqGSM49BAMCA0gAMEUCIQDr
ZPj3z6QMDB0Sttg/TxxUwnBh4yMeARMiCxtuCOGy7AIge2H/P9BJk9W0POUtaPy7
TrjMYtxoVT9ovLs60umzBxU=
-----END CERTIFICATE-----
""",
    "server-key.pem": """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgd799RCtWZ3XyP3PZ
YVxsCVmmFMA4SaRzrFcpZ+3IZXChRANCAAT3VcWozlqIu9EzcXRrXMGIeTkA6jBM
IbLEDrwLioLIQR0ifIHlzwe4rEg8KF5R1ocH0Z1ZKA1MvnHEnUK/ca3O
-----END PRIVATE KEY-----
""",
    "client-cert.pem": """\
-----BEGIN CERTIFICATE-----
MIIBpzCCAU2gAwIBAgIUOUZKHB7T6UyGFQyG0RJOtiV2H3wwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNemNvcmUgdGVzdCBDQTAgFw0yNjExMjUwNzU5MjBaGA8yMTI2
MTEwMTA3NTkyMFowHDEaMBgGA1UEAwwRemNvcmUgdGVzdCBjbGllbnQwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAARLtU65aRiBvF+T25IwhlHfj2/kgxxYRPGz8NNd
ckZySJWI8m3zkW9N8heVDSkAOVwisCpouBmHbv65+2UDdNUHo28wbTAJBgNVHRME
AjAAMAsGA1UdDwQEAwIFoDATBgNVHSUEDDAKBggrBgEFBQcDAjAdBgNVHQ4EFgQU
kQ13u98SHTm12q3POMfJjR56LdAwHwYDVR0jBBgwFoAUj6t5m8w8UQGoXZouK3lg
sbG++iYwCgYIKoZIzj0EAwIDSAAwRQIhAMRfUhPljDEZpQolKSyDcKbHJXh2CGf5
7H3dgRGK77dLAiAW9VkZ8ummJcr2c3fFO6P5WucZyf1NOEMJP7SA/+kZzw==
-----END CERTIFICATE-----
""",
    "client-key.pem": """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQ4qTcFXO3tBQQ2FM
jb7/9Hwpt/+SyBBD2yFWAx7DbCKhRANCAARLtU65aRiBvF+T25IwhlHfj2/kgxxY
RPGz8NNdckZySJWI8m3zkW9N8heVDSkAOVwisCpouBmHbv65+2UDdNUH
-----END PRIVATE KEY-----
""",
}
