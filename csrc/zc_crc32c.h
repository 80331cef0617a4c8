/* zc_crc32c.h - CRC32C (Castagnoli), the checksum of every zcore record and index file.
 *
 * Contract: zc_crc32c(crc, buf, len) extends `crc` (0 to start) over `len` bytes at `buf`
 * and returns the new value; zc_crc32c(0, "123456789", 9) == 0xE3069283.  `buf` is only
 * read during the call and may be NULL when len == 0.  Uses the SSE4.2 instruction when
 * the CPU has it (detected once), a table otherwise.  Thread-safe; never fails.
 */
#ifndef ZC_CRC32C_H
#define ZC_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t zc_crc32c(uint32_t crc, const void *buf, size_t len);

/* CRC32C (from 0) of each consecutive `block`-byte piece of buf[0..len) into out[i]; the
 * last piece may be shorter.  `block` must be a positive multiple of 8.  Same values as
 * calling zc_crc32c per piece, computed several pieces at a time. */
void zc_crc32c_blocks(const void *buf, size_t len, size_t block, uint32_t *out);

#endif
