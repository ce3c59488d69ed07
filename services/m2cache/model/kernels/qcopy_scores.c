// Scores of the qcopy predictor (predictors/kinds/qcopy.py), computed from its packed
// rows: out[r, i] = |silu(g) * u| with g = s_g[i] * <x_r, level(gate codes of i)> and u
// likewise. Codes are packed little-end first, 8/bits per byte; level(c) = a*c + b with
// (a, b) = (2, -1) for 1 bit, (1, -1.5) for 2 bits and (1, -8) for 4 bits, so
// <x, level(c)> = a * <x, c> + b * sum(x). Input rows are rounded to int8 per 32 values
// (as the FFN kernel does) and <x, c> runs as u8 x s8 integer dot products on the codes as
// packed, unpacked 32 at a time in registers: nothing is decoded into memory.
// Requires AVX2 and d % 32 == 0 (the caller checks m2q_supported).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

int m2q_abi_version(void) { return 1; }

#ifdef __AVX2__
int m2q_supported(int64_t d, int32_t bits) { return d % 32 == 0 && (bits == 1 || bits == 2 || bits == 4); }

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehl_ps(sh, lo)));
}

// 32 codes of a 32-element group as unsigned bytes, in the order the permuted input uses
static inline __m256i codes32(const uint8_t* p, int bits) {
    if (bits == 1) {  // 4 bytes, element 8k+j at bit j of byte k: natural order
        uint32_t w;
        memcpy(&w, p, 4);
        const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
        __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), idx);
        return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel), _mm256_set1_epi8(1));
    }
    if (bits == 2) {  // 8 bytes, element 4k+j at bits 2j of byte k: planes j = 0..3
        uint64_t w;
        memcpy(&w, p, 8);
        const uint64_t m = 0x0303030303030303ULL;
        return _mm256_setr_epi64x((long long)(w & m), (long long)((w >> 2) & m), (long long)((w >> 4) & m),
                                  (long long)((w >> 6) & m));
    }
    // 4 bits: 16 bytes, element 2k+j at bits 4j of byte k: low nibbles, then high
    const __m128i m = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128((const __m128i*)p);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// the position of element i of a 32-group in the order codes32 hands out
static inline int slot_of(int i, int bits) {
    if (bits == 1) return i;
    if (bits == 2) return (i % 4) * 8 + i / 4;
    return (i % 2) * 16 + i / 2;
}

static void quantize(const float* x, int64_t d, int bits, int8_t* q, float* s, float* total) {
    float tot = 0.f;
    for (int64_t g = 0; g < d / 32; g++) {
        const float* xg = x + 32 * g;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xg[i]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f, sc = amax / 127.f;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            const int v = (int)lrintf(xg[i] * inv);
            q[32 * g + slot_of(i, bits)] = (int8_t)v;
            sum += v;
        }
        s[g] = sc;
        tot += sc * (float)sum;
    }
    *total = tot;  // sum of the rounded input
}

// <xq, codes> of a gate row and an up row together, in float (int8 input groups scaled
// back): the two rows' dependency chains interleave
static inline void row_dots(const uint8_t* gate, const uint8_t* up, int64_t d, int bits, const int8_t* q,
                            const float* s, float* g_out, float* u_out) {
    const int64_t nx = d / 32, gb = 32 * bits / 8;  // bytes per group
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 ag = _mm256_setzero_ps(), au = _mm256_setzero_ps();
    for (int64_t g = 0; g < nx; g++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
        const __m256 sv = _mm256_set1_ps(s[g]);
        const __m256i pg = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(gate + g * gb, bits), xv), ones);
        const __m256i pu = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(up + g * gb, bits), xv), ones);
        ag = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pg), sv, ag);
        au = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pu), sv, au);
    }
    *g_out = hsum8(ag);
    *u_out = hsum8(au);
}

// the same for four consecutive neurons (gate and up rows i..i+3) against one input row:
// eight independent accumulator chains share each input group's load
static inline void row_dots4(const uint8_t* gate, const uint8_t* up, int64_t rowb, int64_t d, int bits,
                             const int8_t* q, const float* s, float g_out[4], float u_out[4]) {
    const int64_t nx = d / 32, gb = 32 * bits / 8;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 ag[4], au[4];
    for (int k = 0; k < 4; k++) ag[k] = au[k] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nx; g++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
        const __m256 sv = _mm256_set1_ps(s[g]);
        for (int k = 0; k < 4; k++) {
            const __m256i pg = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(gate + k * rowb + g * gb, bits), xv), ones);
            const __m256i pu = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(up + k * rowb + g * gb, bits), xv), ones);
            ag[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pg), sv, ag[k]);
            au[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pu), sv, au[k]);
        }
    }
    for (int k = 0; k < 4; k++) {
        g_out[k] = hsum8(ag[k]);
        u_out[k] = hsum8(au[k]);
    }
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// x [R, d] float32; gate/up codes [F, d*bits/8] uint8, scales fp16 [F]; out [R, F] float32.
// ws: float workspace of R*(d + d/32 + 1) floats.
void m2q_scores(const float* x, int64_t R, int64_t d, const uint8_t* gate, const uint16_t* gs,
                const uint8_t* up, const uint16_t* us, int64_t F, int32_t bits, float* out, float* ws,
                int32_t nthreads) {
    const float a = bits == 1 ? 2.f : 1.f, b = bits == 1 ? -1.f : (bits == 2 ? -1.5f : -8.f);
    const int64_t rowb = d * bits / 8, nx = d / 32;
    int8_t* q = (int8_t*)ws;                      // [R, d]
    float* s = ws + (R * d + 3) / 4;              // [R, nx]
    float* tot = s + R * nx;                      // [R]
    for (int64_t r = 0; r < R; r++) quantize(x + r * d, d, bits, q + r * d, s + r * nx, tot + r);
    const int64_t F4 = F / 4;  // neurons in fours (the same sums, in the same order, as one at a time)
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i4 = 0; i4 < F4 + (F % 4); i4++) {
        const int64_t i = i4 < F4 ? 4 * i4 : 4 * F4 + (i4 - F4), n = i4 < F4 ? 4 : 1;
        for (int64_t r = 0; r < R; r++) {
            float gd[4], ud[4];
            if (n == 4) row_dots4(gate + i * rowb, up + i * rowb, rowb, d, bits, q + r * d, s + r * nx, gd, ud);
            else row_dots(gate + i * rowb, up + i * rowb, d, bits, q + r * d, s + r * nx, gd, ud);
            for (int64_t k = 0; k < n; k++) {
                const float sg = half_to_float(gs[i + k]), su = half_to_float(us[i + k]);
                const float g = sg * (a * gd[k] + b * tot[r]), u = su * (a * ud[k] + b * tot[r]);
                out[r * F + i + k] = fabsf(g / (1.f + expf(-g)) * u);
            }
        }
    }
}
#else
int m2q_supported(int64_t d, int32_t bits) { (void)d; (void)bits; return 0; }
void m2q_scores(void) {}
#endif
