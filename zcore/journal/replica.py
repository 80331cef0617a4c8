"""Replica block sums (docs/format.md 7.5): one CRC32C per 4 KiB block of each replica,
kept in a sidecar `replica-NNNN.sum` beside `replica-NNNN.img`.

Sits between promotion (the only writer of replica bytes) and the read-through (the only
reader): promotion writes replica blocks through `ReplicaSums.write`, which keeps the sums
in memory equal to the replica's bytes; the native read-through checks every replica
block it reads against those sums (zcore._native.index.set_replica_sums), and the scrub
checks every block.  Both sides run under the journal's index lock, so a read never sees
a block whose bytes and sum disagree because a promotion is half-way through it.

Entries are stored as CRC32C(block) ^ CRC32C(zero block of the same size): a block of
zeros has entry 0, so the sums of a sparse replica are a sparse file, and a new journal's
sums cost one header.

Reads see the entries through a read-only shared map of the sidecar: opening costs no
read whatever the volume's size, and the memory is page cache.  Promotion writes them
with pwrite (so every write goes through the one file layer, where crash simulation and
error injection see it), and the map shows them at once.  (A mapped file turns an I/O
error on its pages into SIGBUS: the length is checked before mapping, so only media
errors on the sidecar itself can do that.)

Crash safety (promotion order, retention.py): promote_target durable in journal.meta;
replica blocks and sums written together (not synced: the kernel may write either back
at any time); replica fsynced; sidecar fsynced; promoted_seq durable. A crash before
promoted_seq is durable leaves any mix of old and new replica blocks and old and new
sums (a block whose new data reached the replica while its sum did not, and the
reverse), but only in blocks that the interrupted promotion touched; reopening resumes
that promotion, which replays the same records over the same blocks and rewrites their
sums before any read is served (reads wait for the load). On that resumed pass a block
only partly covered by the records cannot be checked before it is rewritten (its old sum
may describe either state): its bytes outside the records are trusted once, and counted
in `trusted_once`.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

from zcore._native import record as _rec
from zcore.errors import CorruptRecordError, FormatVersionError, ReplicaChecksumError
from zcore.fsutil import (
    data_ranges,
    fsync_dir,
    pread_exact,
    preadinto_exact,
    punch_hole,
    pwrite_all,
)

log = logging.getLogger(__name__)

SUM_MAGIC = b"ZCRSUM\r\n"
SUM_VERSION = 1  # part of journal format 2 (journal.meta version 2)
# 4 KiB blocks: a 4 KiB read-through then reads and checks exactly the block it returns
# (journal.readthrough_4k 0.47 of os.pread with sums, 0.50 without, bench/harness.py
# journal); 64 KiB blocks would read and CRC 16x the bytes of each random 4 KiB read.
# Size: 4 bytes per 4 KiB block, 1 MiB per GiB of volume (mapped, not read at open).
SUM_BLOCK = 4096
RECORD_CRC_BLOCK = 4096  # the block of a raw record's CRC table (docs/format.md 4.4)
# magic, version, header bytes, block bytes, volume id, volume bytes, journal id,
# entries, 8 reserved bytes, CRC32C of the 60 bytes before it
SUM_HEADER = struct.Struct("<8sHHII Q 16s Q 8x I")
assert SUM_HEADER.size == 64
HEADER_BYTES = 64
# A damaged block that a promotion writes only in part stays damaged: its entry is the
# new bytes' entry ^ this, so reads and the scrub keep reporting it until a write covers
# the whole block (or the replica is resynchronised).
POISON = 0x5A5A5A5A
READ_CHUNK = 1 << 20  # bytes of replica read per step when sums are built from it


def sum_path(directory: Path, volume: int) -> Path:
    return directory / f"replica-{volume:04d}.sum"


@lru_cache(maxsize=64)
def zero_crc(length: int) -> int:
    """CRC32C of `length` zero bytes."""
    return int(_rec.crc32c(bytes(length)))


def _pack_header(volume: int, size: int, block: int, journal_id: bytes) -> bytes:
    entries = -(-size // block)
    head = SUM_HEADER.pack(SUM_MAGIC, SUM_VERSION, HEADER_BYTES, block, volume, size,
                           journal_id, entries, 0)
    return head[:60] + struct.pack("<I", _rec.crc32c(head[:60]))


class ReplicaSums:
    """The block sums of one replica, in memory and in its sidecar file.  Not
    thread-safe: every call runs under the journal's index lock (see the docstring)."""

    def __init__(self, path: Path, fd: int, volume: int, size: int, block: int,
                 sums: np.ndarray, mm: mmap.mmap) -> None:
        self.path = path
        self.fd = fd
        self.volume = volume
        self.size = size
        self.block = block
        self.sums = sums
        self.zero_full = zero_crc(block)
        self.zero_last = zero_crc(size - (len(sums) - 1) * block)
        self._mm = mm
        self.trusted_once = 0  # partial blocks rewritten unchecked by a resumed promotion
        self.damaged: set[int] = set()  # block numbers found damaged while writing

    # ---- files -----------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, volume: int, size: int, journal_id: bytes,
               replica_fd: int | None = None) -> ReplicaSums:
        """Write a new sidecar (durable, directory entry included) and open it: the sums
        of an empty replica, or of `replica_fd`'s bytes as they are (trusted as they
        are)."""
        block = SUM_BLOCK
        entries = -(-size // block)
        path = sum_path(directory, volume)
        tmp = path.with_suffix(".sum.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, HEADER_BYTES + 4 * entries)  # holes: entries of zero blocks
            pwrite_all(fd, _pack_header(volume, size, block, journal_id), 0)
            if replica_fd is not None:
                _sum_existing(replica_fd, size, block, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(directory)
        return cls.open(directory, volume, size, journal_id)

    @classmethod
    def open(cls, directory: Path, volume: int, size: int,
             journal_id: bytes) -> ReplicaSums:
        """Check the sidecar of `volume` and map its entries (FileNotFoundError when
        there is none)."""
        path = sum_path(directory, volume)
        fd = os.open(path, os.O_RDWR)
        try:
            head = pread_exact(fd, HEADER_BYTES, 0, what=f"replica sums {path}")
            magic, version, hbytes, block, vol, vsize, jid, entries, crc = \
                SUM_HEADER.unpack(head)
            if magic != SUM_MAGIC or _rec.crc32c(head[:60]) != crc:
                raise CorruptRecordError(f"replica sums {path}: damaged header")
            if version != SUM_VERSION:
                raise FormatVersionError(f"replica sums {path} have version {version}")
            if (hbytes != HEADER_BYTES or block == 0 or block % 512 or vol != volume
                    or vsize != size or jid != journal_id or entries != -(-size // block)):
                raise CorruptRecordError(f"replica sums {path} belong to another volume "
                                         "or journal")
            if os.fstat(fd).st_size != HEADER_BYTES + 4 * entries:  # never map past EOF
                raise CorruptRecordError(f"replica sums {path} have the wrong length")
            mm = mmap.mmap(fd, HEADER_BYTES + 4 * entries, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        sums = np.frombuffer(mm, dtype="<u4", count=entries, offset=HEADER_BYTES)
        return cls(path, fd, volume, size, block, sums, mm)

    def close(self) -> None:
        """Unmap and close (the caller has dropped the index's reference first)."""
        if self.fd < 0:
            return
        self.sums = np.zeros(0, dtype=np.uint32)  # drop the mapped view
        try:
            self._mm.close()
        except BufferError:  # a view of it is still alive: unmapped when it is freed
            pass
        os.close(self.fd)
        self.fd = -1

    def fsync(self) -> None:
        """Make the entries written so far durable."""
        os.fsync(self.fd)

    # ---- blocks ----------------------------------------------------------------------

    def entries_of(self, data: bytes | bytearray | memoryview | np.ndarray,
                   first: int) -> np.ndarray:
        """The entries of whole blocks `data` holds, the first being block `first`."""
        crcs = _rec.crc32c_blocks(data, self.block)
        crcs ^= np.uint32(self.zero_full)
        last = len(self.sums) - 1
        if first + len(crcs) - 1 == last:
            crcs[-1] ^= np.uint32(self.zero_full ^ self.zero_last)
        return crcs

    def _block_range(self, number: int) -> tuple[int, int]:
        lo = number * self.block
        return lo, min(lo + self.block, self.size)

    def check(self, fd: int, offset: int, data: bytes | memoryview | np.ndarray) -> list[int]:
        """Block numbers of `data` (whole blocks read from the replica at the
        block-aligned `offset`) whose entries do not match."""
        first = offset // self.block
        got = self.entries_of(data, first)
        bad = np.flatnonzero(got != self.sums[first : first + len(got)])
        return [first + int(i) for i in bad]

    def write(self, fd: int, data: bytes | memoryview, offset: int, *, resuming: bool,
              block_crcs: memoryview | None = None, zero: bool = False) -> None:
        """pwrite `data` into the replica `fd` at `offset` and set the sums of the blocks
        it touches.  A block it covers only in part is read first and checked: damage
        there stays marked damaged (logged, `damaged`), except on a resumed promotion,
        where the block is trusted once (`trusted_once`).  `block_crcs` (the verified
        4 KiB block CRC table of a raw record, 4.4) or `zero` (the data is zeros) save
        computing the CRCs of whole blocks."""
        n = len(data)
        if n == 0:
            return
        B = self.block
        end = offset + n
        b0, b1 = offset // B, -(-end // B)
        if offset % B == 0 and (end % B == 0 or end == self.size):  # whole blocks only
            if zero and end % B == 0:
                crcs = np.zeros(b1 - b0, dtype=np.uint32)  # entries of zero blocks
            elif block_crcs is not None and B == RECORD_CRC_BLOCK and end % B == 0:
                crcs = np.frombuffer(block_crcs, dtype="<u4", count=b1 - b0) \
                    ^ np.uint32(self.zero_full)
            else:
                crcs = _rec.crc32c_blocks(data, B)
                crcs ^= np.uint32(self.zero_full)
            if b1 == len(self.sums):
                crcs[-1] ^= np.uint32(self.zero_full ^ self.zero_last)
            pwrite_all(fd, data, offset)
            self._set(b0, crcs)
            return
        new = np.empty(b1 - b0, dtype=np.uint32)
        inner0 = b0 if offset % B == 0 else b0 + 1
        inner1 = b1 if end % B == 0 or end == self.size else b1 - 1
        if inner1 > inner0:
            lo, hi = inner0 * B, min(inner1 * B, self.size)
            new[inner0 - b0 : inner1 - b0] = self.entries_of(
                memoryview(data)[lo - offset : hi - offset], inner0)
        for edge in sorted({b0, b1 - 1} - set(range(inner0, inner1))):
            lo, hi = self._block_range(edge)
            old = bytearray(pread_exact(fd, hi - lo, lo, what=f"replica of volume "
                                        f"{self.volume} (block {edge})"))
            entry = int(self.entries_of(old, edge)[0])
            ok = entry == int(self.sums[edge])
            s, t = max(offset, lo), min(end, hi)
            old[s - lo : t - lo] = memoryview(data)[s - offset : t - offset]
            new[edge - b0] = self.entries_of(old, edge)[0]
            if not ok:
                if resuming:
                    self.trusted_once += 1
                else:
                    new[edge - b0] ^= np.uint32(POISON)
                    self.damaged.add(edge)
                    log.warning("replica of volume %d: block at offset %d failed its sum "
                                "before promotion rewrote part of it; it stays damaged",
                                self.volume, lo)
        pwrite_all(fd, data, offset)
        self._set(b0, new)

    def zero(self, fd: int, offset: int, length: int, *, resuming: bool) -> None:
        """Zero [offset, offset + length) of the replica `fd` and set its sums: the whole
        blocks inside it are punched out (`zcore.fsutil.punch_hole`: they read as zeros
        and take no space; a zero block's entry is 0), the partial blocks at its edges
        written with zeros through `write` (their other bytes checked as there)."""
        if length <= 0:
            return
        B = self.block
        end = offset + length
        lo = -(-offset // B) * B
        hi = end if end == self.size else end // B * B
        if hi <= lo:
            self.write(fd, bytes(length), offset, resuming=resuming, zero=True)
            return
        if lo > offset:
            self.write(fd, bytes(lo - offset), offset, resuming=resuming, zero=True)
        punch_hole(fd, lo, hi - lo)
        self._set(lo // B, np.zeros(-(-(hi - lo) // B), dtype=np.uint32))
        if end > hi:
            self.write(fd, bytes(end - hi), hi, resuming=resuming, zero=True)

    def _set(self, first: int, entries: np.ndarray) -> None:
        """Write entries from block `first` on into the sidecar; the read-only map shows
        them at once (one page cache), so reads check against them from now on."""
        pwrite_all(self.fd, entries.astype("<u4", copy=False).data, HEADER_BYTES + 4 * first)

    def error(self, number: int) -> ReplicaChecksumError:
        lo, hi = self._block_range(number)
        return ReplicaChecksumError(
            f"replica of volume {self.volume}: block at offset {lo} (+{hi - lo}) fails its "
            "sum (damaged replica)", self.volume, lo, hi - lo)


def data_extents(fd: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the file `fd` that may hold data (`zcore.fsutil.data_ranges`,
    as (start, end) pairs)."""
    return [(start, start + n) for start, n in data_ranges(fd, lo, hi - lo)]


def _sum_existing(replica_fd: int, size: int, block: int, sums_fd: int) -> None:
    """Write the entries of the replica's bytes as they are into the sidecar `sums_fd`
    (holes are left: zero entries)."""
    buf = np.empty(READ_CHUNK, dtype=np.uint8)
    entries = -(-size // block)
    zf, zl = zero_crc(block), zero_crc(size - (entries - 1) * block)
    for start, stop in data_extents(replica_fd, 0, size):
        lo = start // block * block
        hi = min(-(-stop // block) * block, size)
        for pos in range(lo, hi, READ_CHUNK):
            n = min(READ_CHUNK, hi - pos)
            view = buf[:n]
            preadinto_exact(replica_fd, view.data, pos, what="replica (shorter than its volume)")
            crcs = _rec.crc32c_blocks(view, block) ^ np.uint32(zf)
            first = pos // block
            if first + len(crcs) == entries:
                crcs[-1] ^= np.uint32(zf ^ zl)
            pwrite_all(sums_fd, crcs.astype("<u4").tobytes(), HEADER_BYTES + 4 * first)


def open_sums(directory: Path, volume: int, size: int, journal_id: bytes,
              replica_fd: int, notes: list[str]) -> ReplicaSums:
    """The sums of a replica; a journal without them (journal format 1, or a lost
    sidecar) gets them computed from the replica as it is, with a note in `notes` (and
    a warning logged): what the replica holds then is trusted once."""
    try:
        return ReplicaSums.open(directory, volume, size, journal_id)
    except FileNotFoundError:
        why = "had no block sums (a journal of format 1, or a lost sidecar)"
    except CorruptRecordError as exc:  # FormatVersionError too: refusing would strand it
        why = f"had unreadable block sums ({exc})"
    msg = (f"replica of volume {volume} {why}: they were computed from the replica as it "
           "is, whose bytes are trusted once")
    log.warning("journal %s: %s", directory, msg)
    notes.append(msg)
    return ReplicaSums.create(directory, volume, size, journal_id, replica_fd)
