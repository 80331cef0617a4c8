/* zc_index.c - log-structured per-volume extent runs and the newest-wins planner. */
#include "zc_index.h"

#include <stdlib.h>
#include <string.h>

#define TAIL_CAP 256u /* unsorted recent extents scanned linearly by each lookup */

typedef struct run {
    zc_extent *e;       /* sorted by (offset, seq) */
    size_t n;
    uint32_t max_len;   /* longest extent: bounds how far back an overlap can start */
} run;

typedef struct volume_index {
    run *runs;          /* largest first */
    size_t nruns, runs_cap;
    zc_extent tail[TAIL_CAP];
    size_t ntail;
    uint64_t last_seq;
} volume_index;

typedef struct gap {
    uint64_t lo, hi;
} gap;

struct zc_index {
    volume_index **vols;
    uint32_t nvols;
    size_t count;
    /* planner scratch, reused across calls */
    zc_extent *cand;
    size_t ncand_cap;
    gap *gaps;
    size_t gaps_cap;
    zc_fragment *frags;
    size_t frags_cap;
};

zc_index *zc_index_new(void) { return calloc(1, sizeof(zc_index)); }

void zc_index_free(zc_index *idx)
{
    if (!idx)
        return;
    for (uint32_t v = 0; v < idx->nvols; v++) {
        volume_index *vi = idx->vols[v];
        if (!vi)
            continue;
        for (size_t r = 0; r < vi->nruns; r++)
            free(vi->runs[r].e);
        free(vi->runs);
        free(vi);
    }
    free(idx->vols);
    free(idx->cand);
    free(idx->gaps);
    free(idx->frags);
    free(idx);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return ZC_OK;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return ZC_E_NOMEM;
    *p = q;
    *cap = c;
    return ZC_OK;
}

static int ext_cmp(const void *a, const void *b)
{
    const zc_extent *x = a, *y = b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static uint32_t max_len_of(const zc_extent *e, size_t n)
{
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (e[i].length > m)
            m = e[i].length;
    return m;
}

/* Merge the two smallest runs while the newer is at least half the older's size. */
static int compact(volume_index *vi)
{
    while (vi->nruns >= 2) {
        run *a = &vi->runs[vi->nruns - 2], *b = &vi->runs[vi->nruns - 1];
        if (a->n > 2 * b->n)
            break;
        zc_extent *m = malloc((a->n + b->n) * sizeof *m);
        if (!m)
            return ZC_E_NOMEM;
        size_t i = 0, j = 0, k = 0;
        while (i < a->n && j < b->n)
            m[k++] = ext_cmp(&a->e[i], &b->e[j]) <= 0 ? a->e[i++] : b->e[j++];
        while (i < a->n)
            m[k++] = a->e[i++];
        while (j < b->n)
            m[k++] = b->e[j++];
        free(a->e);
        free(b->e);
        a->e = m;
        a->n = k;
        a->max_len = a->max_len > b->max_len ? a->max_len : b->max_len;
        vi->nruns--;
    }
    return ZC_OK;
}

static int flush_tail(volume_index *vi)
{
    if (!vi->ntail)
        return ZC_OK;
    void *runs = vi->runs;
    if (grow(&runs, &vi->runs_cap, vi->nruns + 1, sizeof(run)))
        return ZC_E_NOMEM;
    vi->runs = runs;
    zc_extent *e = malloc(vi->ntail * sizeof *e);
    if (!e)
        return ZC_E_NOMEM;
    memcpy(e, vi->tail, vi->ntail * sizeof *e);
    qsort(e, vi->ntail, sizeof *e, ext_cmp);
    vi->runs[vi->nruns++] = (run){e, vi->ntail, max_len_of(e, vi->ntail)};
    vi->ntail = 0;
    return compact(vi);
}

static volume_index *volume_slot(zc_index *idx, uint32_t volume)
{
    if (volume >= idx->nvols) {
        uint32_t nv = volume + 1;
        volume_index **vols = realloc(idx->vols, nv * sizeof *vols);
        if (!vols)
            return NULL;
        memset(vols + idx->nvols, 0, (nv - idx->nvols) * sizeof *vols);
        idx->vols = vols;
        idx->nvols = nv;
    }
    if (!idx->vols[volume])
        idx->vols[volume] = calloc(1, sizeof(volume_index));
    return idx->vols[volume];
}

int zc_index_add(zc_index *idx, const zc_extent *e, size_t n, int ordered)
{
    for (size_t i = 0; i < n; i++) {
        const zc_extent *x = &e[i];
        if (x->type != ZC_REC_WRITE && x->type != ZC_REC_ZERO && x->type != ZC_REC_SYNC)
            continue;
        if (x->volume >= ZC_MAX_VOLUMES)
            return ZC_E_RANGE;
        volume_index *vi = volume_slot(idx, x->volume);
        if (!vi)
            return ZC_E_NOMEM;
        if (ordered && x->seq <= vi->last_seq)
            return ZC_E_ORDER;
        if (vi->ntail == TAIL_CAP && flush_tail(vi))
            return ZC_E_NOMEM;
        vi->tail[vi->ntail++] = *x;
        if (x->seq > vi->last_seq)
            vi->last_seq = x->seq;
        idx->count++;
    }
    return ZC_OK;
}

int zc_index_add_sorted(zc_index *idx, const zc_extent *e, size_t n, uint32_t segment,
                        uint64_t seg_len, const uint64_t *volume_sizes, uint32_t nvolumes,
                        int ordered)
{
    for (size_t i = 0; i < n; i++) {
        const zc_extent *x = &e[i];
        if (i && ext_cmp(&e[i - 1], x) >= 0 && e[i - 1].volume == x->volume)
            return ZC_E_ARG;
        if (i && e[i - 1].volume > x->volume)
            return ZC_E_ARG;
        if (x->type != ZC_REC_WRITE && x->type != ZC_REC_ZERO && x->type != ZC_REC_SYNC)
            return ZC_E_BAD_RECORD;
        if (x->segment != segment || x->length == 0 || (x->offset | x->length) % ZC_SECTOR ||
            x->volume >= nvolumes || x->volume >= ZC_MAX_VOLUMES ||
            x->offset + x->length < x->offset ||
            x->offset + x->length > volume_sizes[x->volume] ||
            x->pos + zc_record_size(x->stored) > seg_len || x->pos < 64)
            return ZC_E_BAD_RECORD;
        const volume_index *vi = x->volume < idx->nvols ? idx->vols[x->volume] : NULL;
        if (ordered && vi && x->seq <= vi->last_seq)
            return ZC_E_BAD_RECORD;
    }
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        uint64_t max_seq = 0;
        while (j < n && e[j].volume == e[i].volume) {
            if (e[j].seq > max_seq)
                max_seq = e[j].seq;
            j++;
        }
        volume_index *vi = volume_slot(idx, e[i].volume);
        if (!vi)
            return ZC_E_NOMEM;
        void *runs = vi->runs;
        if (grow(&runs, &vi->runs_cap, vi->nruns + 1, sizeof(run)))
            return ZC_E_NOMEM;
        vi->runs = runs;
        zc_extent *copy = malloc((j - i) * sizeof *copy);
        if (!copy)
            return ZC_E_NOMEM;
        memcpy(copy, e + i, (j - i) * sizeof *copy);
        vi->runs[vi->nruns++] = (run){copy, j - i, max_len_of(copy, j - i)};
        if (max_seq > vi->last_seq)
            vi->last_seq = max_seq;
        idx->count += j - i;
        if (compact(vi))
            return ZC_E_NOMEM;
        i = j;
    }
    return ZC_OK;
}

