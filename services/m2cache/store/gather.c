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
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define RUN_BYTES (64 << 10)  // one pread covers at most this much

int m2r_abi_version(void) { return 3; }

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
