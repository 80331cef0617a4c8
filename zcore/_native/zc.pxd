# Declarations of the C kernels in csrc/ (see the headers for each contract).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "zc_format.h":
    enum:
        ZC_RECORD_HEADER_SIZE
        ZC_SECTOR
        ZC_MAX_WRITE
        ZC_REC_RESERVED
        ZC_REC_WRITE
        ZC_REC_ZERO
        ZC_REC_CHECKPOINT
        ZC_REC_SYNC
        ZC_FLAG_LZ4
        ZC_FLAG_BLOCKCRC
        ZC_FLAG_ZSTD
        ZC_FLAGS_KNOWN
        ZC_FLAGS_V2
        ZC_FLAGS_COMPRESSED

    # the status codes (zcore.errors.Status is their Python twin)
    enum zc_status:
        ZC_OK
        ZC_E_TRUNCATED
        ZC_E_HEADER_CRC
        ZC_E_PAYLOAD_CRC
        ZC_E_BAD_RECORD
        ZC_E_ALIGNMENT
        ZC_E_NOMEM
        ZC_E_ORDER
        ZC_E_RANGE
        ZC_E_IO
        ZC_E_ARG
        ZC_E_FULL
        ZC_E_CLOSED

cdef extern from "zc_crc32c.h" nogil:
    uint32_t zc_crc32c(uint32_t crc, const void *buf, size_t len)
    void zc_crc32c_blocks(const void *buf, size_t len, size_t block, uint32_t *out)

cdef extern from "zc_record.h" nogil:
    ctypedef struct zc_extent:
        uint64_t seq
        uint64_t offset
        uint64_t pos
        uint32_t length
        uint32_t segment
        uint32_t volume
        uint32_t stored
        uint16_t type
        uint16_t flags
        uint32_t reserved

    ctypedef struct zc_extent_vec:
        zc_extent *v
        size_t n
        size_t cap

    ctypedef struct zc_scan_ctx:
        const uint64_t *volume_sizes
        uint32_t nvolumes
        uint32_t segment
        uint64_t base_pos
        uint64_t last_seq
        uint64_t min_time
        uint64_t max_time
        uint16_t refuse_flags

    void zc_extent_vec_free(zc_extent_vec *vec)
    uint64_t zc_record_size(uint64_t stored)
    uint32_t zc_blockcrc_table_size(uint32_t length)
    int zc_encode_raw(uint8_t *out, size_t cap, uint16_t type, uint32_t volume, uint64_t seq,
                      uint64_t offset, const uint8_t *data, uint32_t len, uint64_t time_ns,
                      size_t *written)
    int zc_encode_stored(uint8_t *out, size_t cap, uint16_t type, uint16_t flags,
                         uint32_t volume, uint64_t seq, uint64_t offset, uint32_t length,
                         uint64_t time_ns, const uint8_t *payload, uint32_t stored,
                         size_t *written)
    ctypedef struct zc_lz4:
        void (*reset)(void *stream) noexcept nogil
        int (*compress)(void *stream, const char *src, char *dst, int src_size, int dst_cap,
                        int acceleration) noexcept nogil
        void *stream

    enum:
        ZC_BATCH_EVERY_OUTPUT

    ctypedef struct zc_batch_item:
        const uint8_t *data
        uint64_t seq
        uint64_t offset
        uint64_t time_ns
        uint32_t volume
        uint32_t length
        uint32_t out
        uint16_t type
        uint16_t reserved

    ctypedef struct zc_batch_out:
        uint8_t *buf
        size_t cap
        size_t fill

    uint64_t zc_batch_item_bound(const zc_batch_item *it)
    int zc_encode_batch(const zc_batch_item *items, size_t n, zc_batch_out *outs,
                        uint32_t nouts, const zc_lz4 *lz4, double keep, size_t *done)
    int zc_parse_header(const uint8_t *buf, zc_extent *out, uint32_t *payload_crc)
    int zc_verify_payload(const zc_extent *e, uint32_t payload_crc, const uint8_t *payload)
    int zc_scan(zc_scan_ctx *ctx, const uint8_t *buf, size_t len, zc_extent_vec *vec,
                size_t *consumed)
    int zc_read_blockcrc(int fd, uint64_t pos, uint32_t length, uint64_t src_off, uint64_t n,
                         uint8_t *dst)
    int zc_pread_full(int fd, void *buf, size_t n, uint64_t pos)
    int zc_check_record_header(int fd, const zc_extent *e)
    int zc_read_record(int fd, const zc_extent *e, uint64_t src_off, uint64_t n,
                       uint8_t *dst)