int zc_index_drop_before(zc_index *idx, uint64_t before)
{
    for (uint32_t v = 0; v < idx->nvols; v++) {
        volume_index *vi = idx->vols[v];
        if (!vi)
            continue;
        size_t keep_runs = 0;
        for (size_t r = 0; r < vi->nruns; r++) {
            run *ru = &vi->runs[r];
            size_t k = 0;
            for (size_t i = 0; i < ru->n; i++)
                if (ru->e[i].seq >= before)
                    ru->e[k++] = ru->e[i];
            idx->count -= ru->n - k;
            if (k == 0) {
                free(ru->e);
                continue;
            }
            ru->n = k;
            ru->max_len = max_len_of(ru->e, k);
            vi->runs[keep_runs++] = *ru;
        }
        vi->nruns = keep_runs;
        size_t k = 0;
        for (size_t i = 0; i < vi->ntail; i++)
            if (vi->tail[i].seq >= before)
                vi->tail[k++] = vi->tail[i];
        idx->count -= vi->ntail - k;
        vi->ntail = k;
        /* shrunken runs may now violate the size invariant: merge from the small end */
        for (size_t r = vi->nruns; r > 1; r--)
            if (compact(vi))
                return ZC_E_NOMEM;
    }
    return ZC_OK;
}

size_t zc_index_count(const zc_index *idx) { return idx->count; }

size_t zc_index_memory(const zc_index *idx)
{
    size_t m = sizeof *idx + idx->nvols * sizeof(volume_index *);
    m += idx->ncand_cap * sizeof(zc_extent) + idx->gaps_cap * sizeof(gap) +
         idx->frags_cap * sizeof(zc_fragment);
    for (uint32_t v = 0; v < idx->nvols; v++) {
        volume_index *vi = idx->vols[v];
        if (!vi)
            continue;
        m += sizeof *vi + vi->runs_cap * sizeof(run);
        for (size_t r = 0; r < vi->nruns; r++)
            m += vi->runs[r].n * sizeof(zc_extent);
    }
    return m;
}

