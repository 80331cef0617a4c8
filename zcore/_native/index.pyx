# cython: language_level=3, boundscheck=False, wraparound=False
"""Extent index and point-in-time read-through (csrc/zc_index.c, zc_record.c).

Sits under `zcore.journal`: the journal feeds it every validated record and asks it to
read a volume as of a checkpoint.  Newest-wins planning and verified copies run in C
with the GIL released; only compressed (LZ4, zstd) payloads come back through the journal's
loader.
The caller serialises every call on one index (the journal holds its lock).
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memset, memcpy

from zcore.errors import ConfigError, OutOfMemoryError, ReplicaChecksumError, status_error
from zcore._native.zc cimport *
from zcore._native.record cimport ExtentBatch

cdef enum:
    NO_FD = -1   # an empty slot of a descriptor table (set_*_fd takes it to forget one)
    REPLICA_BAD = -1000  # internal: a replica block failed its sum (not a zc_status)


cdef inline bint _all_zero(const uint8_t *p, uint64_t n) noexcept nogil:
    """True when the n bytes at p are zero (8 bytes at a time; n a multiple of 512)."""
    cdef uint64_t i, acc = 0, w
    for i in range(0, n, 8):
        memcpy(&w, p + i, 8)
        acc |= w
    return acc == 0


cdef struct replica_sums:
    const uint32_t *sums  # one entry per block: CRC32C(block) ^ CRC32C(zeros of its size)
    uint64_t size         # volume bytes
    uint64_t block        # block bytes
    uint32_t zero_full    # CRC32C of `block` zero bytes
    uint32_t zero_last    # CRC32C of the zero bytes of the last (possibly short) block


cdef class ExtentIndex:
    """Every journaled write of one journal, by volume, offset and seq."""
    cdef zc_index *idx
    cdef int *seg_fds         # segment number -> fd (-1 when unknown)
    cdef size_t nseg
    cdef int *replica_fds     # volume -> fd of its replica image (-1: reads as zeros)
    cdef size_t nrep
    cdef replica_sums *rsums  # volume -> its replica's block sums (sums NULL: unchecked)
    cdef size_t nsums
    cdef dict _sum_refs       # volume -> the numpy array rsums[volume].sums points into

    def __cinit__(self):
        self.idx = zc_index_new()
        if self.idx == NULL:
            raise OutOfMemoryError("creating the extent index")

    def __dealloc__(self):
        zc_index_free(self.idx)
        free(self.seg_fds)
        free(self.replica_fds)
        free(self.rsums)

    cdef int _grow_fds(self, int **arr, size_t *n, size_t need) except -1:
        cdef size_t i, newn
        if need <= n[0]:
            return 0
        newn = 2 * n[0] if 2 * n[0] > need else need
        if newn < 16:
            newn = 16
        cdef int *p = <int *>realloc(arr[0], newn * sizeof(int))
        if p == NULL:
            raise OutOfMemoryError("growing the descriptor table")
        for i in range(n[0], newn):
            p[i] = NO_FD
        arr[0] = p
        n[0] = newn
        return 0

    def set_segment_fd(self, unsigned int segment, int fd):
        """Register (fd >= 0) or forget (fd = -1) the descriptor of a segment file."""
        self._grow_fds(&self.seg_fds, &self.nseg, <size_t>segment + 1)
        self.seg_fds[segment] = fd

    def set_replica_fd(self, unsigned int volume, int fd):
        """Register (or forget, with -1) the replica image of a volume."""
        self._grow_fds(&self.replica_fds, &self.nrep, <size_t>volume + 1)
        self.replica_fds[volume] = fd

    def set_replica_sums(self, unsigned int volume, sums, unsigned long long size,
                         unsigned int block, unsigned int zero_full, unsigned int zero_last):
        """Check every replica byte read from `volume` against `sums` (a uint32 numpy
        array, one entry per `block` bytes of the `size`-byte volume, entry = CRC32C of
        the block ^ CRC32C of as many zero bytes; zero_full/zero_last those zero CRCs).
        The array is held and read in place: the caller updates it (under the same
        serialisation as reads) when it rewrites replica blocks.  None forgets them."""
        cdef size_t i, newn
        cdef replica_sums *p
        cdef const uint32_t[::1] view
        if self._sum_refs is None:
            self._sum_refs = {}
        if volume >= self.nsums:
            newn = max(<size_t>16, 2 * self.nsums, <size_t>volume + 1)
            p = <replica_sums *>realloc(self.rsums, newn * sizeof(replica_sums))
            if p == NULL:
                raise OutOfMemoryError("growing the replica sums table")
            for i in range(self.nsums, newn):
                p[i].sums = NULL
            self.rsums = p
            self.nsums = newn
        if sums is None:
            self.rsums[volume].sums = NULL
            self._sum_refs.pop(volume, None)
            return
        if block == 0 or block % 8 or size == 0:
            raise ConfigError("replica sums need a positive block size (multiple of 8) "
                              "and volume size")
        view = sums
        if <uint64_t>view.shape[0] != (size + block - 1) // block:
            raise ConfigError(f"replica sums of volume {volume}: {view.shape[0]} entries "
                              f"for {size} bytes in {block}-byte blocks")
        self._sum_refs[volume] = sums
        self.rsums[volume].sums = &view[0]
        self.rsums[volume].size = size
        self.rsums[volume].block = block
        self.rsums[volume].zero_full = zero_full
        self.rsums[volume].zero_last = zero_last

    cdef int _read_replica(self, uint32_t volume, int fd, uint8_t *dst, uint64_t n,
                           uint64_t src, uint64_t *bad) noexcept nogil:
        """Read n replica bytes at volume offset src into dst, checking every block they
        touch against its sum (whole blocks are read); REPLICA_BAD with *bad the block's
        offset when one fails.  Unchecked reads when the volume has no sums."""
        cdef replica_sums *rs
        if volume >= self.nsums or self.rsums[volume].sums == NULL:
            return zc_pread_full(fd, dst, n, src)
        rs = &self.rsums[volume]
        cdef uint64_t B = rs.block
        cdef uint64_t lo = (src // B) * B
        cdef uint64_t end = src + n
        cdef uint64_t hi = ((end + B - 1) // B) * B
        cdef uint64_t p, blen
        cdef uint32_t crc
        cdef uint8_t *buf = dst
        cdef int st
        if hi > rs.size:
            hi = rs.size
        if end > hi:
            return ZC_E_RANGE
        if lo != src or hi != end:
            buf = <uint8_t *>malloc(hi - lo)
            if buf == NULL:
                return ZC_E_NOMEM
        st = zc_pread_full(fd, buf, hi - lo, lo)
        p = lo
        while st == 0 and p < hi:
            blen = B if hi - p >= B else hi - p
            if rs.sums[p // B] == 0 and _all_zero(buf + (p - lo), blen):
                p += blen  # a zero block (a hole of a sparse replica): its entry is 0
                continue
            crc = zc_crc32c(0, buf + (p - lo), blen)
            crc ^= rs.zero_full if blen == B else rs.zero_last
            if crc != rs.sums[p // B]:
                bad[0] = p
                st = REPLICA_BAD
            p += blen
        if buf != dst:
            if st == 0:
                memcpy(dst, buf + (src - lo), n)
            free(buf)
        return st

    def add(self, ExtentBatch batch, bint ordered=True):
        """Index the data records of a validated batch (`ordered`: their seqs must follow
        those already indexed per volume; False when loading older segments)."""
        cdef int st = zc_index_add(self.idx, batch.vec.v, batch.vec.n, ordered)
        if st:
            raise status_error(st, "indexing records")

    def add_array(self, const uint8_t[::1] extents, bint ordered=True):
        """Index extents given as raw EXTENT_DTYPE bytes (from a segment index file)."""
        if extents.shape[0] % sizeof(zc_extent):
            raise ConfigError("extent array length is not a multiple of the entry size")
        cdef size_t n = extents.shape[0] // sizeof(zc_extent)
        if n == 0:
            return
        cdef int st = zc_index_add(self.idx, <const zc_extent *>&extents[0], n, ordered)
        if st:
            raise status_error(st, "indexing records")

    def add_sorted(self, const uint8_t[::1] extents, unsigned int segment,
                   unsigned long long seg_len, const uint64_t[::1] volume_sizes,
                   bint ordered=True):
        """Adopt a sealed segment's data extents, given as raw EXTENT_DTYPE bytes sorted
        by (volume, offset, seq), as ready-made runs.  Every extent is checked first
        (type, alignment, segment, position, volume range, seq order); on a violation
        nothing is added and CorruptRecordError is raised."""
        if extents.shape[0] % sizeof(zc_extent):
            raise ConfigError("extent array length is not a multiple of the entry size")
        cdef size_t n = extents.shape[0] // sizeof(zc_extent)
        if n == 0:
            return
        cdef int st = zc_index_add_sorted(
            self.idx, <const zc_extent *>&extents[0], n, segment, seg_len,
            &volume_sizes[0] if volume_sizes.shape[0] else NULL, volume_sizes.shape[0],
            ordered)
        if st:
            raise status_error(st if st != ZC_E_ARG else ZC_E_BAD_RECORD,
                               f"adopting the index of segment {segment}")

    def drop_before(self, unsigned long long seq):
        """Forget every extent with seq < `seq` (they were promoted into the replicas)."""
        cdef int st = zc_index_drop_before(self.idx, seq)
        if st:
            raise status_error(st, "dropping promoted records")

    @property
    def count(self):
        return zc_index_count(self.idx)

    @property
    def memory(self):
        """Bytes the native index holds allocated."""
        return zc_index_memory(self.idx)

    def plan(self, unsigned int volume, unsigned long long offset,
             unsigned long long length, unsigned long long at):
        """Fragments of a read as (dst, length, src, seq or 0 for the replica), by dst."""
        cdef const zc_fragment *f
        cdef size_t n, i
        cdef int st = zc_index_plan(self.idx, volume, offset, length, at, &f, &n)
        if st:
            raise status_error(st, "planning a read")
        return [(f[i].dst, f[i].length, f[i].src, f[i].ext.seq) for i in range(n)]

    def kinds(self, unsigned int volume, unsigned long long offset,
              unsigned long long length, unsigned long long at):
        """What [offset, offset+length) is as of seq `at`: maximal runs (start, length,
        kind) by offset, tiling the range; kind 0 = the replica, else the record type
        (ZC_REC_ZERO for zeroed ranges).  Adjacent fragments of one kind are merged."""
        cdef const zc_fragment *f
        cdef size_t n, i
        cdef uint64_t start = 0, run = 0, kind = 0, k
        cdef int st = zc_index_plan(self.idx, volume, offset, length, at, &f, &n)
        if st:
            raise status_error(st, "planning a read")
        out = []
        for i in range(n):
            k = f[i].ext.type if f[i].ext.seq else 0
            if run and k == kind and start + run == offset + f[i].dst:
                run += f[i].length
                continue
            if run:
                out.append((start, run, kind))
            start, run, kind = offset + f[i].dst, f[i].length, k
        if run:
            out.append((start, run, kind))
        return out

    def read(self, unsigned int volume, unsigned long long offset, unsigned long long length,
             unsigned long long at, loader):
        """Bytes of [offset, offset+length) of `volume` as of checkpoint seq `at`.

        `loader(segment, pos, stored, length)` returns the verified, decompressed data of
        an LZ4 or zstd record.  Every journal byte returned has passed its CRC32C."""
        out = PyBytes_FromStringAndSize(NULL, length)
        self._read_into(volume, offset, length, at, <uint8_t *>PyBytes_AS_STRING(out), loader)
        return out

    def read_into(self, unsigned int volume, unsigned long long offset, buf,
                  unsigned long long at, loader):
        """Like read, into a writable buffer whose length is the read's length."""
        cdef uint8_t[::1] o = buf
        if o.shape[0]:
            self._read_into(volume, offset, o.shape[0], at, &o[0], loader)

    cdef int _read_into(self, uint32_t volume, uint64_t offset, uint64_t length, uint64_t at,
                        uint8_t *out, object loader) except -1:
        cdef const zc_fragment *f
        cdef const zc_fragment *fr
        cdef size_t n, i
        cdef int st = 0, fd, pending_lz4 = 0
        cdef size_t bad = 0
        cdef uint64_t bad_block = 0
        st = zc_index_plan(self.idx, volume, offset, length, at, &f, &n)
        if st:
            raise status_error(st, "planning a read")
        with nogil:
            for i in range(n):
                fr = &f[i]
                if fr.ext.type == ZC_REC_RESERVED:
                    fd = self.replica_fds[volume] if volume < self.nrep else NO_FD
                    if fd < 0:
                        memset(out + fr.dst, 0, fr.length)
                    else:
                        st = self._read_replica(volume, fd, out + fr.dst, fr.length,
                                                fr.src, &bad_block)
                else:
                    # every journal byte comes from the record its index entry names:
                    # the header at its position is checked against the entry (an index
                    # file can pass its CRC and still be wrong)
                    fd = self.seg_fds[fr.ext.segment] if fr.ext.segment < self.nseg else NO_FD
                    if fd < 0:
                        st = ZC_E_ARG
                    elif fr.ext.type == ZC_REC_ZERO:
                        st = zc_check_record_header(fd, &fr.ext)
                        if st == 0:
                            memset(out + fr.dst, 0, fr.length)
                    elif fr.ext.flags & ZC_FLAGS_COMPRESSED:
                        st = zc_check_record_header(fd, &fr.ext)
                        pending_lz4 += 1
                    else:
                        st = zc_read_record(fd, &fr.ext, fr.src, fr.length, out + fr.dst)
                if st:
                    bad = i
                    break
        if st:
            memset(out, 0, length)
            fr = &f[bad]
            if st == REPLICA_BAD:
                rs_block = self.rsums[volume].block
                raise ReplicaChecksumError(
                    f"reading volume {volume} at {offset}+{length}: replica block at "
                    f"offset {bad_block} (+{rs_block}) fails its sum (damaged replica)",
                    volume, bad_block, rs_block)
            where = ("replica" if fr.ext.type == ZC_REC_RESERVED else
                     f"record seq {fr.ext.seq} (segment {fr.ext.segment}, pos {fr.ext.pos})")
            raise status_error(st, f"reading volume {volume} at {offset}+{length} from {where}")
        if pending_lz4:
            for i in range(n):
                fr = &f[i]
                if fr.ext.type != ZC_REC_RESERVED and fr.ext.flags & ZC_FLAGS_COMPRESSED:
                    data = loader(fr.ext.segment, fr.ext.pos, fr.ext.stored, fr.ext.length)
                    self._copy_lz4(data, fr, out)
        return 0

    cdef int _copy_lz4(self, object data, const zc_fragment *fr, uint8_t *out) except -1:
        cdef const uint8_t[::1] d = data
        if <uint64_t>d.shape[0] != fr.ext.length:
            raise status_error(ZC_E_BAD_RECORD, f"decompressed record seq {fr.ext.seq} has the wrong size")
        memcpy(out + fr.dst, &d[fr.src], fr.length)
        return 0
