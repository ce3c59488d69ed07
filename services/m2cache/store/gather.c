// A small scattered batch of fixed-size records (a cache's misses) read with one
// pread per record in a C loop (the GIL released by ctypes), straight into the
// destination: no covering-range copy, no mapping in the resident set, no Python per
// record. Short reads are retried; out[0] is -1, or the first record the file ends in.
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

int m2r_abi_version(void) { return 1; }

void m2r_pread_records(int32_t fd, const int64_t* offsets, int64_t n, int64_t size, uint8_t* dest, int64_t* out) {
    out[0] = -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t done = 0;
        while (done < size) {
            const ssize_t got = pread(fd, dest + i * size + done, (size_t)(size - done), (off_t)(offsets[i] + done));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                out[0] = i;
                out[1] = got < 0 ? errno : 0;
                return;
            }
            done += got;
        }
    }
}
