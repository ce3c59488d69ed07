// The sparse mixed-precision FFN, computed straight from neuron records.
//
// A record (codec/format.py) bundles one neuron: nvec vectors of length d
// (SwiGLU: gate row, up row, down column; ReLU/OPT: fc1 row, fc2 column, plus
// the fc1 bias as a float32 prefix), stored as
//   FULL: [bias] elements in the checkpoint dtype (fp32 / fp16 / bf16)
//   INT8: [bias] fp16 scale per vector | int8 [nvec, d]
//   INT4: [bias] fp16 scale per vector and group [nvec, d/group] | nibbles, low first
// The caller hands in, per precision band, the address of each neuron's record
// (HBM cache rows, staging rows or a resident bank) in neuron-id order and an
// optional per-row weight (0 = that batch row did not choose the neuron), so a
// cache hit costs no copy and every path sums in the same order.
//
// Per neuron j and input row r:  a = act(<x_r, v0> [, <x_r, v1>]) * mask[r, j];
//                                 y_r += a * v_last.
// Threads split each band's neurons by neuron id and accumulate into private
// rows, reduced in thread order at the end: a row's result depends only on the
// neurons it chose and the thread count, not on where the records live or on
// what other rows of the batch chose (their neurons add exact zeros).
//
// AVX2 builds (-mavx2 -mfma -mf16c) quantise each input row to int8 per 32
// values (as llama.cpp does for its quantised matmuls) for the INT8 and INT4
// dot products, and use float FMA everywhere else; other builds use scalar code.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include "half.h"
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { P_FULL = 1, P_INT8 = 2, P_INT4 = 3 };
enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
#define RB 4  // input rows per pass over a record (weights stay in L1 across a block)

int m2c_abi_version(void) { return 3; }
#ifdef __AVX2__
int m2c_simd(void) { return 2; }
#else
int m2c_simd(void) { return 0; }
#endif

typedef struct {
    int64_t d;
    int nvec, dt, group, has_bias, relu;
} layout_t;

// int8 copies of the input rows (AVX2 integer dot products); q: natural order,
// qp: each 32-group permuted to [even 16 | odd 16] to meet INT4's nibble order.
typedef struct {
    const int8_t *q, *qp;
    const float* s;     // [R, d/32] scale of each group
    const float* ss;    // [R, d/32] each group's scale times the sum of its codes
} xq_t;


static inline uint16_t rd16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline float elem(const uint8_t* p, int dt, int64_t i) {
    if (dt == DT_F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    uint16_t h = rd16(p + 2 * i);
    if (dt == DT_F16) return f16_to_f32(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline const uint8_t* body_of(const uint8_t* rec, const layout_t* L) { return rec + (L->has_bias ? 4 : 0); }

// ---- scalar path -----------------------------------------------------------------
static float vec_weight(const uint8_t* body, int prec, const layout_t* L, int v, int64_t i) {
    const int64_t d = L->d;
    if (prec == P_FULL) return elem(body + (int64_t)v * d * (L->dt == DT_F32 ? 4 : 2), L->dt, i);
    if (prec == P_INT8) return f16_to_f32(rd16(body + 2 * v)) * (float)((const int8_t*)(body + 2 * L->nvec))[v * d + i];
    const int64_t ng = d / L->group, e = v * d + i;
    const uint8_t b = (body + 2 * L->nvec * ng)[e / 2];
    const int code = (e % 2 ? b >> 4 : b & 15) - 8;
    return f16_to_f32(rd16(body + 2 * (v * ng + i / L->group))) * (float)code;
}

static void dots_scalar(const uint8_t* body, int prec, const layout_t* L, const float* x, int64_t nr, float* out) {
    for (int v = 0; v < L->nvec - 1; v++)
        for (int r = 0; r < nr; r++) {
            float acc = 0.f;
            for (int64_t i = 0; i < L->d; i++) acc += x[r * L->d + i] * vec_weight(body, prec, L, v, i);
            out[v * RB + r] = acc;
        }
}

static void axpy_scalar(const uint8_t* body, int prec, const layout_t* L, const float* a, int64_t nr, float* y) {
    const int v = L->nvec - 1;
    for (int64_t i = 0; i < L->d; i++) {
        const float w = vec_weight(body, prec, L, v, i);
        for (int r = 0; r < nr; r++) y[r * L->d + i] += a[r] * w;
    }
}

#ifdef __AVX2__
// ---- AVX2 path ---------------------------------------------------------------------
static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehl_ps(sh, lo)));
}

