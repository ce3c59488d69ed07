"""The DRAM tier's data plane: how records sit in Redis and how they are proven.

Workers read records straight from Redis (one pipelined MGET per layer and
precision), not through a second gRPC hop; the DramTier only decides what is
there (control plane). Every value is sealed by the tier with a keyed MAC, so a
record edited in Redis (even with its CRC fixed up to match) is refused:

    value = tag[16] | crc32c[4, little-endian] | record as stored
    tag   = HMAC-SHA256(mac_key, redis key | crc32c | record)[:16]

The Redis key (prefix | model | ":" | neuron_key) names model, layer, precision
and neuron, so a valid value cannot be replayed under another key. HMAC-SHA256
(SHA-NI on this CPU) measured twice BLAKE2b's speed here; both are keyed MACs.
Redis itself requires a password (``requirepass``); clients authenticate.
A worker opens a whole MGET reply in one C call (``open_joined``, seal.c beside
this file: the key's HMAC states computed once, then a SHA-256 pass and a copy
per value); where seal.c cannot be built (no OpenSSL headers) a Python loop does.

Secrets (the MAC key, the Redis password) come from files named in the
services' configs (``mac_key_file``, ``redis_password_file``); a tier given none
makes random ones at start and hands them to workers over its control plane
(``DataPlane`` RPC), which is as private as the channel to the tier.
"""
from __future__ import annotations

import ctypes
import functools
import hmac
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from m2cache import native
from m2cache.codec.format import neuron_key
from m2cache.errors import ChecksumError, FailedPrecondition

log = logging.getLogger(__name__)

TAG_BYTES = 16
HEADER_BYTES = TAG_BYTES + 4  # tag + crc32c


def read_secret(path: str, what: str) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped); refused when empty or
    readable by others (like ssh keys)."""
    p = Path(path)
    try:
        data = p.read_bytes().strip()
        mode = p.stat().st_mode
    except OSError as err:
        raise FailedPrecondition(f"cannot read the {what} file {path}: {err}") from None
    if not data:
        raise FailedPrecondition(f"the {what} file {path} is empty")
    if mode & 0o077:
        log.warning("the %s file %s is readable by group/others (mode %o)", what, path, mode & 0o777)
    return data


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def redis_key(prefix: bytes, model: str, layer: int, prec: int, neuron: int) -> bytes:
    return prefix + model.encode() + b":" + neuron_key(layer, prec, neuron)


def redis_keys(prefix: bytes, model: str, layer: int, prec: int, neuron_ids: Sequence[int]) -> list[bytes]:
    base = prefix + model.encode() + b":"
    return [base + neuron_key(layer, prec, nid) for nid in neuron_ids]


class BadSeal(ChecksumError):
    """A Redis value whose tag does not match under this key (edited, forged, or sealed
    under a key the DRAM tier has since replaced)."""


class RecordSeal:
    """Seals records for Redis and opens sealed values, with one deployment key."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise FailedPrecondition("the MAC key must be at least 16 bytes")
        self.key = bytes(key)
        self._base = hmac.new(key, digestmod="sha256")

    def _tag(self, rkey: bytes, crc: bytes, record) -> bytes:
        h = self._base.copy()
        h.update(rkey)
        h.update(crc)
        h.update(record)
        return h.digest()[:TAG_BYTES]

    def seal(self, rkey: bytes, record, crc: int) -> bytes:
        """The Redis value of ``record`` (stored form) under ``rkey``."""
        crc_bytes = struct.pack("<I", crc)
        return self._tag(rkey, crc_bytes, record) + crc_bytes + bytes(record)

    def open(self, rkey: bytes, value: bytes) -> tuple[memoryview, int]:
        """(record view, its crc32c) of a sealed value; ChecksumError if the tag does not match."""
        view = memoryview(value)
        if len(view) <= HEADER_BYTES or not hmac.compare_digest(
                view[:TAG_BYTES], self._tag(rkey, view[TAG_BYTES:HEADER_BYTES], view[HEADER_BYTES:])):
            raise BadSeal(f"Redis value {rkey!r} fails its MAC: refused (edited or forged)")
        return view[HEADER_BYTES:], struct.unpack_from("<I", view, TAG_BYTES)[0]


def open_batch(seal: RecordSeal, keys: Sequence[bytes], values: Sequence[bytes | None]
               ) -> tuple[np.ndarray, list[memoryview], np.ndarray]:
    """Positions of the hits [h], their record views, their crc32c [h]; raises
    ChecksumError naming the key of the first value that fails its MAC."""
    pos = [i for i, v in enumerate(values) if v is not None]
    opened = [seal.open(keys[i], values[i]) for i in pos]
    return (np.asarray(pos, dtype=np.int64), [r for r, _ in opened],
            np.asarray([c for _, c in opened], dtype=np.uint32))


