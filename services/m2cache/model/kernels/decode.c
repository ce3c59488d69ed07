// Kernels of a lone sequence's decode step (batch 1, one new token): the shapes a
// decoding worker runs every layer of every token, where the torch versions are many
// small ops whose dispatch costs more than their arithmetic, and its GEMVs reach less
// of the memory bandwidth than one OpenMP loop over the rows.
//
// m2d_attention_block: a Llama-family layer's attention block, in one call:
//
//   h   = w_attn_norm * rmsnorm(x)
//   qkv = Wqkv h (+ b);  q, k rotated (RoPE, rotate-half);  k, v written at `pos`
//   o   = Wo softmax(q K^T / sqrt(D)) V (+ b)     (GQA: head j reads kv head j / (H / Hkv))
//   x'  = x + o;  h' = w_ffn_norm * rmsnorm(x')  (the FFN's input)
//
// (no sliding-window mask), replacing ~30 torch ops;
// m2d_dense_ffn: the dense path's FFN (fused [2F, d] gate/up or ReLU fc1, [d, F] down);
// m2d_head: the final norm and the vocabulary projection.
//
// Other shapes keep the torch code (model/layers.py, ffn.py), which these reproduce
// operation for operation:
// x, the weights and the outputs are in the model's dtype W (float32, float16 or
// bfloat16) and every value torch rounds to W (the norms' outputs, the projections,
// the attention output, the residual) is rounded to W here too; the products are
// accumulated in float32, and RoPE, the scores and the KV cache are float32 (the
// CPU attention dtype, layers.attention_dtype).
//
// Threads (OpenMP) split the projections' output rows and the heads.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include "half.h"
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

int m2d_abi_version(void) { return 1; }

// ---- dtype conversion -------------------------------------------------------------
static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x7FFFFFu)) return (uint16_t)((b >> 16) | 0x40);  // NaN
    b += 0x7FFFu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

#ifdef __F16C__
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
static uint16_t f32_to_f16(float f) {  // round to nearest even
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000, a = b & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 : 0));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);  // overflows to inf
    if (a < 0x38800000u) {  // subnormal or zero in fp16
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t man = (a & 0x7FFFFFu) | 0x800000u;
        int shift = 126 - (int)(a >> 23);
        uint32_t h = man >> (shift + 1), rem = man & ((2u << shift) - 1), half = 1u << shift;
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((a >> 13) - (112u << 10)), rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}
#endif

