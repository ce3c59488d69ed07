"""Bitmap sparse record codec (Endor): a pruned neuron record stored as a
bitmap of its non-zero elements plus the packed non-zero elements.

A dense record (codec/format.py) is ``prefix | elements``: the prefix (fc1 bias,
INT8/INT4 scales) is copied verbatim; the elements are the FULL values (16 or
32 bits), INT8 codes or INT4 nibbles. The bitmap form of a record is

    prefix | bitmap: uint64 little-endian [T] | non-zero elements packed, record order

with ``T = ceil(m / 64)`` tiles of 64 elements; bit ``j % 64`` of word ``j // 64``
is set when element ``j`` is non-zero. An element is "zero" when its code is the
codec's zero code (all bits clear for FULL and INT8, code 8 for INT4), so -0.0
and any other bit pattern are kept and the round trip is bit-exact. Packed INT4
elements are nibbles, low first, padded to a whole byte per record.

Per-tile value offsets are not stored: they are a prefix sum of the tiles'
popcounts, computed at decode time. A record is stored as bitmap only where
that is smaller than dense, so the per-record flag is the record's length:
``length == dense bytes`` means dense, ``length < dense bytes`` means bitmap.
Decoding is vectorised over a whole batch of records: a byte -> bits lookup
table expands the bitmaps and a popcount table checks every record's length;
the packed values of all records are pulled out with one prefix-sum mask and
scattered into place with one ``masked_scatter`` (its prefix sum over the flags
is the per-tile offset computation): no Python loop per record or weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from m2cache.codec import quant
from m2cache.codec.format import CODECS, DTYPES, Precision, RecordLayout
from m2cache.errors import ChecksumError

TILE = 64
__all__ = ["CODECS", "ElementSpec", "decode", "decode_bytes", "element_spec", "encode", "length_ok"]
INT4_ZERO = 8  # the INT4 code of 0.0 (codes -7..7 stored as 1..15)
# _BITS[b, k] = bit k of byte b: a bitmap byte -> 8 element flags.
_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [256, 8]
_POPCOUNT = _BITS.sum(dim=1)  # [256] set bits per byte
_INT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


@dataclass(frozen=True, slots=True)
class ElementSpec:
    """Where a dense record keeps its elements: after ``prefix_bytes`` bytes,
    ``num_elements`` elements of ``element_bits`` bits each."""

    prefix_bytes: int
    num_elements: int
    element_bits: int  # 32, 16, 8 or 4
    zero: int  # the element code meaning 0.0

    @property
    def num_tiles(self) -> int:
        return -(-self.num_elements // TILE)

    @property
    def dense_bytes(self) -> int:
        return self.prefix_bytes + -(-self.num_elements * self.element_bits // 8)

    def bitmap_bytes(self, nnz: torch.Tensor) -> torch.Tensor:
        """Bitmap-form size of records with ``nnz`` [N] non-zero elements -> [N]."""
        return self.prefix_bytes + 8 * self.num_tiles + (nnz * self.element_bits + 7) // 8


def element_spec(layout: RecordLayout, prec: Precision) -> ElementSpec:
    """The element layout of ``layout``'s records at ``prec``."""
    m = layout.nvec * layout.d_model
    if prec == Precision.FULL:
        return ElementSpec(layout.bias_bytes, m, 8 * DTYPES[layout.dtype].itemsize, 0)
    if prec == Precision.INT8:
        return ElementSpec(layout.bias_bytes + 2 * layout.nvec, m, 8, 0)
    return ElementSpec(layout.bias_bytes + 2 * (m // layout.int4_group), m, 4, INT4_ZERO)


def length_ok(length: int, dense_bytes: int, codec: str) -> bool:
    """Whether a stored record of ``length`` bytes can be valid under ``codec``."""
    return length == dense_bytes if codec == "dense" else 0 < length <= dense_bytes


# ---- elements <-> bytes ------------------------------------------------------------
def _to_codes(body: torch.Tensor, spec: ElementSpec) -> torch.Tensor:
    """Element bytes [N, nbytes] uint8 -> codes [N, m] (int32/int16/uint8)."""
    if spec.element_bits == 4:
        return quant.unpack_nibbles(body, spec.num_elements)
    return body.contiguous().view(_INT_VIEW[spec.element_bits])


def _to_bytes(codes: torch.Tensor, spec: ElementSpec) -> torch.Tensor:
    """Codes [N, k] -> bytes [N, ceil(k * bits / 8)] uint8 (nibbles low first, 0-padded)."""
    if spec.element_bits == 4:
        return quant.pack_nibbles(codes)
    return codes.contiguous().view(torch.uint8).reshape(codes.shape[0], -1)


# ---- encode (conversion time) ----------------------------------------------------------
def encode(records: torch.Tensor, spec: ElementSpec) -> list[bytes]:
    """Dense records [N, dense_bytes] uint8 -> N stored records: bitmap form where
    it is strictly smaller than dense, else the dense bytes unchanged."""
    num = records.shape[0]
    assert records.shape[1] == spec.dense_bytes, (records.shape, spec)
    codes = _to_codes(records[:, spec.prefix_bytes :], spec)  # [N, m]
    mask = codes != spec.zero  # [N, m]
    nnz = mask.sum(dim=1)  # [N]
    sizes = spec.bitmap_bytes(nnz)  # [N]
    padded = torch.nn.functional.pad(mask, (0, spec.num_tiles * TILE - spec.num_elements))
    bitmap = _pack_bits(padded)  # [N, 8T] uint8
    # Non-zero codes moved to the front of each row, in element order.
    # (slots past a row's count stay 0: the pad nibble of an odd INT4 count is 0)
    packed = torch.zeros_like(codes)
    pos = torch.cumsum(mask, dim=1) - 1  # [N, m] slot of each non-zero element
    packed[mask.nonzero(as_tuple=True)[0], pos[mask]] = codes[mask]
    values = _to_bytes(packed, spec).numpy()  # [N, >= nnz bytes]
    prefix, bits, dense = records[:, : spec.prefix_bytes].numpy(), bitmap.numpy(), records.numpy()
    out = []
    for i in range(num):
        size = int(sizes[i])
        if size >= spec.dense_bytes:
            out.append(dense[i].tobytes())
            continue
        nbytes = size - spec.prefix_bytes - bits.shape[1]
        out.append(prefix[i].tobytes() + bits[i].tobytes() + values[i, :nbytes].tobytes())
    return out


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool [N, 8k] -> uint8 [N, k], element j at bit j % 8 of byte j // 8 (little-endian words)."""
    weights = (1 << torch.arange(8, dtype=torch.int32))  # [8]
    grouped = flags.reshape(flags.shape[0], -1, 8).to(torch.int32)  # [N, k, 8]
    return (grouped * weights).sum(dim=-1).to(torch.uint8)


# ---- decode (the worker, and in-process readers) -----------------------------------------
def decode(payload: torch.Tensor, lengths: torch.Tensor, spec: ElementSpec) -> torch.Tensor:
    """Stored records back to back (payload uint8 [L], lengths [N]) -> dense records
    [N, dense_bytes] uint8, bit-exact. ChecksumError if a record is malformed."""
    lengths = lengths.to(torch.long)
    num, rb = lengths.numel(), spec.dense_bytes
    if int(lengths.sum()) != payload.numel():
        raise ChecksumError(f"payload of {payload.numel()} bytes does not match its {int(lengths.sum())} record bytes")
    if bool(((lengths <= 0) | (lengths > rb)).any()):
        raise ChecksumError(f"record length outside (0, {rb}]: corrupt record")
    starts = torch.cumsum(lengths, 0) - lengths  # [N]
    out = torch.empty((num, rb), dtype=torch.uint8, device=payload.device)
    is_dense = lengths == rb
    if bool(is_dense.any()):
        out[is_dense] = _gather(payload, starts[is_dense], rb)
    sparse = ~is_dense
    if bool(sparse.any()):
        out[sparse] = _decode_bitmap(payload, starts[sparse], lengths[sparse], spec)
    return out


def _gather(payload: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """payload[starts[i] : starts[i] + width] for every i -> [K, width]."""
    return payload[starts.unsqueeze(1) + torch.arange(width, device=payload.device)]


def _decode_bitmap(payload: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   spec: ElementSpec) -> torch.Tensor:
    """Bitmap-form records -> dense records [K, dense_bytes]."""
    num, m, map_bytes = starts.numel(), spec.num_elements, 8 * spec.num_tiles
    dev = payload.device
    prefix = _gather(payload, starts, spec.prefix_bytes)  # [K, P]
    bitmap = _gather(payload, starts + spec.prefix_bytes, map_bytes).long()  # [K, 8T]
    flags = _BITS.to(dev)[bitmap].reshape(num, -1)  # [K, 64T] element j non-zero
    if bool(flags[:, m:].any()):
        raise ChecksumError("bitmap record has bits set past its last element: corrupt record")
    nnz = _POPCOUNT.to(dev)[bitmap].sum(dim=1)  # [K] popcount of each record's tiles
    if bool((spec.bitmap_bytes(nnz) != lengths).any()):
        raise ChecksumError("bitmap record length does not match its popcount: corrupt record")
    codes = _packed_codes(payload, starts + spec.prefix_bytes + map_bytes, lengths - spec.prefix_bytes - map_bytes,
                          nnz, spec)  # [sum nnz]
    dense = torch.full((num, m), spec.zero, dtype=codes.dtype, device=dev)
    dense.masked_scatter_(flags[:, :m], codes)  # row-major: each record's non-zeros in element order
    return torch.cat([prefix, _to_bytes(dense, spec)], dim=1)


def _packed_codes(payload: torch.Tensor, starts: torch.Tensor, nbytes: torch.Tensor, nnz: torch.Tensor,
                  spec: ElementSpec) -> torch.Tensor:
    """Every record's packed non-zero codes, concatenated -> [sum nnz].

    The value regions are marked by +1/-1 at their ends and a prefix sum, so one
    masked select pulls them all out (no per-record loop, no data-dependent index)."""
    edges = torch.zeros(payload.numel() + 1, dtype=torch.int32, device=payload.device)
    edges.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
    edges.index_add_(0, starts + nbytes, -torch.ones_like(starts, dtype=torch.int32))
    flat = torch.masked_select(payload, torch.cumsum(edges, 0)[:-1] > 0)  # [sum nbytes]
    if spec.element_bits != 4:
        return flat.view(_INT_VIEW[spec.element_bits])
    nibbles = torch.stack((flat & 0x0F, flat >> 4), dim=-1).flatten()  # [2 * sum nbytes]
    keep = torch.ones_like(nibbles, dtype=torch.bool)
    keep[(2 * torch.cumsum(nbytes, 0) - 1)[nnz % 2 == 1]] = False  # each odd count's pad nibble
    return torch.masked_select(nibbles, keep)


def decode_bytes(payload: bytes | memoryview, lengths, spec: ElementSpec) -> torch.Tensor:
    """Like :func:`decode`, from raw bytes and a length list (a fetch payload)."""
    buf = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    return decode(buf, torch.as_tensor(np.asarray(lengths, dtype=np.int64)), spec)