def open_joined(seal: RecordSeal, keys: Sequence[bytes], values: Sequence[bytes | None],
                into: np.ndarray | None = None, check_crc: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, bool]:
    """An MGET reply opened at once: positions of the hits [h], their records, each
    record's length [h] and crc32c [h], and whether the records were checked against
    those CRCs here (``check_crc`` and seal.c has hardware CRC; else the caller checks).
    The records are back to back in a uint8 array; or, with ``into`` (uint8
    [len(values), record_bytes]: dense records), written into its rows at the hits'
    positions (None is returned for them). Raises BadSeal naming the key of the first
    value that fails its MAC, ChecksumError for a wrong length or CRC."""
    pos = [i for i, v in enumerate(values) if v is not None]
    lib = _seal_library()
    rkey_len = len(keys[pos[0]]) if pos else 0
    hit_keys = b"".join([keys[i] for i in pos])
    if lib is None or len(hit_keys) != rkey_len * len(pos):  # (every key of a batch has one length)
        return (*_open_in_python(seal, keys, values, into), False)
    checked = check_crc and bool(lib.m2seal_crc_supported())
    hits = [values[i] for i in pos]
    value_lens = np.fromiter(map(len, hits), np.int64, len(hits))
    lengths = value_lens - HEADER_BYTES
    rows = np.asarray(pos, dtype=np.int64)
    records = None if into is not None else np.empty(int(np.maximum(lengths, 0).sum()), np.uint8)
    dest = into if into is not None else records
    crcs = np.empty(len(hits), np.uint32)
    status = np.zeros(1, np.int64)
    bad = lib.m2seal_open(seal.key, len(seal.key), hit_keys, rkey_len, (ctypes.c_char_p * len(hits))(*hits),
                       value_lens.ctypes.data, rows.ctypes.data, len(hits), 0 if into is None else into.shape[1],
                       dest.ctypes.data, crcs.ctypes.data, int(checked), status.ctypes.data)
    if bad >= 0 and status[0] == 3:
        raise MemoryError("seal.c: no memory for a batch's offsets")
    if bad >= 0 and status[0] == 1:
        raise BadSeal(f"Redis value {keys[pos[bad]]!r} fails its MAC: refused (edited or forged)")
    if bad >= 0 and status[0] == 4:
        raise ChecksumError(f"record {describe_key(keys[pos[bad]])} in Redis differs from its CRC-32C")
    if bad >= 0:
        raise ChecksumError(f"Redis value {keys[pos[bad]]!r} has {int(value_lens[bad])} bytes: not a sealed record"
                            + ("" if into is None else f" of {into.shape[1]} bytes"))
    return rows, records, lengths, crcs, checked


def _open_in_python(seal, keys, values, into):
    rows, records, crcs = open_batch(seal, keys, values)
    lengths = np.fromiter(map(len, records), np.int64, len(records))
    if into is None:
        return rows, np.frombuffer(b"".join(records), np.uint8), lengths, crcs
    wrong = np.flatnonzero(lengths != into.shape[1])
    if wrong.size:
        raise ChecksumError(f"Redis value {keys[int(rows[wrong[0]])]!r} has {int(lengths[wrong[0]]) + HEADER_BYTES} "
                            f"bytes: not a sealed record of {into.shape[1]} bytes")
    for row, record in zip(rows.tolist(), records):
        into[row] = np.frombuffer(record, np.uint8)
    return rows, None, lengths, crcs


@functools.cache
def _seal_library():
    """seal.c, or None (no compiler or OpenSSL headers, M2CACHE_KERNELS=torch)."""
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    return native.load(Path(__file__).with_name("seal.c"), "m2seal_abi_version", 4,
                       {"m2seal_open": [ctypes.c_char_p, I64, ctypes.c_char_p, I64, P, P, P, I64, I64, P, P, I64, P],
                        "m2seal_crc_supported": []},
                       libs=("crypto",), restypes={"m2seal_open": I64, "m2seal_crc_supported": ctypes.c_int})


def describe_key(rkey: bytes) -> str:
    """'layer L neuron N PREC' of a Redis record key, for error messages."""
    from m2cache.codec.format import Precision

    try:
        layer, prec, neuron = struct.unpack(">HBI", rkey[-7:])
        return f"layer {layer} neuron {neuron} {Precision(prec).name}"
    except (struct.error, ValueError):
        return repr(rkey)


def env_or_file(path: str, what: str) -> bytes | None:
    """A secret from ``path`` when set, else None."""
    return read_secret(os.path.expanduser(path), what) if path else None