static inline __m256 load_full(const uint8_t* p, int dt, int64_t i) {
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 2 * i)));
    if (dt == DT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 2 * i))), 16));
    return _mm256_loadu_ps((const float*)(p + 4 * i));
}

static inline __m256 load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// 32 INT4 codes (16 bytes, low nibble first) minus 8 -> 4 x 8 floats
static inline void load_i4x32(const uint8_t* p, __m256 out[4]) {
    const __m128i m = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    __m128i e0 = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight), e1 = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(e0, e0)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(e1, e1)));
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) {  // 8 int32 sums of 4 products each
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

static void quantize_rows(const float* x, int64_t R, int64_t d, int8_t* q, int8_t* qp, float* s, float* ss) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t g = 0; g < d / 32; g++) {
            const float* xg = x + r * d + 32 * g;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xg[i]));
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t tot = 0;
            for (int i = 0; i < 32; i++) {
                const int v = (int)lrintf(xg[i] * inv);
                q[r * d + 32 * g + i] = (int8_t)v;
                qp[r * d + 32 * g + (i % 2 ? 16 + i / 2 : i / 2)] = (int8_t)v;
                tot += v;
            }
            s[r * (d / 32) + g] = amax / 127.f;
            ss[r * (d / 32) + g] = amax / 127.f * (float)tot;
        }
}

// <x_r, v> for the nin input vectors: out[v * RB + r]. Inlined into callers that pass
// constant nin and nr (the decode case: one row, SwiGLU), so the accumulators live in
// registers; the vectors' chains interleave (v is the inner loop).
static inline __attribute__((always_inline)) void dots_avx2(const uint8_t* body, int prec, const layout_t* L,
                                                            const int nin, const float* x, const int64_t nr,
                                                            float* out, const xq_t* X) {
    const int64_t d = L->d, nx = d / 32;
    __m256 acc[2][RB];
    for (int v = 0; v < 2; v++)
        for (int r = 0; r < RB; r++) acc[v][r] = _mm256_setzero_ps();
    if (prec == P_FULL) {
        const int es = L->dt == DT_F32 ? 4 : 2;
        for (int64_t i = 0; i < d; i += 8)
            for (int v = 0; v < nin; v++) {
                const __m256 w = load_full(body + (int64_t)v * d * es, L->dt, i);
                for (int r = 0; r < nr; r++) acc[v][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * d + i), w, acc[v][r]);
            }
        for (int v = 0; v < nin; v++)
            for (int r = 0; r < nr; r++) out[v * RB + r] = hsum(acc[v][r]);
    } else if (prec == P_INT8) {  // int8 x int8 per 32 values: |w| * sign(x, w) on maddubs
        const int8_t* q = (const int8_t*)(body + 2 * L->nvec);
        for (int64_t g = 0; g < nx; g++)
            for (int v = 0; v < nin; v++) {
                const __m256i w = _mm256_loadu_si256((const __m256i*)(q + v * d + 32 * g));
                const __m256i aw = _mm256_sign_epi8(w, w);
                for (int r = 0; r < nr; r++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i*)(X->q + r * d + 32 * g));
                    const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(aw, _mm256_sign_epi8(xv, w)));
                    acc[v][r] = _mm256_fmadd_ps(p, _mm256_set1_ps(X->s[r * nx + g]), acc[v][r]);
                }
            }
        for (int v = 0; v < nin; v++) {
            const float sw = f16_to_f32(rd16(body + 2 * v));
            for (int r = 0; r < nr; r++) out[v * RB + r] = sw * hsum(acc[v][r]);
        }
    } else {  // INT4: sum(x * (c - 8)) * s = (sum(x * c) - 8 * sum(x)) * s per group
        const int64_t ng = d / L->group, per = L->group / 32;
        const uint8_t* nib = body + 2 * L->nvec * ng;
        const __m128i m = _mm_set1_epi8(15);
        float corr[2][RB] = {{0}};
        for (int64_t g = 0, gx = 0; g < ng; g++) {  // gx: the 32-value block of x
            float sw[2];
            for (int v = 0; v < nin; v++) sw[v] = f16_to_f32(rd16(body + 2 * (v * ng + g)));
            for (int64_t sub = 0; sub < per; sub++, gx++)
                for (int v = 0; v < nin; v++) {
                    const __m128i b = _mm_loadu_si128((const __m128i*)(nib + (v * d + 32 * gx) / 2));
                    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
                    for (int r = 0; r < nr; r++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i*)(X->qp + r * d + 32 * gx));
                        const __m256 f = _mm256_set1_ps(sw[v] * X->s[r * nx + gx]);
                        acc[v][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(codes, xv)), f, acc[v][r]);
                        corr[v][r] += sw[v] * X->ss[r * nx + gx];
                    }
                }
        }
        for (int v = 0; v < nin; v++)
            for (int r = 0; r < nr; r++) out[v * RB + r] = hsum(acc[v][r]) - 8.f * corr[v][r];
    }
}

