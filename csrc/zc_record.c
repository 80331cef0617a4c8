/* zc_record.c - encode, parse, verify and scan records; verified reads of raw payloads. */
#include "zc_record.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "zc_crc32c.h"

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "zcore's formats are little-endian; add byte swapping for this target"
#endif

void zc_extent_vec_free(zc_extent_vec *vec)
{
    free(vec->v);
    vec->v = NULL;
    vec->n = vec->cap = 0;
}

int zc_extent_vec_push(zc_extent_vec *vec, const zc_extent *e)
{
    if (vec->n == vec->cap) {
        size_t cap = vec->cap ? vec->cap * 2 : 64;
        zc_extent *v = realloc(vec->v, cap * sizeof *v);
        if (!v)
            return ZC_E_NOMEM;
        vec->v = v;
        vec->cap = cap;
    }
    vec->v[vec->n++] = *e;
    return ZC_OK;
}

static void write_header(uint8_t *out, uint16_t type, uint16_t flags, uint32_t volume,
                         uint64_t seq, uint64_t offset, uint32_t length, uint32_t stored,
                         uint64_t time_ns, uint32_t payload_crc)
{
    memset(out, 0, ZC_RECORD_HEADER_SIZE);
    put16(out + ZC_HDR_OFF_TYPE, type);
    put16(out + ZC_HDR_OFF_FLAGS, flags);
    put32(out + ZC_HDR_OFF_VOLUME, volume);
    put64(out + ZC_HDR_OFF_SEQ, seq);
    put64(out + ZC_HDR_OFF_OFFSET, offset);
    put32(out + ZC_HDR_OFF_LENGTH, length);
    put32(out + ZC_HDR_OFF_STORED, stored);
    put64(out + ZC_HDR_OFF_TIME, time_ns);
    put32(out + ZC_HDR_OFF_PAYLOAD_CRC, payload_crc);
    put32(out + ZC_HDR_OFF_HEADER_CRC, zc_crc32c(0, out, ZC_HDR_OFF_HEADER_CRC));
}

/* Field rules of docs/format.md, shared by the encoders and the parser. */
static int check_fields(uint16_t type, uint16_t flags, uint32_t volume, uint64_t seq,
                        uint64_t offset, uint32_t length, uint32_t stored)
{
    if (seq == 0 || (flags & ~ZC_FLAGS_KNOWN))
        return ZC_E_BAD_RECORD;
    switch (type) {
    case ZC_REC_WRITE:
    case ZC_REC_SYNC:
        if (length == 0 || length > ZC_MAX_WRITE)
            return ZC_E_BAD_RECORD;
        if ((offset | length) % ZC_SECTOR)
            return ZC_E_ALIGNMENT;
        if (offset + length < offset)
            return ZC_E_RANGE;
        if (flags == ZC_FLAG_BLOCKCRC)
            return stored == zc_blockcrc_table_size(length) + length ? ZC_OK : ZC_E_BAD_RECORD;
        if (flags == ZC_FLAG_LZ4)
            return stored > 0 && stored <= ZC_MAX_PAYLOAD ? ZC_OK : ZC_E_BAD_RECORD;
        return ZC_E_BAD_RECORD;
    case ZC_REC_ZERO:
        if (length == 0 || flags || stored)
            return ZC_E_BAD_RECORD;
        if ((offset | length) % ZC_SECTOR)
            return ZC_E_ALIGNMENT;
        return offset + length < offset ? ZC_E_RANGE : ZC_OK;
    case ZC_REC_CHECKPOINT:
        if (flags || volume || offset || stored != length || stored < 4 ||
            stored > 4 + ZC_MAX_TAG)
            return ZC_E_BAD_RECORD;
        return ZC_OK;
    default:
        return ZC_E_BAD_RECORD;
    }
}

int zc_encode_raw(uint8_t *out, size_t cap, uint16_t type, uint32_t volume, uint64_t seq,
                  uint64_t offset, const uint8_t *data, uint32_t len, uint64_t time_ns,
                  size_t *written)
{
    if (type != ZC_REC_WRITE && type != ZC_REC_SYNC)
        return ZC_E_ARG;
    uint32_t table = zc_blockcrc_table_size(len);
    int st = check_fields(type, ZC_FLAG_BLOCKCRC, volume, seq, offset, len, table + len);
    if (st)
        return st;
    uint64_t size = zc_record_size((uint64_t)table + len);
    if (size > cap)
        return ZC_E_ARG;
    uint8_t *tab = out + ZC_RECORD_HEADER_SIZE;
    memset(tab, 0, table);
    zc_crc32c_blocks(data, len, ZC_CRC_BLOCK, (uint32_t *)tab); /* table is 64-aligned, LE */
    memcpy(tab + table, data, len);
    memset(tab + table + len, 0, size - ZC_RECORD_HEADER_SIZE - table - len);
    write_header(out, type, ZC_FLAG_BLOCKCRC, volume, seq, offset, len, table + len, time_ns,
                 zc_crc32c(0, tab, table));
    *written = size;
    return ZC_OK;
}

