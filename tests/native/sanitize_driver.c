/* sanitize_driver.c - drives the C layer (zc_record, zc_index, zc_capture) under
 * -fsanitize=address,undefined.  Built and run by tests/native/test_sanitizers.py, which
 * fails on any sanitizer report or a nonzero exit.  Every check here is a plain
 * assertion of the documented contract of the csrc headers; the sanitizers do the rest.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "zc_capture.h"
#include "zc_crc32c.h"
#include "zc_index.h"
#include "zc_record.h"

static int failures;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                          \
        }                                                                        \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Encode one record of each kind into buf; returns the bytes used. */
static size_t encode_bundle(uint8_t *buf, size_t cap, uint64_t first_seq, int *nrec)
{
    size_t pos = 0, w = 0;
    uint64_t seq = first_seq;
    uint8_t data[3 * 4096 + 512];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)rnd();
    uint32_t lens[] = {512, 4096, 4096 + 512, sizeof data};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        CHECK(zc_encode_raw(buf + pos, cap - pos, ZC_REC_WRITE, 1, seq++, 512 * i, data,
                            lens[i], 1000 + i, &w) == ZC_OK);
        pos += w;
    }
    /* the ZERO record: no payload, given as NULL (issue 9 finding 10) */
    CHECK(zc_encode_stored(buf + pos, cap - pos, ZC_REC_ZERO, 0, 1, seq++, 8192, 4096, 2000,
                           NULL, 0, &w) == ZC_OK);
    pos += w;
    uint8_t ckpt[16] = {ZC_CKPT_TAGGED, ZC_CKPT_FLAG_CONSISTENT, 3, 0, 't', 'a', 'g'};
    CHECK(zc_encode_stored(buf + pos, cap - pos, ZC_REC_CHECKPOINT, 0, 0, seq++, 0, 7, 3000,
                           ckpt, 7, &w) == ZC_OK);
    pos += w;
    CHECK(zc_encode_raw(buf + pos, cap - pos, ZC_REC_SYNC, 2, seq++, 0, data, 1024, 4000,
                        &w) == ZC_OK);
    pos += w;
    /* refusals: too small a buffer, bad alignment, a blockcrc flag on a stored record */
    CHECK(zc_encode_raw(buf, 10, ZC_REC_WRITE, 1, 1, 0, data, 512, 0, &w) == ZC_E_ARG);
    CHECK(zc_encode_raw(buf + pos, cap - pos, ZC_REC_WRITE, 1, 1, 3, data, 512, 0, &w) < 0);
    CHECK(zc_encode_stored(buf + pos, cap - pos, ZC_REC_WRITE, ZC_FLAG_BLOCKCRC, 1, 1, 0, 512,
                           0, data, 512, &w) == ZC_E_ARG);
    *nrec = (int)(seq - first_seq);
    return pos;
}

static int scan(const uint8_t *buf, size_t len, zc_extent_vec *vec, size_t *consumed)
{
    static const uint64_t sizes[3] = {0, 1 << 20, 1 << 20};
    zc_scan_ctx ctx = {sizes, 3, 7, 64, 0, 0, 0};
    return zc_scan(&ctx, buf, len, vec, consumed);
}

