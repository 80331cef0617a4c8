/* zc_crc32c.c - CRC32C with a hardware path (x86 SSE4.2, three interleaved streams
 * combined by table-free shifting) and a portable slicing-by-8 fallback. */
#include "zc_crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u /* reflected Castagnoli polynomial */

static uint32_t table[8][256];
static int table_ready;

static void build_table(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int s = 1; s < 8; s++)
            table[s][n] = (table[s - 1][n] >> 8) ^ table[0][table[s - 1][n] & 0xff];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t len)
{
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE))
        build_table();
    while (len && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
              table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
              table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

/* Multiply a in GF(2)[x]/P by x^(8*nbytes)... done by running zero bytes through the
 * software shifter is too slow; instead use the standard "shift by a power" via the
 * table of x^(2^k) powers. */
static uint32_t gf_mult(uint32_t a, uint32_t b)
{
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        if (a & 0x80000000u)
            prod ^= b;
        a <<= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return prod;
}

/* x^(8*n) mod P, reflected, for shifting a CRC over n zero bytes */
static uint32_t xpow8n(size_t n)
{
    uint32_t result = 0x80000000u; /* x^0 */
    uint32_t power = 0x00800000u;  /* x^8 */
    while (n) {
        if (n & 1)
            result = gf_mult(result, power);
        power = gf_mult(power, power);
        n >>= 1;
    }
    return result;
}

#define STRIDE 8192u /* bytes per stream in a three-stream round */
static uint32_t shift_stride;
static int shift_ready;

__attribute__((target("sse4.2"))) static uint32_t crc_hw_serial(uint32_t crc,
                                                                const unsigned char *p,
                                                                size_t len)
{
    uint64_t c = crc;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const unsigned char *p,
                                                         size_t len)
{
    if (len >= 3 * STRIDE) {
        if (!__atomic_load_n(&shift_ready, __ATOMIC_ACQUIRE)) {
            shift_stride = xpow8n(STRIDE);
            __atomic_store_n(&shift_ready, 1, __ATOMIC_RELEASE);
        }
        while (len && ((uintptr_t)p & 7)) {
            crc = _mm_crc32_u8(crc, *p++);
            len--;
        }
        while (len >= 3 * STRIDE) {
            uint64_t a = crc, b = 0, c = 0;
            const unsigned char *pb = p + STRIDE, *pc = p + 2 * STRIDE;
            for (size_t i = 0; i < STRIDE; i += 8) {
                uint64_t wa, wb, wc;
                memcpy(&wa, p + i, 8);
                memcpy(&wb, pb + i, 8);
                memcpy(&wc, pc + i, 8);
                a = _mm_crc32_u64(a, wa);
                b = _mm_crc32_u64(b, wb);
                c = _mm_crc32_u64(c, wc);
            }
            /* crc(A||B||C) = shift(shift(a)^b)^c, each shift over STRIDE zero bytes */
            crc = gf_mult(shift_stride, (uint32_t)a) ^ (uint32_t)b;
            crc = gf_mult(shift_stride, crc) ^ (uint32_t)c;
            p += 3 * STRIDE;
            len -= 3 * STRIDE;
        }
    }
    return crc_hw_serial(crc, p, len);
}
#endif

#if defined(__x86_64__)
/* three whole blocks at once: independent dependency chains keep the CRC unit busy */
__attribute__((target("sse4.2"))) static void crc_hw_blocks3(const unsigned char *p,
                                                              size_t block, uint32_t *out)
{
    uint64_t a = 0xFFFFFFFFu, b = 0xFFFFFFFFu, c = 0xFFFFFFFFu;
    const unsigned char *pb = p + block, *pc = p + 2 * block;
    for (size_t i = 0; i < block; i += 8) {
        uint64_t wa, wb, wc;
        memcpy(&wa, p + i, 8);
        memcpy(&wb, pb + i, 8);
        memcpy(&wc, pc + i, 8);
        a = _mm_crc32_u64(a, wa);
        b = _mm_crc32_u64(b, wb);
        c = _mm_crc32_u64(c, wc);
    }
    out[0] = ~(uint32_t)a;
    out[1] = ~(uint32_t)b;
    out[2] = ~(uint32_t)c;
}
#endif

static int have_hw_crc(void)
{
#if defined(__x86_64__)
    static int have_hw = -1;
    if (have_hw < 0)
        have_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    return have_hw;
#else
    return 0;
#endif
}

void zc_crc32c_blocks(const void *buf, size_t len, size_t block, uint32_t *out)
{
    const unsigned char *p = buf;
    size_t i = 0;
#if defined(__x86_64__)
    if (have_hw_crc())
        for (; (i + 3) * block <= len; i += 3)
            crc_hw_blocks3(p + i * block, block, out + i);
#endif
    for (; i * block < len; i++) {
        size_t n = len - i * block < block ? len - i * block : block;
        out[i] = zc_crc32c(0, p + i * block, n);
    }
}

uint32_t zc_crc32c(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    crc = ~crc;
#if defined(__x86_64__)
    if (have_hw_crc())
        return ~crc_hw(crc, p, len);
#endif
    return ~crc_sw(crc, p, len);
}