int zc_encode_stored(uint8_t *out, size_t cap, uint16_t type, uint16_t flags,
                     uint32_t volume, uint64_t seq, uint64_t offset, uint32_t length,
                     uint64_t time_ns, const uint8_t *payload, uint32_t stored,
                     size_t *written)
{
    if (flags & ZC_FLAG_BLOCKCRC)
        return ZC_E_ARG; /* raw payloads go through zc_encode_raw */
    int st = check_fields(type, flags, volume, seq, offset, length, stored);
    if (st)
        return st;
    uint64_t size = zc_record_size(stored);
    if (size > cap)
        return ZC_E_ARG;
    if (stored) /* a ZERO record passes payload NULL: memcpy(dst, NULL, 0) is undefined */
        memcpy(out + ZC_RECORD_HEADER_SIZE, payload, stored);
    memset(out + ZC_RECORD_HEADER_SIZE + stored, 0, size - ZC_RECORD_HEADER_SIZE - stored);
    write_header(out, type, flags, volume, seq, offset, length, stored, time_ns,
                 zc_crc32c(0, payload, stored));
    *written = size;
    return ZC_OK;
}

int zc_parse_header(const uint8_t *buf, zc_extent *out, uint32_t *payload_crc)
{
    if (zc_crc32c(0, buf, ZC_HDR_OFF_HEADER_CRC) != get32(buf + ZC_HDR_OFF_HEADER_CRC))
        return ZC_E_HEADER_CRC;
    out->type = get16(buf + ZC_HDR_OFF_TYPE);
    out->flags = get16(buf + ZC_HDR_OFF_FLAGS);
    out->volume = get32(buf + ZC_HDR_OFF_VOLUME);
    out->seq = get64(buf + ZC_HDR_OFF_SEQ);
    out->offset = get64(buf + ZC_HDR_OFF_OFFSET);
    out->length = get32(buf + ZC_HDR_OFF_LENGTH);
    out->stored = get32(buf + ZC_HDR_OFF_STORED);
    out->reserved = 0;
    *payload_crc = get32(buf + ZC_HDR_OFF_PAYLOAD_CRC);
    for (int i = 44; i < 60; i++)
        if (buf[i])
            return ZC_E_BAD_RECORD;
    return check_fields(out->type, out->flags, out->volume, out->seq, out->offset,
                        out->length, out->stored);
}

#define VERIFY_CHUNK 256u /* block CRCs computed per batch while verifying */

int zc_verify_payload(const zc_extent *e, uint32_t payload_crc, const uint8_t *payload)
{
    if (!(e->flags & ZC_FLAG_BLOCKCRC))
        return zc_crc32c(0, payload, e->stored) == payload_crc ? ZC_OK : ZC_E_PAYLOAD_CRC;
    uint32_t table = zc_blockcrc_table_size(e->length);
    if (zc_crc32c(0, payload, table) != payload_crc)
        return ZC_E_PAYLOAD_CRC;
    const uint8_t *data = payload + table;
    uint32_t crcs[VERIFY_CHUNK];
    for (uint32_t off = 0; off < e->length; off += VERIFY_CHUNK * ZC_CRC_BLOCK) {
        uint32_t n = e->length - off;
        if (n > VERIFY_CHUNK * ZC_CRC_BLOCK)
            n = VERIFY_CHUNK * ZC_CRC_BLOCK;
        zc_crc32c_blocks(data + off, n, ZC_CRC_BLOCK, crcs);
        size_t nblocks = (n + ZC_CRC_BLOCK - 1) / ZC_CRC_BLOCK;
        if (memcmp(crcs, payload + 4 * (off / ZC_CRC_BLOCK), 4 * nblocks))
            return ZC_E_PAYLOAD_CRC;
    }
    return ZC_OK;
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

int zc_scan(zc_scan_ctx *ctx, const uint8_t *buf, size_t len, zc_extent_vec *vec,
            size_t *consumed)
{
    size_t at = 0;
    int st = ZC_OK;
    while (at < len) {
        if (len - at < ZC_RECORD_HEADER_SIZE) {
            st = ZC_E_TRUNCATED;
            break;
        }
        const uint8_t *h = buf + at;
        zc_extent e;
        uint32_t pcrc;
        st = zc_parse_header(h, &e, &pcrc);
        if (st) {
            if (all_zero(h, ZC_RECORD_HEADER_SIZE))
                st = ZC_E_TRUNCATED;
            break;
        }
        uint64_t size = zc_record_size(e.stored);
        if (size > len - at) {
            st = ZC_E_TRUNCATED;
            break;
        }
        if (e.seq <= ctx->last_seq) {
            st = ZC_E_ORDER;
            break;
        }
        if (e.type != ZC_REC_CHECKPOINT &&
            (e.volume >= ctx->nvolumes || ctx->volume_sizes[e.volume] == 0 ||
             e.offset + e.length > ctx->volume_sizes[e.volume])) {
            st = ZC_E_RANGE;
            break;
        }
        st = zc_verify_payload(&e, pcrc, h + ZC_RECORD_HEADER_SIZE);
        if (st)
            break;
        uint64_t t;
        memcpy(&t, h + ZC_HDR_OFF_TIME, 8);
        e.segment = ctx->segment;
        e.pos = ctx->base_pos + at;
        st = zc_extent_vec_push(vec, &e);
        if (st)
            break;
        ctx->last_seq = e.seq;
        if (t < ctx->min_time)
            ctx->min_time = t;
        if (t > ctx->max_time)
            ctx->max_time = t;
        at += size;
    }
    *consumed = at;
    return st;
}

int zc_pread_full(int fd, void *buf, size_t n, uint64_t pos)
{
    uint8_t *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ZC_E_IO;
        }
        if (r == 0)
            return ZC_E_TRUNCATED;
        p += r;
        n -= (size_t)r;
        pos += (uint64_t)r;
    }
    return ZC_OK;
}

