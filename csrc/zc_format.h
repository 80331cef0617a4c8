/* zc_format.h - every on-disk and wire constant of zcore, in one place.
 *
 * docs/format.md is the specification; this header is its machine-readable twin.
 * All integers are little-endian.  Nothing here allocates or performs I/O.
 */
#ifndef ZC_FORMAT_H
#define ZC_FORMAT_H

#include <stdint.h>

/* ---- record (shared by the journal and the wire) ------------------------------------- */
#define ZC_RECORD_HEADER_SIZE 64u   /* fixed header; payload follows                     */
#define ZC_RECORD_ALIGN 64u         /* payload padded with zeros to this multiple         */
#define ZC_SECTOR 512u              /* offsets and lengths of writes are multiples of it  */
#define ZC_CRC_BLOCK 4096u          /* raw write payloads carry one CRC32C per 4 KiB      */
#define ZC_MAX_WRITE (32u << 20)    /* largest single write record, bytes                 */
#define ZC_MAX_PAYLOAD (ZC_MAX_WRITE + (ZC_MAX_WRITE / ZC_CRC_BLOCK) * 4u + ZC_RECORD_ALIGN)
#define ZC_MAX_TAG 1024u            /* checkpoint tag text, bytes of UTF-8                */

/* record types; 0 is reserved so that a zeroed header never parses as a record */
enum zc_record_type {
    ZC_REC_RESERVED = 0,
    ZC_REC_WRITE = 1,       /* volume data captured from a write                          */
    ZC_REC_ZERO = 2,        /* a write of zeros: no payload                               */
    ZC_REC_CHECKPOINT = 3,  /* checkpoint marker; payload is zc_checkpoint_payload        */
    ZC_REC_SYNC = 4,        /* volume data read by an initial or bitmap sync              */
    ZC_REC_TYPE_MAX = 4
};

/* record flags */
#define ZC_FLAG_LZ4 0x0001u       /* payload is one LZ4 block of `length` bytes            */
#define ZC_FLAG_BLOCKCRC 0x0002u  /* payload = CRC table (padded to 64) + raw data         */
#define ZC_FLAG_ZSTD 0x0004u      /* payload is one zstd frame of `length` bytes (segment
                                   * v3 and wire protocol v2 only; format.md 4.5a)     */
#define ZC_FLAGS_KNOWN (ZC_FLAG_LZ4 | ZC_FLAG_BLOCKCRC | ZC_FLAG_ZSTD)
#define ZC_FLAGS_V2 (ZC_FLAG_LZ4 | ZC_FLAG_BLOCKCRC) /* segments v1-v2, wire protocol v1 */
#define ZC_FLAGS_COMPRESSED (ZC_FLAG_LZ4 | ZC_FLAG_ZSTD) /* payloads decoded whole       */

/* Record header layout (64 bytes):
 *   0  u16 type        2  u16 flags        4  u32 volume
 *   8  u64 seq        16  u64 offset      24  u32 length (uncompressed)
 *  28  u32 stored (payload bytes before padding)   32  u64 time_ns
 *  40  u32 payload_crc 44..59 reserved (zero)       60  u32 header_crc (of bytes 0..59)
 */
#define ZC_HDR_OFF_TYPE 0
#define ZC_HDR_OFF_FLAGS 2
#define ZC_HDR_OFF_VOLUME 4
#define ZC_HDR_OFF_SEQ 8
#define ZC_HDR_OFF_OFFSET 16
#define ZC_HDR_OFF_LENGTH 24
#define ZC_HDR_OFF_STORED 28
#define ZC_HDR_OFF_TIME 32
#define ZC_HDR_OFF_PAYLOAD_CRC 40
#define ZC_HDR_OFF_HEADER_CRC 60

/* checkpoint payload: u8 kind, u8 flags, u16 tag_len, then tag_len bytes of UTF-8 */
#define ZC_CKPT_AUTO 1
#define ZC_CKPT_TAGGED 2
#define ZC_CKPT_FLAG_CONSISTENT 0x01

/* ---- journal segment file ------------------------------------------------------------ */
#define ZC_SEGMENT_MAGIC "ZCJSEG\r\n"      /* 8 bytes */
#define ZC_SEGMENT_VERSION 3u          /* v3: records may be ZC_FLAG_ZSTD; 1 and 2 still read */
#define ZC_SEGMENT_HEADER_SIZE 64u
/* header: 0 magic[8], 8 u32 version, 12 u32 header_size, 16 u64 segment number,
 *         24 u8 journal_id[16], 40 u64 created_ns,
 *         v2, v3: 48 u32 mark_units, 52 u32 mark_seq, 56 u32 mark_crc (of 0..55),
 *             60 u32 header_crc (of 0..47);
 *         v1: 48..59 reserved, 60 u32 header_crc (of 0..59) */

/* ---- segment index file (.zci) -------------------------------------------------------- */
#define ZC_INDEX_MAGIC "ZCJIDX\r\n"
#define ZC_INDEX_VERSION 2u                /* version 1 files are still read (format.md 7.1) */

/* status codes returned by every zc_ function (0 = success, negative = failure).
 * zcore.errors.Status mirrors this enum member for member, and tests/test_errors.py
 * checks the two (and the status -> exception table) against this header. */
enum zc_status {
    ZC_OK = 0,
    ZC_E_TRUNCATED = -1,     /* buffer ends inside a record                               */
    ZC_E_HEADER_CRC = -2,    /* header checksum mismatch                                  */
    ZC_E_PAYLOAD_CRC = -3,   /* payload (or block) checksum mismatch                      */
    ZC_E_BAD_RECORD = -4,    /* header fields out of range, unknown type or flags         */
    ZC_E_ALIGNMENT = -5,     /* offset or length not a multiple of the sector             */
    ZC_E_NOMEM = -6,         /* allocation failed                                         */
    ZC_E_ORDER = -7,         /* seq not strictly increasing                               */
    ZC_E_RANGE = -8,         /* write beyond the volume's end, unknown volume             */
    ZC_E_IO = -9,            /* a read or write system call failed (errno preserved)      */
    ZC_E_ARG = -10,          /* caller passed an invalid argument                         */
    ZC_E_FULL = -20,         /* capture sync or marker: the ring has no room now; drain, retry */
    ZC_E_CLOSED = -21        /* the capture is closed: the write was refused untouched    */
};

#endif
