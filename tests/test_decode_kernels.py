"""A lone sequence's decode step in C (model/kernels/decode.c): the Llama attention
block, the dense FFN and the head each equal the torch code they replace (model/
layers.py, ffn.py), in every dtype the model computes in. Generation through them is
compared with transformers token for token in test_model_golden / test_smollm2_golden."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2cache.model import kernels
from m2cache.model.ffn import DenseFFN
from m2cache.model.kv_cache import KVCache
from m2cache.model.layers import AttentionWeights, Heads, RopeTable, attention, rms_norm, rope_inv_freq
from m2cache.model.config import RopeConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# atol per dtype, relative to values of order 1: a few units in the last place of W
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _weights(d: int, H: int, Hkv: int, D: int, dtype, bias: bool, g: torch.Generator):
    w = AttentionWeights(wqkv=(torch.randn((H + 2 * Hkv) * D, d, generator=g) / d**0.5).to(dtype),
                         wo=(torch.randn(d, H * D, generator=g) / (H * D) ** 0.5).to(dtype),
                         bqkv=(0.1 * torch.randn((H + 2 * Hkv) * D, generator=g)).to(dtype) if bias else None)
    norms = [(1 + 0.1 * torch.randn(d, generator=g)).to(dtype) for _ in range(2)]
    return w, norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,bias", [(4, 4, False), (8, 2, True), (9, 3, False)])
def test_attention_block_equals_the_torch_block(dtype, H, Hkv, bias):
    g = torch.Generator().manual_seed(H * 10 + Hkv)
    d, D, eps, history = 96, 32, 1e-5, 11
    w, (attn_norm, ffn_norm) = _weights(d, H, Hkv, D, dtype, bias, g)
    heads = Heads(H, Hkv, D)
    block = kernels.AttentionBlock.build(w.wqkv, w.bqkv, w.wo, w.bo, attn_norm, ffn_norm, eps)
    assert block is not None, "decode.c did not build here"
    rope = RopeTable(rope_inv_freq(RopeConfig(theta=10000.0), D, "cpu"))
    caches = [KVCache(1, 1, 64, Hkv, D) for _ in range(2)]
    for kv in caches:  # the same history in both (a torch prefill)
        kv.allocate()
        x0 = torch.randn(1, history, d, generator=torch.Generator().manual_seed(5)).to(dtype)
        step = kv.step([0], history, None)
        attention(rms_norm(x0, attn_norm, eps), w, 0, kv, step, heads, rope.lookup(step.positions, torch.float32))
        kv.advance([0], history)
    x = torch.randn(1, 1, d, generator=g).to(dtype)
    want_kv, got_kv = caches
    step = want_kv.step([0], 1, None)
    cos_sin = rope.lookup(step.positions, torch.float32)
    want_x = x + attention(rms_norm(x, attn_norm, eps), w, 0, want_kv, step, heads, cos_sin)
    want_h = rms_norm(want_x, ffn_norm, eps)
    got_x, got_h = block(x, heads, got_kv.row(0, 0), history, cos_sin)
    assert got_x.dtype == got_h.dtype == dtype and got_x.shape == (1, 1, d)
    torch.testing.assert_close(got_x.float(), want_x.float(), atol=ATOL[dtype], rtol=ATOL[dtype])
    torch.testing.assert_close(got_h.float(), want_h.float(), atol=4 * ATOL[dtype], rtol=ATOL[dtype])
    # this token's keys and values were written where the torch path writes them
    for got, want in zip(got_kv.row(0, 0), want_kv.row(0, 0)):
        torch.testing.assert_close(got[:, : history + 1], want[:, : history + 1], atol=ATOL[dtype], rtol=ATOL[dtype])
        assert bool((got[:, history + 1 :] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_dense_ffn_and_head_equal_torch(dtype, relu):
    g = torch.Generator().manual_seed(7)
    d, F_, V = 64, 160, 300
    vectors = torch.randn(F_, 2 if relu else 3, d, generator=g) / d**0.5
    bias = 0.1 * torch.randn(F_, generator=g) if relu else None
    ffn = DenseFFN.from_vectors(vectors, bias, dtype)
    h = torch.randn(1, 1, d, generator=g).to(dtype)
    got = kernels.dense_ffn(h, ffn.w_in, ffn.bias, ffn.w_out, ffn.relu)
    assert got is not None and got.dtype == dtype
    with kernels.torch_only():
        want = ffn(h)
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=ATOL[dtype])
    torch.testing.assert_close(ffn(h), got, atol=0, rtol=0)  # DenseFFN takes the C path for one token

    head = (torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    norm = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    logits = kernels.head(h, norm, 1e-6, head)
    assert logits is not None and logits.dtype == torch.float32 and logits.shape == (1, 1, V)
    torch.testing.assert_close(logits, F.linear(rms_norm(h, norm, 1e-6), head).float(),
                               atol=ATOL[dtype], rtol=ATOL[dtype])


def test_other_shapes_and_devices_keep_the_torch_code():
    d = 32
    w_in, w_out = torch.randn(2 * 48, d), torch.randn(d, 48)
    assert kernels.dense_ffn(torch.randn(1, 2, d), w_in, None, w_out, False) is None  # two tokens
    assert kernels.dense_ffn(torch.randn(1, 1, d, dtype=torch.float64), w_in.double(), None, w_out.double(),
                             False) is None  # no float64 code
    assert kernels.head(torch.randn(2, 1, d), None, 1e-6, torch.randn(10, d)) is None  # two rows
    with kernels.torch_only():
        assert kernels.dense_ffn(torch.randn(1, 1, d), w_in, None, w_out, False) is None