// y_r += a_r * (last vector), r < nr
static inline __attribute__((always_inline)) void axpy_avx2(const uint8_t* body, int prec, const layout_t* L,
                                                            const float* a, const int64_t nr, float* y) {
    const int64_t d = L->d;
    const int v = L->nvec - 1;
    __m256 av[RB];
    if (prec == P_FULL) {
        const int es = L->dt == DT_F32 ? 4 : 2;
        const uint8_t* p = body + (int64_t)v * d * es;
        for (int r = 0; r < nr; r++) av[r] = _mm256_set1_ps(a[r]);
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 w = load_full(p, L->dt, i);
            for (int r = 0; r < nr; r++)
                _mm256_storeu_ps(y + r * d + i, _mm256_fmadd_ps(av[r], w, _mm256_loadu_ps(y + r * d + i)));
        }
    } else if (prec == P_INT8) {
        const float sw = f16_to_f32(rd16(body + 2 * v));
        const int8_t* q = (const int8_t*)(body + 2 * L->nvec) + (int64_t)v * d;
        for (int r = 0; r < nr; r++) av[r] = _mm256_set1_ps(a[r] * sw);
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 w = load_i8(q + i);
            for (int r = 0; r < nr; r++)
                _mm256_storeu_ps(y + r * d + i, _mm256_fmadd_ps(av[r], w, _mm256_loadu_ps(y + r * d + i)));
        }
    } else {
        const int64_t ng = d / L->group;
        const uint8_t* nib = body + 2 * L->nvec * ng;
        for (int64_t g = 0; g < ng; g++) {
            const float sw = f16_to_f32(rd16(body + 2 * (v * ng + g)));
            for (int r = 0; r < nr; r++) av[r] = _mm256_set1_ps(a[r] * sw);
            for (int64_t i = g * L->group; i < (g + 1) * L->group; i += 32) {
                __m256 w[4];
                load_i4x32(nib + (v * d + i) / 2, w);
                for (int r = 0; r < nr; r++)
                    for (int k = 0; k < 4; k++) {
                        float* yr = y + r * d + i + 8 * k;
                        _mm256_storeu_ps(yr, _mm256_fmadd_ps(av[r], w[k], _mm256_loadu_ps(yr)));
                    }
            }
        }
    }
}
#endif

// ---- one neuron --------------------------------------------------------------------
static void neuron(const uint8_t* rec, int prec, const layout_t* L, const float* x, int64_t R, const float* mask,
                   int64_t n, int64_t j, const xq_t* X, int simd, float* yt) {
    const uint8_t* body = body_of(rec, L);
    float bias = 0.f;
    if (L->has_bias) memcpy(&bias, rec, 4);
    for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int64_t nr = R - r0 < RB ? R - r0 : RB;
        float o[2 * RB], a[RB];
        int any = 0;
#ifdef __AVX2__
        if (simd) {
            xq_t Xr = {0};
            if (X) {
                const int64_t nx = L->d / 32;
                Xr.q = X->q + r0 * L->d; Xr.qp = X->qp + r0 * L->d; Xr.s = X->s + r0 * nx; Xr.ss = X->ss + r0 * nx;
            }
            if (nr == 1 && L->nvec == 3) dots_avx2(body, prec, L, 2, x + r0 * L->d, 1, o, &Xr);  // decode, SwiGLU
            else dots_avx2(body, prec, L, L->nvec - 1, x + r0 * L->d, nr, o, &Xr);
        } else
#endif
            dots_scalar(body, prec, L, x + r0 * L->d, nr, o);
        for (int r = 0; r < nr; r++) {
            const float g = o[r];
            const float act = L->relu ? fmaxf(g + bias, 0.f) : g / (1.f + expf(-g)) * o[RB + r];
            a[r] = mask ? act * mask[(r0 + r) * n + j] : act;
            any |= a[r] != 0.f;
        }
        if (!any) continue;  // ReLU zeros and unchosen rows cost no down projection
#ifdef __AVX2__
        if (simd && nr == 1) axpy_avx2(body, prec, L, a, 1, yt + r0 * L->d);
        else if (simd) axpy_avx2(body, prec, L, a, nr, yt + r0 * L->d);
        else
#endif
            axpy_scalar(body, prec, L, a, nr, yt + r0 * L->d);
    }
}

