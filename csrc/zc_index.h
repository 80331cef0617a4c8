/* zc_index.h - the journal's in-memory extent index and the read-through planner.
 *
 * The index maps (volume, byte range, seq) to journaled records.  Each volume keeps a
 * small unsorted tail and a few runs sorted by offset, merged log-structured (sizes at
 * least doubling), so adding is amortised O(log n) and a lookup costs one binary search
 * per run.  A plan for reading [offset, offset+length) of a volume at a checkpoint seq
 * `at` lists, for every byte, the newest record with seq < at that wrote it, or the
 * replica where none did.
 *
 * Ownership: the index copies the extents it is given.  zc_index_plan returns fragments
 * in memory owned by the index, valid until the next call on the same index.  The index
 * is not thread-safe: callers serialise every call on one index.
 */
#ifndef ZC_INDEX_H
#define ZC_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "zc_record.h"

#define ZC_MAX_VOLUMES 65536u

typedef struct zc_index zc_index;

/* One piece of a read: `length` bytes landing `dst` bytes into the output, taken from
 * `src` bytes into the data of record `ext` (ext.type == 0 means the replica, src is
 * then the volume offset). */
typedef struct zc_fragment {
    uint64_t dst;
    uint64_t length;
    uint64_t src;
    zc_extent ext;
} zc_fragment;

zc_index *zc_index_new(void);               /* NULL when out of memory */
void zc_index_free(zc_index *idx);          /* accepts NULL */

/* Add extents of data-bearing records (WRITE, ZERO, SYNC; others are skipped).  When
 * `ordered`, seqs must ascend within a volume across calls (ZC_E_ORDER otherwise);
 * unordered adds load older segments after newer records and leave ordering to the
 * caller.  ZC_OK, ZC_E_ORDER, ZC_E_RANGE (volume >= ZC_MAX_VOLUMES), ZC_E_NOMEM (index
 * unchanged for the failing extent). */
int zc_index_add(zc_index *idx, const zc_extent *e, size_t n, int ordered);

/* Adopt the data extents of one sealed segment, already sorted by (volume, offset, seq),
 * as ready-made runs (no sorting).  Validates every extent first: data type, sector
 * alignment, segment number, record inside seg_len, range inside volume_sizes[volume]
 * (0 = unknown volume), and, when `ordered`, seqs above those already indexed for the
 * volume; on any violation returns ZC_E_BAD_RECORD (or ZC_E_ARG when not sorted) and
 * adds nothing.  ZC_E_NOMEM leaves the index holding a prefix of the volumes. */
int zc_index_add_sorted(zc_index *idx, const zc_extent *e, size_t n, uint32_t segment,
                        uint64_t seg_len, const uint64_t *volume_sizes, uint32_t nvolumes,
                        int ordered);

/* Remove every extent with seq < before (after promotion). ZC_OK or ZC_E_NOMEM. */
int zc_index_drop_before(zc_index *idx, uint64_t before);

size_t zc_index_count(const zc_index *idx);   /* extents held */
size_t zc_index_memory(const zc_index *idx);  /* bytes allocated, all structures */

/* Plan a read of [offset, offset+length) of `volume` as of checkpoint seq `at`.
 * Fragments come out ordered by dst and tile the range exactly.  ZC_OK or ZC_E_NOMEM. */
int zc_index_plan(zc_index *idx, uint32_t volume, uint64_t offset, uint64_t length,
                  uint64_t at, const zc_fragment **frags, size_t *nfrags);

#endif