static inline float load1(const void* p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    return dt == DT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

static inline float round_w(float f, int dt) {  // the value torch would hold after .to(W)
    if (dt == DT_F32) return f;
    return dt == DT_F16 ? f16_to_f32(f32_to_f16(f)) : bf16_to_f32(f32_to_bf16(f));
}

static inline void store1(void* p, int dt, int64_t i, float f) {
    if (dt == DT_F32) ((float*)p)[i] = f;
    else ((uint16_t*)p)[i] = dt == DT_F16 ? f32_to_f16(f) : f32_to_bf16(f);
}

// ---- dot product of one weight row (dtype dt) with a float32 vector -----------------
#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load8(const void* p, int dt, int64_t i) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float*)p + i);
    __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dt == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

static float dot(const void* row, int dt, const float* x, int64_t d) {
    int64_t i = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= d; i += 32) {
        a0 = _mm256_fmadd_ps(load8(row, dt, i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8(row, dt, i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8(row, dt, i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8(row, dt, i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(load8(row, dt, i), _mm256_loadu_ps(x + i), a0);
    s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < d; i++) s += load1(row, dt, i) * x[i];
    return s;
}

static float dot_f32(const float* a, const float* b, int64_t n) { return dot(a, DT_F32, b, n); }

// out[r] = round_w(W[r] . x + b[r]) for the rows this thread takes
static void gemv(const void* w, const void* b, int dt, const float* x, int64_t rows, int64_t d, float* out) {
    const size_t es = dt == DT_F32 ? 4 : 2;
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float s = dot((const uint8_t*)w + (size_t)r * d * es, dt, x, d);
        if (b) s += load1(b, dt, r);
        out[r] = round_w(s, dt);
    }
}

// h = round_w(w * round_w(x * rsqrt(mean(x^2) + eps))); x in float32
static void rms_norm(const float* x, const void* w, int dt, int64_t d, float eps, float* h) {
    float ss = 0.f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) h[i] = round_w(load1(w, dt, i) * round_w(x[i] * r, dt), dt);
}

// q/k head vector [D] rotated in place: v * cos + rotate_half(v) * sin
static void rope(float* v, const float* cos, const float* sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// The block. w: model-dtype pointers [wqkv, bqkv|0, wo, bo|0, attn_norm, ffn_norm];
// kcache/vcache: this layer and slot's [Hkv, max_len, D] float32 rows; cos/sin: [D]
// float32 at `pos` (NULL: no RoPE); x [d] in, x_out and h_out [d] out (model dtype);
// work: float32 scratch of (2d + (H + 2Hkv) D + H D + nthreads * (pos + 1)) floats.
void m2d_attention_block(const void* x, void* x_out, void* h_out, const int64_t* w, int32_t dt, int64_t d,
                      int64_t H, int64_t Hkv, int64_t D, float eps, float* kcache, float* vcache,
                      int64_t max_len, int64_t pos, const float* cos, const float* sin, float* work,
                      int32_t nthreads) {
    const void *wqkv = (const void*)w[0], *bqkv = (const void*)w[1], *wo = (const void*)w[2],
               *bo = (const void*)w[3], *attn_norm = (const void*)w[4], *ffn_norm = (const void*)w[5];
    const int64_t L = pos + 1, nqkv = (H + 2 * Hkv) * D, group = H / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    float *xf = work, *h = xf + d, *qkv = h + d, *att = qkv + nqkv, *scores = att + H * D;
    for (int64_t i = 0; i < d; i++) xf[i] = load1(x, dt, i);
    rms_norm(xf, attn_norm, dt, d, eps, h);
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        gemv(wqkv, bqkv, dt, h, nqkv, d, qkv);  // implicit barrier at the end of the loop
        #pragma omp single
        {
            float* q = qkv;
            float* k = qkv + H * D;
            const float* v = k + Hkv * D;
            if (cos) {
                for (int64_t j = 0; j < H; j++) rope(q + j * D, cos, sin, D);
                for (int64_t j = 0; j < Hkv; j++) rope(k + j * D, cos, sin, D);
            }
            for (int64_t j = 0; j < Hkv; j++) {
                memcpy(kcache + (j * max_len + pos) * D, k + j * D, (size_t)D * 4);
                memcpy(vcache + (j * max_len + pos) * D, v + j * D, (size_t)D * 4);
            }
        }
        float* sc = scores + (int64_t)omp_get_thread_num() * L;
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < H; j++) {
            const float* q = qkv + j * D;
            const float* keys = kcache + (j / group) * max_len * D;
            const float* vals = vcache + (j / group) * max_len * D;
            float m = -INFINITY, z = 0.f;
            for (int64_t t = 0; t < L; t++) {
                sc[t] = dot_f32(q, keys + t * D, D) * scale;
                if (sc[t] > m) m = sc[t];
            }
            for (int64_t t = 0; t < L; t++) z += (sc[t] = expf(sc[t] - m));
            float* o = att + j * D;
            for (int64_t e = 0; e < D; e++) o[e] = 0.f;
            for (int64_t t = 0; t < L; t++) {
                const float p = sc[t] / z;
                const float* vt = vals + t * D;
                for (int64_t e = 0; e < D; e++) o[e] += p * vt[e];
            }
            for (int64_t e = 0; e < D; e++) o[e] = round_w(o[e], dt);
        }
        gemv(wo, bo, dt, att, d, H * D, h);  // h now holds the attention output
    }
    for (int64_t i = 0; i < d; i++) xf[i] = round_w(xf[i] + h[i], dt);
    rms_norm(xf, ffn_norm, dt, d, eps, h);
    for (int64_t i = 0; i < d; i++) {
        store1(x_out, dt, i, xf[i]);
        store1(h_out, dt, i, h[i]);
    }
}

// y = W_out act(W_in h + b): SwiGLU (relu 0: W_in is [2F, d], gate rows then up rows,
// act = silu(gate) * up) or ReLU (relu 1: W_in [F, d], bias [F] or NULL); W_out [d, F].
// h, y: [d] model dtype; work: float32 scratch of (d + 2F) floats.
void m2d_dense_ffn(const void* h, void* y, const void* w_in, const void* bias, const void* w_out, int32_t relu,
                   int32_t dt, int64_t d, int64_t F, float* work, int32_t nthreads) {
    float *hf = work, *pre = hf + d;
    for (int64_t i = 0; i < d; i++) hf[i] = load1(h, dt, i);
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        gemv(w_in, bias, dt, hf, relu ? F : 2 * F, d, pre);
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < F; j++) {
            if (relu) pre[j] = pre[j] > 0.f ? pre[j] : 0.f;
            else {
                const float g = pre[j];
                pre[j] = round_w(round_w(g / (1.0f + expf(-g)), dt) * pre[F + j], dt);
            }
        }
        gemv(w_out, NULL, dt, pre, d, F, hf);  // hf now holds y
    }
    for (int64_t i = 0; i < d; i++) store1(y, dt, i, hf[i]);
}

// logits [V] float32 = W (norm ? w_norm * rmsnorm(x) : x), W [V, d]; x, w_norm model dtype;
// the projection is rounded to the model dtype (torch's linear) before widening.
void m2d_head(const void* x, const void* w_norm, float eps, const void* w, int32_t dt, int64_t d, int64_t V,
              float* logits, float* work, int32_t nthreads) {
    float *xf = work, *h = xf + d;
    for (int64_t i = 0; i < d; i++) xf[i] = load1(x, dt, i);
    if (w_norm) rms_norm(xf, w_norm, dt, d, eps, h);
    else memcpy(h, xf, (size_t)d * 4);
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    gemv(w, NULL, dt, h, V, d, logits);
}
