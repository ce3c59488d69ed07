// A scattered batch of fixed-size records (a cache's misses) read in a C loop (the
// GIL released by ctypes), straight into the destination: no covering-range copy, no
// mapping in the resident set, no Python per record. Records at most `max_gap` bytes
// apart (ascending, not overlapping) share one pread into a stack buffer and are
// copied out (a syscall costs more than a few KiB of copy); the others get one pread
// each. Short reads are retried; out[0] is -1, or the first record the file ends in
// (out[1]: errno, or 0 at the end of the file). segments.RecordFile.read_records
// splits large batches across its I/O threads, one call each.
//
// m2r_pread_resident is the same loop with preadv2(RWF_NOWAIT): only what the page
// cache holds is copied, nothing waits on the device. present[k] is set for each record
// wholly read; out[0] counts them, out[1] is an errno other than EAGAIN (EOPNOTSUPP: the
// kernel or file system has no RWF_NOWAIT), else 0.
//
// m2r_read_checked is a store's whole read of a cache's scattered misses in one call:
// the records of ascending neuron ids of one segment, read as m2r_pread_records reads
// them, then each checked against the segment's CRC-32C table (three records at once),
// so the caller pays one ctypes call where it paid a dozen numpy and Python steps.
// m2r_resident_checked is its page-cache-only twin (m2r_pread_resident's loop): only the
// records the page cache holds are read and checked, and marked in `present`.
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../codec/crc32c.h"

#define RUN_BYTES (64 << 10)  // one pread covers at most this much

int m2r_abi_version(void) { return 5; }