static void test_record(void)
{
    size_t cap = 1 << 16;
    uint8_t *buf = malloc(cap);
    int nrec = 0;
    size_t len = encode_bundle(buf, cap, 1, &nrec);
    zc_extent_vec vec = {0};
    size_t consumed = 0;
    CHECK(scan(buf, len, &vec, &consumed) == ZC_OK);
    CHECK(consumed == len && vec.n == (size_t)nrec);
    for (size_t i = 0; i < vec.n; i++) {
        zc_extent e;
        uint32_t pcrc;
        const uint8_t *h = buf + (vec.v[i].pos - 64);
        CHECK(zc_parse_header(h, &e, &pcrc) == ZC_OK);
        CHECK(zc_verify_payload(&e, pcrc, h + 64) == ZC_OK);
    }
    zc_extent_vec_free(&vec);
    /* every truncation and every flipped bit must be refused or stop the scan cleanly */
    for (size_t cut = 0; cut < len; cut += 61) {
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, buf, cut);
        zc_extent_vec v = {0};
        CHECK(scan(copy, cut, &v, &consumed) != ZC_OK || cut == 0 || consumed == cut);
        zc_extent_vec_free(&v);
        free(copy);
    }
    for (int i = 0; i < 400; i++) {
        uint8_t *copy = malloc(len);
        memcpy(copy, buf, len);
        copy[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
        zc_extent_vec v = {0};
        (void)scan(copy, len, &v, &consumed);
        CHECK(consumed <= len);
        zc_extent_vec_free(&v);
        free(copy);
    }
    /* zc_read_blockcrc and zc_pread_full through a real file */
    char path[] = "/tmp/zc-sanitize-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK(write(fd, buf, len) == (ssize_t)len);
    uint8_t out[4096 * 4];
    zc_extent e;
    uint32_t pcrc;
    CHECK(zc_parse_header(buf + 4 * 0, &e, &pcrc) == ZC_OK);
    CHECK(zc_read_blockcrc(fd, 0, e.length, 0, e.length, out) == ZC_OK);
    /* record 3 (4608 bytes): a read across the block edge */
    size_t off = 0;
    for (int r = 0; r < 2; r++) {
        CHECK(zc_parse_header(buf + off, &e, &pcrc) == ZC_OK);
        off += zc_record_size(e.stored);
    }
    CHECK(zc_parse_header(buf + off, &e, &pcrc) == ZC_OK);
    CHECK(zc_read_blockcrc(fd, off, e.length, 4000, 600, out) == ZC_OK);
    CHECK(zc_read_blockcrc(fd, len + 4096, e.length, 0, 512, out) == ZC_E_TRUNCATED);
    CHECK(zc_pread_full(fd, out, 64, len - 32) == ZC_E_TRUNCATED);
    close(fd);
    CHECK(zc_pread_full(fd, out, 64, 0) == ZC_E_IO && errno == EBADF);
    free(buf);
}

static void test_index(void)
{
    zc_index *idx = zc_index_new();
    CHECK(idx != NULL);
    enum { N = 3000 };
    zc_extent *ext = calloc(N, sizeof *ext);
    for (int i = 0; i < N; i++) {
        ext[i].seq = (uint64_t)i + 1;
        ext[i].volume = (uint32_t)(rnd() % 3);
        ext[i].length = (uint32_t)(1 + rnd() % 16) * 512;
        ext[i].offset = (rnd() % 2048) * 512;
        ext[i].type = (i % 7 == 0) ? ZC_REC_ZERO : ZC_REC_WRITE;
        ext[i].segment = 1 + (uint32_t)(i / 1000);
        ext[i].pos = 64 + (uint64_t)i * 128;
        ext[i].stored = ext[i].type == ZC_REC_ZERO ? 0 : ext[i].length;
    }
    CHECK(zc_index_add(idx, ext, N / 2, 1) == ZC_OK);
    CHECK(zc_index_add(idx, ext, 10, 1) == ZC_E_ORDER); /* seqs must ascend */
    CHECK(zc_index_add(idx, ext + N / 2, N - N / 2, 1) == ZC_OK);
    for (int q = 0; q < 500; q++) {
        const zc_fragment *frags;
        size_t n;
        uint64_t offset = (rnd() % 2048) * 512, length = (1 + rnd() % 64) * 512;
        CHECK(zc_index_plan(idx, (uint32_t)(rnd() % 4), offset, length, rnd() % (N + 2),
                            &frags, &n) == ZC_OK);
        uint64_t at = 0;
        for (size_t i = 0; i < n; i++) {
            CHECK(frags[i].dst == at);
            at += frags[i].length;
        }
        CHECK(at == length);
    }
    CHECK(zc_index_drop_before(idx, N / 3) == ZC_OK);
    CHECK(zc_index_count(idx) <= N && zc_index_memory(idx) > 0);
    /* adopting a sealed segment's sorted extents, and refusing unsorted / out of range */
    zc_index *sorted = zc_index_new();
    zc_extent run[4] = {0};
    for (int i = 0; i < 4; i++) {
        run[i].seq = 10 + (uint64_t)i;
        run[i].volume = 1;
        run[i].offset = (uint64_t)i * 4096;
        run[i].length = 4096;
        run[i].type = ZC_REC_WRITE;
        run[i].segment = 5;
        run[i].pos = 64 + (uint64_t)i * 8192;
        run[i].stored = 4096 + 64;
    }
    static const uint64_t sizes[2] = {0, 1 << 20};
    CHECK(zc_index_add_sorted(sorted, run, 4, 5, 1 << 20, sizes, 2, 1) == ZC_OK);
    run[0].offset = 1 << 21;
    CHECK(zc_index_add_sorted(sorted, run, 4, 5, 1 << 20, sizes, 2, 0) != ZC_OK);
    zc_index_free(sorted);
    zc_index_free(idx);
    zc_index_free(NULL);
    free(ext);
}

