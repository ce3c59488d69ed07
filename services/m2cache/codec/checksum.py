"""CRC-32C (Castagnoli) of neuron records at memory speed, with no per-record loop.

Every stored record has its own CRC-32C (recorded at conversion). Verifying a
batch of m records one call at a time costs m Python calls; instead we use that
a CRC is linear over GF(2)::

    crc(A || B) = shift(crc(A), len(B)) ^ crc(B)

where ``shift(c, n)`` runs ``n`` zero bytes through the CRC register (zlib's
``crc32_combine``). So the CRC of a buffer holding records back to back is
predicted from the stored per-record CRCs by a pairwise tree reduction done in
numpy (log2(m) vectorised steps, each a table lookup per byte of the 32-bit
state), and compared with ONE hardware CRC over the whole buffer. Only when
they differ are the records checked one by one, to name the bad one.

The hardware CRC comes from google-crc32c's bundled ``libcrc32c`` called
through ctypes: ctypes releases the GIL and takes any buffer address (the
Python binding accepts only ``bytes``, which would cost a copy), so reader
threads checksum what they just read in parallel.
"""
from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from m2cache import native

POLY = 0x82F63B78  # CRC-32C, reflected


def _load_lib():
    import google_crc32c

    pkg = os.path.dirname(os.path.dirname(google_crc32c.__file__))
    for path in sorted(glob.glob(os.path.join(pkg, "google_crc32c.libs", "libcrc32c*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.crc32c_extend.restype = ctypes.c_uint32
        lib.crc32c_extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return lib
    return None


_LIB = _load_lib()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of a bytes-like object or a C-contiguous numpy array / torch CPU tensor,
    extending ``crc``. Releases the GIL (ctypes) where the bundled library is found."""
    if _LIB is not None:
        arr = _as_array(data)
        if arr.nbytes == 0:
            return crc
        return int(_LIB.crc32c_extend(crc, arr.ctypes.data, arr.nbytes))
    import google_crc32c  # portable fallback: one copy into bytes

    return google_crc32c.extend(crc, bytes(memoryview(data).cast("B")) if not isinstance(data, bytes) else data)


def crc32c_spans(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC-32C of ``buf[starts[i] : starts[i] + lengths[i]]`` for every i -> uint32 [k]:
    one C call for all of them (crc32c_spans.c beside this file), else one library call per span."""
    flat = _as_array(buf).reshape(-1)
    out = np.empty(len(starts), dtype=np.uint32)
    starts64, lengths64 = np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(lengths, np.int64)
    if starts64.size and int((starts64 + lengths64).max()) > flat.size:
        raise ValueError("a span reaches past the end of the buffer")
    spans = _spans_library()
    if spans is not None:
        spans.m2s_crc32c_spans(flat.ctypes.data, starts64.ctypes.data, lengths64.ctypes.data, len(starts64),
                               out.ctypes.data)
        return out
    if _LIB is None:
        raw = flat.tobytes()
        for i, (s, n) in enumerate(zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist())):
            out[i] = crc32c(raw[s : s + n])
        return out
    base = flat.ctypes.data
    fn = _LIB.crc32c_extend
    for i, (s, n) in enumerate(zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist())):
        out[i] = fn(0, base + s, n)
    return out


@lru_cache(maxsize=None)
def _spans_library():
    """crc32c_spans.c (hardware CRC32 instructions), or None where it cannot be used."""
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib = native.load(Path(__file__).with_name("crc32c_spans.c"), "m2s_abi_version", 1,
                      {"m2s_supported": [], "m2s_crc32c_spans": [P, P, P, I64, P]})
    return lib if lib is not None and lib.m2s_supported() else None


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """CRC-32C of every row of a contiguous uint8 [n, record_bytes] array -> uint32 [n]."""
    num, size = rows.shape
    return crc32c_spans(rows, np.arange(num, dtype=np.int64) * size, np.full(num, size, dtype=np.int64))


def _as_array(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        arr = data
    elif hasattr(data, "numpy") and hasattr(data, "is_contiguous"):  # torch tensor (CPU)
        arr = data.numpy()
    else:
        arr = np.frombuffer(data, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("crc32c needs a contiguous buffer")
    return arr


# ---- shift operators: the CRC register after n zero bytes, as byte tables ---------------
def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


@lru_cache(maxsize=None)
def _pow2_operator(bit: int) -> tuple[int, ...]:
    """The 32x32 GF(2) operator (32 columns) of 2**bit zero bytes."""
    if bit == 0:
        one_bit = [POLY] + [1 << (n - 1) for n in range(1, 32)]
        return tuple(_square(_square(_square(one_bit))))  # 8 zero bits
    return tuple(_square(list(_pow2_operator(bit - 1))))


@lru_cache(maxsize=4096)
def _operator(nbytes: int) -> tuple[int, ...]:
    """Operator of ``nbytes`` zero bytes (composition of the power-of-two ones)."""
    mat = [1 << n for n in range(32)]  # identity
    bit = 0
    while nbytes:
        if nbytes & 1:
            op = _pow2_operator(bit)
            mat = [_times(list(op), col) for col in mat]
        nbytes >>= 1
        bit += 1
    return tuple(mat)


@lru_cache(maxsize=4096)
def _tables(op: tuple[int, ...]) -> np.ndarray:
    """[4, 256] uint32: the operator applied to each byte value at each byte position."""
    cols = np.asarray(op, dtype=np.uint32).reshape(4, 8)  # [byte position, bit]
    values = np.arange(256, dtype=np.uint32)
    out = np.zeros((4, 256), dtype=np.uint32)
    for bit in range(8):
        hit = ((values >> bit) & 1).astype(bool)
        out[:, hit] ^= cols[:, bit : bit + 1]
    return out


def _apply(tables: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    return (tables[0][crcs & 0xFF] ^ tables[1][(crcs >> 8) & 0xFF]
            ^ tables[2][(crcs >> 16) & 0xFF] ^ tables[3][crcs >> 24])


def shift(crcs: np.ndarray, nbytes: np.ndarray | int) -> np.ndarray:
    """shift(c_i, n_i) for every i: uint32 [k], byte counts [k] (or one count)."""
    crcs = np.asarray(crcs, dtype=np.uint32)
    counts = np.asarray(nbytes, dtype=np.int64)
    if counts.ndim == 0 or (counts.size and np.all(counts == counts.flat[0])):
        n = int(counts.flat[0]) if counts.size else 0
        return _apply(_tables(_operator(n)), crcs) if n else crcs.copy()
    values, which = np.unique(counts, return_inverse=True)
    if values.size <= 16:  # a few distinct lengths (fixed-size records, pads): one table each
        out = np.empty_like(crcs)
        for k, n in enumerate(values.tolist()):
            sel = which == k
            out[sel] = _apply(_tables(_operator(n)), crcs[sel]) if n else crcs[sel]
        return out
    out = crcs.copy()  # variable lengths (bitmap records): one table per set bit of the counts
    bit = 0
    while True:
        sel = ((counts >> bit) & 1).astype(bool)
        if not (counts >> bit).any():
            return out
        if sel.any():
            out[sel] = _apply(_tables(_pow2_operator(bit)), out[sel])
        bit += 1


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC of A || B from crc(A), crc(B) and len(B)."""
    return int(shift(np.asarray([crc_a], dtype=np.uint32), len_b)[0]) ^ crc_b


def concat(crcs: np.ndarray, lengths: np.ndarray | int) -> int:
    """CRC-32C of records laid back to back, from their own CRCs and lengths
    (one length for fixed-size records): a pairwise tree reduction in numpy."""
    c = np.asarray(crcs, dtype=np.uint32).reshape(1, -1)
    if c.size == 0:
        return 0
    return int(concat_rows(c, np.broadcast_to(np.asarray(lengths, dtype=np.int64), c.shape))[0])


def concat_rows(crcs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row-wise :func:`concat`: uint32 [k, w] CRCs and [k, w] lengths -> [k] CRCs of
    each row's records back to back. Pad rows with (crc 0, length 0): a zero-length
    record with CRC 0 is neutral (shift by 0 bytes, xor 0)."""
    c = np.asarray(crcs, dtype=np.uint32)
    n = np.array(lengths, dtype=np.int64)
    while c.shape[1] > 1:
        pairs = c.shape[1] // 2
        left, right = c[:, 0 : 2 * pairs : 2], c[:, 1 : 2 * pairs : 2]
        right_n = n[:, 1 : 2 * pairs : 2]
        merged = _shift_2d(left, right_n) ^ right
        merged_n = n[:, 0 : 2 * pairs : 2] + right_n
        if c.shape[1] % 2:
            merged, merged_n = np.hstack([merged, c[:, -1:]]), np.hstack([merged_n, n[:, -1:]])
        c, n = merged, merged_n
    return c[:, 0].copy() if c.shape[1] else np.zeros(c.shape[0], np.uint32)


def _shift_2d(crcs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """shift() over [k, p] arrays; fixed-size records (all counts equal but the last
    column, which may hold a carried or padded record) take one table per level."""
    flat_c, flat_n = crcs.reshape(-1), counts.reshape(-1)
    body_n = counts[:, :-1]
    if body_n.size and np.all(body_n == body_n.flat[0]):
        out = np.empty_like(crcs)
        out[:, :-1] = shift(crcs[:, :-1].reshape(-1), int(body_n.flat[0])).reshape(crcs.shape[0], -1)
        out[:, -1] = shift(crcs[:, -1], counts[:, -1])
        return out
    return shift(flat_c, flat_n).reshape(crcs.shape)
