// CRC-32C (Castagnoli, as google-crc32c computes it) of many spans of one buffer in
// one call: a store verifies each small record it gathered without a Python-level
// call per record. Hardware CRC32 instructions (SSE4.2) where the build has them;
// m2s_supported() is 0 otherwise (the caller keeps its per-span library calls).
#include <stdint.h>
#include <string.h>
#ifdef __SSE4_2__
#include <nmmintrin.h>
#endif

int m2s_abi_version(void) { return 1; }

#ifdef __SSE4_2__
int m2s_supported(void) { return 1; }

static uint32_t crc32c(const uint8_t* p, int64_t n) {
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

void m2s_crc32c_spans(const uint8_t* base, const int64_t* starts, const int64_t* lengths, int64_t k, uint32_t* out) {
    for (int64_t i = 0; i < k; i++) out[i] = crc32c(base + starts[i], lengths[i]);
}
#else
int m2s_supported(void) { return 0; }
void m2s_crc32c_spans(const uint8_t* base, const int64_t* starts, const int64_t* lengths, int64_t k, uint32_t* out) {
    (void)base; (void)starts; (void)lengths; (void)k; (void)out;
}
#endif
