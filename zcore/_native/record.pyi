"""Type stubs of zcore._native.record: the record codec of csrc/zc_record.c (docs/format.md).

Byte buffers: any object exposing a C-contiguous buffer of unsigned bytes (format "B" or
"c", item size 1): bytes, bytearray, memoryview, array.array("B"), a numpy uint8 array,
mmap.  Other item formats (signed "b" included) raise ConfigError; non-contiguous views
raise BufferError.  All integers are unsigned: negative or too-large values raise
OverflowError.  Native failures raise the zcore.errors class mapped from the status.
"""

import array
from collections.abc import Sized
from typing import Final, Protocol, TypeAlias, TypedDict, type_check_only

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, disjoint_base

# numpy declares __buffer__ only for Python >= 3.12, hence the explicit uint8 arrays
_Buffer: TypeAlias = Buffer | npt.NDArray[np.uint8]
"""A readable contiguous byte buffer (see the module docstring)."""

_WritableBuffer: TypeAlias = Buffer | npt.NDArray[np.uint8]
"""A writable contiguous byte buffer: bytearray, writable memoryview, numpy uint8 array;
a read-only buffer raises BufferError."""

@type_check_only
class _SizedBytes(Buffer, Sized, Protocol):
    """A byte buffer whose len() is its size in bytes."""

_SizedBuffer: TypeAlias = _SizedBytes | npt.NDArray[np.uint8]

_U64Array: TypeAlias = npt.NDArray[np.uint64] | array.array[int] | memoryview
"""A C-contiguous buffer of native uint64 (numpy uint64, array.array("Q"), a memoryview
cast to "Q"); int64 arrays are refused with ValueError."""

@type_check_only
class _HeaderFields(TypedDict):
    type: int
    flags: int
    volume: int
    seq: int
    offset: int
    length: int
    stored: int

RECORD_HEADER_SIZE: Final = 64
SECTOR: Final = 512
MAX_WRITE: Final = 33554432  # 32 MiB
REC_WRITE: Final = 1
REC_ZERO: Final = 2
REC_CHECKPOINT: Final = 3
REC_SYNC: Final = 4
FLAG_LZ4: Final = 0x0001
FLAG_BLOCKCRC: Final = 0x0002
FLAG_ZSTD: Final = 0x0004
FLAGS_KNOWN: Final = 0x0007
"""Every record flag of the newest version (segment v3, wire protocol v2)."""
FLAGS_V2: Final = 0x0003
"""The flags of segments v1-v2 and wire protocol v1 (no FLAG_ZSTD)."""
FLAGS_COMPRESSED: Final = 0x0005
"""Flags whose payload is decoded whole (LZ4 block, zstd frame)."""

EXTENT_DTYPE: Final[np.dtype[np.void]]
"""numpy twin of struct zc_extent (48 bytes, little-endian): seq u8, offset u8, pos u8,
length u4, segment u4, volume u4, stored u4, type u2, flags u2, reserved u4.  Also the entry
layout of segment index (.zci) files."""

