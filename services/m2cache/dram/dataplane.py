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

Secrets (the MAC key, the Redis password) come from files named in the
services' configs (``mac_key_file``, ``redis_password_file``); a tier given none
makes random ones at start and hands them to workers over its control plane
(``DataPlane`` RPC), which is as private as the channel to the tier.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

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
