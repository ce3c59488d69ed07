// Half precision to float32 for the kernels beside this file (#include "half.h"):
// F16C's instruction where the build has it, else exact scalar decoding (subnormals,
// infinities and NaN included). m2cache/native.py rebuilds a kernel when this changes.
#ifndef M2CACHE_HALF_H
#define M2CACHE_HALF_H
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#ifdef __F16C__
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (!man) bits = sign;
        else {  // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif
#endif
