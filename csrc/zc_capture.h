/* zc_capture.h - the protected site's capture buffer: every write to a protected volume
 * lands on its backing store and is copied, with a VPG-wide seq, into a ring that the
 * VPG stream drains into bundles.
 *
 * Write-order fidelity: a write waits while an overlapping write of the same volume is in
 * flight, takes its seq, then writes the backing store; so for overlapping writes the seq
 * order is the order in which they reached the backing store.  Non-overlapping writes
 * proceed in parallel (each call is meant to run with the GIL released).
 *
 * Modes: in STREAM mode writes are copied into the ring; when a write does not fit, the
 * capture switches itself to BITMAP mode (overflowed = 1).  In BITMAP mode writes only
 * append (volume, offset, length) to a dirty log that the caller folds into bitmaps.
 *
 * Ring entries (not a persistent format): a 64-byte zc_ring_entry header, then the data
 * padded to 64 bytes, so every payload is 64-byte aligned.  Entries become visible to
 * zc_capture_peek in seq order once their copy is complete.
 *
 * Thread safety: every function may be called from any thread, except that peek and
 * consume must come from one draining thread.  Pointers from peek stay valid until the
 * matching consume.  Locking: one mutex per capture, a leaf (no other lock is taken
 * while it is held, never the GIL: callers release the GIL first).  A write holds it
 * twice, briefly (seq and ring space; commit), never across its pwrite or copy; the
 * drainer holds it only in peek and consume, never while encoding.  zc_capture_take_dirty transfers ownership of the array to the
 * caller (release it with free()).
 */
#ifndef ZC_CAPTURE_H
#define ZC_CAPTURE_H

#include <stddef.h>
#include <stdint.h>

#include "zc_format.h"

/* the fd of a capture-only volume (its data is in a hypervisor): no backing store is
 * written; any other negative fd is an error (EBADF), as for a closed volume */
#define ZC_NO_BACKING (-2)

#define ZC_CAPTURE_STREAM 0
#define ZC_CAPTURE_BITMAP 1

/* entry kinds: the record types of zc_format.h, plus */
#define ZC_ENTRY_VOID 0xFFFF   /* a failed write: skip it (its range went to the dirty log) */
#define ZC_ENTRY_FILLER 0xFFFE /* padding to the ring's end */

/* ZC_E_FULL and ZC_E_CLOSED, the capture's own statuses, are in zc_format.h's zc_status */

typedef struct zc_ring_entry {
    uint64_t seq;
    uint64_t offset;
    uint64_t time_ns;
    uint32_t volume;
    uint32_t length;  /* bytes of volume covered                                      */
    uint32_t stored;  /* bytes of payload after the header (data or checkpoint bytes) */
    uint32_t size;    /* whole entry in the ring, header and padding included         */
    uint16_t kind;    /* ZC_REC_WRITE / ZERO / SYNC / CHECKPOINT, VOID, FILLER          */
    uint16_t committed;
    uint8_t pad[20];
} zc_ring_entry;

typedef struct zc_dirty {
    uint32_t volume;
    uint32_t length;
    uint64_t offset;
} zc_dirty;

typedef struct zc_capture_stats {
    uint64_t writes, bytes, ring_used, ring_size, next_seq, dirty_pending;
    int mode, overflowed;
} zc_capture_stats;

typedef struct zc_capture zc_capture;

/* ring_bytes >= 1 MiB, multiple of 64; seqs handed out start at first_seq.  NULL on ENOMEM. */
zc_capture *zc_capture_new(uint64_t ring_bytes, uint64_t first_seq);
void zc_capture_free(zc_capture *c); /* no call may be running; accepts NULL */

/* Write `len` bytes of `data` at `offset` of backing `fd` (volume id `volume`) and
 * capture them; fd ZC_NO_BACKING: a capture-only volume, whose data the caller's source (a
 * hypervisor) already holds, so only the ring or the dirty log gets the write.  kind is ZC_REC_WRITE, or ZC_REC_ZERO when data is all zeros (no copy).
 * Returns the seq (> 0), ZC_E_IO (errno set; the range is logged dirty) or ZC_E_CLOSED
 * (nothing written).  Never blocks on a full ring: it switches to BITMAP mode instead. */
