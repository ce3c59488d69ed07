// CRC-32C (Castagnoli, as google-crc32c computes it) of many spans of one buffer in
// one call: a store verifies each small record it gathered without a Python-level
// call per record. Hardware CRC32 instructions (SSE4.2) where the build has them;
// m2s_supported() is 0 otherwise (the caller keeps its per-span library calls).
#include "crc32c.h"

int m2s_abi_version(void) { return 1; }

#if M2_CRC32C
int m2s_supported(void) { return 1; }

void m2s_crc32c_spans(const uint8_t* base, const int64_t* starts, const int64_t* lengths, int64_t k, uint32_t* out) {
    for (int64_t i = 0; i < k; i++) out[i] = m2_crc32c(base + starts[i], lengths[i]);
}
#else
int m2s_supported(void) { return 0; }
void m2s_crc32c_spans(const uint8_t* base, const int64_t* starts, const int64_t* lengths, int64_t k, uint32_t* out) {
    (void)base; (void)starts; (void)lengths; (void)k; (void)out;
}
#endif
