"""INT8 / INT4 quantisers and the neuron record layout (codec/quant.py, codec/format.py)."""
from __future__ import annotations

import pytest
import torch

from m2cache.codec import quant
from m2cache.codec.format import Precision, RecordLayout, int4_group_size
from m2cache.errors import InvalidArgument
from quant_check import assert_int4_bound, assert_int8_bound

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (leading shape, d): odd sizes included; d must admit the INT4 group chosen below.
SHAPES = ((1, 1), (3, 7), (5, 33), (2, 64), (4, 130))
MAGNITUDES = {
    torch.float32: (1e-30, 1e-6, 1.0, 3e2, 1e5),
    torch.float16: (1e-6, 1.0, 3e2, 6e4),
    torch.bfloat16: (1e-30, 1e-6, 1.0, 3e2, 1e5),
}


def _sample(shape, dtype, magnitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * magnitude  # within +-magnitude
    x[..., 0] = magnitude  # the max sits exactly at the magnitude (the clipping edge)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_round_trip_within_bound(dtype, shape):
    for magnitude in MAGNITUDES[dtype]:
        x = _sample(shape, dtype, magnitude)
        q, s = quant.quantize_int8(x)
        assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == shape[:-1]
        assert q.abs().max() <= quant.INT8_QMAX
        assert_int8_bound(x, quant.dequantize_int8(q, s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_round_trip_within_bound(dtype, shape):
    group = int4_group_size(shape[-1])
    for magnitude in MAGNITUDES[dtype]:
        x = _sample(shape, dtype, magnitude, seed=1)
        codes, s = quant.quantize_int4(x, group)
        assert codes.dtype == torch.uint8 and codes.min() >= 1 and codes.max() <= 15
        assert s.shape == (*shape[:-1], shape[-1] // group)
        assert_int4_bound(x, quant.dequantize_int4(codes, s, group), group)


def test_max_value_uses_the_top_code():
    # s is the smallest fp16 >= max|x|/qmax, so the max lands on code +-qmax, not below.
    x = torch.tensor([[0.3, -1.7, 0.9, 0.01]])
    q, _ = quant.quantize_int8(x)
    assert q[0, 1] == -quant.INT8_QMAX
    codes, _ = quant.quantize_int4(x, 4)
    assert codes[0, 1] == 8 - quant.INT4_QMAX


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_vectors_decode_to_zero(dtype):
    x = torch.zeros(3, 32, dtype=dtype)
    q, s = quant.quantize_int8(x)
    assert torch.equal(s, torch.ones(3, dtype=torch.float16))
    assert torch.equal(quant.dequantize_int8(q, s), torch.zeros(3, 32))
    codes, s4 = quant.quantize_int4(x, 8)
    assert torch.equal(quant.dequantize_int4(codes, s4, 8), torch.zeros(3, 32))


@pytest.mark.parametrize("m", (1, 2, 7, 64, 101))
def test_nibble_pack_unpack_round_trip(m):
    codes = torch.randint(0, 16, (3, m), dtype=torch.uint8, generator=torch.Generator().manual_seed(m))
    packed = quant.pack_nibbles(codes)
    assert packed.shape == (3, (m + 1) // 2)
    assert torch.equal(quant.unpack_nibbles(packed, m), codes)


def test_nibble_order_is_low_first():
    packed = quant.pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8))
    assert packed.tolist() == [0x21, 0x0F]


# ---- RecordLayout -------------------------------------------------------------
LAYOUTS = (
    RecordLayout(d_model=64, nvec=3, has_bias=False, dtype="float16", int4_group=32),
    RecordLayout(d_model=33, nvec=3, has_bias=False, dtype="bfloat16", int4_group=1),  # odd nibble count
    RecordLayout(d_model=48, nvec=2, has_bias=True, dtype="float32", int4_group=16),
)


def _neurons(layout, num=5):
    g = torch.Generator().manual_seed(layout.d_model)
    vectors = (torch.randn(num, layout.nvec, layout.d_model, generator=g) * 0.05).to(getattr(torch, layout.dtype))
    bias = torch.randn(num, generator=g) if layout.has_bias else None
    return vectors, bias


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.dtype}-d{l.d_model}-nvec{l.nvec}")
def test_record_layout_full_round_trip_is_exact(layout):
    vectors, bias = _neurons(layout)
    records = layout.encode(vectors, bias, Precision.FULL)
    assert records.shape == (5, layout.num_bytes(Precision.FULL)) and records.dtype == torch.uint8
    w, b = layout.decode(records, Precision.FULL)
    assert w.dtype == torch.float32 and torch.equal(w, vectors.float())
    assert (b is None) == (bias is None) and (b is None or torch.equal(b, bias))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.dtype}-d{l.d_model}-nvec{l.nvec}")
def test_record_layout_quantised_round_trip(layout):
    vectors, bias = _neurons(layout)
    for prec in (Precision.INT8, Precision.INT4):
        records = layout.encode(vectors, bias, prec)
        assert records.shape == (5, layout.num_bytes(prec))
        # decode_bytes on the concatenated payload, as a fetch would deliver it
        w, b = layout.decode_bytes(records.numpy().tobytes(), prec)
        assert w.shape == vectors.shape
        if prec == Precision.INT8:
            assert_int8_bound(vectors, w)
        else:
            assert_int4_bound(vectors, w, layout.int4_group)
        assert (b is None) == (bias is None) and (b is None or torch.equal(b, bias))


def test_record_layout_decodes_a_subset_independently():
    layout = LAYOUTS[0]
    vectors, _ = _neurons(layout)
    records = layout.encode(vectors, None, Precision.INT4)
    w_all, _ = layout.decode(records, Precision.INT4)
    w_two, _ = layout.decode(records[[3, 1]], Precision.INT4)
    assert torch.equal(w_two, w_all[[3, 1]])


def test_decode_bytes_rejects_partial_records():
    layout = LAYOUTS[0]
    with pytest.raises(InvalidArgument, match="whole number"):
        layout.decode_bytes(b"\0" * (layout.num_bytes(Precision.INT8) + 1), Precision.INT8)
