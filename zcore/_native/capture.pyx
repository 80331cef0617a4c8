# cython: language_level=3, boundscheck=False, wraparound=False
"""Capture ring (csrc/zc_capture.c) and the bundle encoder that drains it.

Sits at the top of the data path: `zcore.capture.ProtectedVolume.write` is one call of
`CaptureRing.write` (validation, ordering, backing-store write and copy, GIL released);
`zcore.vpg` seals what the ring holds into per-VM bundles of journal records with `seal`.
"""
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.errno cimport errno
from libc.string cimport strerror

import numpy as np

from zcore.errors import (
    AlignmentError, ConfigError, NativeIOError, OutOfMemoryError, OutOfRangeError,
    StateError, status_error,
)
from zcore._native.zc cimport *
from zcore._native.record cimport encode_items

MODE_STREAM = ZC_CAPTURE_STREAM
MODE_BITMAP = ZC_CAPTURE_BITMAP
NO_BACKING = ZC_NO_BACKING  # the fd of a capture-only volume: no backing store written


cdef class SealedBatch:
    """Records drained from the ring: one encoded bundle part per VM, and what they cover."""
    cdef readonly list parts           # bytearray per VM (empty when the VM had nothing)
    cdef readonly unsigned long long first_seq, last_seq, oldest_time_ns
    cdef readonly unsigned long long data_bytes, encoded_bytes
    cdef readonly object volumes, offsets, lengths   # numpy arrays of the data entries
    cdef readonly list checkpoints     # (seq, time_ns, payload bytes)
    cdef readonly int entries


cdef object _capture_error(long long seq, int err, str what, str doing):
    """The error of a write or zeroing (`what`) that failed with status `seq` < 0:
    StateError once the capture is closed, NativeIOError from the backing store (while
    `doing`; `err` the errno the native call left), else the status's own.  Only called
    on failure: formatting the messages costs more than a capture does."""
    if seq == ZC_E_CLOSED:
        raise StateError(f"{what} refused: the capture is closed (its VPG is stopping)")
    if seq == ZC_E_IO:
        raise NativeIOError(err, f"{doing} the backing store: {strerror(err).decode()}")
    raise status_error(<int>seq, f"capturing {what}")


