/* zc_capture.c - capture ring with in-flight range ordering and a dirty log. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* fallocate */
#endif
#include "zc_capture.h"
#include "zc_record.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct inflight {
    uint32_t volume;
    uint64_t lo, hi;
} inflight;

typedef struct watch {
    uint64_t id;
    uint32_t volume;
    int spoiled; /* a write or zeroing overlapped the range since the watch began */
    uint64_t lo, hi;
} watch;

struct zc_capture {
    pthread_mutex_t mu;
    pthread_cond_t done; /* an in-flight write finished */
    uint8_t *ring;
    uint64_t size;
    uint64_t head, tail; /* byte positions, monotonically increasing; used = tail - head */
    uint64_t next_seq;
    int mode, overflowed, closed;
    inflight *fl;
    size_t nfl, fl_cap;
    zc_dirty *dirty;
    size_t ndirty, dirty_cap;
    watch *watches;
    size_t nwatch, watch_cap;
    uint64_t next_watch;
    uint64_t writes, bytes;
};

_Static_assert(sizeof(zc_ring_entry) == 64, "ring entry header is 64 bytes");

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

zc_capture *zc_capture_new(uint64_t ring_bytes, uint64_t first_seq)
{
    if (ring_bytes < (1u << 20) || ring_bytes % 64 || first_seq == 0)
        return NULL;
    zc_capture *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    if (posix_memalign((void **)&c->ring, 64, ring_bytes)) {
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->done, NULL);
    c->size = ring_bytes;
    c->next_seq = first_seq;
    return c;
}

void zc_capture_free(zc_capture *c)
{
    if (!c)
        return;
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->done);
    free(c->ring);
    free(c->fl);
    free(c->dirty);
    free(c->watches);
    free(c);
}

static int overlaps_inflight(const zc_capture *c, uint32_t volume, uint64_t lo, uint64_t hi)
{
    for (size_t i = 0; i < c->nfl; i++)
        if (c->fl[i].volume == volume && c->fl[i].lo < hi && lo < c->fl[i].hi)
            return 1;
    return 0;
}

/* Make room for one more element in a growable array (doubling, `first` at start). */
static int room_for_one(void **arr, size_t n, size_t *cap, size_t elem, size_t first)
{
    if (n < *cap)
        return ZC_OK;
    size_t want = *cap ? *cap * 2 : first;
    void *p = realloc(*arr, want * elem);
    if (!p)
        return ZC_E_NOMEM;
    *arr = p;
    *cap = want;
    return ZC_OK;
}

static int push_inflight(zc_capture *c, uint32_t volume, uint64_t lo, uint64_t hi)
{
    void *arr = c->fl;
    int st = room_for_one(&arr, c->nfl, &c->fl_cap, sizeof(inflight), 16);
    c->fl = arr;
    if (st)
        return st;
    c->fl[c->nfl++] = (inflight){volume, lo, hi};
    return ZC_OK;
}

static void pop_inflight(zc_capture *c, uint32_t volume, uint64_t lo)
{
    for (size_t i = 0; i < c->nfl; i++)
        if (c->fl[i].volume == volume && c->fl[i].lo == lo) {
            c->fl[i] = c->fl[--c->nfl];
            break;
        }
    pthread_cond_broadcast(&c->done);
}

static int push_dirty(zc_capture *c, uint32_t volume, uint64_t offset, uint32_t len)
{
    void *arr = c->dirty;
    int st = room_for_one(&arr, c->ndirty, &c->dirty_cap, sizeof(zc_dirty), 1024);
    c->dirty = arr;
    if (st)
        return st;
    c->dirty[c->ndirty++] = (zc_dirty){volume, len, offset};
    return ZC_OK;
}

/* Reserve a ring entry of `stored` payload bytes (mutex held).  NULL when it does not fit. */
static zc_ring_entry *reserve(zc_capture *c, uint32_t stored)
{
    uint64_t need = 64 + (((uint64_t)stored + 63) & ~(uint64_t)63);
    /* An empty ring restarts at the buffer's start (nothing is reserved or peeked: the
     * drainer consumes what it peeked before head can equal tail), so any entry that fits
     * the buffer fits an empty ring; otherwise padding to the end could make an empty
     * ring refuse a write of more than half its size. */
    if (c->tail == c->head && c->tail % c->size)
        c->head = c->tail = c->tail - c->tail % c->size + c->size;
    uint64_t at = c->tail % c->size;
    uint64_t filler = 0;
    if (at + need > c->size) /* does not fit before the end: pad to the end, wrap */
        filler = c->size - at;
    if (c->tail - c->head + filler + need > c->size)
        return NULL;
    if (filler) {
        zc_ring_entry *f = (zc_ring_entry *)(c->ring + at);
        memset(f, 0, sizeof *f);
        f->kind = ZC_ENTRY_FILLER;
        f->size = (uint32_t)filler;
        f->committed = 1;
        c->tail += filler;
        at = 0;
    }
    zc_ring_entry *e = (zc_ring_entry *)(c->ring + at);
    memset(e, 0, sizeof *e);
    e->size = (uint32_t)need;
    e->stored = stored;
    c->tail += need;
    return e;
}

