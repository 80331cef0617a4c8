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
        if (flags == ZC_FLAG_LZ4 || flags == ZC_FLAG_ZSTD)
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
        if (st == ZC_OK && (e.flags & ctx->refuse_flags))
            st = ZC_E_BAD_RECORD; /* a flag this stream's version does not have */
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

/* zc_read_blockcrc; `first_crcs`, when not NULL, holds the CRCs of the first chunk of
 * blocks the read touches (already read along with the record header). */
static int read_blockcrc(int fd, uint64_t pos, uint32_t length, uint64_t src_off, uint64_t n,
                         uint8_t *dst, const uint8_t *first_crcs)
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
        int st = ZC_OK;
        if (first_crcs) {
            memcpy(crcs, first_crcs, nb * 4);
            first_crcs = NULL;
        } else {
            st = zc_pread_full(fd, crcs, nb * 4, pos + ZC_RECORD_HEADER_SIZE + b * 4);
        }
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

int zc_read_blockcrc(int fd, uint64_t pos, uint32_t length, uint64_t src_off, uint64_t n,
                     uint8_t *dst)
{
    return read_blockcrc(fd, pos, length, src_off, n, dst, NULL);
}

/* ZC_OK when the header at buf is valid and is the record the index entry `e` names. */
static int header_is(const uint8_t *buf, const zc_extent *e)
{
    zc_extent h;
    uint32_t pcrc;
    int st = zc_parse_header(buf, &h, &pcrc);
    if (st)
        return st;
    if (h.seq != e->seq || h.volume != e->volume || h.offset != e->offset ||
        h.length != e->length || h.stored != e->stored || h.type != e->type ||
        h.flags != e->flags)
        return ZC_E_BAD_RECORD;
    return ZC_OK;
}

int zc_check_record_header(int fd, const zc_extent *e)
{
    uint8_t hdr[ZC_RECORD_HEADER_SIZE];
    int st = zc_pread_full(fd, hdr, sizeof hdr, e->pos);
    return st ? st : header_is(hdr, e);
}

/* Header plus block CRCs read in one pread while the CRCs a read needs start within
 * this many bytes of the record: a 4 KiB read of a record up to 4 MiB costs the same two
 * preads (header and CRCs, then data) as it did before the header was checked. */
#define HEADER_AND_TABLE 1024u

int zc_read_record(int fd, const zc_extent *e, uint64_t src_off, uint64_t n, uint8_t *dst)
{
    if (n == 0)
        return ZC_OK;
    if (src_off + n > e->length || src_off + n < src_off)
        return ZC_E_ARG;
    uint64_t b = src_off / ZC_CRC_BLOCK, b_last = (src_off + n - 1) / ZC_CRC_BLOCK;
    uint64_t nb = b_last - b + 1 < TABLE_CHUNK ? b_last - b + 1 : TABLE_CHUNK;
    uint64_t need = ZC_RECORD_HEADER_SIZE + (b + nb) * 4;
    int st;
    if (need > HEADER_AND_TABLE + ZC_RECORD_HEADER_SIZE) {
        st = zc_check_record_header(fd, e);
        return st ? st : read_blockcrc(fd, e->pos, e->length, src_off, n, dst, NULL);
    }
    uint8_t buf[HEADER_AND_TABLE + ZC_RECORD_HEADER_SIZE];
    st = zc_pread_full(fd, buf, need, e->pos);
    if (st == ZC_OK)
        st = header_is(buf, e);
    if (st)
        return st;
    return read_blockcrc(fd, e->pos, e->length, src_off, n, dst,
                         buf + ZC_RECORD_HEADER_SIZE + b * 4);
}

/* ---- batch encoding ----------------------------------------------------------------- */