cdef class CaptureRing:
    """The VPG-wide capture buffer: seqs, write-order fidelity, overflow to a dirty log."""
    cdef zc_capture *c

    def __cinit__(self, unsigned long long ring_bytes, unsigned long long first_seq=1):
        if ring_bytes < (1 << 20) or ring_bytes % 64:
            raise ConfigError("capture buffer must be at least 1 MiB and a multiple of 64")
        if first_seq == 0:
            raise ConfigError("seqs start at 1")
        self.c = zc_capture_new(ring_bytes, first_seq)
        if self.c == NULL:
            raise OutOfMemoryError(f"allocating a {ring_bytes}-byte capture buffer")

    def __dealloc__(self):
        zc_capture_free(self.c)

    def write(self, int fd, unsigned int volume, unsigned long long size, offset, data):
        """Write `data` at `offset` of the backing `fd` and capture it; returns its seq.

        `data`: any C-contiguous buffer of 1-byte items (a wider item size is a
        ConfigError, a buffer with gaps a BufferError).  The checks take the buffer once,
        without a typed memoryview: this is the protected VM's every write."""
        cdef unsigned long long off
        cdef Py_buffer view
        cdef size_t n
        cdef long long seq
        cdef uint16_t kind
        cdef const uint8_t *p
        # a negative offset is out of range, not an OverflowError; offset + length must
        # not wrap around 2**64 (checked below against size - off)
        try:
            off = offset
        except OverflowError:
            raise OutOfRangeError(f"write at {offset} is outside the volume (0..{size})") from None
        if off > size:
            raise OutOfRangeError(f"write at {offset} is outside the volume (0..{size})")
        try:
            PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS)
        except TypeError:
            raise ConfigError("write data must be a contiguous bytes-like buffer") from None
        try:
            if view.itemsize != 1:
                raise ConfigError(f"write data must be a contiguous buffer of bytes (item "
                                  f"size {view.itemsize}); cast it to bytes first")
            n = view.len
            p = <const uint8_t *>view.buf
            if n == 0 or n > ZC_MAX_WRITE:
                raise ConfigError(f"write of {n} bytes: length must be 1 to {ZC_MAX_WRITE}")
            if off % ZC_SECTOR or n % ZC_SECTOR:
                raise AlignmentError(f"write {offset}+{n} is not aligned to {ZC_SECTOR}-byte "
                                     "sectors")
            if n > size - off:
                raise OutOfRangeError(f"write {offset}+{n} passes the volume's end ({size})")
            with nogil:
                kind = ZC_REC_ZERO if zc_all_zero(p, n) else ZC_REC_WRITE
                seq = zc_capture_write(self.c, fd, volume, off, p, <uint32_t>n, kind)
        finally:
            PyBuffer_Release(&view)
        if seq < 0:
            _capture_error(seq, errno, f"write {offset}+{n}", f"writing {offset}+{n} to")
        return seq

    def zero(self, int fd, unsigned int volume, unsigned long long size, offset, length):
        """Zero `length` bytes at `offset` of the backing `fd` by punching a hole there
        (zeros written where the file system cannot punch) and capture a zero record;
        returns its seq.  Checked and ordered like `write` (TRIM, fast zero)."""
        if not 0 <= offset <= size:
            raise OutOfRangeError(f"zeroing at {offset} is outside the volume (0..{size})")
        if not 0 < length <= ZC_MAX_WRITE:
            raise ConfigError(f"zeroing {length} bytes: length must be 1 to {ZC_MAX_WRITE}")
        cdef unsigned long long off = offset
        cdef uint32_t n = length
        cdef long long seq
        if off % ZC_SECTOR or n % ZC_SECTOR:
            raise AlignmentError(f"zeroing {offset}+{n} is not aligned to {ZC_SECTOR}-byte "
                                 "sectors")
        if n > size - off:
            raise OutOfRangeError(f"zeroing {offset}+{n} passes the volume's end ({size})")
        with nogil:
            seq = zc_capture_zero(self.c, fd, volume, off, n)
        if seq < 0:
            _capture_error(seq, errno, f"zeroing {offset}+{n}", f"punching {offset}+{n} in")
        return seq

    def sync(self, int fd, unsigned int volume, unsigned long long offset, unsigned int length,
             bint skip_zero=False):
        """Read a range of the backing store into the stream as a sync record (zero data
        as a zero record, or nothing with `skip_zero`).  Returns its seq, or None when it
        cannot go now: the ring has no room (drain, then retry) or overflowed into bitmap
        mode (fold, then sync again later)."""
        cdef long long seq
        if length == 0 or length > ZC_MAX_WRITE or offset % ZC_SECTOR or length % ZC_SECTOR:
            raise AlignmentError(f"sync read {offset}+{length} must be sector-aligned, "
                                 f"1 to {ZC_MAX_WRITE} bytes")
        with nogil:
            seq = zc_capture_sync(self.c, fd, volume, offset, length, skip_zero)
        if seq == ZC_E_FULL or seq == ZC_E_ARG or seq == ZC_E_CLOSED:
            return None
        if seq < 0:
            if seq == ZC_E_IO:
                raise NativeIOError(errno, f"reading {offset}+{length} for a sync: "
                                           f"{strerror(errno).decode()}")
            raise status_error(<int>seq, f"sync read {offset}+{length}")
        return seq

    def watch(self, unsigned int volume, unsigned long long offset, unsigned int length):
        """Begin a sync of a range read from a source outside the capture (a hypervisor's
        disk): returns the watch id to give `sync_from` once the data is read.  A write of
        the range captured in between spoils it (csrc/zc_capture.h)."""
        if length == 0 or length > ZC_MAX_WRITE or offset % ZC_SECTOR or length % ZC_SECTOR:
            raise AlignmentError(f"sync read {offset}+{length} must be sector-aligned, "
                                 f"1 to {ZC_MAX_WRITE} bytes")
        cdef long long wid = zc_capture_watch(self.c, volume, offset, length)
        if wid == ZC_E_CLOSED:
            raise StateError("sync refused: the capture is closed (its VPG is stopping)")
        if wid < 0:
            raise status_error(<int>wid, f"watching {offset}+{length} for a sync")
        return wid

    def sync_from(self, unsigned long long watch, unsigned int length, data,
                  bint skip_zero=False):
        """Append the watched range's bytes (`data`, its `length` bytes; None for zeros)
        as a sync record.  Returns its seq; 0 when a write of the range was captured since
        the watch began (the watch is gone: read the range again); None when it cannot go
        now (ring full: the watch stays, retry after draining; bitmap mode or closed)."""
        cdef const uint8_t[::1] view
        cdef const uint8_t *p = NULL
        cdef long long seq
        if data is not None:
            view = data
            if <unsigned int>view.shape[0] != length:
                raise ConfigError(f"sync data of {view.shape[0]} bytes for a watch of "
                                  f"{length}")
            p = &view[0]
        with nogil:
            seq = zc_capture_sync_from(self.c, watch, p, length, skip_zero)
        if seq == ZC_E_FULL or seq == ZC_E_ARG or seq == ZC_E_CLOSED:
            return None
        if seq < 0:
            raise status_error(<int>seq, "appending a sync record")
        return seq

    def unwatch(self, unsigned long long watch):
        """Drop a watch (a sync abandoned); unknown ids are ignored."""
        zc_capture_unwatch(self.c, watch)

    def marker(self, payload):
        """Append a checkpoint marker; returns its seq, or None when the ring is full or
        the capture is in bitmap mode."""
        cdef const uint8_t[::1] p = payload
        cdef long long seq = zc_capture_marker(self.c, &p[0], p.shape[0])
        return None if seq < 0 else seq

    def close(self):
        """Refuse every later write (StateError, backing store untouched), sync read and
        marker (None), and wait until no write is in flight: afterwards every completed
        write is in the ring or the dirty log."""
        with nogil:
            zc_capture_close(self.c)

    def set_mode(self, int mode):
        """Switch between MODE_STREAM and MODE_BITMAP; returns the previous mode."""
        if mode not in (ZC_CAPTURE_STREAM, ZC_CAPTURE_BITMAP):
            raise ConfigError(f"unknown capture mode {mode}")
        return zc_capture_set_mode(self.c, mode)

    def take_dirty(self):
        """Ranges written while not streaming, as numpy arrays (volumes, offsets, lengths)."""
        cdef size_t n, i
        cdef zc_dirty *d = zc_capture_take_dirty(self.c, &n)
        vols = np.empty(n, dtype=np.uint32)
        offs = np.empty(n, dtype=np.uint64)
        lens = np.empty(n, dtype=np.uint64)
        cdef uint32_t[::1] v = vols
        cdef uint64_t[::1] o = offs
        cdef uint64_t[::1] l = lens
        for i in range(n):
            v[i] = d[i].volume
            o[i] = d[i].offset
            l[i] = d[i].length
        free(d)
        return vols, offs, lens

    def stats(self):
        cdef zc_capture_stats s
        zc_capture_stats_get(self.c, &s)
        return dict(writes=s.writes, bytes=s.bytes, ring_used=s.ring_used,
                    ring_size=s.ring_size, next_seq=s.next_seq,
                    dirty_pending=s.dirty_pending, mode=s.mode, overflowed=bool(s.overflowed))

    def discard(self, list checkpoints=None):
        """Drop every committed entry, returning what the data entries covered:
        (volumes, offsets, lengths, oldest time_ns or 0).  Used to fold the ring into
        dirty bitmaps.  The dropped checkpoint markers are appended to `checkpoints`
        (when given) as (seq, time_ns, payload bytes), so none vanishes unseen."""
        cdef const uint8_t *base
        cdef uint64_t nbytes, at = 0, oldest = 0
        cdef const zc_ring_entry *e
        vols, offs, lens = [], [], []
        zc_capture_peek(self.c, &base, &nbytes, 0xFFFFFFFFFFFFFFFF)
        while at < nbytes:
            e = <const zc_ring_entry *>(base + at)
            at += e.size
            if e.kind == ZC_REC_CHECKPOINT:
                if checkpoints is not None:
                    checkpoints.append((e.seq, e.time_ns, (<char *>e + 64)[:e.stored]))
                continue
            # a VOID entry's range is already in the dirty log, but marking it twice is free
            vols.append(e.volume)
            offs.append(e.offset)
            lens.append(e.length)
            if e.kind != ZC_ENTRY_VOID and (oldest == 0 or e.time_ns < oldest):
                oldest = e.time_ns
        zc_capture_consume(self.c, nbytes)
        return (np.array(vols, dtype=np.uint32), np.array(offs, dtype=np.uint64),
                np.array(lens, dtype=np.uint64), oldest)

    def seal(self, unsigned long long max_bytes, const uint32_t[::1] vm_of_volume,
             unsigned int nvms, bint compress, double min_saving):
        """Drain up to `max_bytes` of committed entries into per-VM bundle parts.

        Writes go to their volume's VM; checkpoint markers go to every VM.  LZ4 is kept
        when it saves at least `min_saving` of a payload.  Returns None when the ring
        holds nothing committed.

        One pass over the entries in C builds the batch (no Python object per entry),
        then zcore._native.record.encode_items encodes all of it with the GIL released."""
        cdef const uint8_t *base
        cdef uint64_t nbytes, at = 0
        cdef const zc_ring_entry *e
        cdef size_t n = 0, ndata = 0, done = 0
        cdef unsigned int vm
        cdef int st
        cdef uint64_t first = 0, last = 0, oldest = 0xFFFFFFFFFFFFFFFF, data_bytes = 0
        cdef uint64_t ckpt_bytes = 0, bound
        cdef uint32_t nvols = vm_of_volume.shape[0]
        cdef zc_batch_item *items = NULL
        cdef zc_batch_out *outs = NULL
        cdef uint64_t *caps = NULL
        cdef zc_batch_item *it
        cdef const zc_ring_entry *bad = NULL
        zc_capture_peek(self.c, &base, &nbytes, max_bytes)
        if nbytes == 0:
            return None
        if nvms == 0:
            raise ConfigError("sealing needs at least one VM")
        # entries in the peeked span: at most one per 64 bytes
        items = <zc_batch_item *>malloc((nbytes // 64 + 1) * sizeof(zc_batch_item))
        outs = <zc_batch_out *>malloc(nvms * sizeof(zc_batch_out))
        caps = <uint64_t *>calloc(nvms, sizeof(uint64_t))
        try:
            if items == NULL or outs == NULL or caps == NULL:
                raise OutOfMemoryError("allocating a seal batch")
            # the walk touches every entry header (cold memory): done without the GIL
            with nogil:
                while at < nbytes:
                    e = <const zc_ring_entry *>(base + at)
                    at += e.size
                    if e.kind == ZC_ENTRY_VOID:
                        continue
                    it = &items[n]
                    it.data = <const uint8_t *>e + sizeof(zc_ring_entry)
                    it.seq = e.seq
                    it.offset = e.offset
                    it.time_ns = e.time_ns
                    it.volume = e.volume
                    it.type = e.kind
                    it.reserved = 0
                    if e.kind == ZC_REC_CHECKPOINT:
                        it.length = e.stored
                        it.out = ZC_BATCH_EVERY_OUTPUT
                        ckpt_bytes += zc_batch_item_bound(it)
                    else:
                        if e.volume >= nvols or vm_of_volume[e.volume] >= nvms:
                            bad = e
                            break
                        vm = vm_of_volume[e.volume]
                        it.length = e.length
                        it.out = vm
                        caps[vm] += zc_batch_item_bound(it)
                        ndata += 1
                        data_bytes += e.length
                    if first == 0:
                        first = e.seq
                    last = e.seq
                    if e.time_ns < oldest:
                        oldest = e.time_ns
                    n += 1
            if bad != NULL:
                if bad.volume >= nvols:
                    raise OutOfRangeError(f"captured write names unknown volume {bad.volume}")
                raise OutOfRangeError(f"volume {bad.volume} belongs to VM "
                                      f"{vm_of_volume[bad.volume]} of {nvms}")
            parts = []
            for vm in range(nvms):
                bound = caps[vm] + ckpt_bytes
                parts.append(PyByteArray_FromStringAndSize(NULL, bound))
                outs[vm].buf = <uint8_t *>PyByteArray_AS_STRING(parts[vm])
                outs[vm].cap = bound
                outs[vm].fill = 0
            vols = np.empty(ndata, dtype=np.uint32)
            offs = np.empty(ndata, dtype=np.uint64)
            lens = np.empty(ndata, dtype=np.uint64)
            checkpoints = self._fill_batch(items, n, vols, offs, lens)
            st = encode_items(items, n, outs, nvms, compress, 1.0 - min_saving, &done)
            if st:
                raise status_error(st, f"encoding seq {items[done].seq}")
            zc_capture_consume(self.c, nbytes)
            encoded = 0
            for vm in range(nvms):
                PyByteArray_Resize(parts[vm], outs[vm].fill)
                encoded += outs[vm].fill
        finally:
            free(items)
            free(outs)
            free(caps)
        b = SealedBatch()
        b.parts = parts
        b.first_seq = first
        b.last_seq = last
        b.oldest_time_ns = oldest if n else 0
        b.data_bytes = data_bytes
        b.encoded_bytes = encoded
        b.volumes, b.offsets, b.lengths = vols, offs, lens
        b.checkpoints = checkpoints
        b.entries = n
        return b

    cdef list _fill_batch(self, const zc_batch_item *items, size_t n, vols, offs, lens):
        """The data entries' (volume, offset, length) into the arrays; the checkpoints."""
        cdef uint32_t[::1] vv = vols
        cdef uint64_t[::1] ov = offs
        cdef uint64_t[::1] lv = lens
        cdef size_t i, k = 0
        checkpoints = []
        for i in range(n):
            if items[i].type == ZC_REC_CHECKPOINT:
                checkpoints.append((items[i].seq, items[i].time_ns,
                                    (<const char *>items[i].data)[:items[i].length]))
                continue
            vv[k] = items[i].volume
            ov[k] = items[i].offset
            lv[k] = items[i].length
            k += 1
        return checkpoints
