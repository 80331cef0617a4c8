"""Encoding writes and checkpoints as records (docs/format.md, "Records").

Sits between producers of writes (capture, the journal's local `append`, tests) and the
native codec: picks the cheapest encoding of each write (zero record, LZ4 block when it
saves space, raw with per-block CRCs otherwise) and packs checkpoint payloads.  Also the
one decoder of compressed payloads (`decode_payload`: LZ4 blocks and zstd frames), which
every reader of record payloads goes through, and the link's zstd re-encoding of a sealed
part (`zstd_part`).
"""

from __future__ import annotations

import operator
import struct
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard

from zcore._native import record as _rec
from zcore.errors import (
    AlignmentError,
    ConfigError,
    CorruptRecordError,
    OutOfRangeError,
    TruncatedRecordError,
    status_error,
)

SECTOR = _rec.SECTOR
MAX_WRITE = _rec.MAX_WRITE
HEADER_SIZE = _rec.RECORD_HEADER_SIZE
REC_WRITE = _rec.REC_WRITE
REC_ZERO = _rec.REC_ZERO
REC_CHECKPOINT = _rec.REC_CHECKPOINT
REC_SYNC = _rec.REC_SYNC
FLAG_LZ4 = _rec.FLAG_LZ4
FLAG_BLOCKCRC = _rec.FLAG_BLOCKCRC
FLAG_ZSTD = _rec.FLAG_ZSTD
FLAGS_KNOWN = _rec.FLAGS_KNOWN  # segment v3, wire protocol v2
FLAGS_V2 = _rec.FLAGS_V2  # segments v1-v2, wire protocol v1: no FLAG_ZSTD
FLAGS_COMPRESSED = _rec.FLAGS_COMPRESSED
EXTENT_DTYPE = _rec.EXTENT_DTYPE

CKPT_AUTO = 1
CKPT_TAGGED = 2
CKPT_FLAG_CONSISTENT = 0x01
MAX_TAG = 1024
_CKPT_HEAD = struct.Struct("<BBH")

# LZ4 is kept only when it saves at least 1/16 of the payload: below that the raw record
# (with its per-block CRCs, readable 4 KiB at a time) is worth more than the bytes saved.
LZ4_MIN_SAVING = 1 / 16

# zstd levels the link may use (python-zstandard; format.md 4.5a).  Measured on these
# machines on VM-like 4-64 KiB writes: level 1 ~250 MB/s per core, level 3 ~175 MB/s,
# level 6 ~65 MB/s, ratio 2.10 / 2.17 / 2.20 where LZ4 gets 1.81 at ~700 MB/s.
ZSTD_LEVELS = range(1, 20)


class Codec(StrEnum):
    """How the link encodes write payloads (the adaptive choice of
    zcore.replication.compression): raw, LZ4 blocks, or zstd frames."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"


class CodecChoice(NamedTuple):
    """The link's encoding for the next bundles: a codec and, for zstd, its level."""

    codec: Codec
    level: int = 0

    def __str__(self) -> str:
        return f"zstd-{self.level}" if self.codec == Codec.ZSTD else str(self.codec)


LZ4_CHOICE = CodecChoice(Codec.LZ4)