def crc32c(data: _Buffer, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `crc` (0 to start); a u32."""

def crc32c_blocks(data: _Buffer, block: int) -> npt.NDArray[np.uint32]:
    """CRC32C (from 0) of each consecutive `block`-byte piece of `data` (the last may be
    shorter); `block` a positive multiple of 8 (ConfigError otherwise)."""

def record_size(stored: int) -> int:
    """Bytes a record with `stored` payload bytes occupies: 64 + stored rounded up to 64."""

def blockcrc_table_size(length: int) -> int:
    """Bytes of the block-CRC table (4 bytes per 4 KiB block, padded to 64) of a raw write
    of `length` bytes.  `length` is a u32 and is not range-checked."""

def raw_record_size(length: int) -> int:
    """Bytes a raw (BLOCKCRC) write record of `length` data bytes occupies."""

def encode_raw_into(
    out: _WritableBuffer,
    at: int,
    volume: int,
    seq: int,
    offset: int,
    data: _Buffer,
    time_ns: int,
    sync: bool = False,
) -> int:
    """Encode a raw write (REC_WRITE, or REC_SYNC when `sync`) of `data` into `out` at byte
    `at`; returns the position after the record.  Raises ConfigError when `data` is empty,
    longer than MAX_WRITE, `at` is beyond `out` or `out` is too small; AlignmentError or
    CorruptRecordError on bad fields."""

def encode_raw(
    volume: int, seq: int, offset: int, data: _Buffer, time_ns: int, sync: bool = False
) -> bytes:
    """A raw write (or sync) record as bytes (raw_record_size(len(data)) of them)."""

def encode_stored(
    type: int,
    flags: int,
    volume: int,
    seq: int,
    offset: int,
    length: int,
    time_ns: int,
    payload: _SizedBuffer = b"",
) -> bytes:
    """A record whose payload is stored as given: an LZ4 block or zstd frame (flags FLAG_LZ4
    or FLAG_ZSTD, `length` = uncompressed size), a zero record (no payload) or a checkpoint.
    FLAG_BLOCKCRC is refused (ConfigError): raw writes go through encode_raw."""

def parse_header(data: _Buffer) -> tuple[_HeaderFields, int]:
    """Check the 64-byte record header at the start of `data` (CRC, reserved bytes, field
    rules); returns its fields and its payload_crc.  time_ns is not returned."""

def verify_payload(header: _Buffer, payload: _SizedBuffer) -> None:
    """Verify the payload (its first `stored` bytes) of the record whose header is
    `header`; raises ChecksumError, TruncatedRecordError or CorruptRecordError."""

@disjoint_base  # a cdef class: holds a C struct, cannot share a layout
class ExtentBatch:
    """Records validated by `scan`: one extent per record, in stream order."""

    @property
    def status(self) -> int:
        """0 when every byte was consumed, else the (negative) native status of the first
        record that failed."""

    @property
    def consumed(self) -> int:
        """Bytes of valid records before the failing one (all of them when status is 0)."""

    @property
    def last_seq(self) -> int:
        """Highest seq validated (the `last_seq` given to scan when there was none)."""

    @property
    def min_time(self) -> int:
        """Smallest time_ns of the valid records; 2**64 - 1 when there was none."""

    @property
    def max_time(self) -> int:
        """Largest time_ns of the valid records; 0 when there was none."""

    def __len__(self) -> int: ...
    def array(self) -> npt.NDArray[np.void]:
        """A numpy copy of the extents (dtype EXTENT_DTYPE)."""

def scan(
    data: _Buffer, base_pos: int, segment: int, last_seq: int, volume_sizes: _U64Array,
    flags: int = 0x0007,
) -> ExtentBatch:
    """Validate the records of `data` in order (headers, checksums, seq > `last_seq` and
    strictly increasing, volume ranges against `volume_sizes`, bytes by volume id, 0 = not
    ours; a record with a known flag outside `flags`, the flags of the stream's version,
    is bad).  Never raises for bad records: see ExtentBatch.status and .consumed.  Extents
    get `segment` and pos = `base_pos` + offset of the record in `data`."""

def native_lz4() -> bool:
    """True when batch encoding (encode_batch, CaptureRing.seal) compresses with the GIL
    released through the `lz4` package's own compressor (found in its loaded extension and
    checked to give lz4.block.compress's bytes); False: lz4.block.compress per record."""

def set_native_lz4(enabled: bool) -> bool:
    """Use (True) or bypass (False) the native compressor in batch encoding; returns the
    previous setting.  Both give the same bytes (for differential tests and benchmarks)."""

def encode_batch(
    items: list[tuple[int, int, int, int, int, int, _SizedBuffer]],
    nouts: int = 1,
    compress: bool = True,
    min_saving: float = 0.0625,
) -> list[bytes]:
    """Records of `items`, each (out, type, volume, seq, offset, time_ns, data), encoded in
    one batch into `nouts` outputs exactly as the capture ring's seal encodes them: a
    WRITE or SYNC of all-zero data as a ZERO record, else LZ4 (when `compress` and it saves
    `min_saving`) or raw with block CRCs; a ZERO item's data gives only its length; a
    CHECKPOINT item (out -1) goes into every output.  ConfigError on a bad type or output;
    the encoders' errors (AlignmentError, CorruptRecordError) on bad fields."""