static void test_capture(void)
{
    char path[] = "/tmp/zc-sanitize-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK(ftruncate(fd, 1 << 20) == 0);
    zc_capture *c = zc_capture_new(1 << 20, 1);
    CHECK(c != NULL);
    uint8_t data[65536];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)rnd();
    static uint8_t zeros[4096];
    int64_t seq = 0;
    for (int i = 0; i < 40; i++) {
        seq = zc_capture_write(c, fd, 1, (rnd() % 64) * 4096, data, sizeof data, ZC_REC_WRITE);
        CHECK(seq > 0);
        if (i % 5 == 0) {
            CHECK(zc_capture_write(c, fd, 1, 0, zeros, sizeof zeros, ZC_REC_ZERO) > 0);
            uint8_t ckpt[8] = {ZC_CKPT_AUTO, 0, 0, 0};
            (void)zc_capture_marker(c, ckpt, 4);
        }
        if (i % 3 == 0)
            (void)zc_capture_sync(c, fd, 1, 8192, 8192, i % 2);
        if (i % 7 == 0) { /* TRIM: a hole punched, a ZERO entry */
            CHECK(zc_capture_zero(c, fd, 1, 65536, 65536) > 0);
            uint8_t back[512];
            CHECK(pread(fd, back, sizeof back, 65536) == (ssize_t)sizeof back);
            CHECK(zc_all_zero(back, sizeof back) == 1);
        }
        const uint8_t *ptr;
        uint64_t n;
        zc_capture_peek(c, &ptr, &n, 256 << 10);
        if (i % 2 == 0 && n)
            zc_capture_consume(c, n);
    }
    /* filling the ring switches to bitmap mode; the dirty log then holds the writes */
    for (int i = 0; i < 40; i++)
        CHECK(zc_capture_write(c, fd, 2, 0, data, sizeof data, ZC_REC_WRITE) > 0);
    zc_capture_stats st;
    zc_capture_stats_get(c, &st);
    CHECK(st.mode == ZC_CAPTURE_BITMAP && st.overflowed);
    CHECK(zc_capture_sync(c, fd, 1, 0, 4096, 0) == ZC_E_ARG);
    size_t nd = 0;
    zc_dirty *dirty = zc_capture_take_dirty(c, &nd);
    CHECK(nd > 0);
    free(dirty);
    CHECK(zc_capture_set_mode(c, ZC_CAPTURE_STREAM) == ZC_CAPTURE_BITMAP);
    /* a failed backing write is reported and logged dirty */
    CHECK(zc_capture_write(c, -1, 1, 0, data, 4096, ZC_REC_WRITE) == ZC_E_IO);
    CHECK(zc_capture_zero(c, -1, 1, 0, 4096) == ZC_E_IO);
    CHECK(zc_capture_write(c, fd, 1, 0, NULL, 4096, ZC_REC_WRITE) == ZC_E_ARG);
    zc_capture_close(c);
    CHECK(zc_capture_write(c, fd, 1, 0, data, 4096, ZC_REC_WRITE) == ZC_E_CLOSED);
    zc_capture_close(c);
    CHECK(zc_all_zero(zeros, sizeof zeros) == 1 && zc_all_zero(data, 64) == 0);
    zc_capture_free(c);
    zc_capture_free(NULL);
    close(fd);
    (void)seq;
}

/* A stand-in compressor with LZ4's contract for bounds checking (no LZ4 in this tree):
 * "compresses" to the first half of the input when that fits dst_cap, else fails. */
static void toy_reset(void *stream) { memset(stream, 0, 64); }
static int toy_compress(void *stream, const char *src, char *dst, int src_size, int dst_cap,
                        int acceleration)
{
    (void)stream;
    (void)acceleration;
    int n = src_size / 2;
    if (n > dst_cap)
        return 0;
    memcpy(dst, src, (size_t)n);
    return n;
}