_local = threading.local()  # zstd (de)compressors are not shared between threads


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zc", {})
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False, write_dict_id=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def zstd_compress(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """One zstd frame of `data` stating its content size (format.md 4.5a); releases the
    GIL while it compresses."""
    if level not in ZSTD_LEVELS:
        raise ConfigError(f"zstd level {level} is not 1 to 19")
    packed: bytes = _compressor(level).compress(data)
    return packed


def decode_payload(flags: int, payload: bytes | bytearray | memoryview, length: int,
                   where: str) -> bytes:
    """The `length` data bytes of a compressed record payload (an LZ4 block or a zstd
    frame, by `flags`) whose payload_crc has been checked.  The one decoder of record
    payloads: a payload that does not decode to exactly `length` bytes, a zstd frame
    that does not state that size or has bytes after it, is CorruptRecordError naming
    `where`; no byte of it is returned."""
    data: bytes
    try:
        if flags & FLAG_LZ4:
            data = lz4.block.decompress(payload, uncompressed_size=length)
        elif flags & FLAG_ZSTD:
            # the declared size bounds the output before any allocation: a frame that
            # does not say it is `length` bytes is refused, and libzstd checks the size
            # it declares against what it decodes
            if zstandard.frame_content_size(payload) != length:
                raise CorruptRecordError(f"zstd record at {where} does not declare "
                                         f"{length} bytes")
            data = _decompressor().decompress(payload, max_output_size=length,
                                              allow_extra_data=False)
        else:
            raise CorruptRecordError(f"record at {where} has no compressed payload "
                                     f"(flags {flags:#x})")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise CorruptRecordError(f"compressed record at {where} fails to decode: "
                                 f"{exc}") from exc
    if len(data) != length:
        raise CorruptRecordError(f"compressed record at {where} decodes to {len(data)} "
                                 f"bytes, not {length}")
    return data


def check_int(what: str, value: object) -> int:
    """`value` as an int, or ConfigError: a bool or a float (`True`, `0.0`, `512.0`) is
    refused as a volume id, offset or length, never read as the number it equals."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, not a bool ({value!r})")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, not {type(value).__name__} "
                          f"({value!r})") from None


def byte_view(data: object, what: str = "write data") -> memoryview:
    """`data` as a flat memoryview of bytes, or ConfigError: the one check of every path
    where write data enters (the journal's append, protected volumes, NBD, scratch).
    A buffer whose items are wider than a byte (`memoryview(...).cast("I")`, a numpy
    array of int32) is refused, never measured in items while its bytes are encoded."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be a bytes-like buffer, not "
                          f"{type(data).__name__}") from None
    if view.itemsize != 1 or not view.c_contiguous:
        raise ConfigError(f"{what} must be a contiguous buffer of bytes (item size "
                          f"{view.itemsize}, format {view.format!r}); cast it to bytes first")
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def check_range(offset: int, length: int, size: int | None = None) -> None:
    """Raise unless [offset, offset+length) is sector-aligned, non-empty and within size."""
    if type(offset) is not int or type(length) is not int:  # True, 0.0, 512.0: refused
        check_int("offset", offset)
        check_int("length", length)
    if offset < 0 or length <= 0:
        raise ConfigError(f"invalid range {offset}+{length}")
    if offset % SECTOR or length % SECTOR:
        raise AlignmentError(
            f"range {offset}+{length} is not aligned to {SECTOR}-byte sectors"
        )
    if size is not None and offset + length > size:
        raise OutOfRangeError(f"range {offset}+{length} passes the volume's end ({size})")


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte of a sector-aligned buffer is zero."""
    return not np.frombuffer(data, dtype=np.uint64).any()


def encode_write(
    volume: int,
    seq: int,
    offset: int,
    data: bytes | bytearray | memoryview,
    time_ns: int,
    *,
    compress: bool = True,
    sync: bool = False,
    zstd_level: int = 0,
) -> bytes:
    """One write as a record: zero, LZ4 (when it pays) or raw with block CRCs; with
    `zstd_level` (1-19) a zstd record instead of LZ4 (segment v3, wire protocol v2)."""
    data = byte_view(data)
    length = len(data)
    check_range(offset, length)
    if length > MAX_WRITE:
        raise ConfigError(f"write of {length} bytes exceeds the {MAX_WRITE}-byte record limit")
    if is_zero(data):
        return _rec.encode_stored(REC_ZERO, 0, volume, seq, offset, length, time_ns)
    if compress:
        flag = FLAG_ZSTD if zstd_level else FLAG_LZ4
        packed = (zstd_compress(data, zstd_level) if zstd_level else
                  lz4.block.compress(data, store_size=False))
        if len(packed) <= length * (1 - LZ4_MIN_SAVING):
            kind = REC_SYNC if sync else REC_WRITE
            return _rec.encode_stored(kind, flag, volume, seq, offset, length, time_ns, packed)
    return _rec.encode_raw(volume, seq, offset, data, time_ns, sync)


def zstd_part(part: bytes | bytearray | memoryview, level: int,
              volume_sizes: npt.NDArray[np.uint64],
              min_saving: float = LZ4_MIN_SAVING, *, raw: bool = True) -> bytes:
    """A sealed part (records of one VM) with each raw, LZ4 or zstd WRITE or SYNC record
    re-encoded as a zstd record at `level` where that pays: a raw one when zstd saves
    `min_saving` of its data, an LZ4 or zstd one when the new frame is smaller than its
    payload.  Every other record is kept byte for byte; so are raw ones with `raw` False
    (a part sealed with zstd: its raw records are those zstd did not pay for).  The link's
    adaptive compression calls this when the link, not the CPU, is the bottleneck: the
    stream on the parts it sealed raw, the sender on bundles sealed before zstd or its
    present level was chosen."""
    view = memoryview(part).cast("B")
    batch = _rec.scan(view, 0, 0, 0, volume_sizes)
    if batch.status:
        raise status_error(batch.status, "re-encoding a sealed part for zstd")
    arr = batch.array()
    out: list[bytes | memoryview] = []
    pos = 0
    compress = _compressor(level).compress
    for e in arr.tolist():  # (seq, offset, pos, length, segment, volume, stored, type, flags, _)
        seq, offset, at, length, _seg, volume, stored, type_, flags, _res = e
        size = HEADER_SIZE + (stored + 63) // 64 * 64
        payload = view[at + HEADER_SIZE : at + HEADER_SIZE + stored]
        if flags == FLAG_BLOCKCRC and raw:
            table = _rec.blockcrc_table_size(length)
            packed = compress(payload[table:])
            keep = len(packed) <= length * (1 - min_saving)
        elif flags in (FLAG_LZ4, FLAG_ZSTD):
            packed = compress(decode_payload(flags, payload, length, f"sealed seq {seq}"))
            keep = len(packed) < stored
        else:
            continue
        if keep:
            if at > pos:
                out.append(view[pos:at])
            time_ns = int.from_bytes(view[at + 32 : at + 40], "little")
            out.append(_rec.encode_stored(type_, FLAG_ZSTD, volume, seq, offset, length,
                                          time_ns, packed))
            pos = at + size
    if pos == 0:
        return bytes(view)
    out.append(view[pos:])
    return b"".join(out)


def unzstd_part(part: bytes | bytearray | memoryview,
                volume_sizes: npt.NDArray[np.uint64]) -> bytes:
    """A part with each zstd record turned back into a raw one (for a peer of wire
    protocol v1, which has no zstd: a bundle sealed before the link went to one)."""
    view = memoryview(part).cast("B")
    batch = _rec.scan(view, 0, 0, 0, volume_sizes)
    if batch.status:
        raise status_error(batch.status, "re-encoding a sealed part without zstd")
    out: list[bytes | memoryview] = []
    pos = 0
    for e in batch.array().tolist():
        seq, offset, at, length, _seg, volume, stored, type_, flags, _res = e
        if flags == FLAG_ZSTD:
            if at > pos:
                out.append(view[pos:at])
            data = decode_payload(flags, view[at + HEADER_SIZE : at + HEADER_SIZE + stored],
                                  length, f"sealed record seq {seq}")
            time_ns = int.from_bytes(view[at + 32 : at + 40], "little")
            out.append(_rec.encode_raw(volume, seq, offset, data, time_ns,
                                       type_ == REC_SYNC))
            pos = at + HEADER_SIZE + (stored + 63) // 64 * 64
    if pos == 0:
        return bytes(view)
    out.append(view[pos:])
    return b"".join(out)


def checkpoint_payload(kind: int, consistent: bool, tag: str | None) -> bytes:
    raw = (tag or "").encode()
    if len(raw) > MAX_TAG:
        raise ConfigError(f"checkpoint tag is {len(raw)} bytes; the limit is {MAX_TAG}")
    flags = CKPT_FLAG_CONSISTENT if consistent else 0
    return _CKPT_HEAD.pack(kind, flags, len(raw)) + raw


def encode_checkpoint(
    seq: int, time_ns: int, kind: int, consistent: bool, tag: str | None = None
) -> bytes:
    """A checkpoint marker record."""
    if kind not in (CKPT_AUTO, CKPT_TAGGED):
        raise ConfigError(f"unknown checkpoint kind {kind}")
    payload = checkpoint_payload(kind, consistent, tag)
    return _rec.encode_stored(REC_CHECKPOINT, 0, 0, seq, 0, len(payload), time_ns, payload)


class CheckpointKind(StrEnum):
    """Who made a checkpoint: the cadence of its VPG, or a user with a tag."""

    AUTO = "auto"
    TAGGED = "tagged"


@dataclass(frozen=True)
class Checkpoint:
    """A point in a VPG's stream: every write with a smaller seq is before it.  The one
    checkpoint type of the protected site, the wire and the journal.

    `id` equals `seq`: seqs are unique and ordered across the whole VPG."""

    id: int
    seq: int
    time_ns: int
    kind: CheckpointKind
    tag: str | None
    consistent: bool

    @property
    def time(self) -> float:
        return self.time_ns / 1e9

    @classmethod
    def from_payload(cls, seq: int, time_ns: int, payload: bytes | memoryview) -> Checkpoint:
        """The checkpoint a CHECKPOINT record at `seq` stands for (payload checked)."""
        marker = decode_checkpoint_payload(payload)
        kind = CheckpointKind.TAGGED if marker.kind == CKPT_TAGGED else CheckpointKind.AUTO
        return cls(seq, seq, time_ns, kind, marker.tag, marker.consistent)


@dataclass(frozen=True)
class CheckpointPayload:
    """A decoded CHECKPOINT record payload (docs/format.md 4.7): kind code, flag, tag."""

    kind: int
    consistent: bool
    tag: str | None


def decode_checkpoint_payload(payload: bytes | memoryview) -> CheckpointPayload:
    if len(payload) < _CKPT_HEAD.size:
        raise CorruptRecordError("checkpoint payload shorter than its header")
    kind, flags, taglen = _CKPT_HEAD.unpack_from(payload)
    if kind not in (CKPT_AUTO, CKPT_TAGGED) or flags & ~CKPT_FLAG_CONSISTENT:
        raise CorruptRecordError(f"checkpoint payload has kind {kind} flags {flags:#x}")
    if _CKPT_HEAD.size + taglen != len(payload):
        raise CorruptRecordError("checkpoint tag length disagrees with the payload")
    try:
        tag = bytes(payload[_CKPT_HEAD.size :]).decode()
    except UnicodeDecodeError:
        raise CorruptRecordError("checkpoint tag is not UTF-8") from None
    return CheckpointPayload(kind, bool(flags & CKPT_FLAG_CONSISTENT), tag or None)


# ---- record header (docs/format.md 4.1) ----------------------------------------------------

# type, flags, volume, seq, offset, length, stored, time_ns, payload_crc, reserved, header_crc
_HEADER = struct.Struct("<HHIQQIIQI16xI")
assert _HEADER.size == HEADER_SIZE


class RecordHeader(NamedTuple):
    """The fields of a 64-byte record header, named as in docs/format.md 4.1."""

    type: int
    flags: int
    volume: int
    seq: int
    offset: int
    length: int
    stored: int
    time_ns: int
    payload_crc: int
    header_crc: int


def read_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> RecordHeader:
    """The header fields of the record at `pos` of `buf`, as stored.  Nothing is checked
    (use it on records the native `scan` or `parse_header` has validated); a buffer that
    ends inside the header raises `TruncatedRecordError`."""
    if pos < 0 or len(buf) - pos < HEADER_SIZE:
        raise TruncatedRecordError(f"record header at {pos} passes the buffer's end ({len(buf)})")
    return RecordHeader._make(_HEADER.unpack_from(buf, pos))


def record_time(buf: bytes | bytearray | memoryview, record_pos: int) -> int:
    """time_ns field of the record header at `record_pos` of `buf`."""
    return read_header(buf, record_pos).time_ns
