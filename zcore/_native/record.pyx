# cython: language_level=3, boundscheck=False, wraparound=False
"""Record codec (csrc/zc_record.c): encode records, validate bundles, CRC32C.

Sits at the bottom of the data path: capture encodes with it, the journal and the
receiver validate every bundle with `scan` before a byte of it is trusted.

Batch encoding (`encode_items`, used by the capture ring's `seal`; `encode_batch` for
tests) runs with the GIL released and compresses as lz4.block.compress does (a fresh
LZ4 stream, LZ4_compress_fast_continue, acceleration 1) through the functions of the
`lz4` package's own extension module (lz4.block._block, found with dlopen(RTLD_NOLOAD):
no second copy of LZ4 is built or loaded).  They are used only when that module exports
them, reports the version lz4.library_version_number() does and compresses probes to
exactly the bytes lz4.block.compress gives; otherwise each record is compressed by
lz4.block.compress, as before (`native_lz4()` says which).
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import lz4
import lz4.block
import numpy as np

from zcore.errors import ConfigError, status_error
from zcore._native.zc cimport *

RECORD_HEADER_SIZE = ZC_RECORD_HEADER_SIZE
SECTOR = ZC_SECTOR
MAX_WRITE = ZC_MAX_WRITE
REC_WRITE = ZC_REC_WRITE
REC_ZERO = ZC_REC_ZERO
REC_CHECKPOINT = ZC_REC_CHECKPOINT
REC_SYNC = ZC_REC_SYNC
FLAG_LZ4 = ZC_FLAG_LZ4
FLAG_BLOCKCRC = ZC_FLAG_BLOCKCRC
FLAG_ZSTD = ZC_FLAG_ZSTD
FLAGS_KNOWN = ZC_FLAGS_KNOWN
FLAGS_V2 = ZC_FLAGS_V2
FLAGS_COMPRESSED = ZC_FLAGS_COMPRESSED

# numpy twin of zc_extent (48 bytes); also the entry layout of segment index files
EXTENT_DTYPE = np.dtype([
    ("seq", "<u8"), ("offset", "<u8"), ("pos", "<u8"), ("length", "<u4"),
    ("segment", "<u4"), ("volume", "<u4"), ("stored", "<u4"), ("type", "<u2"),
    ("flags", "<u2"), ("reserved", "<u4"),
])
assert EXTENT_DTYPE.itemsize == sizeof(zc_extent)


cdef inline const uint8_t[::1] _bytes_view(object data, str what):
    cdef const uint8_t[::1] view
    try:
        view = data
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: expected a contiguous buffer of bytes ({exc})") from None
    return view


def crc32c(data, unsigned int crc=0):
    """CRC32C of `data` (any contiguous byte buffer), continuing from `crc`."""
    cdef const uint8_t[::1] v = _bytes_view(data, "crc32c")
    cdef uint32_t r
    cdef size_t n = v.shape[0]
    with nogil:
        r = zc_crc32c(crc, &v[0] if n else NULL, n)
    return r


def crc32c_blocks(data, unsigned int block):
    """CRC32C (from 0) of each consecutive `block`-byte piece of `data` (the last may be
    shorter), as a numpy uint32 array; `block` a positive multiple of 8."""
    cdef const uint8_t[::1] v = _bytes_view(data, "crc32c_blocks")
    cdef size_t n = v.shape[0]
    if block == 0 or block % 8:
        raise ConfigError(f"block size {block} is not a positive multiple of 8")
    out = np.empty((n + block - 1) // block, dtype=np.uint32)
    cdef uint32_t[::1] o = out
    if n:
        with nogil:
            zc_crc32c_blocks(&v[0], n, block, &o[0])
    return out


def record_size(unsigned long long stored):
    """Bytes a record with `stored` payload bytes occupies (header and padding included)."""
    return zc_record_size(stored)


def blockcrc_table_size(unsigned int length):
    """Bytes of the per-block CRC table (padding included) before a raw write's data."""
    return zc_blockcrc_table_size(length)


def raw_record_size(unsigned int length):
    """Bytes a raw write record of `length` data bytes occupies."""
    return zc_record_size(<uint64_t>zc_blockcrc_table_size(length) + length)


def encode_raw_into(out, size_t at, unsigned int volume, unsigned long long seq,
                    unsigned long long offset, data, unsigned long long time_ns,
                    bint sync=False):
    """Encode a raw write (or sync) record into writable buffer `out` at `at`; returns
    the position after it."""
    cdef uint8_t[::1] o = out
    cdef const uint8_t[::1] d = _bytes_view(data, "write data")
    cdef size_t written = 0, n = d.shape[0], cap
    cdef int st
    if n == 0 or n > ZC_MAX_WRITE:
        raise ConfigError(f"write of {n} bytes: length must be 1 to {ZC_MAX_WRITE}")
    if at > <size_t>o.shape[0]:
        raise ConfigError("encode position beyond the output buffer")
    cap = o.shape[0] - at
    with nogil:
        st = zc_encode_raw(&o[at], cap, ZC_REC_SYNC if sync else ZC_REC_WRITE, volume, seq,
                           offset, &d[0], <uint32_t>n, time_ns, &written)
    if st:
        raise status_error(st, f"encoding write seq {seq} at {offset}+{n}")
    return at + written