int64_t zc_capture_write(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                         const uint8_t *data, uint32_t len, uint16_t kind);

/* Zero `len` bytes at `offset` of backing `fd` by deallocating them (fallocate
 * PUNCH_HOLE | KEEP_SIZE; zeros written where the file system cannot punch) and capture
 * a ZERO entry, ordered like a write: what TRIM and fast zero of a protected volume do.
 * Returns as zc_capture_write (data NULL there means exactly this). */
int64_t zc_capture_zero(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                        uint32_t len);

/* Read `len` bytes at `offset` of `fd` into the ring as a SYNC entry, ordered like a
 * write.  All-zero data becomes a ZERO entry, or is skipped (a VOID entry) when
 * skip_zero is set (initial sync onto an empty replica).  Returns the seq, ZC_E_FULL when
 * the ring lacks room, ZC_E_IO, or ZC_E_ARG in BITMAP mode. */
int64_t zc_capture_sync(zc_capture *c, int fd, uint32_t volume, uint64_t offset,
                        uint32_t len, int skip_zero);

/* Sync from a source outside the capture (a hypervisor's disk, read over the network):
 * the data is read after zc_capture_watch registered its range and before
 * zc_capture_sync_from appends it.  Every write or zeroing of the range captured in
 * between spoils the watch, since the source may have been read before that write reached
 * it: the append then refuses (returns 0, the watch dropped: read again).  A write captured
 * before the watch began reached the source first, so the data holds it.
 * watch: returns the watch id (> 0), ZC_E_CLOSED or ZC_E_NOMEM.
 * sync_from: `data` holds the watched range's bytes (`len`, the watch's length), NULL
 * for zeros (a hole the source reported).  Zero data becomes a ZERO entry, or a VOID one when skip_zero.  Returns the seq (the watch dropped), 0 when spoiled, ZC_E_FULL when the
 * ring lacks room (the watch kept: retry after draining), ZC_E_ARG for an unknown watch, a
 * wrong len or BITMAP mode (the watch kept), ZC_E_CLOSED.  unwatch drops a watch (unknown ids are
 * ignored). */
int64_t zc_capture_watch(zc_capture *c, uint32_t volume, uint64_t offset, uint32_t len);
int64_t zc_capture_sync_from(zc_capture *c, uint64_t id, const uint8_t *data, uint32_t len,
                             int skip_zero);
void zc_capture_unwatch(zc_capture *c, uint64_t id);

/* Append a checkpoint marker with `payload` (stored bytes).  Returns its seq, ZC_E_FULL
 * when the ring lacks room, ZC_E_ARG in BITMAP mode. */
int64_t zc_capture_marker(zc_capture *c, const uint8_t *payload, uint32_t len);

/* Committed entries at the head: *ptr and *nbytes cover whole entries, contiguous in
 * memory, at most max_bytes (at least one entry when any is committed). */
void zc_capture_peek(zc_capture *c, const uint8_t **ptr, uint64_t *nbytes, uint64_t max_bytes);
void zc_capture_consume(zc_capture *c, uint64_t nbytes);

int zc_capture_set_mode(zc_capture *c, int mode); /* returns the previous mode; clears overflowed */

/* Refuse every later write, sync read and marker (ZC_E_CLOSED, before the backing store is
 * touched), then wait until no write or sync read is in flight: afterwards every write
 * that completed is in the ring or in the dirty log, and stays so.  Idempotent. */
void zc_capture_close(zc_capture *c);
zc_dirty *zc_capture_take_dirty(zc_capture *c, size_t *n);
void zc_capture_stats_get(zc_capture *c, zc_capture_stats *out);

/* 1 when all n bytes at p are zero (n a multiple of 8), else 0. */
int zc_all_zero(const uint8_t *p, size_t n);

#endif