static void test_batch(void)
{
    enum { N = 40, NOUT = 3 };
    static uint8_t data[64 * 1024];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)rnd();
    memset(data + 8192, 0, 4096); /* a zero block */
    zc_batch_item items[N];
    uint64_t caps[NOUT] = {0};
    for (int i = 0; i < N; i++) {
        zc_batch_item *it = &items[i];
        memset(it, 0, sizeof *it);
        it->seq = 100 + (uint64_t)i;
        it->time_ns = (uint64_t)i;
        it->volume = (uint32_t)(rnd() % 4);
        it->offset = 512 * (rnd() % 1000);
        if (i % 9 == 4) {
            it->type = ZC_REC_CHECKPOINT;
            it->data = (const uint8_t *)"\x01\x00\x00\x00";
            it->length = 4;
            it->out = ZC_BATCH_EVERY_OUTPUT;
            for (int k = 0; k < NOUT; k++)
                caps[k] += zc_batch_item_bound(it);
            continue;
        }
        it->type = i % 7 == 3 ? ZC_REC_ZERO : i % 5 == 2 ? ZC_REC_SYNC : ZC_REC_WRITE;
        it->length = 512 * (uint32_t)(1 + rnd() % 32);
        it->data = i % 6 == 1 ? data + 8192 : data + 512 * (rnd() % 32); /* zero or not */
        if (it->data == data + 8192 && it->length > 4096)
            it->length = 4096;
        it->out = (uint32_t)(rnd() % NOUT);
        caps[it->out] += zc_batch_item_bound(it);
    }
    uint64_t stream[64];
    zc_lz4 toy = {toy_reset, toy_compress, stream};
    for (int pass = 0; pass < 3; pass++) {
        zc_batch_out outs[NOUT];
        for (int k = 0; k < NOUT; k++) {
            outs[k].cap = (size_t)caps[k];
            outs[k].fill = 0;
            outs[k].buf = malloc(outs[k].cap ? outs[k].cap : 1);
            CHECK(outs[k].buf != NULL);
        }
        size_t done = 0;
        const zc_lz4 *lz4 = pass == 0 ? NULL : &toy;
        CHECK(zc_encode_batch(items, N, outs, NOUT, lz4, pass == 2 ? 0.25 : 0.9375, &done)
              == ZC_OK);
        CHECK(done == N);
        for (int k = 0; k < NOUT; k++) {
            zc_extent_vec vec = {0};
            size_t consumed = 0;
            zc_scan_ctx ctx = {0};
            uint64_t sizes[4] = {1ull << 40, 1ull << 40, 1ull << 40, 1ull << 40};
            ctx.volume_sizes = sizes;
            ctx.nvolumes = 4;
            ctx.min_time = UINT64_MAX;
            CHECK(outs[k].fill <= outs[k].cap);
            /* the toy's "LZ4" payloads are not LZ4, but every header and CRC is real */
            CHECK(zc_scan(&ctx, outs[k].buf, outs[k].fill, &vec, &consumed) == ZC_OK);
            CHECK(consumed == outs[k].fill);
            zc_extent_vec_free(&vec);
        }
        /* too small an output: refused, fills stand after the items before */
        size_t fills[NOUT];
        for (int k = 0; k < NOUT; k++) {
            outs[k].fill = 0;
            outs[k].cap = 64; /* room for one header each */
        }
        CHECK(zc_encode_batch(items, N, outs, NOUT, lz4, 0.9375, &done) == ZC_E_ARG);
        CHECK(done < N);
        for (int k = 0; k < NOUT; k++)
            fills[k] = outs[k].fill;
        for (int k = 0; k < NOUT; k++) {
            CHECK(fills[k] <= outs[k].cap);
            free(outs[k].buf);
        }
    }
    /* a checkpoint that fails in its last output is taken back from the others */
    zc_batch_item ck = {(const uint8_t *)"\x01\x00\x00\x00", 7, 0, 0, 0, 4,
                        ZC_BATCH_EVERY_OUTPUT, ZC_REC_CHECKPOINT, 0};
    uint8_t a[256], b[256];
    zc_batch_out two[2] = {{a, sizeof a, 0}, {b, 64, 0}};
    size_t done = 9;
    CHECK(zc_encode_batch(&ck, 1, two, 2, NULL, 0.9, &done) == ZC_E_ARG);
    CHECK(done == 0 && two[0].fill == 0 && two[1].fill == 0);
    /* a write into no output, a bad type */
    zc_batch_item bad = ck;
    bad.type = ZC_REC_WRITE;
    CHECK(zc_encode_batch(&bad, 1, two, 2, NULL, 0.9, &done) == ZC_E_ARG);
    bad.out = 0;
    bad.type = 9;
    CHECK(zc_encode_batch(&bad, 1, two, 2, NULL, 0.9, &done) == ZC_E_ARG);
}

int main(void)
{
    test_record();
    test_batch();
    test_index();
    test_capture();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("sanitize_driver: all checks passed\n");
    return 0;
}