def encode_raw(unsigned int volume, unsigned long long seq, unsigned long long offset, data,
               unsigned long long time_ns, bint sync=False):
    """A raw write (or sync) record as bytes."""
    cdef const uint8_t[::1] d = _bytes_view(data, "write data")
    out = bytearray(raw_record_size(d.shape[0]) if d.shape[0] else 0)
    encode_raw_into(out, 0, volume, seq, offset, d, time_ns, sync)
    return bytes(out)


def encode_stored(unsigned int type, unsigned int flags, unsigned int volume,
                  unsigned long long seq, unsigned long long offset, unsigned int length,
                  unsigned long long time_ns, payload=b""):
    """A record whose payload is stored as given (LZ4 block, zero record, checkpoint)."""
    cdef const uint8_t[::1] p = _bytes_view(payload, "payload") if len(payload) else None
    cdef size_t stored = len(payload), written = 0
    cdef int st
    if stored > 0xFFFFFFFF:
        raise ConfigError("payload too large")
    out = PyBytes_FromStringAndSize(NULL, zc_record_size(stored))
    cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
    st = zc_encode_stored(o, len(out), type, flags, volume, seq, offset, length, time_ns,
                          &p[0] if stored else NULL, <uint32_t>stored, &written)
    if st:
        raise status_error(st, f"encoding record type {type} seq {seq}")
    return out


def parse_header(data):
    """Check one 64-byte header; returns (extent tuple as a dict, payload_crc)."""
    cdef const uint8_t[::1] d = _bytes_view(data, "record header")
    cdef zc_extent e
    cdef uint32_t pcrc
    if d.shape[0] < ZC_RECORD_HEADER_SIZE:
        raise status_error(ZC_E_TRUNCATED, "parsing record header")
    st = zc_parse_header(&d[0], &e, &pcrc)
    if st:
        raise status_error(st, "parsing record header")
    return dict(type=e.type, flags=e.flags, volume=e.volume, seq=e.seq, offset=e.offset,
                length=e.length, stored=e.stored), pcrc


def verify_payload(header, payload):
    """Verify a whole record payload against its header (bytes); raises on mismatch."""
    cdef const uint8_t[::1] h = _bytes_view(header, "record header")
    cdef const uint8_t[::1] p = _bytes_view(payload, "record payload") if len(payload) else None
    cdef zc_extent e
    cdef uint32_t pcrc
    if h.shape[0] < ZC_RECORD_HEADER_SIZE:
        raise status_error(ZC_E_TRUNCATED, "verifying record")
    st = zc_parse_header(&h[0], &e, &pcrc)
    if st == 0 and <size_t>len(payload) < e.stored:
        st = ZC_E_TRUNCATED
    if st == 0:
        st = zc_verify_payload(&e, pcrc, &p[0] if e.stored else NULL)
    if st:
        raise status_error(st, f"verifying record seq {e.seq}")


cdef class ExtentBatch:
    """Records validated by `scan`: one extent per record, in stream order."""

    def __dealloc__(self):
        zc_extent_vec_free(&self.vec)

    def __len__(self):
        return self.vec.n

    def array(self):
        """A numpy copy of the extents (dtype EXTENT_DTYPE)."""
        out = np.empty(self.vec.n, dtype=EXTENT_DTYPE)
        cdef uint8_t[::1] o = out.view(np.uint8)
        if self.vec.n:
            memcpy(&o[0], self.vec.v, self.vec.n * sizeof(zc_extent))
        return out


def scan(data, unsigned long long base_pos, unsigned int segment,
         unsigned long long last_seq, const uint64_t[::1] volume_sizes,
         unsigned int flags=ZC_FLAGS_KNOWN):
    """Validate the records of `data` in order.  Returns an ExtentBatch whose `status` is
    0 when every byte was consumed, else the native status of the first bad record
    (`consumed` bytes before it are valid).  `flags`: the record flags the stream's
    version has (FLAGS_V2 for a v1-v2 segment or a wire protocol v1 peer)."""
    cdef const uint8_t[::1] d = _bytes_view(data, "bundle")
    cdef ExtentBatch b = ExtentBatch()
    cdef zc_scan_ctx ctx
    cdef size_t consumed = 0, n = d.shape[0]
    cdef int st
    ctx.volume_sizes = &volume_sizes[0] if volume_sizes.shape[0] else NULL
    ctx.nvolumes = volume_sizes.shape[0]
    ctx.segment = segment
    ctx.base_pos = base_pos
    ctx.last_seq = last_seq
    ctx.min_time = 0xFFFFFFFFFFFFFFFF
    ctx.max_time = 0
    ctx.refuse_flags = ZC_FLAGS_KNOWN & ~flags
    with nogil:
        st = zc_scan(&ctx, &d[0] if n else NULL, n, &b.vec, &consumed)
    b.status = st
    b.consumed = consumed
    b.last_seq = ctx.last_seq
    b.min_time = ctx.min_time
    b.max_time = ctx.max_time
    return b


