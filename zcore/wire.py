"""Site-to-site protocol v2 (and v1): frames and messages (docs/format.md, "Wire protocol").

Sits between the replication endpoints and the socket.  Every frame is a 24-byte header
(magic, type, channel, payload length, payload CRC32C, header CRC32C) and a payload.
Control messages are small JSON objects checked against a schema; bundles and acks are
binary.  A bundle payload carries one part per VM, each a run of journal records exactly
as the protected site encoded them, so the recovery site appends them as received.
Everything here treats its input as hostile: lengths are bounded before any allocation
and every checksum is checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zcore._native.record import FLAGS_KNOWN, FLAGS_V2, crc32c
from zcore.errors import ProtocolError

# v2: BUNDLE records may be zstd (FLAG_ZSTD).  A HELLO says `protocol` 1 (what a v1 peer
# checks) and `max_protocol`, the newest it speaks; the server answers with the version
# of the connection, the newest both speak (docs/format.md 10.3).
PROTOCOL_VERSION = 2
PROTOCOL_V1 = 1
MAGIC = b"ZCWF"
HEADER = struct.Struct("<4sHHIIII")  # magic, type, flags, channel, length, payload crc, crc
assert HEADER.size == 24
MAX_CONTROL = 64 << 10  # JSON control payloads
MAX_PAYLOAD = 80 << 20  # a bundle: up to a 32 MiB write record per VM part and headroom

# frame types
HELLO = 1
PAIR = 2
PAIRED = 3
ATTACH = 4
ATTACHED = 5
BUNDLE = 6
ACK = 7
HEARTBEAT = 8
CLOSE = 9
ERROR = 10
MOVE = 11  # protected -> recovery: fail over to a durable checkpoint (a planned move)
MOVING = 12  # recovery -> protected: the move is accepted or refused
FAILED_OVER = 13  # recovery -> protected: the VPG failed over there (shutdown policy)
# delta sync, types 32-39 (docs/format.md 10c; payloads in zcore.deltasync.messages)
DSYNC_OFFER = 32
DSYNC_START = 33
DSYNC_HASHES = 34
DSYNC_REFINE = 35
DSYNC_DATA = 36
DSYNC_VERDICT = 37
DSYNC_DONE = 38
DSYNC_COMPARED = 39  # a resync's compare: a batch compared (docs/format.md 10c.7)
TYPE_NAMES = {HELLO: "HELLO", PAIR: "PAIR", PAIRED: "PAIRED", ATTACH: "ATTACH",
              ATTACHED: "ATTACHED", BUNDLE: "BUNDLE", ACK: "ACK", HEARTBEAT: "HEARTBEAT",
              CLOSE: "CLOSE", ERROR: "ERROR", MOVE: "MOVE", MOVING: "MOVING",
              FAILED_OVER: "FAILED_OVER", DSYNC_OFFER: "DSYNC_OFFER",
              DSYNC_START: "DSYNC_START", DSYNC_HASHES: "DSYNC_HASHES",
              DSYNC_REFINE: "DSYNC_REFINE", DSYNC_DATA: "DSYNC_DATA",
              DSYNC_VERDICT: "DSYNC_VERDICT", DSYNC_DONE: "DSYNC_DONE",
              DSYNC_COMPARED: "DSYNC_COMPARED"}
CONTROL_TYPES = {HELLO, PAIR, PAIRED, ATTACH, ATTACHED, CLOSE, ERROR, MOVE, MOVING,
                 FAILED_OVER, DSYNC_OFFER, DSYNC_START, DSYNC_DONE, DSYNC_COMPARED}

BUNDLE_HEAD = struct.Struct("<QQII")  # first seq, last seq, parts, reserved
PART_HEAD = struct.Struct("<II")  # vm index, length
ACK_BODY = struct.Struct("<Q")
HEARTBEAT_BODY = struct.Struct("<Q")


def frame_header(ftype: int, channel: int, payload: bytes | bytearray | memoryview) -> bytes:
    head = HEADER.pack(MAGIC, ftype, 0, channel, len(payload), crc32c(payload), 0)
    return head[:20] + struct.pack("<I", crc32c(head[:20]))


def frame(ftype: int, channel: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return frame_header(ftype, channel, payload) + bytes(payload)


@dataclass(frozen=True)
class Frame:
    type: int
    channel: int
    payload: memoryview

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")


class FrameReader:
    """Incremental frame parser for an asyncio BufferedProtocol: hand out buffers with
    `get_buffer`, report received bytes with `received`, iterate complete frames."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._head = bytearray(HEADER.size)
        self._head_fill = 0
        self._payload: bytearray | None = None
        self._fill = 0
        self._type = self._channel = self._length = self._crc = 0
        self._frames: list[Frame] = []

    @property
    def payload_allocated(self) -> int:
        """Bytes allocated for the payload of the frame being received (0 between frames
        and while a header is incomplete)."""
        return 0 if self._payload is None else len(self._payload)

    def get_buffer(self) -> memoryview:
        if self._payload is None:
            return memoryview(self._head)[self._head_fill :]
        return memoryview(self._payload)[self._fill :]

    def received(self, n: int) -> list[Frame]:
        """Account for `n` bytes written into the last buffer; returns complete frames."""
        if self._payload is None:
            self._head_fill += n
            if self._head_fill == HEADER.size:
                self._start_payload()
        else:
            self._fill += n
        if self._payload is not None and self._fill == self._length:
            self._finish()
        frames, self._frames = self._frames, []
        return frames

    def feed(self, data: bytes) -> list[Frame]:
        """Parse a chunk of bytes (for stream readers and tests)."""
        out: list[Frame] = []
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            out.extend(self.received(n))
        return out

    def _start_payload(self) -> None:
        magic, ftype, flags, channel, length, pcrc, hcrc = HEADER.unpack(self._head)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
        if crc32c(memoryview(self._head)[:20]) != hcrc:
            raise ProtocolError("frame header checksum mismatch")
        if ftype not in TYPE_NAMES or flags:
            raise ProtocolError(f"unknown frame type {ftype} or flags {flags:#x}")
        limit = MAX_CONTROL if ftype in CONTROL_TYPES else self.max_payload
        if length > limit:
            raise ProtocolError(f"{TYPE_NAMES[ftype]} frame of {length} bytes exceeds {limit}")
        self._type, self._channel, self._length, self._crc = ftype, channel, length, pcrc
        self._payload = bytearray(length)
        self._fill = 0

    def _finish(self) -> None:
        payload = self._payload
        assert payload is not None
        if crc32c(payload) != self._crc:
            raise ProtocolError(f"{TYPE_NAMES[self._type]} frame payload checksum mismatch")
        self._frames.append(Frame(self._type, self._channel, memoryview(payload)))
        self._payload = None
        self._head_fill = 0


