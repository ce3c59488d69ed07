"""Sets of neuron ids as bitmaps (LayerUse's ``*_bits``): bit i of byte i // 8, least
significant first, is neuron i. A layer's set costs d_ffn / 8 bytes whatever its size,
and packing or unpacking it is one numpy call, where a list of ids costs a Python
object per id on both sides of the wire."""
from __future__ import annotations

import numpy as np

from m2cache.errors import InvalidArgument


def pack(ids: np.ndarray, d_ffn: int) -> bytes:
    """``ids`` (any order, duplicates allowed, each in [0, d_ffn)) -> the bitmap's bytes."""
    mask = np.zeros(d_ffn, dtype=bool)
    mask[ids] = True
    return np.packbits(mask, bitorder="little").tobytes()


def unpack(bits: bytes, listed, d_ffn: int, what: str) -> np.ndarray:
    """The sorted ids of a bitmap, or of ``listed`` (the repeated field) when ``bits`` is
    empty; InvalidArgument naming ``what`` for an id outside [0, d_ffn)."""
    if not bits:
        ids = np.asarray(listed, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= d_ffn):
            raise InvalidArgument(f"neuron id out of range in {what}: layers have {d_ffn} neurons")
        return ids
    if len(bits) > -(-d_ffn // 8):
        raise InvalidArgument(f"a bitmap of {len(bits)} bytes in {what}: layers have {d_ffn} neurons")
    ids = np.flatnonzero(np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little"))
    if ids.size and ids[-1] >= d_ffn:
        raise InvalidArgument(f"neuron id {int(ids[-1])} out of range in {what}: layers have {d_ffn} neurons")
    return ids