#define TABLE_CHUNK 1024u /* block CRCs fetched per pread (4 KiB) */

int zc_read_blockcrc(int fd, uint64_t pos, uint32_t length, uint64_t src_off, uint64_t n,
                     uint8_t *dst)
{
    if (n == 0)
        return ZC_OK;
    if (src_off + n > length || src_off + n < src_off)
        return ZC_E_ARG;
    uint64_t data_pos = pos + ZC_RECORD_HEADER_SIZE + zc_blockcrc_table_size(length);
    uint64_t end = src_off + n;
    uint32_t crcs[TABLE_CHUNK];
    uint8_t edge[ZC_CRC_BLOCK];
    uint64_t b = src_off / ZC_CRC_BLOCK, b_last = (end - 1) / ZC_CRC_BLOCK;
    while (b <= b_last) {
        uint64_t nb = b_last - b + 1 < TABLE_CHUNK ? b_last - b + 1 : TABLE_CHUNK;
        int st = zc_pread_full(fd, crcs, nb * 4, pos + ZC_RECORD_HEADER_SIZE + b * 4);
        if (st)
            return st;
        uint64_t i = 0;
        while (i < nb) {
            uint64_t blk = (b + i) * ZC_CRC_BLOCK;
            uint64_t blk_len = length - blk < ZC_CRC_BLOCK ? length - blk : ZC_CRC_BLOCK;
            if (blk >= src_off && blk + blk_len <= end) {
                /* a run of whole blocks: one pread straight into dst, then verify each */
                uint64_t j = i, run_end = blk;
                while (j < nb) {
                    uint64_t s = (b + j) * ZC_CRC_BLOCK;
                    uint64_t l = length - s < ZC_CRC_BLOCK ? length - s : ZC_CRC_BLOCK;
                    if (s + l > end)
                        break;
                    run_end = s + l;
                    j++;
                }
                uint8_t *out = dst + (blk - src_off);
                st = zc_pread_full(fd, out, run_end - blk, data_pos + blk);
                if (st)
                    return st;
                for (uint64_t k = i; k < j; k++) {
                    uint64_t s = (b + k) * ZC_CRC_BLOCK;
                    uint64_t l = length - s < ZC_CRC_BLOCK ? length - s : ZC_CRC_BLOCK;
                    if (zc_crc32c(0, dst + (s - src_off), l) != crcs[k]) {
                        memset(dst, 0, n); /* never leave unchecked bytes behind */
                        return ZC_E_PAYLOAD_CRC;
                    }
                }
                i = j;
            } else {
                /* a block the range only partly covers: verify it whole, copy the part */
                st = zc_pread_full(fd, edge, blk_len, data_pos + blk);
                if (st)
                    return st;
                if (zc_crc32c(0, edge, blk_len) != crcs[i]) {
                    memset(dst, 0, n);
                    return ZC_E_PAYLOAD_CRC;
                }
                uint64_t lo = blk > src_off ? blk : src_off;
                uint64_t hi = blk + blk_len < end ? blk + blk_len : end;
                memcpy(dst + (lo - src_off), edge + (lo - blk), hi - lo);
                i++;
            }
        }
        b += nb;
    }
    return ZC_OK;
}
