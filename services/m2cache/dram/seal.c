// A batch of sealed Redis values opened in one C call (dataplane.open_joined): for each
// value `tag[16] | crc32c[4] | record`, the tag must be HMAC-SHA256(key, redis key | crc |
// record)[:16] (dataplane.RecordSeal, RFC 2104); the records are copied into the caller's
// rows (or back to back) and their CRCs into `crcs`. The key's inner and outer SHA-256 states are
// computed once per call, so a value costs its hashing (OpenSSL's SHA-256, SHA-NI where the
// CPU has it) and a copy, not a Python loop. Values arrive as pointers (no joined copy), keys
// joined: every key of a batch has one length (prefix | model | layer, precision, neuron).
#define OPENSSL_SUPPRESS_DEPRECATED  // SHA256_Init/Update/Final: the low-level calls, still in 3.x
#include <openssl/sha.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../codec/crc32c.h"

#define TAG 16
#define HEADER 20
#define BLOCK 64

int m2seal_abi_version(void) { return 4; }

#if M2_CRC32C
// 1: m2seal_open checks each record against its CRC-32C when asked (else the caller does)
int m2seal_crc_supported(void) { return 1; }
#define crc32c m2_crc32c
#else
int m2seal_crc_supported(void) { return 0; }
static uint32_t crc32c(const uint8_t* p, int64_t n) {
    (void)p; (void)n;
    return 0;
}
#endif

// 0: opened; 1: the tag differs; 4: the record differs from its CRC-32C (checked when `check`)
static int open_one(const SHA256_CTX* inner, const SHA256_CTX* outer, const uint8_t* rkey, int64_t rkey_len,
                    const uint8_t* v, int64_t len, uint8_t* to, uint32_t* crc, int check) {
    uint8_t digest[SHA256_DIGEST_LENGTH];
    SHA256_CTX c = *inner;
    SHA256_Update(&c, rkey, (size_t)rkey_len);
    SHA256_Update(&c, v + TAG, (size_t)(len - TAG));  // crc | record
    SHA256_Final(digest, &c);
    c = *outer;
    SHA256_Update(&c, digest, SHA256_DIGEST_LENGTH);
    SHA256_Final(digest, &c);
    uint8_t diff = 0;  // constant time in the tag, as hmac.compare_digest
    for (int k = 0; k < TAG; k++) diff |= (uint8_t)(digest[k] ^ v[k]);
    if (diff) return 1;
    memcpy(crc, v + TAG, 4);  // little-endian, as struct "<I" (x86 and arm64 alike)
    memcpy(to, v + HEADER, (size_t)(len - HEADER));
    if (check && crc32c(to, len - HEADER) != *crc) return 4;
    return 0;
}

// values[i]: value i (value_lens[i] bytes). Its record goes to dest + rows[i] * row_bytes
// when row_bytes > 0 (dense records straight into the caller's rows; every record must be
// exactly row_bytes long), else back to back from dest. Returns -1 when every value opens;
// else the index of the first that does not, with status[0] = 1 (its tag differs), 2 (its
// length is wrong), 3 (no memory for the offsets) or 4 (with check_crc, where
// m2seal_crc_supported: its record differs from its CRC-32C). Large batches run on the
// OpenMP threads.
int64_t m2seal_open(const uint8_t* key, int64_t key_len, const uint8_t* rkeys, int64_t rkey_len,
                    const uint8_t* const* values, const int64_t* value_lens, const int64_t* rows, int64_t n,
                    int64_t row_bytes, uint8_t* dest, uint32_t* crcs, int64_t check_crc, int64_t* status) {
    uint8_t block[BLOCK] = {0}, pad[BLOCK];
    if (key_len > BLOCK)
        SHA256(key, (size_t)key_len, block);
    else
        memcpy(block, key, (size_t)key_len);
    SHA256_CTX inner, outer;
    for (int i = 0; i < BLOCK; i++) pad[i] = block[i] ^ 0x36;
    SHA256_Init(&inner);
    SHA256_Update(&inner, pad, BLOCK);
    for (int i = 0; i < BLOCK; i++) pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&outer);
    SHA256_Update(&outer, pad, BLOCK);
    int64_t* starts = row_bytes > 0 ? NULL : malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (row_bytes == 0 && starts == NULL) {
        status[0] = 3;  // out of memory
        return 0;
    }
    for (int64_t i = 0, at = 0; i < n; i++) {  // lengths first, and where each record goes
        const int64_t len = value_lens[i];
        if (len <= HEADER || (row_bytes > 0 && len - HEADER != row_bytes)) {
            free(starts);
            status[0] = 2;
            return i;
        }
        if (starts) starts[i] = at;
        at += len - HEADER;
    }
    int64_t first_bad = INT64_MAX;  // the first failing value and why: 8 * index + why
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (n >= 64)
    for (int64_t i = 0; i < n; i++) {
        uint8_t* to = row_bytes > 0 ? dest + rows[i] * row_bytes : dest + starts[i];
        const int why = open_one(&inner, &outer, rkeys + i * rkey_len, rkey_len, values[i], value_lens[i], to,
                                 &crcs[i], (int)check_crc);
        if (why && 8 * i + why < first_bad) first_bad = 8 * i + why;
    }
    free(starts);
    if (first_bad != INT64_MAX) {
        status[0] = first_bad % 8;
        return first_bad / 8;
    }
    return -1;
}
