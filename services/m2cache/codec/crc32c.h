// CRC-32C (Castagnoli, as google-crc32c computes it) with the SSE4.2 CRC32 instruction:
// the one copy the C libraries share (codec/crc32c_spans.c, store/gather.c, dram/seal.c
// include it by relative path; native.py hashes it into their build keys).
// M2_CRC32C is 1 where the build has the instruction, else 0 and the functions are not
// defined (each caller reports that and its Python caller checks the records itself).
#ifndef M2_CRC32C_H
#define M2_CRC32C_H
#include <stdint.h>
#include <string.h>

#ifdef __SSE4_2__
#include <nmmintrin.h>
#define M2_CRC32C 1

static inline uint32_t m2_crc32c(const uint8_t* p, int64_t n) {
    uint64_t c = 0xFFFFFFFFu;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
    }
    uint32_t c32 = (uint32_t)c;
    for (; n > 0; p++, n--) c32 = _mm_crc32_u8(c32, *p);
    return ~c32;
}

// three spans of one length at once: three independent chains keep the CRC unit busy
// (the instruction's latency is 3 cycles, its throughput one a cycle), ~3x one chain
static inline void m2_crc32c_x3(const uint8_t* a, const uint8_t* b, const uint8_t* c, int64_t n, uint32_t* out) {
    uint64_t x = 0xFFFFFFFFu, y = 0xFFFFFFFFu, z = 0xFFFFFFFFu;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t u, v, w;
        memcpy(&u, a + i, 8);
        memcpy(&v, b + i, 8);
        memcpy(&w, c + i, 8);
        x = _mm_crc32_u64(x, u);
        y = _mm_crc32_u64(y, v);
        z = _mm_crc32_u64(z, w);
    }
    uint32_t x32 = (uint32_t)x, y32 = (uint32_t)y, z32 = (uint32_t)z;
    for (; i < n; i++) {
        x32 = _mm_crc32_u8(x32, a[i]);
        y32 = _mm_crc32_u8(y32, b[i]);
        z32 = _mm_crc32_u8(z32, c[i]);
    }
    out[0] = ~x32;
    out[1] = ~y32;
    out[2] = ~z32;
}
#else
#define M2_CRC32C 0
#endif
#endif