cdef extern from "zc_index.h" nogil:
    ctypedef struct zc_index:
        pass

    ctypedef struct zc_fragment:
        uint64_t dst
        uint64_t length
        uint64_t src
        zc_extent ext

    zc_index *zc_index_new()
    void zc_index_free(zc_index *idx)
    int zc_index_add(zc_index *idx, const zc_extent *e, size_t n, int ordered)
    int zc_index_add_sorted(zc_index *idx, const zc_extent *e, size_t n, uint32_t segment,
                            uint64_t seg_len, const uint64_t *volume_sizes,
                            uint32_t nvolumes, int ordered)
    int zc_index_drop_before(zc_index *idx, uint64_t before)
    size_t zc_index_count(const zc_index *idx)
    size_t zc_index_memory(const zc_index *idx)
    int zc_index_plan(zc_index *idx, uint32_t volume, uint64_t offset, uint64_t length,
                      uint64_t at, const zc_fragment **frags, size_t *nfrags)

cdef extern from "zc_capture.h" nogil:
    enum:
        ZC_NO_BACKING
        ZC_CAPTURE_STREAM
        ZC_CAPTURE_BITMAP
        ZC_ENTRY_VOID
        ZC_ENTRY_FILLER

    ctypedef struct zc_ring_entry:
        uint64_t seq
        uint64_t offset
        uint64_t time_ns
        uint32_t volume
        uint32_t length
        uint32_t stored
        uint32_t size
        uint16_t kind
        uint16_t committed
        uint8_t pad[20]

    ctypedef struct zc_dirty:
        uint32_t volume
        uint32_t length
        uint64_t offset

    ctypedef struct zc_capture_stats:
        uint64_t writes, bytes, ring_used, ring_size, next_seq, dirty_pending
        int mode, overflowed

    ctypedef struct zc_capture:
        pass

    zc_capture *zc_capture_new(uint64_t ring_bytes, uint64_t first_seq)
    void zc_capture_free(zc_capture *c)
    void zc_capture_close(zc_capture *c)
    long long zc_capture_write(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                               const uint8_t *data, uint32_t len, uint16_t kind)
    long long zc_capture_zero(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                              uint32_t len)
    long long zc_capture_sync(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                              uint32_t len, int skip_zero)
    long long zc_capture_watch(zc_capture *c, uint32_t volume, uint64_t offset, uint32_t len)
    long long zc_capture_sync_from(zc_capture *c, uint64_t id, const uint8_t *data,
                                   uint32_t len, int skip_zero)
    void zc_capture_unwatch(zc_capture *c, uint64_t id)
    long long zc_capture_marker(zc_capture *c, const uint8_t *payload, uint32_t len)
    void zc_capture_peek(zc_capture *c, const uint8_t **ptr, uint64_t *nbytes,
                         uint64_t max_bytes)
    void zc_capture_consume(zc_capture *c, uint64_t nbytes)
    int zc_capture_set_mode(zc_capture *c, int mode)
    zc_dirty *zc_capture_take_dirty(zc_capture *c, size_t *n)
    void zc_capture_stats_get(zc_capture *c, zc_capture_stats *out)
    int zc_all_zero(const uint8_t *p, size_t n)
