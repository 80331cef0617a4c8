/* zc_record.h - the record codec shared by the journal and the wire.
 *
 * A record is a 64-byte header (layout in zc_format.h) followed by its payload padded
 * with zeros to a multiple of 64 bytes.  Raw write payloads (ZC_FLAG_BLOCKCRC) are a
 * table of one CRC32C per 4 KiB block of data, padded to 64 bytes, then the data; the
 * header's payload_crc covers the table, so a reader can verify any block alone.
 * Other payloads (LZ4, checkpoint) are covered whole by payload_crc.
 *
 * Ownership: every function only reads its input buffers during the call and writes at
 * most `cap` bytes of `out`.  zc_extent_vec memory is owned by the vec: release it with
 * zc_extent_vec_free.  No function keeps a pointer after it returns.
 */
#ifndef ZC_RECORD_H
#define ZC_RECORD_H

#include <stddef.h>
#include <stdint.h>

#include "zc_format.h"

/* One parsed record: what the journal index keeps per write (48 bytes). */
typedef struct zc_extent {
    uint64_t seq;
    uint64_t offset;   /* volume byte offset (0 for checkpoints)                      */
    uint64_t pos;      /* position of the record header in its segment file or buffer */
    uint32_t length;   /* uncompressed payload / bytes of volume covered               */
    uint32_t segment;  /* segment number the record lives in                           */
    uint32_t volume;
    uint32_t stored;   /* stored payload length, before padding                        */
    uint16_t type;
    uint16_t flags;
    uint32_t reserved;
} zc_extent;

typedef struct zc_extent_vec {
    zc_extent *v;
    size_t n, cap;
} zc_extent_vec;

void zc_extent_vec_free(zc_extent_vec *vec);
int zc_extent_vec_push(zc_extent_vec *vec, const zc_extent *e);

/* Bytes a record with `stored` payload bytes occupies, header and padding included. */
static inline uint64_t zc_record_size(uint64_t stored)
{
    return ZC_RECORD_HEADER_SIZE + ((stored + ZC_RECORD_ALIGN - 1) & ~(uint64_t)(ZC_RECORD_ALIGN - 1));
}

/* Bytes of the block-CRC table of a raw write of `length` bytes, padding included. */
static inline uint32_t zc_blockcrc_table_size(uint32_t length)
{
    uint32_t blocks = (length + ZC_CRC_BLOCK - 1) / ZC_CRC_BLOCK;
    return (blocks * 4u + ZC_RECORD_ALIGN - 1) & ~(ZC_RECORD_ALIGN - 1);
}

/* Encode a raw write or sync record (type ZC_REC_WRITE or ZC_REC_SYNC) of `len` bytes at
 * `data` into out[0..cap).  On success stores the record size in *written and returns
 * ZC_OK; ZC_E_ARG if cap is too small, ZC_E_ALIGNMENT / ZC_E_BAD_RECORD on bad fields. */
int zc_encode_raw(uint8_t *out, size_t cap, uint16_t type, uint32_t volume, uint64_t seq,
                  uint64_t offset, const uint8_t *data, uint32_t len, uint64_t time_ns,
                  size_t *written);

/* Encode a record whose payload is given as stored: an LZ4 block or zstd frame (flags
 * ZC_FLAG_LZ4 or ZC_FLAG_ZSTD,
 * `length` = uncompressed size), a zero record (stored = 0) or a checkpoint. */
int zc_encode_stored(uint8_t *out, size_t cap, uint16_t type, uint16_t flags,
                     uint32_t volume, uint64_t seq, uint64_t offset, uint32_t length,
                     uint64_t time_ns, const uint8_t *payload, uint32_t stored,
                     size_t *written);

/* ---- batch encoding (the sealer's whole batch in one call, no Python in between) ----- */

/* An LZ4 block compressor, as the `lz4` package runs one for lz4.block.compress: a fresh
 * stream (`reset`, LZ4_resetStream's contract) then `compress` (LZ4_compress_fast_continue's:
 * src_size bytes at src into dst, dst_cap bytes, acceleration 1; the compressed size, or 0
 * when it does not fit).  zcore takes both functions from the package's loaded extension,
 * so the bytes are exactly those of lz4.block.compress(data, store_size=False).  `stream`
 * is scratch of LZ4_sizeofState() bytes, 8-byte aligned, used by one call at a time. */
typedef struct zc_lz4 {
    void (*reset)(void *stream);
    int (*compress)(void *stream, const char *src, char *dst, int src_size, int dst_cap,
                    int acceleration);
    void *stream;
} zc_lz4;

#define ZC_BATCH_EVERY_OUTPUT 0xFFFFFFFFu /* item.out of a checkpoint: into every output */

/* One record to encode.  data: `length` bytes of write data (WRITE, SYNC; unused for
 * ZERO) or the checkpoint payload (CHECKPOINT: `length` = payload bytes). */