# ---- batch encoding -----------------------------------------------------------------------

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int dlclose(void *handle)
    enum:
        RTLD_NOW
        RTLD_NOLOAD

ctypedef int (*_int_fn)() noexcept nogil
ctypedef void (*_reset_fn)(void *stream) noexcept nogil
ctypedef int (*_compress_fn)(void *stream, const char *src, char *dst, int src_size,
                             int dst_cap, int acceleration) noexcept nogil

cdef zc_lz4 _lz4_found         # the `lz4` package's stream functions (compress NULL: none)
cdef size_t _lz4_state_bytes = 0
cdef bint _lz4_enabled = True  # set_native_lz4(False): the per-record path (tests)
_lz4_found.compress = NULL


cdef int _run_lz4(zc_lz4 *z, const char *src, char *dst, int n, int cap) noexcept nogil:
    z.reset(z.stream)
    return z.compress(z.stream, src, dst, n, cap, 1)


cdef void _locate_lz4():
    """Fill _lz4_found from the loaded lz4.block._block, which compresses as
    LZ4_resetStream then LZ4_compress_fast_continue (acceleration 1): left empty when the
    module does not export them, reports another LZ4 version than the package does, or
    compresses a probe to other bytes than lz4.block.compress."""
    global _lz4_found, _lz4_state_bytes
    cdef void *handle
    cdef void *fns[4]
    cdef zc_lz4 z
    try:
        import lz4.block._block as block_module
        path = block_module.__file__.encode()
    except (ImportError, AttributeError):
        return
    handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)  # the loaded module; never loads one
    if handle == NULL:
        return
    for i, name in enumerate((b"LZ4_resetStream", b"LZ4_compress_fast_continue",
                              b"LZ4_sizeofState", b"LZ4_versionNumber")):
        fns[i] = dlsym(handle, name)
    dlclose(handle)  # drops the reference NOLOAD took; Python keeps the module loaded
    if fns[0] == NULL or fns[1] == NULL or fns[2] == NULL or fns[3] == NULL:
        return
    if (<_int_fn>fns[3])() != lz4.library_version_number():
        return
    cdef int state_bytes = (<_int_fn>fns[2])()
    if state_bytes <= 0 or state_bytes > (1 << 20):
        return
    z.reset = <_reset_fn>fns[0]
    z.compress = <_compress_fn>fns[1]
    z.stream = malloc(state_bytes)
    if z.stream == NULL:
        return
    # probes of text, runs, zeros and noise, small and large, must compress to exactly
    # the bytes lz4.block.compress gives
    rng = np.random.default_rng(14)
    ok = True
    for probe in (b"zcore probe " * 40, bytes(512) + rng.bytes(512),
                  b"zcore probe " * 500 + bytes(3000) + bytes(range(256)) * 20
                  + rng.bytes(9000), rng.bytes(70000) + b"tail" * 4000):
        expect = lz4.block.compress(probe, store_size=False)
        out = bytearray(len(probe) + len(probe) // 255 + 16)
        r = _run_lz4(&z, PyBytes_AS_STRING(probe), PyByteArray_AS_STRING(out), len(probe),
                     len(out))
        if r <= 0 or bytes(out[:r]) != expect:
            ok = False
            break
    free(z.stream)
    if ok:
        z.stream = NULL
        _lz4_found = z
        _lz4_state_bytes = state_bytes


_locate_lz4()


def native_lz4():
    """True when batch encoding compresses with the GIL released (the `lz4` package's
    compressor was found and checked); False: lz4.block.compress per record."""
    return _lz4_found.compress != NULL and _lz4_enabled


def set_native_lz4(bint enabled):
    """Use (True) or bypass (False) the native compressor in batch encoding; returns the
    previous setting.  For differential tests and benchmarks: both give the same bytes."""
    global _lz4_enabled
    previous = _lz4_enabled
    _lz4_enabled = enabled
    return previous


cdef int encode_items(const zc_batch_item *items, size_t n, zc_batch_out *outs,
                      unsigned int nouts, bint compress, double keep, size_t *done) except -1000:
    cdef zc_lz4 z = _lz4_found
    cdef int st = ZC_OK
    cdef size_t i, one, written
    cdef const zc_batch_item *it
    cdef zc_batch_out *o
    if not compress:
        with nogil:
            st = zc_encode_batch(items, n, outs, nouts, NULL, keep, done)
        return st
    if z.compress != NULL and _lz4_enabled:
        z.stream = malloc(_lz4_state_bytes)  # one stream per call: calls may run in parallel
        if z.stream == NULL:
            raise MemoryError()
        with nogil:
            st = zc_encode_batch(items, n, outs, nouts, &z, keep, done)
        free(z.stream)
        return st
    # the per-record path: lz4.block.compress (which releases the GIL itself) per write
    for i in range(n):
        it = &items[i]
        if (it.type == ZC_REC_WRITE or it.type == ZC_REC_SYNC) and it.out < nouts \
                and 0 < it.length <= ZC_MAX_WRITE and not zc_all_zero(it.data, it.length):
            packed = lz4.block.compress(
                PyMemoryView_FromMemory(<char *>it.data, it.length, PyBUF_READ),
                store_size=False)
            if len(packed) <= it.length * keep:
                o = &outs[it.out]
                if o.fill > o.cap:
                    st = ZC_E_ARG
                else:
                    st = zc_encode_stored(o.buf + o.fill, o.cap - o.fill, it.type, ZC_FLAG_LZ4,
                                          it.volume, it.seq, it.offset, it.length, it.time_ns,
                                          <const uint8_t *>PyBytes_AS_STRING(packed),
                                          len(packed), &written)
                if st:
                    done[0] = i
                    return st
                o.fill += written
                continue
        st = zc_encode_batch(it, 1, outs, nouts, NULL, keep, &one)
        if st:
            done[0] = i
            return st
    done[0] = n
    return ZC_OK


_ITEM_TYPES = (ZC_REC_WRITE, ZC_REC_SYNC, ZC_REC_ZERO, ZC_REC_CHECKPOINT)


def encode_batch(list items, unsigned int nouts=1, bint compress=True,
                 double min_saving=1.0 / 16):
    """Records of `items`, each (out, type, volume, seq, offset, time_ns, data), encoded
    into `nouts` outputs in one batch as the capture ring's seal encodes them (out -1: a
    checkpoint into every output; a ZERO item's data gives only its length).  Returns one
    bytes per output."""
    cdef size_t n = len(items), i, done = 0
    cdef zc_batch_item *arr = <zc_batch_item *>malloc((n + 1) * sizeof(zc_batch_item))
    cdef zc_batch_out *outs = <zc_batch_out *>malloc((nouts + 1) * sizeof(zc_batch_out))
    cdef const uint8_t[::1] d
    cdef uint64_t bound
    cdef int st
    if arr == NULL or outs == NULL:
        free(arr)
        free(outs)
        raise MemoryError()
    keep_alive = []
    try:
        caps = [0] * nouts
        for i in range(n):
            out, type_, volume, seq, offset, time_ns, data = items[i]
            if type_ not in _ITEM_TYPES:
                raise ConfigError(f"item {i}: record type {type_} cannot be batch-encoded")
            if not -1 <= out < nouts or (out == -1) != (type_ == ZC_REC_CHECKPOINT):
                raise ConfigError(f"item {i}: output {out} (of {nouts}) for record type "
                                  f"{type_}")
            d = _bytes_view(data, "item data") if len(data) else None
            if len(data) > ZC_MAX_WRITE:
                raise ConfigError(f"item {i}: {len(data)} bytes exceed {ZC_MAX_WRITE}")
            keep_alive.append(d)
            arr[i].data = &d[0] if len(data) else NULL
            arr[i].seq = seq
            arr[i].offset = offset
            arr[i].time_ns = time_ns
            arr[i].volume = volume
            arr[i].length = len(data)
            arr[i].out = ZC_BATCH_EVERY_OUTPUT if out == -1 else out
            arr[i].type = type_
            arr[i].reserved = 0
            bound = zc_batch_item_bound(&arr[i])
            if out == -1:
                caps = [c + bound for c in caps]
            else:
                caps[out] += bound
        parts = [PyByteArray_FromStringAndSize(NULL, c) for c in caps]
        for i in range(nouts):
            outs[i].buf = <uint8_t *>PyByteArray_AS_STRING(parts[i])
            outs[i].cap = caps[i]
            outs[i].fill = 0
        st = encode_items(arr, n, outs, nouts, compress, 1.0 - min_saving, &done)
        if st:
            raise status_error(st, f"encoding batch item {done}")
        return [bytes(parts[i][:outs[i].fill]) for i in range(nouts)]
    finally:
        free(arr)
        free(outs)