static int data_is_zero(const uint8_t *p, size_t n)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        if (acc)
            return 0;
    }
    for (; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

uint64_t zc_batch_item_bound(const zc_batch_item *it)
{
    if (it->type == ZC_REC_CHECKPOINT)
        return zc_record_size(it->length);
    if (it->type == ZC_REC_ZERO)
        return zc_record_size(0);
    return zc_record_size((uint64_t)zc_blockcrc_table_size(it->length) + it->length);
}

/* Bytes of slack LZ4's output may need beyond the largest block kept: LZ4 with a limited
 * output refuses a step that might not leave room for the block's end (a few bytes), so
 * a block of at most `limit` bytes always fits limit + this. */
#define LZ4_LIMIT_SLACK 64u

/* One write as LZ4 into out (room bytes): ZC_OK with *written, or 1 when LZ4 does not
 * save enough (the caller then encodes it raw). */
static int encode_lz4(uint8_t *out, size_t room, const zc_batch_item *it, const zc_lz4 *lz4,
                      double keep, size_t *written)
{
    if (room <= ZC_RECORD_HEADER_SIZE)
        return 1;
    double limit = (double)it->length * keep;
    size_t cap = room - ZC_RECORD_HEADER_SIZE;
    if (limit < 0)
        return 1;
    if ((double)cap > limit + LZ4_LIMIT_SLACK)
        cap = (size_t)limit + LZ4_LIMIT_SLACK;
    if (cap > 0x7FFFFFFF)
        cap = 0x7FFFFFFF;
    uint8_t *payload = out + ZC_RECORD_HEADER_SIZE;
    lz4->reset(lz4->stream);
    int r = lz4->compress(lz4->stream, (const char *)it->data, (char *)payload, (int)it->length,
                          (int)cap, 1);
    if (r <= 0 || (double)r > limit)
        return 1;
    uint32_t stored = (uint32_t)r;
    int st = check_fields(it->type, ZC_FLAG_LZ4, it->volume, it->seq, it->offset, it->length,
                          stored);
    if (st)
        return st;
    uint64_t size = zc_record_size(stored);
    memset(payload + stored, 0, size - ZC_RECORD_HEADER_SIZE - stored);
    write_header(out, it->type, ZC_FLAG_LZ4, it->volume, it->seq, it->offset, it->length,
                 stored, it->time_ns, zc_crc32c(0, payload, stored));
    *written = size;
    return ZC_OK;
}

static int encode_item(uint8_t *out, size_t room, const zc_batch_item *it, const zc_lz4 *lz4,
                       double keep, size_t *written)
{
    switch (it->type) {
    case ZC_REC_CHECKPOINT:
        return zc_encode_stored(out, room, ZC_REC_CHECKPOINT, 0, 0, it->seq, 0, it->length,
                                it->time_ns, it->data, it->length, written);
    case ZC_REC_ZERO:
        return zc_encode_stored(out, room, ZC_REC_ZERO, 0, it->volume, it->seq, it->offset,
                                it->length, it->time_ns, NULL, 0, written);
    case ZC_REC_WRITE:
    case ZC_REC_SYNC:
        break;
    default:
        return ZC_E_ARG;
    }
    if (it->length == 0 || it->length > ZC_MAX_WRITE)
        return ZC_E_BAD_RECORD;
    if (data_is_zero(it->data, it->length))
        return zc_encode_stored(out, room, ZC_REC_ZERO, 0, it->volume, it->seq, it->offset,
                                it->length, it->time_ns, NULL, 0, written);
    if (lz4) {
        /* the raw record's field rules first: a bad write fails as it would raw */
        int st = check_fields(it->type, ZC_FLAG_BLOCKCRC, it->volume, it->seq, it->offset,
                              it->length, zc_blockcrc_table_size(it->length) + it->length);
        if (st)
            return st;
        st = encode_lz4(out, room, it, lz4, keep, written);
        if (st <= 0)
            return st;
    }
    return zc_encode_raw(out, room, it->type, it->volume, it->seq, it->offset, it->data,
                         it->length, it->time_ns, written);
}

int zc_encode_batch(const zc_batch_item *items, size_t n, zc_batch_out *outs, uint32_t nouts,
                    const zc_lz4 *lz4, double keep, size_t *done)
{
    size_t i;
    int st = ZC_OK;
    for (i = 0; i < n && st == ZC_OK; i++) {
        const zc_batch_item *it = &items[i];
        uint32_t lo = it->out, hi = it->out + 1;
        if (it->out == ZC_BATCH_EVERY_OUTPUT) {
            if (it->type != ZC_REC_CHECKPOINT) {
                st = ZC_E_ARG;
                break;
            }
            lo = 0;
            hi = nouts;
        } else if (it->out >= nouts) {
            st = ZC_E_ARG;
            break;
        }
        for (uint32_t k = lo; k < hi; k++) {
            zc_batch_out *o = &outs[k];
            size_t written = 0;
            if (o->fill > o->cap) {
                st = ZC_E_ARG;
                break;
            }
            st = encode_item(o->buf + o->fill, o->cap - o->fill, it, lz4, keep, &written);
            if (st) {
                /* a checkpoint that failed in one output is taken back from the others */
                for (uint32_t j = lo; j < k; j++)
                    outs[j].fill -= zc_record_size(it->length);
                break;
            }
            o->fill += written;
        }
        if (st)
            break;
    }
    *done = i;
    return st;
}
