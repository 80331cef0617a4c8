from zcore._native.zc cimport zc_batch_item, zc_batch_out, zc_extent_vec

cdef class ExtentBatch:
    cdef zc_extent_vec vec
    cdef readonly int status
    cdef readonly size_t consumed
    cdef readonly unsigned long long last_seq
    cdef readonly unsigned long long min_time
    cdef readonly unsigned long long max_time


# Encode a batch of records (zc_encode_batch) with the GIL released, LZ4 through the
# `lz4` package's own compressor; where that is not reachable, compressing through
# lz4.block.compress one record at a time.  Returns the status, *done as zc_encode_batch.
cdef int encode_items(const zc_batch_item *items, size_t n, zc_batch_out *outs,
                      unsigned int nouts, bint compress, double keep, size_t *done) except -1000
