"""Bitmap sparse codec (codec/bitmap.py): bit-exact round trips for every dtype,
precision, shape and sparsity; the size arithmetic; corrupt records refused."""
from __future__ import annotations

import pytest
import torch

from m2cache.codec import bitmap
from m2cache.codec.format import Precision, RecordLayout, int4_group_size
from m2cache.convert.prune import prune_vectors
from m2cache.errors import ChecksumError

DTYPES = ("float32", "float16", "bfloat16")


def _layout(d: int, relu: bool, dtype: str) -> RecordLayout:
    return RecordLayout(d, 2 if relu else 3, relu, dtype, int4_group_size(d))


def _round_trip(records: torch.Tensor, spec: bitmap.ElementSpec) -> tuple[torch.Tensor, list[int]]:
    stored = bitmap.encode(records, spec)
    lengths = [len(s) for s in stored]
    return bitmap.decode_bytes(b"".join(stored), lengths, spec), lengths


@pytest.mark.parametrize("seed", range(12))
def test_round_trip_is_bit_exact_for_random_records(seed):
    """Random d (tile-aligned or not), sparsity in [0, 1] (0 and 1 included),
    every dtype and precision, ReLU and SwiGLU layouts: decode(encode(r)) == r."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(1, 40, (1,), generator=g)) * 2
    num = int(torch.randint(1, 30, (1,), generator=g))
    sparsity = (0.0, 1.0, float(torch.rand(1, generator=g)))[seed % 3]
    relu = bool(seed % 2)
    for dtype in DTYPES:
        layout = _layout(d, relu, dtype)
        vectors = torch.randn(num, layout.nvec, d, generator=g)
        vectors[torch.rand(vectors.shape, generator=g) < sparsity] = 0.0
        bias = torch.randn(num, generator=g) if relu else None
        for prec in Precision:
            records = layout.encode(vectors, bias, prec)  # [num, rb]
            spec = bitmap.element_spec(layout, prec)
            out, lengths = _round_trip(records, spec)
            assert torch.equal(out, records), (seed, dtype, prec)
            assert max(lengths) <= layout.num_bytes(prec)


@pytest.mark.parametrize("bits,zero", [(32, 0), (16, 0), (8, 0), (4, 8)])
def test_round_trip_of_raw_codes_with_mixed_rows(bits, zero):
    """Arbitrary element codes (NaN/-0.0 patterns, INT8/INT4 codes), rows from all
    zero to fully dense in one batch, so dense and bitmap records mix."""
    g = torch.Generator().manual_seed(bits)
    m, num = 100, 24
    spec = bitmap.ElementSpec(prefix_bytes=6, num_elements=m, element_bits=bits, zero=zero)
    high = {32: 2**31, 16: 2**15, 8: 256, 4: 16}[bits]
    codes = torch.randint(-high if bits >= 16 else 0, high, (num, m), generator=g)
    density = torch.linspace(0, 1, num).unsqueeze(1)  # row i keeps ~i/num of its elements
    codes = torch.where(torch.rand(num, m, generator=g) < density, codes, torch.full_like(codes, zero))
    if bits == 16:
        codes[0, :4] = torch.tensor([-32768, 0x7E00, 0, 1])  # -0.0 and NaN fp16 bit patterns kept as is
    dtype = {32: torch.int32, 16: torch.int16, 8: torch.uint8, 4: torch.uint8}[bits]
    body = bitmap._to_bytes(codes.to(dtype), spec)
    records = torch.cat([torch.randint(0, 256, (num, 6), generator=g, dtype=torch.uint8), body], dim=1)
    out, lengths = _round_trip(records, spec)
    assert torch.equal(out, records)
    assert lengths[0] < spec.dense_bytes and lengths[-1] == spec.dense_bytes  # sparse row compressed, dense kept


def test_fp16_half_sparse_record_is_nine_bits_per_weight():
    """50% of every vector pruned, FULL fp16: 16 * 0.5 + 1 = 9 bits per weight (<= 0.57x dense)."""
    layout = _layout(256, False, "float16")
    vectors = prune_vectors(torch.randn(64, 3, 256).half(), 0.5)
    spec = bitmap.element_spec(layout, Precision.FULL)
    stored = bitmap.encode(layout.encode(vectors, None, Precision.FULL), spec)
    ratios = {len(s) / layout.num_bytes(Precision.FULL) for s in stored}
    assert ratios == {9 / 16}


def test_negative_zero_survives_and_only_positive_zero_is_dropped():
    layout = _layout(64, False, "float32")
    vectors = torch.zeros(1, 3, 64)
    vectors[0, 0, :3] = torch.tensor([-0.0, 1.5, -2.0])
    records = layout.encode(vectors, None, Precision.FULL)
    spec = bitmap.element_spec(layout, Precision.FULL)
    (stored,) = bitmap.encode(records, spec)
    assert len(stored) == 8 * 3 + 3 * 4  # three tiles of bitmap + three kept values, -0.0 among them
    out, _ = _round_trip(records, spec)
    decoded, _ = layout.decode(out, Precision.FULL)
    assert torch.signbit(decoded[0, 0, 0]) and decoded[0, 0, 1] == 1.5


def test_corrupt_bitmap_records_are_refused():
    layout = _layout(64, True, "float16")
    vectors = prune_vectors(torch.randn(4, 2, 64).half(), 0.5)
    spec = bitmap.element_spec(layout, Precision.FULL)
    stored = bitmap.encode(layout.encode(vectors, torch.randn(4), Precision.FULL), spec)
    lengths = [len(s) for s in stored]
    flipped = bytearray(stored[1])
    flipped[spec.prefix_bytes] ^= 0x01  # one more (or one fewer) non-zero: popcount no longer matches
    bad = [stored[0], bytes(flipped)] + stored[2:]
    with pytest.raises(ChecksumError, match="popcount"):
        bitmap.decode_bytes(b"".join(bad), lengths, spec)
    with pytest.raises(ChecksumError, match="does not match"):
        bitmap.decode_bytes(b"".join(stored)[:-1], lengths, spec)
    with pytest.raises(ChecksumError, match="length outside"):
        bitmap.decode_bytes(b"".join(stored) + bytes(1000), lengths[:-1] + [lengths[-1] + 1000], spec)


def test_stray_bits_past_the_last_element_are_refused():
    spec = bitmap.ElementSpec(prefix_bytes=0, num_elements=70, element_bits=8, zero=0)
    records = torch.zeros(1, 70, dtype=torch.uint8)
    records[0, 3] = 9
    (stored,) = bitmap.encode(records, spec)
    bad = bytearray(stored)
    bad[15] |= 0x80  # bit 127: element 127 of a 70-element record
    with pytest.raises(ChecksumError, match="past its last element"):
        bitmap.decode_bytes(bytes(bad), [len(bad)], spec)