# ---- control messages -------------------------------------------------------------------

# required keys and their types per control message
SCHEMAS: dict[int, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"protocol": int, "site_id": str, "site_name": str, "role": str},
    PAIR: {"token_id": str, "cert": str, "proof": str},  # never the token itself
    PAIRED: {"cert": str, "proof": str, "site_id": str, "site_name": str},
    ATTACH: {"vpg": str, "vms": list, "journal": dict},
    ATTACHED: {"durable_seq": int, "max_seq": int},
    CLOSE: {"reason": str},
    ERROR: {"reason": str},
    MOVE: {"checkpoint_id": int, "reverse": bool},
    MOVING: {"accepted": bool, "reason": str},
    FAILED_OVER: {"checkpoint_id": int, "shutdown": str},
    DSYNC_OFFER: {"protocol": int, "volumes": list},
    DSYNC_START: {"key": str, "batch": int, "volumes": list},
    DSYNC_DONE: {"volumes": list},
    DSYNC_COMPARED: {"batch": int},
}


def control(ftype: int, channel: int = 0, **fields: object) -> bytes:
    return frame(ftype, channel, json.dumps(fields).encode())


def parse_control(f: Frame) -> dict[str, Any]:
    """Decode and check a control message against its schema; anything else raises
    `ProtocolError` (never another exception: the caller refuses the peer with it)."""
    schema = SCHEMAS.get(f.type)
    if schema is None:
        raise ProtocolError(f"{f.name} is not a control message")
    try:
        msg = json.loads(bytes(f.payload))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{f.name} payload is not JSON") from None
    except RecursionError:  # e.g. 60,000 nested "[" fit one 64 KiB control frame
        raise ProtocolError(f"{f.name} payload nests too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{f.name} payload is not an object")
    for key, kind in schema.items():
        value = msg.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{f.name} lacks a valid {key!r}")
    return msg


def client_hello(role: str, site_id: str, site_name: str) -> bytes:
    """A client's HELLO: readable by a v1 server (`protocol` 1), offering the newest."""
    return control(HELLO, protocol=PROTOCOL_V1, max_protocol=PROTOCOL_VERSION,
                   site_id=site_id, site_name=site_name, role=role)


def negotiate(msg: dict[str, Any]) -> int:
    """The version of a connection whose client sent HELLO `msg` (the server's side):
    the newest both speak.  A HELLO without `max_protocol` is a v1 client's."""
    if msg["protocol"] != PROTOCOL_V1:
        raise ProtocolError(f"protocol version {msg['protocol']} is not supported")
    top = msg.get("max_protocol", PROTOCOL_V1)
    if not isinstance(top, int) or isinstance(top, bool) or top < PROTOCOL_V1:
        raise ProtocolError(f"HELLO has a bad max_protocol {top!r}")
    return min(top, PROTOCOL_VERSION)


def accepted_version(msg: dict[str, Any]) -> int:
    """The version the server's HELLO `msg` chose (the client's side): a v1 server says
    1, a newer one the version it agreed; anything this client does not speak is refused."""
    version = msg["protocol"]
    if not PROTOCOL_V1 <= version <= PROTOCOL_VERSION:
        raise ProtocolError(f"recovery site speaks protocol {version}")
    return int(version)


