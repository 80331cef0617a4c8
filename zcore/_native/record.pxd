from zcore._native.zc cimport zc_extent_vec

cdef class ExtentBatch:
    cdef zc_extent_vec vec
    cdef readonly int status
    cdef readonly size_t consumed
    cdef readonly unsigned long long last_seq
    cdef readonly unsigned long long min_time
    cdef readonly unsigned long long max_time