/* Copies of at least this many bytes stream past the caches (below, a plain memcpy). */
#define RING_STREAM_MIN (16u << 10)

/* Copy a write's data into its ring entry (the payload is 64-byte aligned).  With SSE2 a
 * large copy streams past the caches: the ring is far larger than they are and the
 * sealer reads an entry long after, so a plain memcpy's read-for-ownership of every
 * cold line cost a 64 KiB write ~2.4x the time (8.4 vs 3.4 us here).  A small one does
 * not pay for the wait its fence makes (a 4 KiB capture was ~8 % slower streamed; 8-32
 * KiB even).  Streamed stores are weakly ordered: ring_copy_done() before the entry is
 * committed. */
static void ring_copy(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;
#ifdef __SSE2__
    for (; n >= RING_STREAM_MIN && i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
#endif
    memcpy(dst + i, src + i, n - i);
}

static void ring_copy_done(void)
{
#ifdef __SSE2__
    _mm_sfence();
#endif
}

static void commit_entry(zc_ring_entry *e)
{
    __atomic_store_n(&e->committed, 1, __ATOMIC_RELEASE);
}

static int pwrite_full(int fd, const uint8_t *p, size_t n, uint64_t pos)
{
    while (n) {
        ssize_t r = pwrite(fd, p, n, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ZC_E_IO;
        }
        p += r;
        n -= (size_t)r;
        pos += (uint64_t)r;
    }
    return ZC_OK;
}

static const uint8_t zero_block[64 << 10];

/* Deallocate [pos, pos+n) of fd (it reads as zeros after); where the file system cannot
 * punch, the range is written with zeros instead. */
static int punch_full(int fd, uint64_t pos, size_t n)
{
    int r;
    do
        r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)pos, (off_t)n);
    while (r < 0 && errno == EINTR);
    if (r == 0)
        return ZC_OK;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return ZC_E_IO;
    while (n) {
        size_t k = n < sizeof zero_block ? n : sizeof zero_block;
        if (pwrite_full(fd, zero_block, k, pos))
            return ZC_E_IO;
        n -= k;
        pos += k;
    }
    return ZC_OK;
}

int64_t zc_capture_zero(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                        uint32_t len)
{
    return zc_capture_write(c, fd, volume, offset, NULL, len, ZC_REC_ZERO);
}

int64_t zc_capture_write(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                         const uint8_t *data, uint32_t len, uint16_t kind)
{
    if (len == 0 || (kind != ZC_REC_WRITE && kind != ZC_REC_ZERO) ||
        (data == NULL && kind != ZC_REC_ZERO))
        return ZC_E_ARG;
    uint64_t hi = offset + len;
    pthread_mutex_lock(&c->mu);
    while (!c->closed && overlaps_inflight(c, volume, offset, hi))
        pthread_cond_wait(&c->done, &c->mu);
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_CLOSED;
    }
    if (push_inflight(c, volume, offset, hi)) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_NOMEM;
    }
    uint64_t seq = c->next_seq++;
    for (size_t i = 0; i < c->nwatch; i++)
        if (c->watches[i].volume == volume && c->watches[i].lo < hi && offset < c->watches[i].hi)
            c->watches[i].spoiled = 1;
    zc_ring_entry *e = NULL;
    if (c->mode == ZC_CAPTURE_STREAM) {
        e = reserve(c, kind == ZC_REC_ZERO ? 0 : len);
        if (!e) {
            c->mode = ZC_CAPTURE_BITMAP;
            c->overflowed = 1;
        }
    }
    int st = ZC_OK;
    if (!e)
        st = push_dirty(c, volume, offset, len);
    c->writes++;
    c->bytes += len;
    pthread_mutex_unlock(&c->mu);

    /* the copy first: the pwrite then reads a source the copy brought into the cache,
     * and it gives the streaming stores time to drain before ring_copy_done() */
    if (e && kind != ZC_REC_ZERO)
        ring_copy((uint8_t *)e + 64, data, len);
    int io = fd == ZC_NO_BACKING ? ZC_OK : data ? pwrite_full(fd, data, len, offset)
                                   : punch_full(fd, offset, len);
    int saved_errno = errno;
    if (e) {
        ring_copy_done();
        e->seq = seq;
        e->offset = offset;
        e->volume = volume;
        e->length = len;
        e->time_ns = now_ns();
        /* a failed write's entry is void: whatever reached the disk is resent by a sync */
        e->kind = io ? ZC_ENTRY_VOID : kind;
    }
    pthread_mutex_lock(&c->mu);
    if (e)
        commit_entry(e);
    if (io && e)
        st = push_dirty(c, volume, offset, len);
    pop_inflight(c, volume, offset);
    pthread_mutex_unlock(&c->mu);
    if (io) {
        errno = saved_errno;
        return ZC_E_IO;
    }
    return st ? st : (int64_t)seq;
}

