// The HBM neuron cache's per-layer bookkeeping (worker/neuron_cache.py, PrecisionSlots)
// in two calls per layer and precision, instead of ~20 torch ops:
//
//   m2k_lookup: rows of the step's neurons (-1 = miss), their last use set to this
//               step (inside the window now), the misses' ids and positions;
//   m2k_admit:  rows for as many misses as the window allows (free rows first in row
//               order, then least recently used neurons outside the window, ties in
//               row order), the fetched records copied into them (CPU records), and
//               the band's rows/which fixed up (admitted: the new row; the surplus:
//               its row in the fetched table, which = 1).
//
// Same semantics as the torch code, which stays for other devices. The tables
// (row_of, neuron_at, last_used) are int64 CPU tensors on every device.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int m2k_abi_version(void) { return 2; }

// out[0]: number of misses, or -1 - k when ids[k] is not a neuron id (nothing changed)
void m2k_lookup(const int64_t* ids, int64_t n, int64_t num_neurons, const int64_t* row_of, int64_t* last_used,
                int64_t step, int64_t* rows, int64_t* miss_ids, int64_t* miss_pos, int64_t* out) {
    for (int64_t k = 0; k < n; k++)
        if (ids[k] < 0 || ids[k] >= num_neurons) {
            out[0] = -1 - k;
            return;
        }
    int64_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        const int64_t id = ids[k], r = row_of[id];
        rows[k] = r;
        last_used[id] = step;
        if (r < 0) {
            miss_ids[m] = id;
            miss_pos[m++] = k;
        }
    }
    out[0] = m;
}

typedef struct {
    int64_t age, row;
} victim_t;

static int by_age_then_row(const void* a, const void* b) {
    const victim_t *x = (const victim_t*)a, *y = (const victim_t*)b;
    if (x->age != y->age) return x->age < y->age ? -1 : 1;
    return x->row < y->row ? -1 : (x->row > y->row);
}

// out[0]: misses admitted; out[1]: neurons evicted. work: 2 * cap int64.
void m2k_admit(const int64_t* miss_ids, const int64_t* miss_pos, int64_t m, int64_t* neuron_at, int64_t* row_of,
               const int64_t* last_used, int64_t cap, int64_t step, int64_t window, int64_t* rows, int64_t* which,
               uint8_t* records, const uint8_t* fetched, int64_t rb, int64_t* work, int64_t* out) {
    int64_t nfree = 0, evicted = 0;
    int64_t* chosen = work;  // rows handed out, in order
    for (int64_t r = 0; r < cap && nfree < m; r++)
        if (neuron_at[r] < 0) chosen[nfree++] = r;
    int64_t take = nfree;
    if (nfree < m) {
        victim_t* cand = (victim_t*)malloc((size_t)cap * sizeof(victim_t));  // NULL: nothing evicted
        int64_t nc = 0;
        const int64_t oldest_kept = step - window;
        for (int64_t r = 0; cand && r < cap; r++) {
            const int64_t nid = neuron_at[r];
            if (nid >= 0 && last_used[nid] <= oldest_kept) cand[nc++] = (victim_t){last_used[nid], r};
        }
        int64_t want = m - nfree;
        qsort(cand, (size_t)nc, sizeof(victim_t), by_age_then_row);  // victims take the misses in this order
        if (want > nc) want = nc;
        for (int64_t i = 0; i < want; i++) {
            const int64_t r = cand[i].row;
            row_of[neuron_at[r]] = -1;
            neuron_at[r] = -1;
            chosen[take++] = r;
        }
        evicted = want;
        free(cand);
    }
    for (int64_t i = 0; i < take; i++) {
        const int64_t r = chosen[i], id = miss_ids[i];
        neuron_at[r] = id;
        row_of[id] = r;
        rows[miss_pos[i]] = r;
        if (records) memcpy(records + r * rb, fetched + i * rb, (size_t)rb);
    }
    for (int64_t i = take; i < m; i++) {  // no room: computed from the fetched table
        rows[miss_pos[i]] = i;
        which[miss_pos[i]] = 1;
    }
    out[0] = take;
    out[1] = evicted;
}
