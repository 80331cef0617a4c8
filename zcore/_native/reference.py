"""Pure-Python references of the native kernels, used only by differential tests.

Each function follows docs/format.md (or the contract in the C header) as plainly as
possible, with no attempt at speed, so that a disagreement with the native code points
at a bug in one of the two:

- CRC32C, bit by bit and with a byte table          (csrc/zc_crc32c.c)
- record header encoding and parsing, field rules   (csrc/zc_record.c, format 4.1-4.4)
- the newest-wins read planner over a list of extents, and the read it plans
                                                    (csrc/zc_index.c, format 8.4)

Status codes are the native ones (zc_format.h): functions return them, or raise
`RefError(status)` where the native function would return one.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from zcore.errors import Status

POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
HEADER_SIZE = 64
ALIGN = 64
SECTOR = 512
CRC_BLOCK = 4096
MAX_WRITE = 32 << 20
MAX_PAYLOAD = MAX_WRITE + (MAX_WRITE // CRC_BLOCK) * 4 + ALIGN
MAX_TAG = 1024
U64 = (1 << 64) - 1

REC_WRITE, REC_ZERO, REC_CHECKPOINT, REC_SYNC = 1, 2, 3, 4
FLAG_LZ4, FLAG_BLOCKCRC, FLAG_ZSTD = 0x0001, 0x0002, 0x0004
FLAGS_KNOWN = FLAG_LZ4 | FLAG_BLOCKCRC | FLAG_ZSTD
FLAGS_V2 = FLAG_LZ4 | FLAG_BLOCKCRC  # segments v1-v2, wire protocol v1

# the status codes are named once, in zcore.errors.Status (the twin of zc_format.h)
OK = Status.OK
E_TRUNCATED = Status.TRUNCATED
E_HEADER_CRC = Status.HEADER_CRC
E_PAYLOAD_CRC = Status.PAYLOAD_CRC
E_BAD_RECORD = Status.BAD_RECORD
E_ALIGNMENT = Status.ALIGNMENT
E_RANGE = Status.RANGE
E_ARG = Status.ARG

# header: type u16, flags u16, volume u32, seq u64, offset u64, length u32, stored u32,
# time_ns u64, payload_crc u32, 16 reserved bytes, header_crc u32
_HEADER = struct.Struct("<HHIQQIIQI16xI")
assert _HEADER.size == HEADER_SIZE


class RefError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# ---- CRC32C ------------------------------------------------------------------------------


def crc32c_bitwise(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C one bit at a time, continuing from `crc` (as zc_crc32c does)."""
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_table(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C one byte at a time through a 256-entry table."""
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        c = (c >> 8) ^ table[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


# ---- records -----------------------------------------------------------------------------


def record_size(stored: int) -> int:
    return HEADER_SIZE + (stored + ALIGN - 1) // ALIGN * ALIGN


def blockcrc_table_size(length: int) -> int:
    blocks = (length + CRC_BLOCK - 1) // CRC_BLOCK
    return (blocks * 4 + ALIGN - 1) // ALIGN * ALIGN


def check_fields(type_: int, flags: int, volume: int, seq: int, offset: int, length: int,
                 stored: int) -> int:
    """The field rules of format 4.3 (after the CRC and reserved-byte checks)."""
    if seq == 0 or flags & ~FLAGS_KNOWN:
        return E_BAD_RECORD
    if type_ in (REC_WRITE, REC_SYNC):
        if not 1 <= length <= MAX_WRITE:
            return E_BAD_RECORD
        if offset % SECTOR or length % SECTOR:
            return E_ALIGNMENT
        if offset + length > U64:
            return E_RANGE
        if flags == FLAG_BLOCKCRC:
            return OK if stored == blockcrc_table_size(length) + length else E_BAD_RECORD
        if flags in (FLAG_LZ4, FLAG_ZSTD):
            return OK if 1 <= stored <= MAX_PAYLOAD else E_BAD_RECORD
        return E_BAD_RECORD
    if type_ == REC_ZERO:
        if length == 0 or flags or stored:
            return E_BAD_RECORD
        if offset % SECTOR or length % SECTOR:
            return E_ALIGNMENT
        return E_RANGE if offset + length > U64 else OK
    if type_ == REC_CHECKPOINT:
        if flags or volume or offset or stored != length or not 4 <= stored <= 4 + MAX_TAG:
            return E_BAD_RECORD
        return OK
    return E_BAD_RECORD


def encode_header(type_: int, flags: int, volume: int, seq: int, offset: int, length: int,
                  stored: int, time_ns: int, payload_crc: int) -> bytes:
    """A 64-byte header with its header_crc (no field rules checked)."""
    body = _HEADER.pack(type_, flags, volume, seq, offset, length, stored, time_ns,
                        payload_crc, 0)[:60]
    return body + struct.pack("<I", crc32c_table(body))


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[int, dict[str, int] | None, int]:
    """(status, fields, payload_crc) of a 64-byte header, checked as format 4.3 orders
    it.  `fields` is None only when the header CRC fails."""
    buf = bytes(buf[:HEADER_SIZE])
    if len(buf) < HEADER_SIZE:
        return E_TRUNCATED, None, 0
    type_, flags, volume, seq, offset, length, stored, time_ns, pcrc, hcrc = \
        _HEADER.unpack(buf)
    if crc32c_table(buf[:60]) != hcrc:
        return E_HEADER_CRC, None, 0
    fields = dict(type=type_, flags=flags, volume=volume, seq=seq, offset=offset,
                  length=length, stored=stored, time_ns=time_ns)
    if any(buf[44:60]):
        return E_BAD_RECORD, fields, pcrc
    return check_fields(type_, flags, volume, seq, offset, length, stored), fields, pcrc


def _pad(n: int) -> bytes:
    return bytes((ALIGN - n % ALIGN) % ALIGN)


def encode_raw(volume: int, seq: int, offset: int, data: bytes, time_ns: int,
               sync: bool = False) -> bytes:
    """A raw (BLOCKCRC) WRITE or SYNC record: header, CRC table padded to 64, data."""
    length = len(data)
    table_size = blockcrc_table_size(length)
    type_ = REC_SYNC if sync else REC_WRITE
    status = check_fields(type_, FLAG_BLOCKCRC, volume, seq, offset, length,
                          table_size + length)
    if status:
        raise RefError(status)
    table = b"".join(struct.pack("<I", crc32c_table(data[i : i + CRC_BLOCK]))
                     for i in range(0, length, CRC_BLOCK))
    table += bytes(table_size - len(table))
    header = encode_header(type_, FLAG_BLOCKCRC, volume, seq, offset, length,
                           table_size + length, time_ns, crc32c_table(table))
    return header + table + data + _pad(table_size + length)


def encode_stored(type_: int, flags: int, volume: int, seq: int, offset: int, length: int,
                  time_ns: int, payload: bytes = b"") -> bytes:
    """A record whose payload is stored as given (LZ4 block, zero record, checkpoint)."""
    if flags & FLAG_BLOCKCRC:
        raise RefError(E_ARG)
    status = check_fields(type_, flags, volume, seq, offset, length, len(payload))
    if status:
        raise RefError(status)
    header = encode_header(type_, flags, volume, seq, offset, length, len(payload), time_ns,
                           crc32c_table(payload))
    return header + payload + _pad(len(payload))


# ---- the extent index ------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """What the index keeps of one data record."""

    seq: int
    volume: int
    offset: int
    length: int
    type: int = REC_WRITE


DATA_TYPES = (REC_WRITE, REC_ZERO, REC_SYNC)


def plan(extents: Iterable[Extent], volume: int, offset: int, length: int,
         at: int) -> list[tuple[int, int, int, int]]:
    """Fragments (dst, length, src, seq) of a read of [offset, offset+length) of `volume`
    as of checkpoint seq `at`: for every byte the extent with the highest seq < `at` that
    covers it (src = bytes into that extent's data), or the replica (seq 0, src = the
    volume offset).  Fragments are maximal runs of one source, ordered by dst."""
    end = offset + length
    live = [e for e in extents
            if e.volume == volume and e.type in DATA_TYPES and e.seq < at
            and e.offset < end and e.offset + e.length > offset]
    cuts = {offset, end}
    for e in live:
        cuts.update(p for p in (e.offset, e.offset + e.length) if offset < p < end)
    points = sorted(cuts)
    out: list[list[int]] = []
    for lo, hi in itertools.pairwise(points):
        cover = [e for e in live if e.offset <= lo and hi <= e.offset + e.length]
        best = max(cover, key=lambda e: e.seq, default=None)
        seq = best.seq if best else 0
        src = lo - best.offset if best else lo
        if out and out[-1][3] == seq and out[-1][0] + out[-1][1] == lo - offset:
            out[-1][1] += hi - lo  # the same source continues (src is contiguous too)
        else:
            out.append([lo - offset, hi - lo, src, seq])
    return [(dst, n, src, seq) for dst, n, src, seq in out]


def read(writes: Sequence[tuple[int, int, int, bytes]], replica: bytes, volume: int,
         offset: int, length: int, at: int) -> bytes:
    """Bytes of [offset, offset+length) of `volume` as of `at`: the replica image with
    every write (seq, volume, offset, data) of seq < `at` applied in seq order."""
    image = bytearray(replica[offset : offset + length])
    for seq, vol, off, data in sorted(writes, key=lambda w: w[0]):
        if vol != volume or seq >= at:
            continue
        lo, hi = max(off, offset), min(off + len(data), offset + length)
        if lo < hi:
            image[lo - offset : hi - offset] = data[lo - off : hi - off]
    return bytes(image)
