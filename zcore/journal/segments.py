"""Segment files `seg-NNNNNNNN.zcj` (docs/format.md 7.3): the in-memory descriptor of one
segment, its 64-byte header with the durable-length mark (version 2), creating, listing
and reading the files.

Records inside a segment are validated by zcore._native.record.scan; the journal's
loader and append path decide what a failing record means."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zcore._native import record as _rec
from zcore.errors import CorruptRecordError, FormatVersionError
from zcore.fsutil import fsync_dir, preadinto_upto, pwrite_all

SEGMENT_MAGIC = b"ZCJSEG\r\n"
SEGMENT_VERSION = 3  # v3: the v2 layout; its records may be zstd (FLAG_ZSTD, format 4.5a)
SEGMENT_V2 = 2  # v2: durable-length mark in bytes 48..59, header CRC over 0..47; still read
SEGMENT_V1 = 1  # v1: bytes 48..59 reserved, header CRC over 0..59; still read
SEGMENT_VERSIONS = (SEGMENT_V1, SEGMENT_V2, SEGMENT_VERSION)
SEGMENT_HEADER = struct.Struct("<8sII Q 16s Q 12x I")  # 64 bytes, crc last
assert SEGMENT_HEADER.size == 64
# The durable-length mark (v2): committed end / 64, low 32 bits of the last committed
# seq, CRC32C of header bytes 0..55.  Written by the group commit before an fdatasync,
# describing what the previous fdatasync covered (docs/format.md 7.3, 8.1).
MARK_AT = 48
MARK = struct.Struct("<III")


@dataclass
class Segment:
    """One segment of an open journal.  `fd` is -1 until the segment is opened; it is
    closed only with the index lock held (see Journal), so a read never sees it reused."""

    number: int
    path: Path
    fd: int
    size: int  # bytes, header included
    sealed: bool
    min_seq: int = 0
    max_seq: int = 0
    min_time: int = 0
    max_time: int = 0
    records: int = 0
    extents: list[np.ndarray] = field(default_factory=list)  # active segment only
    version: int = SEGMENT_VERSION
    head: bytes = b""  # header bytes 0..47 (v2: what the mark's CRC covers)
    synced: tuple[int, int] = (0, 0)  # (end, seq) the last completed fdatasync covered
    marked_end: int = 0  # the end the mark on disk states (0: none)


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"seg-{number:08d}.zcj"


def list_segments(directory: Path) -> dict[int, int]:
    """Segment number -> file size of every `seg-NNNNNNNN.zcj` in `directory`; other
    names are not this journal's."""
    sizes = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if (len(name) == 16 and name.startswith("seg-") and name.endswith(".zcj")
                    and name[4:12].isdigit()):
                sizes[int(name[4:12])] = entry.stat().st_size
    return sizes


def pack_header(number: int, journal_id: bytes) -> bytes:
    """A header of the current version with no mark (bytes 48..59 zero)."""
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 64, number, journal_id,
                               time.time_ns(), 0)
    return head[:60] + struct.pack("<I", _rec.crc32c(head[:48]))


def check_header(path: Path, number: int, journal_id: bytes, head: bytes | memoryview) -> int:
    """The header's version, 0 when `head` is no valid segment header (short, bad CRC
    or magic); raises when it is a valid header of another version, journal or slot."""
    if len(head) < 64:
        return 0
    magic, version, hsize, num, jid, _created, crc = SEGMENT_HEADER.unpack(head[:64])
    if magic != SEGMENT_MAGIC:
        return 0
    covered = 48 if version >= SEGMENT_V2 else 60
    if _rec.crc32c(head[:covered]) != crc:
        return 0
    if version not in SEGMENT_VERSIONS:
        raise FormatVersionError(f"segment {path} has format version {version}")
    if hsize != 64 or num != number or jid != journal_id:
        raise CorruptRecordError(f"segment {path} belongs to another journal or slot")
    return int(version)


def record_flags(version: int) -> int:
    """The record flags a segment of `version` may hold (zstd from v3 on)."""
    return _rec.FLAGS_KNOWN if version >= SEGMENT_VERSION else _rec.FLAGS_V2


def pack_mark(head: bytes, end: int, seq: int) -> bytes | None:
    """The 12 mark bytes saying that bytes [0, end) and seqs up to `seq` are durable
    (None when `end` cannot be stated: not a multiple of 64 or past 256 GiB)."""
    if end % 64 or end >> 38:
        return None
    body = MARK.pack(end // 64, seq & 0xFFFFFFFF, 0)[:8]
    return body + struct.pack("<I", _rec.crc32c(head[:48] + body))


def read_mark(head: bytes | memoryview) -> tuple[int, int] | None:
    """(committed end, low 32 bits of its last seq) from a v2 header's mark; None when
    there is none (a new segment) or it fails its CRC (then the reader falls back to
    treating every failing record as a torn tail, as v1 does)."""
    units, seq_low, crc = MARK.unpack_from(head, MARK_AT)
    if not units or _rec.crc32c(bytes(head[:56])) != crc:
        return None
    return units * 64, seq_low


def full_seq(seq_low: int, known: int) -> int:
    """The seq whose low 32 bits are `seq_low` closest to `known` (a segment holds far
    fewer than 2**31 records, so the mark's seq is within that of any seq in it)."""
    base = (known & ~0xFFFFFFFF) | seq_low
    return min((base - (1 << 32), base, base + (1 << 32)), key=lambda s: abs(s - known))


def tail_segment_torn(path: Path, number: int, journal_id: bytes) -> bool:
    """True when the newest segment file is no longer than a header and that header is
    not valid: the only state a crash can leave a segment's header in.  A damaged header
    in front of records is media damage, which the loader's scan reports."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = bytearray(65)
        n = preadinto_upto(fd, head, 0)
    finally:
        os.close(fd)
    if n > 64:
        return False
    return not check_header(path, number, journal_id, bytes(head[:n]))


def header_of(path: Path, number: int, journal_id: bytes, fd: int) -> tuple[int, bytes]:
    """(version, header bytes 0..47) of the open segment file `fd` (version 0: invalid)."""
    head = bytearray(64)
    n = preadinto_upto(fd, head, 0)
    return check_header(path, number, journal_id, bytes(head[:n])), bytes(head[:48])


def create_segment(directory: Path, number: int, journal_id: bytes) -> Segment:
    """Create segment `number` with a durable header (file and directory entry)."""
    path = segment_path(directory, number)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    head = pack_header(number, journal_id)
    try:
        pwrite_all(fd, head, 0)
        os.fsync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return Segment(number, path, fd, 64, sealed=False, head=head[:48])


def read_segment(seg: Segment) -> memoryview:
    """The bytes of `seg` (up to its recorded size; fewer if the file ends first)."""
    # np.empty, not bytearray: a bytearray is zero-filled first, one more pass over up to
    # 64 MiB on every reopen (bench/harness.py journal: journal.reopen)
    view = np.empty(seg.size, dtype=np.uint8).data
    return view[: preadinto_upto(seg.fd, view, 0)]
