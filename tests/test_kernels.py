"""The sparse FFN kernel (model/kernels): it computes from the stored records
exactly what the arithmetic says, wherever the records live, and a batch row's
result never depends on what the other rows chose."""
from __future__ import annotations

import pytest
import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.model import kernels
from m2cache.model.ffn import Band

N = 96


def _layout(kind: str, d: int, dtype: str) -> RecordLayout:
    from m2cache.codec.format import int4_group_size

    return RecordLayout(d, 3 if kind == "swiglu" else 2, kind == "relu", dtype, int4_group_size(d))


def _case(kind: str, d: int, dtype: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layout = _layout(kind, d, dtype)
    vectors = torch.randn(N, layout.nvec, d, generator=g) * 0.1
    bias = torch.randn(N, generator=g) * 0.1 if kind == "relu" else None
    records = {p: layout.encode(vectors, bias, p) for p in Precision}
    return layout, records


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """x [R, d] as the AVX2 kernel sees it for INT8/INT4 dot products: int8 per 32 values."""
    groups = x.reshape(x.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(groups / torch.where(scale > 0, scale, 1)), 0)
    return (q * scale).reshape(x.shape)


def _exact(x, records, layout, prec, ids, mask=None):
    """float64 FFN over the decoded records (activations quantised where the kernel does)."""
    vectors, bias = layout.decode(records[ids], prec)
    v, xd = vectors.double(), x.double()
    xin = _quantised(x).double() if prec != Precision.FULL and kernels.backend() == "c-avx2" and layout.d_model % 32 == 0 else xd
    pre = xin @ v[:, 0].T
    act = torch.relu(pre + bias.double()) if layout.has_bias else torch.nn.functional.silu(pre) * (xin @ v[:, 1].T)
    if mask is not None:
        act = act * mask.double()
    return act @ v[:, -1]


@pytest.mark.parametrize("kind,d", [("swiglu", 64), ("swiglu", 96), ("relu", 64), ("swiglu", 40)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kernel_equals_the_arithmetic(kind, d, dtype):
    """d 64/96: the AVX2 path (int8 activations for INT8/INT4 dots); d 40 (not a multiple of 32): scalar code."""
    layout, records = _case(kind, d, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, d, generator=g)
    ids = torch.tensor(sorted(torch.randperm(N, generator=g)[:40].tolist()))
    for prec in Precision:
        mask = (torch.rand(5, ids.numel(), generator=g) > 0.3).float()
        y = kernels.neuron_ffn(x, [Band(prec, ids, (records[prec],), ids, mask=mask)], layout, N)
        want = _exact(x, records[prec], layout, prec, ids, mask)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-4)


def test_batch_rows_equal_alone_bitwise_and_sources_do_not_matter():
    layout, records = _case("swiglu", 64, "float16")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, generator=g)
    chosen = [torch.tensor(sorted(torch.randperm(N, generator=g)[:k].tolist())) for k in (10, 50, 90)]
    union = torch.unique(torch.cat(chosen))
    mask = torch.stack([torch.isin(union, c).float() for c in chosen])
    rec = records[Precision.INT4]
    together = kernels.neuron_ffn(x, [Band(Precision.INT4, union, (rec,), union, mask=mask)], layout, N)
    for r, ids in enumerate(chosen):
        alone = kernels.neuron_ffn(x[r : r + 1], [Band(Precision.INT4, ids, (rec,), ids)], layout, N)
        assert torch.equal(together[r], alone[0])
    # the same neurons split over a slot matrix and a staging buffer: the same floats
    ids = chosen[1]
    half = ids.numel() // 2
    slots = torch.zeros(7 + half, rec.shape[1], dtype=torch.uint8)
    slots[7:] = rec[ids[:half]]
    staging = rec[ids[half:]].clone()
    rows = torch.cat([torch.arange(7, 7 + half), torch.arange(ids.numel() - half)])
    which = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(ids.numel() - half, dtype=torch.long)])
    split = kernels.neuron_ffn(x[1:2], [Band(Precision.INT4, ids, (slots, staging), rows, which)], layout, N)
    direct = kernels.neuron_ffn(x[1:2], [Band(Precision.INT4, ids, (rec,), ids)], layout, N)
    assert torch.equal(split, direct)


def test_the_c_kernel_is_built_here():
    """This machine has a C compiler (the CI image too): the fast path must be in use."""
    assert kernels.backend() in ("c-avx2", "c-scalar")


def test_torch_fallback_equals_the_arithmetic():
    layout, records = _case("relu", 64, "float32")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(0, N, 3)
    for prec in Precision:
        y = kernels._torch_neuron_ffn(x, [Band(prec, ids, (records[prec],), ids)], layout)
        vectors, bias = layout.decode(records[prec][ids], prec)
        want = torch.relu(x.double() @ vectors[:, 0].double().T + bias.double()) @ vectors[:, 1].double()
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qcopy_scores_kernel_equals_the_arithmetic(bits):
    """The predictor's packed-code scorer: |silu(g) * u| of the decoded rows on the
    int8-rounded input, without decoding the rows into memory."""
    from m2cache.predictors.kinds.qcopy import QCopyPredictor, dequantize_rows

    g = torch.Generator().manual_seed(bits)
    F, d = 200, 96
    p = QCopyPredictor.from_rows(torch.randn(F, d, generator=g), torch.randn(F, d, generator=g), bits)
    x = torch.randn(3, d, generator=g)
    got = kernels.qcopy_scores(x, p.gate_codes, p.gate_scale, p.up_codes, p.up_scale, bits)
    assert got is not None, "the C kernel runs on this machine"
    xq = _quantised(x).double()
    gate = xq @ dequantize_rows(p.gate_codes, p.gate_scale, bits, d).double().T
    up = xq @ dequantize_rows(p.up_codes, p.up_scale, bits, d).double().T
    want = (torch.nn.functional.silu(gate) * up).abs()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(p.scores(x), got)  # the predictor uses it