typedef struct zc_batch_item {
    const uint8_t *data;
    uint64_t seq;
    uint64_t offset;
    uint64_t time_ns;
    uint32_t volume;
    uint32_t length;
    uint32_t out;      /* index of the output buffer, or ZC_BATCH_EVERY_OUTPUT */
    uint16_t type;     /* ZC_REC_WRITE, ZC_REC_SYNC, ZC_REC_ZERO or ZC_REC_CHECKPOINT */
    uint16_t reserved;
} zc_batch_item;

typedef struct zc_batch_out {
    uint8_t *buf;
    size_t cap;        /* bytes of buf                                */
    size_t fill;       /* in: where the next record goes; out: after it */
} zc_batch_out;

/* Bytes an item may take in its output (each output, for a checkpoint): the raw record
 * of a write, which bounds its LZ4 and zero encodings too. */
uint64_t zc_batch_item_bound(const zc_batch_item *it);

/* Encode items[0..n) in order, each appended to its output, exactly as one call each of
 * today's per-record encoders would: a WRITE or SYNC whose data is all zeros becomes a
 * ZERO record; otherwise, when `lz4` is not NULL, an LZ4 record when the compressed size
 * is at most length * keep (keep = 1 - the minimum saving), else a raw record with block
 * CRC32Cs.  Never calls back into Python: run it with the GIL released (`lz4` is
 * NULL: no compression).  Returns ZC_OK,
 * or the status of the first item that failed (ZC_E_ARG: an output too small or a bad
 * output index; the field statuses of zc_encode_raw/zc_encode_stored); *done receives
 * the items encoded before it, and the outputs' fill stands after them. */
int zc_encode_batch(const zc_batch_item *items, size_t n, zc_batch_out *outs, uint32_t nouts,
                    const zc_lz4 *lz4, double keep, size_t *done);

/* Parse and check one header at buf (ZC_RECORD_HEADER_SIZE bytes).  Verifies the header
 * CRC and the field rules of docs/format.md (type, flags, alignment, lengths); fills
 * *out (segment and pos untouched).  Returns ZC_OK or a negative status. */
int zc_parse_header(const uint8_t *buf, zc_extent *out, uint32_t *payload_crc);

/* Verify a record's payload (stored bytes at `payload`) against its parsed header. */
int zc_verify_payload(const zc_extent *e, uint32_t payload_crc, const uint8_t *payload);

/* Validation context for zc_scan. */
typedef struct zc_scan_ctx {
    const uint64_t *volume_sizes; /* bytes, indexed by volume id; 0 = not ours          */
    uint32_t nvolumes;
    uint32_t segment;             /* stamped into every extent produced                */
    uint64_t base_pos;            /* added to each record's offset within buf          */
    uint64_t last_seq;            /* in: records need seq > it; out: highest seq seen   */
    uint64_t min_time, max_time;  /* out: widened by each record's time_ns             */
    uint16_t refuse_flags;        /* known flags this stream's version lacks (0: none;
                                   * ZC_FLAG_ZSTD in a v1-v2 segment or a v1 peer's
                                   * bundle): such a record is ZC_E_BAD_RECORD          */
} zc_scan_ctx;

/* Validate the records in buf[0..len) in order (headers, payload checksums, seq order,
 * volume ranges), appending one extent per record to `vec`.  Stops at the first record
 * that fails; *consumed receives the bytes of valid records before it.  Returns ZC_OK
 * when all of buf was consumed, else the failing record's status (ZC_E_TRUNCATED when
 * buf ends inside a record or at an all-zero header).  On ZC_E_NOMEM the vec and ctx
 * may hold the records before the failure. */
int zc_scan(zc_scan_ctx *ctx, const uint8_t *buf, size_t len, zc_extent_vec *vec,
            size_t *consumed);

/* Read `n` bytes starting `src_off` bytes into the data of the raw (BLOCKCRC) record
 * whose header is at file position `pos` of `fd` and whose data length is `length`,
 * verifying the CRC of every 4 KiB block touched, into dst.  Returns ZC_OK,
 * ZC_E_PAYLOAD_CRC, ZC_E_TRUNCATED (file too short) or ZC_E_IO (errno set). */
int zc_read_blockcrc(int fd, uint64_t pos, uint32_t length, uint64_t src_off, uint64_t n,
                     uint8_t *dst);

/* Check that the record header at file position e->pos of `fd` is valid and names the
 * record the index entry `e` describes (seq, volume, offset, length, stored, type and
 * flags equal): an index entry that passed its file's CRC but points elsewhere is caught
 * before its bytes are used.  ZC_OK, ZC_E_BAD_RECORD (another record), ZC_E_HEADER_CRC,
 * ZC_E_TRUNCATED or ZC_E_IO. */
int zc_check_record_header(int fd, const zc_extent *e);

/* zc_read_blockcrc of the raw record of index entry `e` (header at e->pos), after
 * zc_check_record_header; the header and the block CRCs are read in one pread where
 * they are close.  Same returns as both. */
int zc_read_record(int fd, const zc_extent *e, uint64_t src_off, uint64_t n, uint8_t *dst);

/* pread exactly n bytes (retrying short reads and EINTR): ZC_OK, ZC_E_TRUNCATED, ZC_E_IO */
int zc_pread_full(int fd, void *buf, size_t n, uint64_t pos);

#endif