// bytes read into buf (fewer only at the end of the file), or -errno
static int64_t read_full(int fd, uint8_t* buf, int64_t len, int64_t off) {
    int64_t done = 0;
    while (done < len) {
        const ssize_t got = pread(fd, buf + done, (size_t)(len - done), (off_t)(off + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -errno;
        if (got == 0) break;
        done += got;
    }
    return done;
}

// the last record of the run that starts at record i: ascending neighbours at most
// max_gap apart, the run at most RUN_BYTES long
static int64_t run_last(const int64_t* offsets, int64_t i, int64_t n, int64_t size, int64_t max_gap) {
    int64_t j = i, end = offsets[i] + size;
    while (j + 1 < n && offsets[j + 1] >= end && offsets[j + 1] - end <= max_gap &&
           offsets[j + 1] + size - offsets[i] <= RUN_BYTES)
        end = offsets[++j] + size;
    return j;
}

void m2r_pread_records(int32_t fd, const int64_t* offsets, int64_t n, int64_t size, int64_t max_gap, uint8_t* dest,
                       int64_t* out) {
    uint8_t run[RUN_BYTES];
    out[0] = -1;
    out[1] = 0;
    for (int64_t i = 0; i < n;) {
        const int64_t j = run_last(offsets, i, n, size, max_gap), end = offsets[j] + size;
        const int direct = j == i;
        uint8_t* buf = direct ? dest + i * size : run;
        const int64_t got = read_full(fd, buf, end - offsets[i], offsets[i]);
        if (got < end - offsets[i]) {  // name the first record not wholly read
            int64_t k = i;
            while (got >= 0 && k < j && offsets[k] + size - offsets[i] <= got) k++;
            out[0] = k;
            out[1] = got < 0 ? -got : 0;
            return;
        }
        if (!direct)
            for (int64_t k = i; k <= j; k++) memcpy(dest + k * size, run + (offsets[k] - offsets[i]), (size_t)size);
        i = j + 1;
    }
}

// records [i, j] start at offsets[i..j]; the run's first `got` bytes were read
static int64_t mark_read(const int64_t* offsets, int64_t i, int64_t j, int64_t size, int64_t got, uint8_t* present) {
    int64_t k = i;
    for (; k <= j && offsets[k] + size - offsets[i] <= got; k++) present[k] = 1;
    return k - i;
}

void m2r_pread_resident(int32_t fd, const int64_t* offsets, int64_t n, int64_t size, int64_t max_gap, uint8_t* dest,
                        uint8_t* present, int64_t* out) {
    uint8_t run[RUN_BYTES];
    out[0] = 0;
    out[1] = 0;
    for (int64_t i = 0; i < n;) {
        const int64_t j = run_last(offsets, i, n, size, max_gap), end = offsets[j] + size;
        const int direct = j == i;
        uint8_t* buf = direct ? dest + i * size : run;
        struct iovec iov = {buf, (size_t)(end - offsets[i])};
        ssize_t got;
        do got = preadv2(fd, &iov, 1, (off_t)offsets[i], RWF_NOWAIT);
        while (got < 0 && errno == EINTR);
        if (got < 0 && errno != EAGAIN) {
            out[1] = errno;
            return;
        }
        if (got > 0) {
            const int64_t k = mark_read(offsets, i, j, size, got, present);
            out[0] += k;
            if (!direct)
                for (int64_t r = i; r < i + k; r++)
                    memcpy(dest + r * size, run + (offsets[r] - offsets[i]), (size_t)size);
        }
        i = j + 1;
    }
}

// Runs of consecutive ids in ids[0..n) (ascending, in [0, num_ids)), or -1 where they are not.
static int64_t count_runs(const int64_t* ids, int64_t n, int64_t num_ids) {
    int64_t runs = n > 0;
    for (int64_t k = 0; k < n; k++) {
        if (ids[k] < 0 || ids[k] >= num_ids || (k && ids[k] <= ids[k - 1])) return -1;
        if (k && ids[k] != ids[k - 1] + 1) runs++;
    }
    return runs;
}

// File offsets of the ids' records (malloc'd; NULL: out of memory, out[0] = 0 and out[1] = ENOMEM)
static int64_t* record_offsets(int64_t base, const int64_t* ids, int64_t n, int64_t size, int64_t* out) {
    int64_t* offsets = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (!offsets) {
        out[0] = 0;
        out[1] = ENOMEM;
        return NULL;
    }
    for (int64_t k = 0; k < n; k++) offsets[k] = base + ids[k] * size;
    return offsets;
}

// The first row k (present[k] set, or every row where present is NULL) whose record
// differs from crcs[ids[k]]: -1 none, -2 not checked (no CRC32 instruction in this build).
// Every row (present NULL: all read): three records at once (three independent CRC chains).
static int64_t first_bad(const uint8_t* dest, const int64_t* ids, int64_t n, int64_t size, const uint32_t* crcs,
                         const uint8_t* present) {
#if M2_CRC32C
    int64_t k = 0;
    if (!present) {
        uint32_t got[3];
        for (; k + 3 <= n; k += 3) {
            m2_crc32c_x3(dest + k * size, dest + (k + 1) * size, dest + (k + 2) * size, size, got);
            for (int r = 0; r < 3; r++)
                if (got[r] != crcs[ids[k + r]]) return k + r;
        }
    }
    for (; k < n; k++)
        if ((!present || present[k]) && m2_crc32c(dest + k * size, size) != crcs[ids[k]]) return k;
    return -1;
#else
    (void)dest; (void)ids; (void)n; (void)size; (void)crcs; (void)present;
    return -2;
#endif
}

// out[0]: -1 read, -2 not taken (ids not ascending or out of [0, num_ids), or the batch is
// mostly contiguous: min_per_run records a run or more on average; nothing read), else the
// first record not wholly read (out[1]: errno, or 0 at the end of the file); out[2]: -1
// every CRC matched (or crcs is NULL), -2 not checked (no CRC32 instruction in this build),
// else the first record whose CRC-32C differs from crcs[ids[k]].
void m2r_read_checked(int32_t fd, int64_t base, const int64_t* ids, int64_t n, int64_t num_ids, int64_t size,
                      int64_t max_gap, int64_t min_per_run, const uint32_t* crcs, uint8_t* dest, int64_t* out) {
    out[0] = -2;
    out[1] = 0;
    out[2] = -1;
    const int64_t runs = count_runs(ids, n, num_ids);
    if (runs < 0 || runs * min_per_run < n) return;
    int64_t* offsets = record_offsets(base, ids, n, size, out);
    if (!offsets) return;
    m2r_pread_records(fd, offsets, n, size, max_gap, dest, out);
    free(offsets);
    if (out[0] < 0 && crcs) out[2] = first_bad(dest, ids, n, size, crcs, NULL);
}

// out[0]: -2 not taken (ids not ascending or out of [0, num_ids); nothing read), else the
// number of records read (present[k] set for each); out[1]: an errno other than EAGAIN
// (EOPNOTSUPP: no RWF_NOWAIT here), else 0; out[2]: as m2r_read_checked's, over the
// records read.
void m2r_resident_checked(int32_t fd, int64_t base, const int64_t* ids, int64_t n, int64_t num_ids, int64_t size,
                          int64_t max_gap, const uint32_t* crcs, uint8_t* dest, uint8_t* present, int64_t* out) {
    out[0] = -2;
    out[1] = 0;
    out[2] = -1;
    if (count_runs(ids, n, num_ids) < 0) return;
    int64_t* offsets = record_offsets(base, ids, n, size, out);
    if (!offsets) return;
    memset(present, 0, (size_t)n);
    m2r_pread_resident(fd, offsets, n, size, max_gap, dest, present, out);
    free(offsets);
    if (!out[1] && crcs && out[0]) out[2] = first_bad(dest, ids, n, size, crcs, out[0] == n ? NULL : present);
}
