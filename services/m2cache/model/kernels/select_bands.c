// Precision bands of one row of importance scores (predictors/bands.py, the decode
// path: every layer of every token). The e1 highest scores go to FULL, the next
// e2 - e1 to INT8, the next e3 - e2 to INT4; each band's ids are written in
// ascending order, back to back: out[0, e1) FULL, [e1, e2) INT8, [e2, e3) INT4.
// NaN ranks above everything (as torch.topk orders it). Exactly tied scores at a
// band edge are split by a deterministic order, as sorting would split them by
// its own.
//
// Selection of the three thresholds on order-preserving integer keys (radix selection,
// 11 + 11 + 10 bits: a histogram of every key's top bits shared by the three, then
// histograms over the keys left in each chosen bin), then one pass over the ids: O(n),
// no sort. Exactly tied keys at a threshold are taken lowest id first.
// work: int64 [n] scratch (the keys and one threshold's candidates, uint32 each).
#include <stdint.h>
#include <string.h>

int m2b_abi_version(void) { return 1; }

// higher score -> higher key; NaN above everything (torch.topk's order)
static inline uint32_t key(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    if (v != v) return 0xFFFFFFFFu;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static const int SHIFT[3] = {21, 10, 0}, WIDTH[3] = {11, 11, 10};

// k in [1, n]: *t = the k-th largest key, *q = how many keys equal to *t are among the k
// largest. Radix selection, 11 + 11 + 10 bits: top is the histogram of every key's top
// bits (shared by every k); each later pass runs over the keys left in the chosen bin,
// compacted into cand.
static void kth_largest(const uint32_t* u, int64_t n, int64_t k, const int32_t* top, uint32_t* cand,
                        uint32_t* t, int64_t* q) {
    int64_t above = 0;  // keys known to be greater than the threshold
    uint32_t prefix = 0;
    const uint32_t* src = u;
    int64_t m = n;
    int32_t hist[1 << 11];
    for (int p = 0; p < 3; p++) {
        const int nb = 1 << WIDTH[p];
        const int32_t* h = top;
        if (p > 0) {
            memset(hist, 0, sizeof(int32_t) * (size_t)nb);
            for (int64_t i = 0; i < m; i++) hist[(src[i] >> SHIFT[p]) & (uint32_t)(nb - 1)]++;
            h = hist;
        }
        int b = nb - 1;
        while (above + h[b] < k) above += h[b--];
        prefix |= (uint32_t)b << SHIFT[p];
        if (p < 2) {  // keep the bin's keys for the next pass
            int64_t kept = 0;
            for (int64_t i = 0; i < m; i++) {
                const uint32_t v = src[i];
                cand[kept] = v;
                kept += ((v >> SHIFT[p]) & (uint32_t)(nb - 1)) == (uint32_t)b;
            }
            src = cand;
            m = kept;
        }
    }
    *t = prefix;
    *q = k - above;
}

void m2b_bands(const float* scores, int64_t n, int64_t e1, int64_t e2, int64_t e3, int64_t* out, int64_t* work) {
    uint32_t* u = (uint32_t*)work;
    uint32_t* cand = u + n;
    int32_t top[1 << 11];  // WIDTH[0] bits
    memset(top, 0, sizeof top);
    for (int64_t i = 0; i < n; i++) {
        u[i] = key(scores[i]);
        top[u[i] >> SHIFT[0]]++;
    }
    const int64_t e[3] = {e1, e2, e3};
    uint32_t t[3];
    int64_t q[3], c[3] = {0, 0, 0};
    for (int j = 0; j < 3; j++) {
        if (e[j] > 0) kth_largest(u, n, e[j], top, cand, &t[j], &q[j]);
        else { t[j] = 0xFFFFFFFFu; q[j] = 0; }  // nothing above, no tie taken
    }
    int64_t at[4] = {0, 0, e1, e2};  // next output position of each band (0: skipped ids, not written)
    int64_t spare;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t v = u[i];
        int in0 = v > t[0], in1 = v > t[1], in2 = v > t[2];
        if (v == t[0] || v == t[1] || v == t[2]) {  // a tie at a threshold: lowest ids first
            if (v == t[0] && c[0] < q[0]) { in0 = 1; c[0]++; }
            if (v == t[1] && c[1] < q[1]) { in1 = 1; c[1]++; }
            if (v == t[2] && c[2] < q[2]) { in2 = 1; c[2]++; }
        }
        const int band = in2 * (3 - in1 - in0);  // nested: in0 implies in1 implies in2
        int64_t* slot = band ? out + at[band] : &spare;
        *slot = (int64_t)i;
        at[band] += band != 0;
    }
}