int64_t zc_capture_sync(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                        uint32_t len, int skip_zero)
{
    if (len == 0)
        return ZC_E_ARG;
    uint64_t hi = offset + len;
    pthread_mutex_lock(&c->mu);
    if (c->mode != ZC_CAPTURE_STREAM) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_ARG;
    }
    while (!c->closed && overlaps_inflight(c, volume, offset, hi))
        pthread_cond_wait(&c->done, &c->mu);
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_CLOSED;
    }
    if (push_inflight(c, volume, offset, hi)) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_NOMEM;
    }
    zc_ring_entry *e = reserve(c, len);
    if (!e) {
        pop_inflight(c, volume, offset);
        pthread_mutex_unlock(&c->mu);
        return ZC_E_FULL;
    }
    uint64_t seq = c->next_seq++;
    pthread_mutex_unlock(&c->mu);

    int io = zc_pread_full(fd, (uint8_t *)e + 64, len, offset);
    int saved_errno = errno;
    e->seq = seq;
    e->offset = offset;
    e->volume = volume;
    e->length = len;
    e->time_ns = now_ns();
    if (io)
        e->kind = ZC_ENTRY_VOID;
    else if (zc_all_zero((uint8_t *)e + 64, len))
        e->kind = skip_zero ? ZC_ENTRY_VOID : ZC_REC_ZERO;
    else
        e->kind = ZC_REC_SYNC;
    pthread_mutex_lock(&c->mu);
    commit_entry(e);
    pop_inflight(c, volume, offset);
    pthread_mutex_unlock(&c->mu);
    if (io) {
        errno = saved_errno;
        return io;
    }
    return (int64_t)seq;
}

static watch *find_watch(zc_capture *c, uint64_t id)
{
    for (size_t i = 0; i < c->nwatch; i++)
        if (c->watches[i].id == id)
            return &c->watches[i];
    return NULL;
}

static void drop_watch(zc_capture *c, watch *w)
{
    *w = c->watches[--c->nwatch];
}

int64_t zc_capture_watch(zc_capture *c, uint32_t volume, uint64_t offset, uint32_t len)
{
    if (len == 0)
        return ZC_E_ARG;
    pthread_mutex_lock(&c->mu);
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_CLOSED;
    }
    void *arr = c->watches;
    int st = room_for_one(&arr, c->nwatch, &c->watch_cap, sizeof(watch), 8);
    c->watches = arr;
    if (st) {
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    uint64_t id = ++c->next_watch;
    c->watches[c->nwatch++] = (watch){id, volume, 0, offset, offset + len};
    pthread_mutex_unlock(&c->mu);
    return (int64_t)id;
}

void zc_capture_unwatch(zc_capture *c, uint64_t id)
{
    pthread_mutex_lock(&c->mu);
    watch *w = find_watch(c, id);
    if (w)
        drop_watch(c, w);
    pthread_mutex_unlock(&c->mu);
}

int64_t zc_capture_sync_from(zc_capture *c, uint64_t id, const uint8_t *data, uint32_t len,
                             int skip_zero)
{
    pthread_mutex_lock(&c->mu);
    watch *w = find_watch(c, id);
    if (!w || c->mode != ZC_CAPTURE_STREAM || len != w->hi - w->lo) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_ARG;
    }
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_CLOSED;
    }
    if (w->spoiled) {
        drop_watch(c, w);
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    uint32_t volume = w->volume;
    uint64_t offset = w->lo;
    int zero = data == NULL || zc_all_zero(data, len);
    zc_ring_entry *e = reserve(c, zero ? 0 : len);
    if (!e) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_FULL;
    }
    drop_watch(c, w);
    uint64_t seq = c->next_seq++;
    e->seq = seq;
    e->offset = offset;
    e->volume = volume;
    e->length = len;
    e->time_ns = now_ns();
    /* skipped zeros still take a seq and an entry, as zc_capture_sync's do */
    e->kind = zero ? (skip_zero ? ZC_ENTRY_VOID : ZC_REC_ZERO) : ZC_REC_SYNC;
    if (!zero) {
        ring_copy((uint8_t *)e + 64, data, len);
        ring_copy_done();
    }
    commit_entry(e);
    pthread_mutex_unlock(&c->mu);
    return (int64_t)seq;
}