// bands: desc[DESC * b ...] = {ids, rows, which, base0, base1, n, mask, precision, record bytes}:
// neuron ids[k] (int64, ascending) has its record at row rows[k] of table which[k] (int64,
// or 0: every record in table 0) whose first byte is base0 / base1; mask: float32 [R, n]
// or 0. Part t of nthreads computes the neurons with ids in [t * N / nthreads,
// (t + 1) * N / nthreads) in order, so a row's sum runs in the same order whatever
// other rows chose and wherever the records live.
// y [R, d] float32 is accumulated into. scratch: float32 [nthreads, R, d].
// xq: int8 workspace of at least 2*R*d + 8*R*(d/32) bytes (AVX2 builds), may be 0.
enum { DESC = 9 };

static int64_t lower_bound(const int64_t* ids, int64_t n, int64_t v) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (ids[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

void m2c_neuron_ffn(const float* x, int64_t R, int64_t d, int32_t nbands, const int64_t* desc,
                    int32_t nvec, int32_t dtype, int32_t group, int32_t has_bias, int64_t N,
                    float* y, float* scratch, int8_t* xq, int32_t nthreads) {
    const layout_t L = {d, nvec, dtype, group, has_bias, nvec == 2};
    int simd = 0;
    xq_t X = {0};
    const xq_t* Xp = 0;
#ifdef __AVX2__
    simd = d % 32 == 0 && group % 32 == 0;
    if (simd && xq) {
        const int64_t nx = d / 32;
        int8_t* q = xq;
        int8_t* qp = xq + R * d;
        float* s = (float*)(xq + 2 * R * d);
        float* ss = s + R * nx;
        quantize_rows(x, R, d, q, qp, s, ss);
        X.q = q; X.qp = qp; X.s = s; X.ss = ss;
        Xp = &X;
    }
    if (simd && !Xp) simd = 0;  // integer dot products need the workspace
#endif
    #pragma omp parallel num_threads(nthreads)
    {
        // part p of every band accumulates into scratch[p]; a smaller team than asked
        // takes several parts per thread, so the sums never depend on the team size
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        for (int part = t; part < nthreads; part += T) {
            float* yt = scratch + (int64_t)part * R * d;
            memset(yt, 0, sizeof(float) * (size_t)(R * d));
            for (int b = 0; b < nbands; b++) {
                const int64_t* D = desc + DESC * b;
                const int64_t *ids = (const int64_t*)D[0], *rows = (const int64_t*)D[1], *which = (const int64_t*)D[2];
                const int64_t n = D[5], rb = D[8];
                const uint8_t* base[2] = {(const uint8_t*)D[3], (const uint8_t*)D[4]};
                const float* mask = (const float*)D[6];
                const int prec = (int)D[7];
                const int64_t j0 = lower_bound(ids, n, part * N / nthreads);
                const int64_t j1 = lower_bound(ids, n, (part + 1) * N / nthreads);
                for (int64_t j = j0; j < j1; j++) {
                    const uint8_t* rec = base[which ? which[j] : 0] + rows[j] * rb;
#ifdef __AVX2__
                    if (j + 1 < j1) {  // the next record may start elsewhere: warm it
                        const uint8_t* next = base[which ? which[j + 1] : 0] + rows[j + 1] * rb;
                        for (int64_t k = 0; k < rb && k < 64 * 64; k += 64) _mm_prefetch((const char*)next + k, _MM_HINT_T0);
                    }
#endif
                    neuron(rec, prec, &L, x, R, mask, n, j, Xp, simd, yt);
                }
            }
        }
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < R * d; i++) {
            float s = 0.f;
            for (int u = 0; u < nthreads; u++) s += scratch[(int64_t)u * R * d + i];
            y[i] += s;
        }
    }
}