static int cand_push(zc_index *idx, size_t *n, const zc_extent *e)
{
    void *p = idx->cand;
    if (grow(&p, &idx->ncand_cap, *n + 1, sizeof(zc_extent)))
        return ZC_E_NOMEM;
    idx->cand = p;
    idx->cand[(*n)++] = *e;
    return ZC_OK;
}

static int seq_desc(const void *a, const void *b)
{
    const zc_extent *x = a, *y = b;
    return x->seq > y->seq ? -1 : x->seq < y->seq;
}

static int frag_dst(const void *a, const void *b)
{
    const zc_fragment *x = a, *y = b;
    return x->dst < y->dst ? -1 : x->dst > y->dst;
}

static int frag_push(zc_index *idx, size_t *n, uint64_t dst, uint64_t len, uint64_t src,
                     const zc_extent *e)
{
    void *p = idx->frags;
    if (grow(&p, &idx->frags_cap, *n + 1, sizeof(zc_fragment)))
        return ZC_E_NOMEM;
    idx->frags = p;
    zc_fragment *f = &idx->frags[(*n)++];
    f->dst = dst;
    f->length = len;
    f->src = src;
    if (e)
        f->ext = *e;
    else
        memset(&f->ext, 0, sizeof f->ext);
    return ZC_OK;
}

int zc_index_plan(zc_index *idx, uint32_t volume, uint64_t offset, uint64_t length,
                  uint64_t at, const zc_fragment **frags, size_t *nfrags)
{
    uint64_t end = offset + length;
    size_t nc = 0, nf = 0;
    volume_index *vi = volume < idx->nvols ? idx->vols[volume] : NULL;
    if (vi) {
        for (size_t r = 0; r < vi->nruns; r++) {
            const run *ru = &vi->runs[r];
            uint64_t from = offset > ru->max_len ? offset - ru->max_len : 0;
            size_t lo = 0, hi = ru->n; /* first extent with offset > from - 1 */
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (ru->e[mid].offset < from)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            for (size_t i = lo; i < ru->n && ru->e[i].offset < end; i++) {
                const zc_extent *x = &ru->e[i];
                if (x->seq < at && x->offset + x->length > offset && cand_push(idx, &nc, x))
                    return ZC_E_NOMEM;
            }
        }
        for (size_t i = 0; i < vi->ntail; i++) {
            const zc_extent *x = &vi->tail[i];
            if (x->seq < at && x->offset < end && x->offset + x->length > offset &&
                cand_push(idx, &nc, x))
                return ZC_E_NOMEM;
        }
    }
    if (nc > 1)
        qsort(idx->cand, nc, sizeof(zc_extent), seq_desc);

    /* paint newest first; gaps are the parts of the range no newer extent covered */
    void *gp = idx->gaps;
    if (grow(&gp, &idx->gaps_cap, 2, sizeof(gap)))
        return ZC_E_NOMEM;
    idx->gaps = gp;
    size_t ng = 1;
    idx->gaps[0] = (gap){offset, end};
    for (size_t c = 0; c < nc && ng; c++) {
        const zc_extent *x = &idx->cand[c];
        uint64_t xlo = x->offset, xhi = x->offset + x->length;
        size_t g = 0;
        while (g < ng) {
            gap cur = idx->gaps[g];
            uint64_t lo = cur.lo > xlo ? cur.lo : xlo, hi = cur.hi < xhi ? cur.hi : xhi;
            if (lo >= hi) {
                g++;
                continue;
            }
            if (frag_push(idx, &nf, lo - offset, hi - lo, lo - xlo, x))
                return ZC_E_NOMEM;
            if (cur.lo < lo && hi < cur.hi) { /* split in two */
                gp = idx->gaps;
                if (grow(&gp, &idx->gaps_cap, ng + 1, sizeof(gap)))
                    return ZC_E_NOMEM;
                idx->gaps = gp;
                memmove(&idx->gaps[g + 2], &idx->gaps[g + 1], (ng - g - 1) * sizeof(gap));
                idx->gaps[g] = (gap){cur.lo, lo};
                idx->gaps[g + 1] = (gap){hi, cur.hi};
                ng++;
                g += 2;
            } else if (cur.lo < lo) {
                idx->gaps[g++].hi = lo;
            } else if (hi < cur.hi) {
                idx->gaps[g++].lo = hi;
            } else {
                memmove(&idx->gaps[g], &idx->gaps[g + 1], (ng - g - 1) * sizeof(gap));
                ng--;
            }
        }
    }
    for (size_t g = 0; g < ng; g++)
        if (frag_push(idx, &nf, idx->gaps[g].lo - offset, idx->gaps[g].hi - idx->gaps[g].lo,
                      idx->gaps[g].lo, NULL))
            return ZC_E_NOMEM;
    if (nf > 1)
        qsort(idx->frags, nf, sizeof(zc_fragment), frag_dst);
    *frags = idx->frags;
    *nfrags = nf;
    return ZC_OK;
}