int64_t zc_capture_marker(zc_capture *c, const uint8_t *payload, uint32_t len)
{
    pthread_mutex_lock(&c->mu);
    if (c->closed) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_CLOSED;
    }
    if (c->mode != ZC_CAPTURE_STREAM) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_ARG;
    }
    zc_ring_entry *e = reserve(c, len);
    if (!e) {
        pthread_mutex_unlock(&c->mu);
        return ZC_E_FULL;
    }
    uint64_t seq = c->next_seq++;
    e->seq = seq;
    e->length = len;
    e->time_ns = now_ns();
    e->kind = ZC_REC_CHECKPOINT;
    memcpy((uint8_t *)e + 64, payload, len);
    commit_entry(e);
    pthread_mutex_unlock(&c->mu);
    return (int64_t)seq;
}

void zc_capture_peek(zc_capture *c, const uint8_t **ptr, uint64_t *nbytes, uint64_t max_bytes)
{
    pthread_mutex_lock(&c->mu);
    uint64_t head = c->head, tail = c->tail;
    /* fillers at the head are consumed here: the caller never sees them */
    while (head < tail) {
        zc_ring_entry *e = (zc_ring_entry *)(c->ring + head % c->size);
        if (e->kind != ZC_ENTRY_FILLER || !__atomic_load_n(&e->committed, __ATOMIC_ACQUIRE))
            break;
        head += e->size;
    }
    c->head = head;
    pthread_mutex_unlock(&c->mu);

    uint64_t at = head, start = head % c->size;
    while (at < tail) {
        zc_ring_entry *e = (zc_ring_entry *)(c->ring + at % c->size);
        if (!__atomic_load_n(&e->committed, __ATOMIC_ACQUIRE) || e->kind == ZC_ENTRY_FILLER)
            break;
        if (at > head && at - head + e->size > max_bytes)
            break;
        at += e->size;
        if (at % c->size == 0) /* reached the ring's end: stop at the wrap */
            break;
    }
    *ptr = c->ring + start;
    *nbytes = at - head;
}

void zc_capture_consume(zc_capture *c, uint64_t nbytes)
{
    pthread_mutex_lock(&c->mu);
    c->head += nbytes;
    pthread_mutex_unlock(&c->mu);
}

int zc_capture_set_mode(zc_capture *c, int mode)
{
    pthread_mutex_lock(&c->mu);
    int old = c->mode;
    c->mode = mode;
    c->overflowed = 0;
    pthread_mutex_unlock(&c->mu);
    return old;
}

void zc_capture_close(zc_capture *c)
{
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    pthread_cond_broadcast(&c->done); /* writers waiting on an overlap give up */
    while (c->nfl)
        pthread_cond_wait(&c->done, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

zc_dirty *zc_capture_take_dirty(zc_capture *c, size_t *n)
{
    pthread_mutex_lock(&c->mu);
    zc_dirty *d = c->dirty;
    *n = c->ndirty;
    c->dirty = NULL;
    c->ndirty = c->dirty_cap = 0;
    pthread_mutex_unlock(&c->mu);
    return d;
}

void zc_capture_stats_get(zc_capture *c, zc_capture_stats *out)
{
    pthread_mutex_lock(&c->mu);
    out->writes = c->writes;
    out->bytes = c->bytes;
    out->ring_used = c->tail - c->head;
    out->ring_size = c->size;
    out->next_seq = c->next_seq;
    out->dirty_pending = c->ndirty;
    out->mode = c->mode;
    out->overflowed = c->overflowed;
    pthread_mutex_unlock(&c->mu);
}

int zc_all_zero(const uint8_t *p, size_t n)
{
    uint64_t acc = 0;
    for (size_t i = 0; i + 64 <= n; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        if (acc)
            return 0;
    }
    for (size_t i = n & ~(size_t)63; i < n; i++)
        acc |= p[i];
    return acc == 0;
}