def record_flags(version: int) -> int:
    """The record flags BUNDLE parts may carry on a connection of `version`."""
    return FLAGS_KNOWN if version >= 2 else FLAGS_V2


def parse_attach_vms(msg: dict[str, Any]) -> list[tuple[str, list[tuple[int, str, int]]]]:
    """The VMs and volumes of an ATTACH, checked: [(vm, [(volume id, name, size)])]."""
    vms = []
    seen_ids: set[int] = set()
    for vm in msg["vms"]:
        if not isinstance(vm, dict) or not isinstance(vm.get("name"), str) or not vm["name"]:
            raise ProtocolError("ATTACH names a VM without a name")
        if not _safe_name(vm["name"]) or not isinstance(vm.get("volumes"), list):
            raise ProtocolError(f"ATTACH VM {vm.get('name')!r} is malformed")
        vols = []
        for v in vm["volumes"]:
            try:
                vid, name, size = int(v["id"]), str(v["name"]), int(v["size"])
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("ATTACH volume entry is malformed") from None
            if not 0 <= vid < 65536 or vid in seen_ids or size <= 0 or size % 512:
                raise ProtocolError(f"ATTACH volume {name!r} has a bad id or size")
            seen_ids.add(vid)
            vols.append((vid, name, size))
        if not vols:
            raise ProtocolError(f"ATTACH VM {vm['name']!r} has no volume")
        vms.append((vm["name"], vols))
    if not vms or len({name for name, _ in vms}) != len(vms):
        raise ProtocolError("ATTACH needs distinct VMs")
    return vms


def _safe_name(name: str) -> bool:
    return (0 < len(name) <= 128 and name not in (".", "..")
            and all(c.isalnum() or c in "-_." for c in name))


def safe_name(name: str) -> bool:
    """True for names usable as one path component (VPG and VM names)."""
    return _safe_name(name)


# ---- bundles and acks -------------------------------------------------------------------

def bundle_frames(channel: int, first_seq: int, last_seq: int,
                  parts: Sequence[tuple[int, bytes | bytearray]]) -> list[bytes | bytearray]:
    """A BUNDLE frame as buffers for writelines (parts are not copied)."""
    head = bytearray(BUNDLE_HEAD.pack(first_seq, last_seq, len(parts), 0))
    for vm_index, data in parts:
        head += PART_HEAD.pack(vm_index, len(data))
    crc = crc32c(head)
    for _, data in parts:
        crc = crc32c(data, crc)
    length = len(head) + sum(len(d) for _, d in parts)
    fh = HEADER.pack(MAGIC, BUNDLE, 0, channel, length, crc, 0)
    fh = fh[:20] + struct.pack("<I", crc32c(fh[:20]))
    return [fh, head, *(d for _, d in parts)]


@dataclass(frozen=True)
class BundleFrame:
    first_seq: int
    last_seq: int
    parts: list[tuple[int, memoryview]]


def parse_bundle(payload: memoryview, nvms: int) -> BundleFrame:
    if len(payload) < BUNDLE_HEAD.size:
        raise ProtocolError("BUNDLE shorter than its header")
    first, last, nparts, reserved = BUNDLE_HEAD.unpack_from(payload)
    if reserved or first == 0 or last < first or nparts > nvms:
        raise ProtocolError(f"BUNDLE header is invalid (seqs {first}..{last}, {nparts} parts)")
    at = BUNDLE_HEAD.size + nparts * PART_HEAD.size
    if at > len(payload):
        raise ProtocolError("BUNDLE part table passes its end")
    parts = []
    seen: set[int] = set()
    for i in range(nparts):
        vm, length = PART_HEAD.unpack_from(payload, BUNDLE_HEAD.size + i * PART_HEAD.size)
        if vm >= nvms or vm in seen or at + length > len(payload):
            raise ProtocolError("BUNDLE part names an unknown VM or passes the end")
        seen.add(vm)
        parts.append((vm, payload[at : at + length]))
        at += length
    if at != len(payload):
        raise ProtocolError("BUNDLE has trailing bytes")
    return BundleFrame(first, last, parts)


def ack(channel: int, seq: int) -> bytes:
    return frame(ACK, channel, ACK_BODY.pack(seq))


def parse_ack(f: Frame) -> int:
    if len(f.payload) != ACK_BODY.size:
        raise ProtocolError("ACK payload has the wrong size")
    seq: int = ACK_BODY.unpack(f.payload)[0]
    return seq


def heartbeat(time_ns: int) -> bytes:
    return frame(HEARTBEAT, 0, HEARTBEAT_BODY.pack(time_ns))


def iter_records(part: memoryview) -> Iterator[tuple[int, int]]:
    """(seq, byte position) of each record header in a part, walking declared sizes only
    (no checksum checks: the journal validates the records it is given)."""
    at = 0
    while at + 64 <= len(part):
        (seq,) = struct.unpack_from("<Q", part, at + 8)
        (stored,) = struct.unpack_from("<I", part, at + 28)
        yield seq, at
        at += 64 + (stored + 63) // 64 * 64
